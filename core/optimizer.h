// AdamW over a model's parameters: global-norm gradient clipping, decoupled weight decay
// (by default only on projection matrices: not on norms, lambdas or embeddings), the
// learning-rate schedule of OptimizerConfig, and f32 master weights when the working
// weights are bf16.
#pragma once
#include <cstdint>
#include <vector>

#include "core/config.h"
#include "core/model.h"

namespace difftron {

struct StepStats {
  double lr = 0;
  double grad_norm = 0;   // before clipping
  double clip_scale = 1;  // factor applied to the gradients
};

class AdamW {
 public:
  AdamW(const OptimizerConfig& config, Model& model);
  // Applies one update from the model's accumulated gradients; `step` is 0-based.
  StepStats step(int64_t step);
  // The global L2 norm of the model's gradients.
  double grad_norm();
  bool decays(const Param& p) const;
  const OptimizerConfig& config() const { return cfg_; }

  struct State {
    Tensor master;  // f32 master weights (the param itself when it is f32 or f64)
    Tensor m, v;    // f32 moments
  };
  std::vector<State>& state() { return state_; }

 private:
  OptimizerConfig cfg_;
  Model& model_;
  std::vector<State> state_;
};

}  // namespace difftron
