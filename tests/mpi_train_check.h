// Shared by the multi-rank training tests (tests/test_mpi_train_*.cpp): MPI set-up, a
// deterministic batch source whose global micro-batch order is the same for every
// TP x DP layout, a tiny training run, and the comparison of a rank's weight shards with
// the same slices of a single-process run.
#pragma once
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/batch_source.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "base/rng.h"
#include "core/trainer.h"
#include "kernels/ops.h"
#include "parallel/grid.h"
#include "parallel/mpi_comm.h"
#include "tests/mpi_env.h"
#include "tests/tolerances.h"

namespace difftron::testing {

// Global micro-batch j = (step * accum * dp) + dp_rank * accum + m: a single process with
// accumulation accum * dp sees the same micro-batches in the same order. Random tokens,
// next-token targets, about one target in 9 ignored.
class GlobalOrderBatches : public BatchSource {
 public:
  GlobalOrderBatches(int64_t vocab, uint64_t seed, int dp_rank, int dp, int64_t accum)
      : vocab_(vocab), seed_(seed), r_(dp_rank), dp_(dp), a_(accum) {}
  void next_batch(int64_t B, int64_t S, int32_t* tokens, int32_t* targets) override {
    const int64_t step = calls_ / a_, m = calls_ % a_;
    const uint64_t j = uint64_t(step * a_ * dp_ + r_ * a_ + m);
    ++calls_;
    Rng rng(seed_ * 1000003ull + j);
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int32_t> row(S + 1);
      for (auto& t : row) t = int32_t(rng.below(uint64_t(vocab_)));
      for (int64_t s = 0; s < S; ++s) {
        tokens[b * S + s] = row[s];
        targets[b * S + s] = rng.below(9) == 0 ? -1 : row[s + 1];
      }
    }
  }
  std::string describe() const override { return "global-order test batches"; }

 private:
  int64_t vocab_;
  uint64_t seed_;
  int64_t r_, dp_, a_;
  int64_t calls_ = 0;
};

inline ModelConfig tiny_parallel_config(AttentionKind kind, bool tie) {
  ModelConfig c;
  c.vocab_size = 37;  // padded: to 40 at TP 4 (10 rows a rank), 64 at TP 2 and at TP 1
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.ffn_dim = 64;
  c.max_seq_len = 8;
  c.init_std = 0.1;
  c.attention = kind;
  c.tie_embeddings = tie;
  return c;
}

// The optimizer of the comparisons: AdamW with eps = 1. With the default eps (1e-8) the update
// m / (sqrt(v) + eps) of a parameter whose gradient is near zero is a ratio of two rounding
// noises, so a last-bit gradient difference (another summation order, another OpenBLAS
// kernel) moves that weight by up to ~lr: the weights of two correct runs then differ by an
// amount set by the processor, not by the code. With eps = 1 and gradients clipped to norm 1
// the update is 2-Lipschitz in the gradient history (d/dm = 1/(sqrt(v)+eps) <= 1, and
// |d/dsqrt(v)| = |m|/(sqrt(v)+eps)^2 <= |m| <= 1), so weight differences follow gradient
// differences (see Tolerances). AdamW's per-element update itself is compared bit for bit in
// test_mpi_zero.cpp, and the first micro-batch's gradients under the default settings in
// test_mpi_train_2ranks.cpp.
inline OptimizerConfig tiny_optimizer(int64_t steps) {
  OptimizerConfig o;
  o.eps = 1.0;
  o.lr = 3e-3;
  o.warmup_steps = 1;
  o.total_steps = steps;
  o.weight_decay = 0.1;
  o.grad_clip = 1.0;
  return o;
}

struct RunSpec {
  ModelConfig cfg;
  int64_t steps = 4, batch = 2, seq = 8, accum = 1;  // accum per rank
  uint64_t seed = 17;
};

struct RunResult {
  std::vector<double> losses;
  std::vector<std::vector<float>> weights;  // per parameter, this rank's values
  std::vector<double> grad_norms;
};

// ---- Tolerances (see tests/tolerances.h for the rounding bounds) ---------------------------

// Upper bound on the curvature through which earlier weight differences change later
// gradients: the Hessian norm of these tiny models' loss (weights ~0.1, 2 layers, logits ~0.1,
// the cross-entropy's Hessian in the logits <= 1/2) is O(1); 10 leaves a margin.
constexpr double kCurvatureBound = 10;

struct Tolerances {
  double loss_rel = 0;  // one forward pass, relative to the loss
  double grad_rel = 0;  // forward + backward, relative to a tensor's largest |gradient|
  int64_t n_params = 0;
  OptimizerConfig opt;

  // Largest |weight difference| after `steps` updates of tiny_optimizer: each update moves a
  // weight by lr_t * u_t with u_t 2-Lipschitz in the gradients (see tiny_optimizer), whose
  // difference is at most grad_rel of the clipped gradient (norm <= grad_clip); the
  // difference of earlier steps feeds back through the curvature, a factor (1 + lr ||H||) per
  // step; and each f32 update of a weight |w| <= 1 rounds by u.
  double weight_abs(int64_t steps) const {
    double d = 0;
    for (int64_t t = 0; t < steps; ++t) {
      const double lr = opt.lr_at(t);
      d = d * (1 + 2 * lr * kCurvatureBound) + lr * 2 * grad_rel * opt.grad_clip + 2 * kF32UnitRoundoff;
    }
    return d;
  }
  // |loss difference| at 0-based step t (weights after t updates): rounding of the pass plus
  // the first-order change from the weights, |g . dw| <= ||g||_2 sqrt(N) max|dw|.
  double loss_abs(int64_t t, double loss, double grad_norm) const {
    return loss_rel * loss + grad_norm * std::sqrt(double(n_params)) * weight_abs(t);
  }
  // |gradient norm difference| at step t: rounding plus the curvature times the weight change.
  double grad_norm_abs(int64_t t, double grad_norm) const {
    return grad_rel * grad_norm + kCurvatureBound * std::sqrt(double(n_params)) * weight_abs(t);
  }
};

inline Tolerances tolerances(const RunSpec& spec, int64_t micro_batches_per_step) {
  const ModelConfig& c = spec.cfg;
  const int64_t tokens = spec.batch * spec.seq * micro_batches_per_step;
  Tolerances t;
  t.loss_rel = loss_rel_bound(c, spec.seq, tokens);
  t.grad_rel = grad_rel_bound(c, spec.seq, tokens);
  t.opt = tiny_optimizer(spec.steps);
  auto ops = make_cpu_ops();
  Model shape_only(c, *ops, ModelPrecision::uniform(DType::F32), 1, 1);
  for (const Param& p : shape_only.params()) t.n_params += p.value.numel();
  return t;
}

// Trains spec on `ctx` (null: one process with accumulation accum * dp_for_reference).
inline RunResult run_training(const RunSpec& spec, ParallelContext* ctx, int reference_dp = 1) {
  auto ops = make_cpu_ops();
  ModelParallel mp = ctx ? model_parallel(*ctx) : ModelParallel{};
  Model model(spec.cfg, *ops, ModelPrecision::uniform(DType::F32), spec.batch, spec.seq, mp);
  model.init_weights(spec.seed);
  AdamW opt(tiny_optimizer(spec.steps), model, ctx);
  const int dp = ctx ? ctx->dp_size() : 1;
  const int64_t accum = ctx ? spec.accum : spec.accum * reference_dp;
  GlobalOrderBatches data(spec.cfg.vocab_size, spec.seed, ctx ? ctx->dp_rank() : 0, dp, accum);
  TrainOptions to;
  to.steps = spec.steps;
  to.batch = spec.batch;
  to.seq = spec.seq;
  to.grad_accum = accum;
  to.log_every = 1000;
  Trainer trainer(model, opt, data, nullptr, to, ctx);
  RunResult r;
  trainer.on_step = [&](int64_t, double) { r.grad_norms.push_back(opt.grad_norm()); };
  r.losses = trainer.run().losses;
  for (auto& p : model.params()) {
    std::vector<float> w(p.value.numel());
    ops->download(p.value, w.data());
    r.weights.push_back(std::move(w));
  }
  return r;
}

// This rank's slice of a full tensor (see Param::shard_dim).
inline std::vector<float> shard_of(const std::vector<float>& full, const Param& p) {
  if (p.shard_dim < 0 || int64_t(full.size()) == p.value.numel()) return full;
  const int64_t rows = p.full_shape[0], cols = p.full_shape.size() > 1 ? p.full_shape[1] : 1;
  const int64_t b = p.shard_begin, n = p.value.dim(p.shard_dim);
  std::vector<float> out;
  if (p.shard_dim == 0) return std::vector<float>(full.begin() + b * cols, full.begin() + (b + n) * cols);
  for (int64_t r = 0; r < rows; ++r) out.insert(out.end(), full.begin() + r * cols + b, full.begin() + r * cols + b + n);
  return out;
}

// Largest |a - b| between this rank's weights and the matching slices of the reference.
inline double max_weight_diff(const RunSpec& spec, ParallelContext& ctx, const RunResult& par,
                              const RunResult& ref, std::string* worst = nullptr) {
  auto ops = make_cpu_ops();
  Model shape_only(spec.cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1, model_parallel(ctx));
  double worst_diff = 0;
  for (size_t i = 0; i < shape_only.params().size(); ++i) {
    const Param& p = shape_only.params()[i];
    std::vector<float> want = shard_of(ref.weights[i], p);
    EXPECT_EQ(want.size(), par.weights[i].size()) << p.name;
    for (size_t k = 0; k < want.size() && k < par.weights[i].size(); ++k) {
      const double d = std::abs(double(want[k]) - double(par.weights[i][k]));
      if (d > worst_diff) {
        worst_diff = d;
        if (worst) *worst = p.name + "[" + std::to_string(k) + "]";
      }
    }
  }
  return worst_diff;
}

// Every rank of `group` holds the same bits for the parameters every rank of it holds whole
// (replicated over TP when group is TP; all parameters when group is DP).
inline bool replicas_identical(Communicator& group_host, const RunResult& r, const Model& layout,
                               bool only_replicated) {
  bool same = true;
  auto& params = const_cast<Model&>(layout).params();
  for (size_t i = 0; i < params.size(); ++i) {
    if (only_replicated && params[i].shard_dim >= 0) continue;
    const auto& w = r.weights[i];
    std::vector<double> mine(w.begin(), w.end()), all(w.size() * group_host.size());
    all_gather_host(group_host, mine.data(), all.data(), int64_t(w.size()));
    for (int g = 0; g < group_host.size(); ++g)
      for (size_t k = 0; k < w.size(); ++k) same = same && all[g * w.size() + k] == mine[k];
  }
  return same;
}

}  // namespace difftron::testing
