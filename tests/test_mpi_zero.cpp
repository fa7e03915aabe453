// mpi-ranks: 4
// ZeRO-1 over flat buffers on 4 ranks (DP=4, and TP=2 x DP=2): gradients from
// (seed, rank, step, index) are reduce-scattered bucket by bucket, AdamW runs on each shard,
// weights are all-gathered; after every step the weights must equal, bit for bit, an
// unsharded reference on one rank (gradients summed in rank order, AdamW per segment), and
// the gradient norm the formula (replicated segments counted once over TP).
#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "base/rng.h"
#include "kernels/cpu/reference.h"
#include "kernels/ops.h"
#include "parallel/grid.h"
#include "parallel/mpi_comm.h"
#include "tests/mpi_env.h"
#include "core/zero.h"

namespace difftron {
namespace {

const auto* const kEnv = ::testing::AddGlobalTestEnvironment(new testing::MpiEnv);

float value_of(uint64_t seed, int64_t i) {
  Rng r(seed * 7777 + uint64_t(i));
  return float(0.2 * r.normal());
}
float grad_of(uint64_t seed, int rank, int64_t step, int64_t i) {
  Rng r(seed * 1000003ull + uint64_t(rank) * 65537ull + uint64_t(step) * 257ull + uint64_t(i) * 3ull);
  return float(r.normal() * (1 + (i % 5)));
}

// Segments with padding gaps, sizes that do not line up with buckets or chunks.
std::vector<FlatSegment> make_segments(int64_t& total, int dp) {
  std::vector<FlatSegment> s;
  const int64_t sizes[] = {300, 7, 1, 129, 64, 513, 30, 2, 250};
  int64_t off = 0;
  for (int i = 0; i < 9; ++i) {
    FlatSegment f;
    f.name = "p" + std::to_string(i);
    f.offset = off;
    f.numel = sizes[i];
    f.decay = i % 3 != 1;
    f.replicated = i % 4 == 1;  // p1, p5: every TP rank holds them whole
    s.push_back(f);
    off += (sizes[i] + 15) / 16 * 16;  // alignment padding
  }
  const int64_t g = 64 * dp;
  total = (off + g - 1) / g * g;
  return s;
}

OptimizerConfig opt_config(double clip) {
  OptimizerConfig c;
  c.lr = 1e-2;
  c.warmup_steps = 1;
  c.total_steps = 10;
  c.weight_decay = 0.1;
  c.grad_clip = clip;
  return c;
}

// Runs `steps` ZeRO steps on ctx and compares with the unsharded reference. The TP rank
// seeds the non-replicated segments (each TP rank holds a different shard of them).
// separate_master: f32 master shards beside the working weights (the bf16 path's bookkeeping:
// Ops::adamw_step_each writes each update run's working weights, the padding is copied).
void run_and_compare(ParallelContext& ctx, double clip, int64_t bucket_numel, int steps,
                     bool separate_master = false) {
  auto ops = make_cpu_ops();
  int64_t n = 0;
  auto segs = make_segments(n, ctx.dp_size());
  const int tp = ctx.tp_rank(), P = ctx.dp_size();
  auto seed_of = [&](const FlatSegment& s, int tp_rank) { return s.replicated ? 5u : 100u + tp_rank; };
  Tensor values = ops->empty({n}, DType::F32), grads = ops->empty({n}, DType::F32);
  std::vector<float> ref(n, 0.0f);
  ops->fill_zero(values);
  for (auto& s : segs)
    for (int64_t i = s.offset; i < s.offset + s.numel; ++i) ref[i] = values.data<float>()[i] = value_of(seed_of(s, tp), i);
  OptimizerConfig oc = opt_config(clip);
  ZeroOptions zo;
  zo.bucket_numel = bucket_numel;
  zo.separate_master = separate_master;
  ZeroOptimizer zero(oc, *ops, ctx, segs, values, grads, zo);
  ASSERT_GT(zero.buckets().size(), 1u);

  std::vector<float> m_ref(n, 0.0f), v_ref(n, 0.0f);
  for (int64_t step = 0; step < steps; ++step) {
    // this rank's gradients; the reference sums every DP rank's in rank order
    ops->fill_zero(grads);
    std::vector<float> gsum(n, 0.0f);
    for (auto& s : segs) {
      for (int64_t i = s.offset; i < s.offset + s.numel; ++i) {
        const uint64_t seed = seed_of(s, tp);
        grads.data<float>()[i] = grad_of(seed, ctx.dp_rank(), step, i);
        float acc = grad_of(seed, 0, step, i);
        for (int r = 1; r < P; ++r) acc += grad_of(seed, r, step, i);
        gsum[i] = acc;
      }
    }
    // backward hands over buckets in pieces, from the end
    zero.grads_ready(n - n / 3);
    zero.grads_ready(n / 2);
    StepStats st = zero.step(step);

    // the norm: every TP rank's non-replicated segments, the replicated ones once
    double ss = 0;
    for (auto& s : segs) {
      for (int t = 0; t < ctx.tp_size(); ++t) {
        if (s.replicated && t > 0) continue;
        for (int64_t i = s.offset; i < s.offset + s.numel; ++i) {
          float acc = grad_of(seed_of(s, t), 0, step, i);
          for (int r = 1; r < P; ++r) acc += grad_of(seed_of(s, t), r, step, i);
          ss += double(acc) * acc;
        }
      }
    }
    const double norm = std::sqrt(ss);
    ASSERT_NEAR(st.grad_norm, norm, 1e-12 * norm) << "step " << step;
    const double scale = clip > 0 && norm > clip ? clip / norm : 1.0;
    ASSERT_NEAR(st.clip_scale, scale, 1e-12);
    for (auto& s : segs) {
      cpu::adamw_step<float, float>(ref.data() + s.offset, gsum.data() + s.offset, m_ref.data() + s.offset,
                                    v_ref.data() + s.offset, s.numel, float(oc.lr_at(step)), float(oc.beta1),
                                    float(oc.beta2), float(oc.eps), s.decay ? float(oc.weight_decay) : 0.0f,
                                    step + 1, float(st.clip_scale));
    }
    int64_t mismatches = 0;
    for (auto& s : segs)
      for (int64_t i = s.offset; i < s.offset + s.numel; ++i)
        mismatches += values.data<float>()[i] != ref[i];
    ASSERT_EQ(mismatches, 0) << "step " << step << ": weights differ from the unsharded reference";
  }
}

TEST(Zero, FourWayDataParallelEqualsUnshardedAdamW) {
  auto ctx = testing::test_grid(1, 4);
  run_and_compare(*ctx, 0.0, 512, 3);    // no clipping
  run_and_compare(*ctx, 5.0, 256, 3);    // clipped (the norms are far above 5)
}

TEST(Zero, TwoByTwoGridCountsReplicatedSegmentsOnce) {
  auto ctx = testing::test_grid(2, 2);
  run_and_compare(*ctx, 5.0, 128, 3);
}

// The weights reach the working buffer through the update runs' own writes (no per-bucket
// copy): every parameter element of every chunk must still come out as the reference's.
TEST(Zero, SeparateMastersWriteEveryWorkingWeight) {
  auto dp4 = testing::test_grid(1, 4);
  run_and_compare(*dp4, 5.0, 256, 3, true);
  auto grid = testing::test_grid(2, 2);
  run_and_compare(*grid, 0.0, 128, 3, true);
}

TEST(Zero, BucketsStartOnlyWhenReady) {
  auto ctx = testing::test_grid(1, 4);
  auto ops = make_cpu_ops();
  const int64_t n = 4 * 64 * 4;  // four buckets of 256
  std::vector<FlatSegment> segs{{"w", 0, n, true, false}};
  Tensor values = ops->empty({n}, DType::F32), grads = ops->empty({n}, DType::F32);
  ops->fill_zero(values);
  for (int64_t i = 0; i < n; ++i) grads.data<float>()[i] = float(ctx->dp_rank() + 1);  // sum = 10
  ZeroOptions zo;
  zo.bucket_numel = 256;
  ZeroOptimizer zero(opt_config(0), *ops, *ctx, segs, values, grads, zo);
  ASSERT_EQ(zero.buckets().size(), 4u);
  EXPECT_EQ(zero.buckets()[0].begin, 768);  // bucket 0 is the tail
  zero.grads_ready(600);                    // only [768, 1024) is complete
  const int64_t c = 64, r = ctx->dp_rank();
  for (int b = 0; b < 4; ++b) {
    const float want = b == 0 ? 10.0f : float(r + 1);
    EXPECT_EQ(grads.data<float>()[zero.buckets()[b].begin + r * c], want) << "bucket " << b;
  }
  zero.finish_grads();
  for (int b = 0; b < 4; ++b) EXPECT_EQ(grads.data<float>()[zero.buckets()[b].begin + r * c], 10.0f);
  EXPECT_EQ(zero.shard_numel(), n / 4);
}

TEST(Zero, RejectsBuffersNotDivisibleByDp) {
  auto ctx = testing::test_grid(1, 4);
  auto ops = make_cpu_ops();
  Tensor values = ops->empty({10}, DType::F32), grads = ops->empty({10}, DType::F32);
  try {
    ZeroOptimizer zero(opt_config(0), *ops, *ctx, {}, values, grads);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multiple of the DP size (4)"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace difftron
