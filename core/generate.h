// Sampling from a trained model: temperature and top-k over the last position's logits,
// recomputing the whole context each token (simple; a KV cache is future work).
#pragma once
#include <cstdint>
#include <vector>

#include "core/model.h"

namespace difftron {

struct SampleOptions {
  int64_t max_new_tokens = 200;
  double temperature = 0.8;  // <= 0: greedy
  int64_t top_k = 40;        // <= 0: whole vocabulary
  uint64_t seed = 1;
  int32_t stop_token = -1;   // stop after emitting this id (e.g. EOS); -1: never
};

// Returns prompt + generated ids. The context fed to the model is the last max_seq tokens.
std::vector<int32_t> sample(Model& model, const std::vector<int32_t>& prompt, const SampleOptions& o);

}  // namespace difftron
