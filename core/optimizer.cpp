// AdamW step: norm, clip factor, then every parameter's update and bf16 cast in one call
// (Ops::adamw_step_each); or, with a ParallelContext, the same per element on ZeRO-1 shards
// (core/zero.cpp).
#include "core/optimizer.h"

#include <cmath>

#include "parallel/grid.h"
#include "core/zero.h"

namespace difftron {

AdamW::AdamW(const OptimizerConfig& config, Model& model, ParallelContext* parallel)
    : cfg_(config), model_(model) {
  cfg_.validate();
  Ops& ops = model_.ops();
  if (parallel) {
    if (parallel->tp_size() != model_.tp_size())
      throw_error("AdamW: the model is split over ", model_.tp_size(), " TP ranks but the context has ",
                  parallel->tp_size());
    std::vector<FlatSegment> segs;
    for (auto& p : model_.params())
      segs.push_back({p.name, p.flat_offset, p.value.numel(), decays(p), p.shard_dim < 0});
    zero_ = std::make_unique<ZeroOptimizer>(cfg_, ops, *parallel, std::move(segs), model_.flat_values(),
                                            model_.flat_grads());
    ZeroOptimizer* z = zero_.get();
    model_.set_grads_ready_hook([z](int64_t offset) { z->grads_ready(offset); });
    return;
  }
  for (auto& p : model_.params()) {
    State s;
    if (p.value.dtype() == DType::F32 || p.value.dtype() == DType::F64) {
      s.master = p.value;
    } else {
      s.master = ops.empty(p.value.shape(), DType::F32);
      ops.copy(p.value, s.master);
    }
    s.m = ops.empty(p.value.shape(), DType::F32);
    s.v = ops.empty(p.value.shape(), DType::F32);
    ops.fill_zero(s.m);
    ops.fill_zero(s.v);
    state_.push_back(std::move(s));
  }
}

AdamW::~AdamW() {
  if (zero_) model_.set_grads_ready_hook(nullptr);
}

std::vector<AdamW::State>& AdamW::state() {
  if (zero_)
    throw_error("AdamW::state(): under ZeRO the optimizer state is sharded over the DP ranks "
                "(use AdamW::zero())");
  return state_;
}

bool AdamW::decays(const Param& p) const {
  if (p.is_embedding) return cfg_.decay_embeddings;
  if (p.is_matrix) return true;
  return cfg_.decay_norms;
}

double AdamW::grad_norm() {
  if (zero_) return zero_->grad_norm();
  // one synchronisation for all parameters (sum_squares_each), summed in parameter order
  std::vector<Tensor> grads;
  for (auto& p : model_.params()) grads.push_back(p.grad);
  double ss = 0;
  for (double s : model_.ops().sum_squares_each(grads)) ss += s;
  return std::sqrt(ss);
}

StepStats plan_step(const OptimizerConfig& config, int64_t step, double grad_norm) {
  StepStats st;
  st.lr = config.lr_at(step);
  st.grad_norm = grad_norm;
  if (!std::isfinite(grad_norm))
    throw_error("gradient norm is ", grad_norm, " at step ", step,
                " (the loss diverged: lower lr or enable grad_clip)");
  if (config.grad_clip > 0 && grad_norm > config.grad_clip) st.clip_scale = config.grad_clip / grad_norm;
  return st;
}

AdamWParams adamw_params(const OptimizerConfig& config, const StepStats& stats, int64_t step, bool decay) {
  AdamWParams hp;
  hp.lr = float(stats.lr);
  hp.beta1 = float(config.beta1);
  hp.beta2 = float(config.beta2);
  hp.eps = float(config.eps);
  hp.weight_decay = decay ? float(config.weight_decay) : 0.0f;
  hp.step = step + 1;
  hp.grad_scale = float(stats.clip_scale);
  return hp;
}

StepStats AdamW::step(int64_t step) {
  if (zero_) return zero_->step(step);
  const StepStats st = plan_step(cfg_, step, grad_norm());
  auto& params = model_.params();
  std::vector<AdamWTensors> items;
  items.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const State& s = state_[i];
    const bool separate = s.master.raw() != params[i].value.raw();
    items.push_back({s.master, params[i].grad, s.m, s.v, adamw_params(cfg_, st, step, decays(params[i])),
                     separate ? params[i].value : Tensor()});
  }
  model_.ops().adamw_step_each(items);
  return st;
}

}  // namespace difftron
