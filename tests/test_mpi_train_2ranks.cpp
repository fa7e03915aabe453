// mpi-ranks: 2
// Two ranks: tensor parallel TP=2 (differential attention with GQA and an untied head;
// the baseline with tied embeddings; Differential Transformer V2, whose pairs of query heads
// and lambda rows split with their heads) and data parallel DP=2 train like one process.
// TP: the gradients of one micro-batch, the losses of 4 steps and the final weights match
// the single-process run within stated tolerances (sharded GEMMs and the parallel
// cross-entropy sum in another order); parameters every TP rank holds whole stay bit-identical
// across ranks. DP: the first loss is bit-exact, the rest within tolerance, and the DP
// replicas hold identical weights.
#include <cstdio>

#include "tests/mpi_train_check.h"

namespace difftron {
namespace {

using namespace difftron::testing;
const auto* const kEnv = ::testing::AddGlobalTestEnvironment(new MpiEnv);

// Tolerances come from tolerances() in tests/mpi_train_check.h (rounding bounds of the
// reordered sums, and the optimizer's Lipschitz constant for later weights); each test
// prints what it measured beside them.

std::unique_ptr<ParallelContext> grid(int tp, int dp) { return test_grid(tp, dp); }

void report(const char* what, double loss_diff, double weight_diff, double weight_tol) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::printf("[rank %d] %s: max |loss - single| / loss = %.3g, max |weight - single| = %.3g (bound %.3g)\n",
              rank, what, loss_diff, weight_diff, weight_tol);
}

// Losses and gradient norms of every step against the single process, within the bounds.
void expect_trajectory(const Tolerances& tol, const RunResult& par, const RunResult& ref) {
  ASSERT_EQ(par.losses.size(), ref.losses.size());
  for (size_t i = 0; i < ref.losses.size(); ++i) {
    EXPECT_NEAR(par.losses[i], ref.losses[i], tol.loss_abs(i, ref.losses[i], ref.grad_norms[i])) << "step " << i;
    EXPECT_NEAR(par.grad_norms[i], ref.grad_norms[i], tol.grad_norm_abs(i, ref.grad_norms[i])) << "step " << i;
  }
}

double max_rel_loss_diff(const RunResult& a, const RunResult& b) {
  double m = 0;
  for (size_t i = 0; i < a.losses.size(); ++i) m = std::max(m, std::abs(a.losses[i] - b.losses[i]) / b.losses[i]);
  return m;
}

class TensorParallel2 : public ::testing::TestWithParam<std::pair<AttentionKind, bool>> {};

TEST_P(TensorParallel2, GradientsOfOneMicroBatchMatchSingleProcess) {
  auto ctx = grid(2, 1);
  RunSpec spec;
  spec.cfg = tiny_parallel_config(GetParam().first, GetParam().second);
  auto ops = make_cpu_ops();
  Model ref(spec.cfg, *ops, ModelPrecision::uniform(DType::F32), spec.batch, spec.seq);
  Model par(spec.cfg, *ops, ModelPrecision::uniform(DType::F32), spec.batch, spec.seq, model_parallel(*ctx));
  ref.init_weights(3);
  par.init_weights(3);
  GlobalOrderBatches data(spec.cfg.vocab_size, 5, 0, 1, 1);
  std::vector<int32_t> tok(spec.batch * spec.seq), tgt(tok.size());
  data.next_batch(spec.batch, spec.seq, tok.data(), tgt.data());
  const Tolerances tol = tolerances(spec, 1);
  ref.zero_grads();
  par.zero_grads();
  const double lr = ref.forward_backward(tok.data(), tgt.data(), spec.batch, spec.seq, 0.7f);
  const double lp = par.forward_backward(tok.data(), tgt.data(), spec.batch, spec.seq, 0.7f);
  EXPECT_NEAR(lp, lr, tol.loss_rel * lr);
  double worst = 0;
  for (size_t i = 0; i < ref.params().size(); ++i) {
    const Param &pr = ref.params()[i], &pp = par.params()[i];
    ASSERT_EQ(pr.name, pp.name);
    std::vector<float> gr(pr.grad.numel()), gp(pp.grad.numel());
    ops->download(pr.grad, gr.data());
    ops->download(pp.grad, gp.data());
    std::vector<float> want = shard_of(gr, pp);
    ASSERT_EQ(want.size(), gp.size()) << pp.name;
    double scale = 0, diff = 0;
    for (float g : gr) scale = std::max(scale, double(std::abs(g)));
    for (size_t k = 0; k < gp.size(); ++k) diff = std::max(diff, std::abs(double(want[k]) - gp[k]));
    EXPECT_LE(diff, tol.grad_rel * scale) << pp.name << " (largest |grad| " << scale << ")";
    worst = std::max(worst, diff / std::max(scale, 1e-30));
  }
  report("TP=2 one micro-batch, gradient rel. diff as weight diff", std::abs(lp - lr) / lr, worst, tol.grad_rel);
  // the logits for sampling are gathered whole
  auto a = ref.last_logits(tok.data(), spec.seq), b = par.last_logits(tok.data(), spec.seq);
  ASSERT_EQ(a.size(), b.size());
  for (size_t v = 0; v < a.size(); ++v) EXPECT_NEAR(a[v], b[v], 1e-5) << "logit " << v;
}

TEST_P(TensorParallel2, TrainingMatchesSingleProcess) {
  auto ctx = grid(2, 1);
  RunSpec spec;
  spec.cfg = tiny_parallel_config(GetParam().first, GetParam().second);
  const Tolerances tol = tolerances(spec, 1);
  RunResult ref = run_training(spec, nullptr);
  RunResult par = run_training(spec, ctx.get());
  expect_trajectory(tol, par, ref);
  std::string where;
  const double wd = max_weight_diff(spec, *ctx, par, ref, &where);
  EXPECT_LE(wd, tol.weight_abs(spec.steps)) << "at " << where;
  const AttentionKind kind = GetParam().first;
  report(kind == AttentionKind::Differential ? "TP=2 diff" : kind == AttentionKind::Standard ? "TP=2 standard, tied" : "TP=2 diff_v2",
         max_rel_loss_diff(par, ref), wd, tol.weight_abs(spec.steps));
  auto ops = make_cpu_ops();
  Model layout(spec.cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1, model_parallel(*ctx));
  EXPECT_TRUE(replicas_identical(ctx->tp_host(), par, layout, true))
      << "parameters every TP rank holds whole have diverged across TP ranks";
}

INSTANTIATE_TEST_SUITE_P(Variants, TensorParallel2,
                         ::testing::Values(std::make_pair(AttentionKind::Differential, false),
                                           std::make_pair(AttentionKind::Standard, true),
                                           std::make_pair(AttentionKind::DifferentialV2, false)));

TEST(DataParallel2, TrainingMatchesSingleProcessWithAccumulation) {
  auto ctx = grid(1, 2);
  RunSpec spec;
  spec.cfg = tiny_parallel_config(AttentionKind::Differential, false);
  const Tolerances tol = tolerances(spec, 2);
  RunResult ref = run_training(spec, nullptr, 2);  // one process, 2 micro-batches per step
  RunResult par = run_training(spec, ctx.get());
  expect_trajectory(tol, par, ref);
  // Each micro-batch's forward pass is the same computation in both runs; the step's loss is
  // their mean, which two values make exact in any order.
  EXPECT_EQ(par.losses[0], ref.losses[0]) << "the first step sees the same weights and batches";
  std::string where;
  const double wd = max_weight_diff(spec, *ctx, par, ref, &where);
  EXPECT_LE(wd, tol.weight_abs(spec.steps)) << "at " << where;
  report("DP=2", max_rel_loss_diff(par, ref), wd, tol.weight_abs(spec.steps));
  auto ops = make_cpu_ops();
  Model layout(spec.cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1, model_parallel(*ctx));
  EXPECT_TRUE(replicas_identical(ctx->dp_host(), par, layout, false)) << "DP replicas differ";
}

TEST(TensorParallel2, RejectsConfigsThatDoNotSplit) {
  auto ctx = grid(2, 1);
  auto ops = make_cpu_ops();
  ModelConfig c = tiny_parallel_config(AttentionKind::Differential, false);
  c.n_heads = 3;
  c.n_kv_heads = 3;
  c.head_dim = 4;
  c.d_model = 24;
  c.vocab_size = 33;
  c.ffn_dim = 63;
  try {
    Model m(c, *ops, ModelPrecision::uniform(DType::F32), 1, 4, model_parallel(*ctx));
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("n_heads (3) must be a multiple of the tensor-parallel size (2)"), std::string::npos) << w;
    EXPECT_NE(w.find("n_kv_heads (3)"), std::string::npos) << w;
    EXPECT_NE(w.find("ffn_dim (63)"), std::string::npos) << w;
    EXPECT_EQ(w.find("vocab_size"), std::string::npos) << "the vocabulary is padded, not refused: " << w;
  }
}

}  // namespace
}  // namespace difftron
