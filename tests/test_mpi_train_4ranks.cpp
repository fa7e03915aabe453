// mpi-ranks: 4
// Four ranks: TP=2 x DP=2, DP=4 with 2 micro-batches of accumulation per rank, and TP=4
// train like one process (with 2 x 1, 4 x 2 and 1 x 1 micro-batches per step): losses of
// 4 steps and final weights within derived tolerances; the first loss of the pure-DP run
// exact up to the order of its DP sum; TP-replicated parameters bit-identical across TP ranks and every parameter
// bit-identical across DP replicas.
#include <cstdio>

#include "tests/mpi_train_check.h"

namespace difftron {
namespace {

using namespace difftron::testing;
const auto* const kEnv = ::testing::AddGlobalTestEnvironment(new MpiEnv);

// Tolerances from tolerances() in tests/mpi_train_check.h (each test prints what it measured).

std::unique_ptr<ParallelContext> grid(int tp, int dp) { return test_grid(tp, dp); }

void check_run(const char* what, const RunSpec& spec, ParallelContext& ctx, bool first_loss_exact) {
  const Tolerances tol = tolerances(spec, spec.accum * ctx.dp_size());
  RunResult ref = run_training(spec, nullptr, ctx.dp_size());
  RunResult par = run_training(spec, &ctx);
  ASSERT_EQ(par.losses.size(), ref.losses.size());
  double worst_loss = 0;
  for (size_t i = 0; i < ref.losses.size(); ++i) {
    EXPECT_NEAR(par.losses[i], ref.losses[i], tol.loss_abs(i, ref.losses[i], ref.grad_norms[i])) << what << " step " << i;
    EXPECT_NEAR(par.grad_norms[i], ref.grad_norms[i], tol.grad_norm_abs(i, ref.grad_norms[i])) << what << " step " << i;
    worst_loss = std::max(worst_loss, std::abs(par.losses[i] - ref.losses[i]) / ref.losses[i]);
  }
  // The first step's micro-batch losses are the same computations in both runs; only their
  // double-precision sum over the DP ranks may run in another order (2 gamma_dp in double).
  if (first_loss_exact)
    EXPECT_NEAR(par.losses[0], ref.losses[0], 2.0 * ctx.dp_size() * 0x1p-53 * ref.losses[0]) << what;
  std::string where;
  const double wd = max_weight_diff(spec, ctx, par, ref, &where);
  EXPECT_LE(wd, tol.weight_abs(spec.steps)) << what << " at " << where;
  std::printf("[rank %d] %s: max |loss - single| / loss = %.3g, max |weight - single| = %.3g (bound %.3g)\n",
              ctx.world_rank(), what, worst_loss, wd, tol.weight_abs(spec.steps));
  auto ops = make_cpu_ops();
  Model layout(spec.cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1, model_parallel(ctx));
  EXPECT_TRUE(replicas_identical(ctx.tp_host(), par, layout, true)) << what << ": TP replicas differ";
  EXPECT_TRUE(replicas_identical(ctx.dp_host(), par, layout, false)) << what << ": DP replicas differ";
}

TEST(ParallelTraining4, TensorParallel2xDataParallel2) {
  auto ctx = grid(2, 2);
  RunSpec spec;
  spec.cfg = tiny_parallel_config(AttentionKind::Differential, false);
  check_run("TP=2 x DP=2", spec, *ctx, false);
}

TEST(ParallelTraining4, DataParallel4WithAccumulation) {
  auto ctx = grid(1, 4);
  RunSpec spec;
  spec.cfg = tiny_parallel_config(AttentionKind::Differential, true);
  spec.accum = 2;  // 2 per rank; the single process accumulates 8
  check_run("DP=4, accum 2", spec, *ctx, false);
}

TEST(ParallelTraining4, DataParallel4) {
  auto ctx = grid(1, 4);
  RunSpec spec;
  spec.cfg = tiny_parallel_config(AttentionKind::Standard, false);
  check_run("DP=4", spec, *ctx, true);
}

TEST(ParallelTraining4, TensorParallel4) {
  auto ctx = grid(4, 1);
  RunSpec spec;
  spec.cfg = tiny_parallel_config(AttentionKind::Differential, false);
  spec.cfg.n_kv_heads = 4;  // one diff head and one K/V group per rank
  check_run("TP=4", spec, *ctx, false);
}

}  // namespace
}  // namespace difftron
