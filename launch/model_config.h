// The model config that `difftron train` and `difftron plan` build from the model flags and a
// --model_config file, the same way for both (docs/TRAINING.md, "The model config").
//
// Each field's value comes from, first match wins: a model flag given on the command line;
// the file; the flag's default. A value of 0 means what it means for the flag wherever it
// comes from: vocab_size 0 = the dataset's vocabulary, n_kv_heads 0 = n_heads, head_dim and
// ffn_dim 0 = derived from d_model. So a file that leaves out vocab_size takes the dataset's,
// and one that leaves out n_kv_heads gets n_kv_heads = n_heads, exactly as the flags do.
// max_seq_len is at least the run's sequence length (the file's value, if any, when larger).
// The file's keys are ModelConfig's JSON fields (core/config.cpp's to_json, the `model_config`
// of a checkpoint's meta.json); any other key is refused, naming it and the file.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/config.h"

namespace difftron {

struct ModelConfigFile {
  std::string path;                                   // "" when there is no file
  nlohmann::json fields = nlohmann::json::object();  // the keys the file sets
  bool has(const std::string& field) const { return fields.contains(field); }
};

// Reads --model_config's file ("" = none: an empty ModelConfigFile). Throws difftron::Error
// naming the file when it cannot be read or is not one JSON object, and listing every key
// that is not a model config field and every value of the wrong type.
ModelConfigFile read_model_config_file(const std::string& path);

// The resolved and validated config of the model flags and `file` (rules above).
// `data_vocab`: the vocabulary when neither --vocab_size nor the file sets one; `seq`: the
// sequence length the run trains (or plans) at.
ModelConfig model_config_from_flags(const ModelConfigFile& file, int64_t data_vocab, int64_t seq);

// Where an existing model (a checkpoint being resumed, --init_from's weights) differs from
// what the model flags given on the command line and `file` ask for: one line per field
// ("\n  --n_heads=4, <existing> has 2"), "" when nothing differs. Fields neither a given flag
// nor the file sets are not compared. `existing` names the model in the lines.
std::string model_config_conflicts(const ModelConfigFile& file, const ModelConfig& model, int64_t seq,
                                   const std::string& existing);

}  // namespace difftron
