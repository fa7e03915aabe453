// Import from and export to Hugging Face transformers' model folders: DiffLlama (model_type
// "diffllama") for differential attention, Llama (model_type "llama") for the baseline
// (`attention=standard`). A folder is config.json plus model.safetensors, or shards listed by
// model.safetensors.index.json (io/safetensors.h).
//
// Differential Transformer V2 (`attention=diff_v2`) has no transformers class: its folder has
// the same layout under difftron's own model_type "difftron_diff_v2" (architecture
// "DifftronDiffV2ForCausalLM", which no transformers class claims), the tensors under their
// checkpoint names, unpermuted, and a config.json whose fields are all difftron's (import
// refuses any other field by name). io/hf_export.h adds a README.md; docs/EXPORT.md.
//
// DiffLlama's conventions differ from difftron's (docs/MODEL.md section 2): HF counts 2h
// single-map heads and puts map 2 of every differential head in the second half of
// q_proj/k_proj/v_proj rows; difftron interleaves the two maps per head. HF's sub-layer norm
// has no weight, so export folds w_sub into the matching o_proj columns and import sets it to 1.
// The baseline's 2h heads over 2h_kv K/V heads (query head i reads K/V head i / (h / h_kv))
// are Llama's own order, so its tensors map one to one.
//
// Import refuses, naming the field and its value, every config field that would change the
// computation and that difftron does not implement (hidden_act, biases, RoPE scaling, ...).
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "core/config.h"
#include "core/model.h"
#include "io/safetensors.h"

namespace difftron {

// Token ids a folder declares (config.json, generation_config.json); -1 = none.
struct HfSpecialTokens {
  int64_t bos = -1;
  int64_t eos = -1;
  int64_t pad = -1;
};

inline constexpr const char* kHfDiffV2ModelType = "difftron_diff_v2";
inline constexpr const char* kHfDiffV2Architecture = "DifftronDiffV2ForCausalLM";

// "diffllama" for differential attention, "llama" for the baseline, "difftron_diff_v2" for V2.
const char* hf_model_type(const ModelConfig& c);

// config.json (model_type diffllama, llama or difftron_diff_v2) -> ModelConfig; throws
// difftron::Error naming the field at fault, or listing every unsupported field with its value
// (for difftron_diff_v2 also every field its config does not have).
ModelConfig model_config_from_hf(const nlohmann::json& hf, const std::string& source);
nlohmann::json hf_config_from_model(const ModelConfig& c, const HfSpecialTokens& tokens = {},
                                    StoreDType dtype = StoreDType::F32);
ModelConfig read_hf_config(const std::string& dir);

// Loads the folder's weights into `model` (built from read_hf_config(dir)). Refuses tensors
// the model has no place for (e.g. biases) rather than dropping them, and a missing tensor or
// one whose shape disagrees with config.json, naming the weight file and the tensor.
void import_hf_model(const std::string& dir, Model& model);

struct HfExportOptions {
  StoreDType dtype = StoreDType::F32;
  int64_t max_shard_bytes = 5000000000;  // transformers' default max_shard_size, "5GB"
  HfSpecialTokens tokens;                // written into config.json
};
// Writes dir/config.json and the weights (one file or shards + index), creating dir.
// Returns the names of the files written.
std::vector<std::string> export_hf_model(Model& model, const std::string& dir, const HfExportOptions& opt = {});

}  // namespace difftron
