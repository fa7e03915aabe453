// mpi-ranks: 4
// Sharded checkpoints across layouts: a TP=2 x DP=2 run saves at step 3 and the run goes on
// (a) on the same layout: bit-identical to never stopping; (b) in one process: like a single
// process that never stopped (within the multi-rank tests' tolerances, as TP sums in another
// order); and a single-process checkpoint resumes on TP=2 x DP=2 the same way. Also: a
// checkpoint missing a rank file is refused.
#include <filesystem>

#include "io/checkpoint.h"
#include "tests/mpi_train_check.h"

namespace fs = std::filesystem;

namespace difftron {
namespace {

using namespace difftron::testing;
const auto* const kEnv = ::testing::AddGlobalTestEnvironment(new MpiEnv);

// Across layouts the runs differ by rounding only: tolerances() in tests/mpi_train_check.h
// bounds the losses and the weights after kSteps (the run is 2 x 2 ranks and one micro-batch a
// rank, so 2 micro-batches a step).
constexpr int64_t kSteps = 6, kSaveAt = 3;

std::unique_ptr<ParallelContext> grid(int tp, int dp) { return test_grid(tp, dp); }

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

// Trains steps [from, to) on `ctx` (null: one process, seeing dp_of_run x accum micro-batches a
// step so it matches a DP run), loading `load_dir` first and saving under `save_root` at the end
// when given.
RunResult train_segment(const RunSpec& spec, ParallelContext* ctx, int dp_of_run, int64_t from, int64_t to,
                        const std::string& load_dir, const std::string& save_root) {
  auto ops = make_cpu_ops();
  Model model(spec.cfg, *ops, ModelPrecision::uniform(DType::F32), spec.batch, spec.seq,
              ctx ? model_parallel(*ctx) : ModelParallel{});
  model.init_weights(spec.seed);
  AdamW opt(tiny_optimizer(kSteps), model, ctx);
  const int dp = ctx ? ctx->dp_size() : 1;
  const int64_t accum = ctx ? spec.accum : spec.accum * dp_of_run;
  GlobalOrderBatches data(spec.cfg.vocab_size, spec.seed, ctx ? ctx->dp_rank() : 0, dp, accum);
  std::vector<int32_t> skip(spec.batch * spec.seq), skip2(skip.size());
  for (int64_t i = 0; i < from * accum; ++i) data.next_batch(spec.batch, spec.seq, skip.data(), skip2.data());
  if (!load_dir.empty()) {
    CheckpointMeta meta = load_checkpoint(load_dir, model, &opt, ctx);
    EXPECT_EQ(meta.step, from);
  }
  TrainOptions o;
  o.steps = to;
  o.batch = spec.batch;
  o.seq = spec.seq;
  o.grad_accum = accum;
  o.log_every = 1000;
  Trainer trainer(model, opt, data, nullptr, o, ctx);
  RunResult r;
  trainer.on_step = [&](int64_t, double) { r.grad_norms.push_back(opt.grad_norm()); };
  r.losses = trainer.run(from).losses;
  if (!save_root.empty()) {
    CheckpointMeta meta;
    meta.step = to;
    save_checkpoint(save_root, meta, model, &opt, ctx);
  }
  for (auto& p : model.params()) {
    std::vector<float> w(p.value.numel());
    ops->download(p.value, w.data());
    r.weights.push_back(std::move(w));
  }
  return r;
}

std::string fresh_root(const char* tag) {
  std::string root = std::string(DIFFTRON_BINARY_DIR) + "/test_mpi_checkpoint_" + tag;
  if (world_rank() == 0) fs::remove_all(root);
  MPI_Barrier(MPI_COMM_WORLD);
  return root;
}

RunSpec spec() {
  RunSpec s;
  s.cfg = tiny_parallel_config(AttentionKind::Differential, false);
  s.steps = kSteps;
  return s;
}

// The resumed run's losses (steps kSaveAt..) against the straight run's, within the bounds;
// returns the largest relative difference.
double expect_losses_near(const RunResult& resumed, const RunResult& straight) {
  const Tolerances tol = tolerances(spec(), 2);
  double m = 0;
  for (size_t i = 0; i < resumed.losses.size(); ++i) {
    const size_t t = kSaveAt + i;
    const double want = straight.losses[t];
    EXPECT_NEAR(resumed.losses[i], want, tol.loss_abs(t, want, straight.grad_norms[t])) << "step " << t;
    m = std::max(m, std::abs(resumed.losses[i] - want) / want);
  }
  return m;
}

TEST(ShardedCheckpoint, SameLayoutResumesBitForBit) {
  auto ctx = grid(2, 2);
  const std::string root = fresh_root("same");
  RunResult straight = train_segment(spec(), ctx.get(), 2, 0, kSteps, "", "");
  train_segment(spec(), ctx.get(), 2, 0, kSaveAt, "", root);
  RunResult resumed = train_segment(spec(), ctx.get(), 2, kSaveAt, kSteps, latest_checkpoint(root), "");
  ASSERT_EQ(resumed.losses.size(), size_t(kSteps - kSaveAt));
  for (size_t i = 0; i < resumed.losses.size(); ++i) EXPECT_EQ(resumed.losses[i], straight.losses[kSaveAt + i]) << i;
  for (size_t k = 0; k < straight.weights.size(); ++k) EXPECT_EQ(resumed.weights[k], straight.weights[k]) << k;
}

TEST(ShardedCheckpoint, FourRankCheckpointResumesInOneProcess) {
  const std::string root = fresh_root("to_single");
  {
    auto ctx = grid(2, 2);
    train_segment(spec(), ctx.get(), 2, 0, kSaveAt, "", root);
  }
  // every rank, on its own: one process continues from the 4-rank checkpoint
  RunResult straight = train_segment(spec(), nullptr, 2, 0, kSteps, "", "");
  RunResult resumed = train_segment(spec(), nullptr, 2, kSaveAt, kSteps, latest_checkpoint(root), "");
  double d = expect_losses_near(resumed, straight);
  std::printf("[rank %d] TP2xDP2 -> 1 process: max relative loss diff %.3g\n", world_rank(), d);
  double wd = 0;
  for (size_t k = 0; k < straight.weights.size(); ++k)
    for (size_t i = 0; i < straight.weights[k].size(); ++i)
      wd = std::max(wd, double(std::abs(resumed.weights[k][i] - straight.weights[k][i])));
  EXPECT_LE(wd, tolerances(spec(), 2).weight_abs(kSteps));
}

TEST(ShardedCheckpoint, OneProcessCheckpointResumesOnFourRanks) {
  const std::string root = fresh_root("from_single");
  if (world_rank() == 0) train_segment(spec(), nullptr, 2, 0, kSaveAt, "", root);
  MPI_Barrier(MPI_COMM_WORLD);
  RunResult straight = train_segment(spec(), nullptr, 2, 0, kSteps, "", "");
  auto ctx = grid(2, 2);
  RunResult resumed = train_segment(spec(), ctx.get(), 2, kSaveAt, kSteps, latest_checkpoint(root), "");
  double d = expect_losses_near(resumed, straight);
  std::printf("[rank %d] 1 process -> TP2xDP2: max relative loss diff %.3g\n", world_rank(), d);
  EXPECT_LE(max_weight_diff(spec(), *ctx, resumed, straight), tolerances(spec(), 2).weight_abs(kSteps));
}

TEST(ShardedCheckpoint, MissingRankFileIsRefused) {
  const std::string root = fresh_root("missing");
  auto ctx = grid(2, 2);
  train_segment(spec(), ctx.get(), 2, 0, 1, "", root);
  const std::string dir = latest_checkpoint(root);
  if (world_rank() == 0) fs::remove(dir + "/rank_00003.h5");
  MPI_Barrier(MPI_COMM_WORLD);
  try {
    train_segment(spec(), nullptr, 2, 1, 2, dir, "");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank_00003.h5: missing"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace difftron
