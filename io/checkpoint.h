// Training checkpoints (DESIGN.md section 4): ROOT/step_00000100/ holds meta.json (model
// config, step, tokens seen, data position, layout, per-tensor checksums) and tensors.h5
// (f32 master weights under their Hugging Face names, AdamW moments under optim/<name>/m|v,
// each dataset with a `slice` attribute giving the rows it holds of the full tensor).
// A checkpoint is written under a temporary name and renamed when complete; ROOT/latest
// (a one-line file naming the directory) is replaced last, atomically, so a crash at any
// point leaves the previous checkpoint intact and `latest` pointing at a whole one.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/model.h"
#include "core/optimizer.h"

namespace difftron {

struct CheckpointMeta {
  int64_t step = 0;            // optimizer steps completed
  int64_t tokens_seen = 0;
  uint64_t seed = 0;
  std::string data_position;   // BatchSource::position() of the training data
  nlohmann::json extra;        // free-form (flags of the run, tokenizer spec, ...)
};

// Writes ROOT/step_<step>/ and updates ROOT/latest; returns the checkpoint directory.
// `optimizer` may be null (weights only, e.g. for export).
std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta, Model& model,
                            AdamW* optimizer);
// The directory ROOT/latest names, or "" when ROOT has no checkpoint yet.
std::string latest_checkpoint(const std::string& root);
// The model config stored in a checkpoint directory.
ModelConfig read_checkpoint_config(const std::string& dir);
// Loads weights (and, when `optimizer` is given, its moments and master weights) into a
// model built from read_checkpoint_config(dir); verifies every tensor's checksum.
CheckpointMeta load_checkpoint(const std::string& dir, Model& model, AdamW* optimizer);

}  // namespace difftron
