// Import from and export to Hugging Face transformers' DiffLlama (model_type "diffllama":
// config.json + model.safetensors). Conventions differ from difftron's (docs/MODEL.md section 2):
// HF counts 2h single-map heads and puts map 2 of every differential head in the second half
// of q_proj/k_proj/v_proj rows; difftron interleaves the two maps per head. HF's sub-layer norm
// has no weight, so export folds w_sub into the matching o_proj columns and import sets it to 1.
#pragma once
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "core/config.h"
#include "core/model.h"

namespace difftron {

// DiffLlama config.json -> ModelConfig; throws difftron::Error naming the field at fault.
ModelConfig model_config_from_hf(const nlohmann::json& hf, const std::string& source);
nlohmann::json hf_config_from_model(const ModelConfig& c);
ModelConfig read_hf_config(const std::string& dir);

// Loads dir/model.safetensors into `model` (built from read_hf_config(dir)).
void import_hf_diffllama(const std::string& dir, Model& model);
// Writes dir/config.json and dir/model.safetensors (f32), creating dir.
void export_hf_diffllama(Model& model, const std::string& dir);

}  // namespace difftron
