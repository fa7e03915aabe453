// What `generate` and `eval` share (defined in tools/generate.cpp): the backend chosen by
// --device, and a model with its tokenizer loaded from --checkpoint or --from_hf.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/model.h"
#include "io/tokenizer.h"

namespace difftron {

struct LoadedModel {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;  // null: none recorded (synthetic data)
  std::string source;                    // the checkpoint directory or the HF folder
};

// --device: cpu, cuda or auto.
std::unique_ptr<Ops> make_ops_for_device();
// The model of --checkpoint or --from_hf (one of them), for batches of up to max_batch x
// max_seq tokens (max_seq capped at the model's max_seq_len), in f32 on the CPU and bf16 on the
// GPU; refuses one that does not fit the host's memory.
LoadedModel load_model_for_inference(Ops& ops, int64_t max_batch, int64_t max_seq);

}  // namespace difftron
