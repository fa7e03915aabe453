// Training checkpoints, sharded and reshardable (docs/CHECKPOINTS.md has the format).
// ROOT/step_00000100/ holds meta.json (format, model config, step, tokens seen, data
// position, the TP x DP layout that wrote it, the file list) and one HDF5 file per rank,
// rank_00000.h5 ... Each file stores the pieces of tensors that rank owned (named shard
// descriptors, core/checkpoint_state.h), under the tensor's full Hugging Face name, with an
// index dataset saying which elements of the full tensor each piece holds and its checksums:
// f32 master weights (w), AdamW moments (m, v). Every element of every tensor is stored once,
// so a run can resume on any TP x DP layout: each rank assembles the slices it needs.
//
// Durability: every rank writes, closes (checked) and fsyncs its file in ROOT/.tmp.step_N;
// the ranks agree that all succeeded; rank 0 then writes meta.json, fsyncs, swaps the
// directory into place and replaces ROOT/latest atomically (fsynced). Any failure throws
// difftron::Error naming the file and the OS error on every rank and leaves `latest` on the
// previous checkpoint. Readers treat files as untrusted: every index entry is checked against
// the model and the file's real size before anything is allocated.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/checkpoint_state.h"
#include "core/model.h"
#include "core/optimizer.h"

namespace difftron {

class ParallelContext;

struct CheckpointMeta {
  int64_t step = 0;            // optimizer steps completed
  int64_t tokens_seen = 0;
  uint64_t seed = 0;
  std::string data_position;   // BatchSource::position() of the training data (DP rank 0's)
  nlohmann::json extra;        // free-form (flags of the run, tokenizer spec, ...)
};

// Writes ROOT/step_<step>/ from this rank's pieces (collective over `parallel`; null: one
// process) and updates ROOT/latest; returns the checkpoint directory. `model_config` is
// stored in meta.json; `rank_data_position` is this rank's data position.
std::string write_checkpoint(const std::string& root, const CheckpointMeta& meta, const nlohmann::json& model_config,
                             const std::vector<ShardPiece>& pieces, bool has_optimizer, Ops& ops,
                             ParallelContext* parallel, int tp_rank, int dp_rank,
                             const std::string& rank_data_position);
// The same for a model and its optimizer (null: weights only, e.g. for export).
std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta, Model& model,
                            AdamW* optimizer, ParallelContext* parallel = nullptr,
                            const std::string& rank_data_position = "");
// The directory ROOT/latest names, or "" when ROOT has no checkpoint yet.
std::string latest_checkpoint(const std::string& root);
// The model config stored in a checkpoint directory.
ModelConfig read_checkpoint_config(const std::string& dir);
// meta.json of a checkpoint directory, checked for format and version.
nlohmann::json read_checkpoint_meta(const std::string& dir);
// Fills `pieces` from a checkpoint (each array by its kind; "m"/"v" only when has_optimizer),
// verifying checksums and that every element is present.
void read_checkpoint_pieces(const std::string& dir, const std::vector<ShardPiece>& pieces, bool with_optimizer,
                            Ops& ops);
// Loads weights (and, when `optimizer` is given, its master weights and moments) into a model
// built from read_checkpoint_config(dir), on whatever TP x DP layout the model and optimizer
// use. The returned data_position is this DP rank's own when the writing run had the same DP
// size, else DP rank 0's (a global position the token-dataset loader can re-slice).
CheckpointMeta load_checkpoint(const std::string& dir, Model& model, AdamW* optimizer,
                               ParallelContext* parallel = nullptr);
// Every array's checksum in a checkpoint, keyed "file:group/kind": two checkpoints of the same
// layout hold bit-identical tensors exactly when these maps are equal.
std::map<std::string, std::string> checkpoint_digests(const std::string& dir);
// Removes all but the newest `keep` step_* directories under ROOT (never the one `latest`
// names); returns how many were removed.
int prune_checkpoints(const std::string& root, int keep);

}  // namespace difftron
