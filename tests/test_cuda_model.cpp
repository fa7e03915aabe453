// The whole model on the GPU in bf16 mixed precision (ModelPrecision::cuda_mixed) against
// the CPU f32 reference started from the same (bf16-rounded) weights: the loss and every
// parameter gradient of one micro-batch, for the differential and the baseline model; the
// loss curve of 20 AdamW steps; two GPU runs with the same seed giving bit-identical losses;
// and the fused attention's kept state (Model::keep_attention_state, on by default) against
// the path without it. Exits 77 (skipped) when no GPU is present.
#include <unistd.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "base/rng.h"
#include "io/checkpoint.h"
#include "kernels/ops.h"

namespace difftron {
namespace {

constexpr int64_t kB = 2, kS = 24, kSteps = 20;

void skip_without_gpu() {
  if (!cuda_available()) {
    std::fprintf(stderr, "test_cuda_model: no GPU visible (cuda_available() is false): skipping\n");
    std::exit(77);
  }
}

ModelConfig tiny_config(AttentionKind kind) {
  ModelConfig c;
  c.vocab_size = 61;  // padded to 64: the padding columns masked on the GPU too
  c.d_model = 64;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;  // GQA
  c.max_seq_len = 32;
  c.attention = kind;
  return c;
}

// Sequences s -> (a + c s) mod V with per-sequence a and c in [1, 4]: the next token is
// predictable from context. A few targets are ignored (-1).
struct Batch {
  std::vector<int32_t> tokens, targets;
};
Batch make_batch(Rng& rng, int64_t V) {
  Batch b;
  b.tokens.resize(kB * kS);
  b.targets.resize(kB * kS);
  for (int64_t i = 0; i < kB; ++i) {
    const int64_t a = int64_t(rng.below(V)), c = 1 + int64_t(rng.below(4));
    for (int64_t s = 0; s < kS; ++s) {
      b.tokens[i * kS + s] = int32_t((a + c * s) % V);
      b.targets[i * kS + s] = s == kS - 1 || s % 11 == 5 ? -1 : int32_t((a + c * (s + 1)) % V);
    }
  }
  return b;
}

std::vector<double> host_values(Ops& ops, const Tensor& t) {
  std::vector<double> v(t.numel());
  ops.download(t, v.data());
  return v;
}

// Gives the CPU model the GPU model's (bf16) weights.
void copy_weights(Model& gpu, Model& cpu) {
  ASSERT_EQ(gpu.params().size(), cpu.params().size());
  for (size_t i = 0; i < gpu.params().size(); ++i) {
    std::vector<double> w = host_values(gpu.ops(), gpu.params()[i].value);
    cpu.ops().upload(cpu.params()[i].value, w.data());
  }
}

double rel_err(const std::vector<double>& a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Relative tolerance of a GPU gradient against the CPU's. bf16 (unit roundoff 2^-9, a few
// roundings deep): under 3e-2 (seen 4e-3..1e-2). Not for the lambda vectors in bf16: their
// gradient is (d loss / d lambda) times a fixed vector, and d loss / d lambda sums terms over
// every query, key and head that cancel to 1-5% of their magnitude, so bf16 activation noise
// makes it differ from the f32 CPU's by 10-100% (measured on the H200, 2026-12-01) with no
// error in the code: in bf16 they are reported, not checked. Their math is checked on the
// GPU where rounding is small: the fused kernel's dlambda against the CPU on identical inputs
// (test_cuda_diff_flash), and the whole model in f32 below (LambdaGradientsMatchTheCpuInF32).
constexpr double kBf16GradTol = 3e-2;
// V1's lambda vectors (not V2's lambda_proj, an ordinary projection)
bool ill_conditioned_in_bf16(const std::string& name) {
  return name.find(".lambda_") != std::string::npos && name.find("lambda_proj") == std::string::npos;
}

OptimizerConfig optimizer_config() {
  OptimizerConfig oc;
  oc.lr = 3e-3;
  oc.warmup_steps = 0;
  oc.total_steps = kSteps;
  oc.schedule = LrSchedule::Constant;
  oc.weight_decay = 0.05;
  oc.grad_clip = 1.0;
  return oc;
}

std::vector<double> train(Model& m, const std::vector<Batch>& batches) {
  AdamW opt(optimizer_config(), m);
  std::vector<double> losses;
  for (int64_t step = 0; step < int64_t(batches.size()); ++step) {
    m.zero_grads();
    losses.push_back(m.forward_backward(batches[step].tokens.data(), batches[step].targets.data(),
                                        kB, kS));
    opt.step(step);
  }
  return losses;
}

class CudaModel : public ::testing::TestWithParam<AttentionKind> {};

// One micro-batch's loss and gradients on the GPU (precision `prec`) against the CPU in f32,
// from the same weights; returns the relative error of all gradients together.
double compare_gradients(AttentionKind kind, ModelPrecision prec, double tol) {
  auto gpu_ops = make_cuda_ops(0);
  auto cpu_ops = make_cpu_ops();
  const ModelConfig cfg = tiny_config(kind);
  const bool bf16 = prec.act == DType::BF16;
  Model gpu(cfg, *gpu_ops, prec, kB, kS);
  Model cpu(cfg, *cpu_ops, ModelPrecision::uniform(DType::F32), kB, kS);
  gpu.init_weights(7);
  copy_weights(gpu, cpu);
  Rng rng(11);
  Batch b = make_batch(rng, cfg.vocab_size);
  gpu.zero_grads();
  cpu.zero_grads();
  const double lg = gpu.forward_backward(b.tokens.data(), b.targets.data(), kB, kS);
  const double lc = cpu.forward_backward(b.tokens.data(), b.targets.data(), kB, kS);
  std::printf("%s %s: loss gpu %.6f cpu %.6f rel %.2e\n", attention_kind_name(cfg.attention), bf16 ? "bf16" : "f32",
              lg, lc, std::fabs(lg - lc) / lc);
  EXPECT_NEAR(lg, lc, (bf16 ? 2e-3 : tol) * lc);
  std::vector<double> all_g, all_c;
  for (size_t i = 0; i < gpu.params().size(); ++i) {
    const Param& pg = gpu.params()[i];
    const auto g = host_values(*gpu_ops, pg.grad), c = host_values(*cpu_ops, cpu.params()[i].grad);
    const double err = rel_err(g, c);
    const bool checked = !(bf16 && ill_conditioned_in_bf16(pg.name));
    double norm = 0;
    for (double x : c) norm += x * x;
    std::printf("  %-50s |grad| %.3e rel err %.2e%s\n", pg.name.c_str(), std::sqrt(norm), err,
                !checked ? "  (not checked in bf16)" : err <= tol ? "" : "  FAIL");
    if (checked) EXPECT_LE(err, tol) << pg.name;
    all_g.insert(all_g.end(), g.begin(), g.end());
    all_c.insert(all_c.end(), c.begin(), c.end());
  }
  const double total = rel_err(all_g, all_c);
  std::printf("  all gradients: rel err %.2e\n", total);
  return total;
}

TEST_P(CudaModel, LossAndEveryGradientMatchTheCpu) {
  skip_without_gpu();
  EXPECT_LE(compare_gradients(GetParam(), ModelPrecision::cuda_mixed(), kBf16GradTol), 1.5e-2);  // seen: 5e-3
}

// f32 on the GPU: the same sums as the CPU in another order, so every gradient, the lambda
// vectors' included (cancellation to ~1% of the terms' size amplifies the 2^-24 rounding of
// sums of a few thousand terms to ~1e-5), agrees within 1e-3.
TEST_P(CudaModel, LambdaGradientsMatchTheCpuInF32) {
  skip_without_gpu();
  compare_gradients(GetParam(), ModelPrecision::uniform(DType::F32), 1e-3);
}

TEST_P(CudaModel, TrainingFollowsTheCpuAndRepeatsBitForBit) {
  skip_without_gpu();
  auto gpu_ops = make_cuda_ops(0);
  auto cpu_ops = make_cpu_ops();
  const ModelConfig cfg = tiny_config(GetParam());
  Rng rng(23);
  std::vector<Batch> batches;
  // One batch, seen every step: the loss falls steadily (about 4.1 -> 1.3 on the CPU), so the
  // curves are compared over a wide range of losses.
  const Batch one = make_batch(rng, cfg.vocab_size);
  for (int64_t i = 0; i < kSteps; ++i) batches.push_back(one);

  auto gpu_run = [&] {
    Model gpu(cfg, *gpu_ops, ModelPrecision::cuda_mixed(), kB, kS);
    gpu.init_weights(5);
    return train(gpu, batches);
  };
  std::vector<double> g1 = gpu_run();
  std::vector<double> g2 = gpu_run();

  Model gpu_init(cfg, *gpu_ops, ModelPrecision::cuda_mixed(), kB, kS);
  gpu_init.init_weights(5);
  Model cpu(cfg, *cpu_ops, ModelPrecision::uniform(DType::F32), kB, kS);
  copy_weights(gpu_init, cpu);
  std::vector<double> c = train(cpu, batches);

  std::printf("%s: step   gpu loss    cpu loss    rel diff\n", attention_kind_name(cfg.attention));
  for (int64_t s = 0; s < kSteps; ++s) {
    const double rel = std::fabs(g1[s] - c[s]) / c[s];
    std::printf("      %4lld   %.6f   %.6f   %.2e\n", (long long)s, g1[s], c[s], rel);
    // seen on the H200: at most 5.3e-3 relative
    EXPECT_LE(std::fabs(g1[s] - c[s]), 1.5e-2 * c[s] + 5e-3) << "step " << s;
  }
  EXPECT_LT(c.back(), 0.6 * c.front()) << "the CPU reference did not learn: the comparison is vacuous";
  EXPECT_EQ(0, std::memcmp(g1.data(), g2.data(), g1.size() * sizeof(double)))
      << "two GPU runs with the same seed gave different losses";
  for (int64_t s = 0; s < kSteps; ++s)
    if (g1[s] != g2[s]) std::printf("  step %lld: %.17g vs %.17g\n", (long long)s, g1[s], g2[s]);
}

// head_dim 64, where the fused flash kernels run and the backend keeps O2n between forward
// and backward: the default (kept) and keep_attention_state(false) (recomputed) both match the
// CPU, and each other to bf16 rounding (D2' for dS_2 comes from the bf16 O2n or is recomputed;
// dlambda is summed from recomputed f32 values either way; the forward's O is the same).
TEST(CudaModelAttentionState, KeptAndRecomputedMatchTheCpu) {
  skip_without_gpu();
  auto gpu_ops = make_cuda_ops(0);
  auto cpu_ops = make_cpu_ops();
  ModelConfig cfg = tiny_config(AttentionKind::Differential);
  cfg.head_dim = 64;
  Model kept(cfg, *gpu_ops, ModelPrecision::cuda_mixed(), kB, kS);  // the default: kept
  Model recomputed(cfg, *gpu_ops, ModelPrecision::cuda_mixed(), kB, kS);
  recomputed.keep_attention_state(false);
  Model cpu(cfg, *cpu_ops, ModelPrecision::uniform(DType::F32), kB, kS);
  kept.init_weights(7);
  recomputed.init_weights(7);
  copy_weights(kept, cpu);
  Rng rng(13);
  Batch b = make_batch(rng, cfg.vocab_size);
  double loss[3];
  Model* models[3] = {&kept, &recomputed, &cpu};
  for (int m = 0; m < 3; ++m) {
    models[m]->zero_grads();
    loss[m] = models[m]->forward_backward(b.tokens.data(), b.targets.data(), kB, kS);
  }
  std::printf("loss kept %.6f recomputed %.6f cpu %.6f\n", loss[0], loss[1], loss[2]);
  EXPECT_NEAR(loss[0], loss[1], 1e-5 * loss[2]);
  EXPECT_NEAR(loss[0], loss[2], 2e-3 * loss[2]);
  std::vector<double> all[3];
  for (size_t i = 0; i < kept.params().size(); ++i) {
    const std::string& name = kept.params()[i].name;
    std::vector<double> g[3];
    for (int m = 0; m < 3; ++m) {
      g[m] = host_values(models[m]->ops(), models[m]->params()[i].grad);
      all[m].insert(all[m].end(), g[m].begin(), g[m].end());
    }
    const double e_kept = rel_err(g[0], g[2]), e_rec = rel_err(g[1], g[2]);
    const double e_pair = rel_err(g[0], g[1]);
    std::printf("  %-50s rel err kept %.2e recomputed %.2e kept-recomputed %.2e\n", name.c_str(),
                e_kept, e_rec, e_pair);
    // kept vs recomputed: the same bf16 inputs; they differ only in D2' (from the bf16 O2n or
    // recomputed), every gradient within kBf16GradTol but the lambda vectors': layer 0's dlambda
    // is a cancelling sum over dO, which layer 1's two D2' paths make differ at bf16 rounding
    // (on the H200: 16% apart once the residual adds ran as one GEMM with a C input, 0.487 /
    // 0.559 against the CPU; their f32 form is checked to 1e-3 by the f32 model test above)
    if (!ill_conditioned_in_bf16(name)) {  // against the f32 CPU: see kBf16GradTol
      EXPECT_LE(e_kept, kBf16GradTol) << name << " (kept)";
      EXPECT_LE(e_rec, kBf16GradTol) << name << " (recomputed)";
      EXPECT_LE(e_pair, kBf16GradTol) << name << " (kept vs recomputed)";
    }
  }
  const double t_kept = rel_err(all[0], all[2]), t_rec = rel_err(all[1], all[2]);
  const double t_pair = rel_err(all[0], all[1]);
  std::printf("  all gradients: rel err kept %.2e recomputed %.2e kept-recomputed %.2e\n", t_kept,
              t_rec, t_pair);
  EXPECT_LE(t_kept, 1.5e-2);
  EXPECT_LE(t_rec, 1.5e-2);
  EXPECT_LE(t_pair, 1.5e-2);
}

// Checkpoints of a GPU model: the asynchronous save (raw copies into pinned memory) writes
// exactly what the synchronous one does, and a model and optimizer loaded from it (raw
// uploads of the f32 state) continue bit for bit like the original.
TEST(CudaModelCheckpoint, AsyncSaveAndLoadContinueBitForBit) {
  skip_without_gpu();
  auto ops = make_cuda_ops(0);
  const ModelConfig cfg = tiny_config(AttentionKind::Differential);
  Rng rng(31);
  const Batch b = make_batch(rng, cfg.vocab_size);
  auto step = [&](Model& m, AdamW& opt, int64_t s) {
    m.zero_grads();
    const double l = m.forward_backward(b.tokens.data(), b.targets.data(), kB, kS);
    opt.step(s);
    return l;
  };
  Model a(cfg, *ops, ModelPrecision::cuda_mixed(), kB, kS);
  a.init_weights(3);
  AdamW opt_a(optimizer_config(), a);
  for (int64_t s = 0; s < 3; ++s) step(a, opt_a, s);
  const std::string root = ::testing::TempDir() + "difftron_cuda_ckpt_" + std::to_string(getpid());
  CheckpointMeta meta;
  meta.step = 3;
  std::string async_dir, sync_dir;
  {
    AsyncCheckpointer ck;
    ck.start(root + "/async", meta, a, &opt_a);
    async_dir = ck.wait();
  }
  sync_dir = save_checkpoint(root + "/sync", meta, a, &opt_a);
  EXPECT_EQ(checkpoint_digests(async_dir), checkpoint_digests(sync_dir));
  Model c(cfg, *ops, ModelPrecision::cuda_mixed(), kB, kS);
  c.init_weights(99);
  AdamW opt_c(optimizer_config(), c);
  EXPECT_EQ(load_checkpoint(async_dir, c, &opt_c).step, 3);
  for (size_t i = 0; i < a.params().size(); ++i)
    EXPECT_EQ(host_values(*ops, a.params()[i].value), host_values(*ops, c.params()[i].value)) << a.params()[i].name;
  for (int64_t s = 3; s < 6; ++s) EXPECT_EQ(step(a, opt_a, s), step(c, opt_c, s)) << "step " << s;
  std::filesystem::remove_all(root);
}

INSTANTIATE_TEST_SUITE_P(Attention, CudaModel,
                         ::testing::Values(AttentionKind::Differential, AttentionKind::Standard,
                                           AttentionKind::DifferentialV2),
                         [](const auto& info) {
                           return std::string(attention_kind_name(info.param));
                         });

}  // namespace
}  // namespace difftron
