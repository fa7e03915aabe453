// Training checkpoints (DESIGN.md section 4), sharded and reshardable.
// ROOT/step_00000100/ holds meta.json (format, model config, step, tokens seen, data
// position, the TP x DP layout that wrote it, the file list) and one HDF5 file per rank,
// rank_00000.h5 ... Each file stores the pieces of tensors that rank owned, under the tensor's
// full Hugging Face name, with an index (JSON attribute) saying which elements of the full
// tensor each piece holds and its checksum: f32 master weights (model/...), AdamW moments
// (optim/.../m|v). Every element of every tensor is stored once, so a run can resume on any
// TP x DP layout: each rank assembles the slices it needs from whichever files hold them.
// A checkpoint is written under a temporary name and renamed when every rank has finished;
// ROOT/latest (a one-line file naming the directory) is replaced last, atomically, so a crash
// at any point leaves the previous checkpoint intact and `latest` pointing at a whole one.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

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

// Writes ROOT/step_<step>/ and updates ROOT/latest; returns the checkpoint directory. Every
// rank of `parallel` (null: one process) calls it with its own model/optimizer; the DP ranks'
// data positions are stored per rank. `optimizer` null: weights only (e.g. for export).
std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta, Model& model,
                            AdamW* optimizer, ParallelContext* parallel = nullptr,
                            const std::string& rank_data_position = "");
// The directory ROOT/latest names, or "" when ROOT has no checkpoint yet.
std::string latest_checkpoint(const std::string& root);
// The model config stored in a checkpoint directory.
ModelConfig read_checkpoint_config(const std::string& dir);
// Loads weights (and, when `optimizer` is given, its master weights and moments) into a model
// built from read_checkpoint_config(dir), on whatever TP x DP layout the model and optimizer
// use; verifies every piece's checksum and that every element is present. The returned
// data_position is this DP rank's own when the writing run had the same DP size, else
// DP rank 0's (a global position the token-dataset loader can re-slice for any DP size).
CheckpointMeta load_checkpoint(const std::string& dir, Model& model, AdamW* optimizer,
                               ParallelContext* parallel = nullptr);

}  // namespace difftron
