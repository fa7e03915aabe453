// AdamW over a model's parameters: global-norm gradient clipping, decoupled weight decay
// (by default only on projection matrices: not on norms, lambdas or embeddings), the
// learning-rate schedule of OptimizerConfig, and f32 master weights when the working
// weights are bf16. Given a ParallelContext it runs as ZeRO-1 (core/zero.h) over the
// model's flat buffers: DP-sharded state, bucketed gradient reduce-scatter started from
// the model's backward, and a gradient norm over every TP and DP rank.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/config.h"
#include "core/model.h"

namespace difftron {

struct StepStats {
  double lr = 0;
  double grad_norm = 0;   // before clipping
  double clip_scale = 1;  // factor applied to the gradients
};

class ParallelContext;
class ZeroOptimizer;

// The step's schedule and clipping from the global gradient norm: lr, the norm, the clip
// scale; throws when the norm is not finite (the loss diverged). Shared by AdamW and ZeRO.
StepStats plan_step(const OptimizerConfig& config, int64_t step, double grad_norm);
// The AdamW hyper-parameters of one update (weight decay applied only when `decay`).
AdamWParams adamw_params(const OptimizerConfig& config, const StepStats& stats, int64_t step, bool decay);

class AdamW {
 public:
  // `parallel` null: one process, per-parameter state. Otherwise ZeRO-1 over the context's
  // DP group; the model must have been built with ModelParallel from the same context
  // (see model_parallel() in parallel/grid.h) and hold its initial weights. It installs
  // the model's grads-ready hook.
  AdamW(const OptimizerConfig& config, Model& model, ParallelContext* parallel = nullptr);
  ~AdamW();
  // Applies one update from the model's accumulated gradients; `step` is 0-based.
  StepStats step(int64_t step);
  // The global L2 norm of the model's gradients (ZeRO: of the reduced gradients, after
  // the step's reduction).
  double grad_norm();
  bool decays(const Param& p) const;
  const OptimizerConfig& config() const { return cfg_; }

  struct State {
    Tensor master;  // f32 master weights (the param itself when it is f32 or f64)
    Tensor m, v;    // f32 moments
  };
  // Per-parameter state; throws under ZeRO, whose state is sharded (see zero()).
  std::vector<State>& state();
  ZeroOptimizer* zero() { return zero_.get(); }

 private:
  OptimizerConfig cfg_;
  Model& model_;
  std::vector<State> state_;
  std::unique_ptr<ZeroOptimizer> zero_;
};

}  // namespace difftron
