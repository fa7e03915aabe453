// Asynchronous checkpoint saves (AsyncCheckpointer): a run saving in the background after
// every step ends with checkpoints bit-identical to synchronous saves of the same steps (the
// snapshot is the state at the save, not what training later made of it), and trains the
// same; a write that fails is reported by wait() naming the file and the OS error and leaves
// `latest` where it was (in process, and through `difftron train`); the destructor of a checkpointer with a save in flight waits for it
// and publishes it. Through `difftron train`: --ckpt_every saves, async and not, alike in one
// process and on 2 DP ranks under mpirun (the agreement runs on the training thread).
#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/model.h"
#include "core/optimizer.h"
#include "core/trainer.h"
#include "io/checkpoint.h"
#include "io/synthetic_data.h"
#include "tests/checkpoint_test_util.h"
#include "tests/run_command.h"

namespace fs = std::filesystem;

namespace difftron {
namespace {

constexpr int64_t kSteps = 6;

struct TrainingRun : testing::TrainingRunOf<kSteps, 2> {
  TrainingRun() { model.init_weights(1); }
  CheckpointMeta meta(int64_t step) const {
    CheckpointMeta m;
    m.step = step;
    m.data_position = data->position();
    return m;
  }
};

fs::path temp_root(const std::string& tag) {
  fs::path p = fs::temp_directory_path() / ("difftron_async_" + tag + "_" + std::to_string(getpid()));
  fs::remove_all(p);
  return p;
}

std::string step_dir(const fs::path& root, int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", (long long)step);
  return (root / buf).string();
}

TEST(AsyncCheckpoint, EveryStepInTheBackgroundEqualsSynchronousSaves) {
  const fs::path sync_root = temp_root("sync"), async_root = temp_root("async");
  TrainingRun a, b;
  Trainer ta(a.model, a.opt, *a.data, nullptr, a.to);
  ta.on_step = [&](int64_t step, double) { save_checkpoint(sync_root.string(), a.meta(step + 1), a.model, &a.opt); };
  const auto losses_sync = ta.run().losses;

  AsyncCheckpointer ckpt;
  std::vector<int64_t> published;
  ckpt.on_published = [&](const std::string& dir, int64_t step, double) {
    EXPECT_EQ(dir, step_dir(async_root, step));
    published.push_back(step);
  };
  Trainer tb(b.model, b.opt, *b.data, nullptr, b.to);
  tb.on_step = [&](int64_t step, double) {
    ckpt.start(async_root.string(), b.meta(step + 1), b.model, &b.opt);
    EXPECT_EQ(ckpt.in_flight_step(), step + 1);
  };
  const auto losses_async = tb.run().losses;
  EXPECT_EQ(ckpt.wait(), step_dir(async_root, kSteps));
  EXPECT_FALSE(ckpt.in_flight());
  EXPECT_EQ(ckpt.wait(), "");  // nothing in flight

  EXPECT_EQ(losses_async, losses_sync) << "saving in the background changed training";
  EXPECT_EQ(published, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
  for (int64_t s = 1; s <= kSteps; ++s) {
    const auto want = checkpoint_digests(step_dir(sync_root, s));
    ASSERT_FALSE(want.empty());
    EXPECT_EQ(checkpoint_digests(step_dir(async_root, s)), want) << "step " << s;
    EXPECT_EQ(read_checkpoint_meta(step_dir(async_root, s)).at("data_position"),
              read_checkpoint_meta(step_dir(sync_root, s)).at("data_position"));
  }
  EXPECT_EQ(latest_checkpoint(async_root.string()), step_dir(async_root, kSteps));

  // and the last one resumes into the same weights as the synchronous one
  TrainingRun c;
  load_checkpoint(latest_checkpoint(async_root.string()), c.model, &c.opt);
  const fs::path again = temp_root("again");
  EXPECT_EQ(checkpoint_digests(save_checkpoint(again.string(), c.meta(kSteps), c.model, &c.opt)),
            checkpoint_digests(step_dir(sync_root, kSteps)));
  for (const auto& p : {sync_root, async_root, again}) fs::remove_all(p);
}

// The writer cannot create its file: with RLIMIT_NOFILE at the lowest free descriptor every
// open() fails with EMFILE, even as root (where permissions would not stop it). (A write that
// fails half-way, the CLI test below, leaves HDF5 1.10 with a broken file that its exit handler
// crashes on; `difftron` leaves without exit handlers after an error, a test cannot.)
TEST(AsyncCheckpoint, FailedWriteIsReportedByWaitAndLeavesLatest) {
  const fs::path root = temp_root("fail");
  TrainingRun r;
  AsyncCheckpointer ckpt;
  ckpt.start(root.string(), r.meta(1), r.model, &r.opt);
  ASSERT_EQ(ckpt.wait(), step_dir(root, 1));

  struct rlimit old_limit;
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &old_limit), 0);
  const int lowest_free = dup(0);
  ASSERT_GE(lowest_free, 0);
  close(lowest_free);
  struct rlimit none = old_limit;
  none.rlim_cur = rlim_t(lowest_free);
  std::string message;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &none), 0);
  ckpt.start(root.string(), r.meta(2), r.model, &r.opt);  // makes .tmp.step_00000002: no descriptor needed
  try {
    ckpt.wait();
  } catch (const Error& e) {
    message = e.what();
  }
  setrlimit(RLIMIT_NOFILE, &old_limit);

  EXPECT_NE(message.find((root / ".tmp.step_00000002" / "rank_00000.h5").string()), std::string::npos) << message;
  EXPECT_NE(message.find("Too many open files"), std::string::npos) << message;
  EXPECT_FALSE(ckpt.in_flight());
  EXPECT_EQ(latest_checkpoint(root.string()), step_dir(root, 1));
  EXPECT_FALSE(fs::exists(step_dir(root, 2)));

  // the checkpointer is usable again; the next save replaces the failed one's leftovers
  ckpt.start(root.string(), r.meta(2), r.model, &r.opt);
  EXPECT_EQ(ckpt.wait(), step_dir(root, 2));
  EXPECT_EQ(latest_checkpoint(root.string()), step_dir(root, 2));
  fs::remove_all(root);
}

TEST(AsyncCheckpoint, DestructorWaitsForTheSaveInFlight) {
  const fs::path root = temp_root("dtor"), sync_root = temp_root("dtor_sync");
  TrainingRun r;
  Trainer(r.model, r.opt, *r.data, nullptr, r.to).run();
  int64_t published = -1;
  {
    AsyncCheckpointer ckpt;
    ckpt.on_published = [&](const std::string&, int64_t step, double) { published = step; };
    ckpt.start(root.string(), r.meta(kSteps), r.model, &r.opt);
    ASSERT_TRUE(ckpt.in_flight());
  }
  EXPECT_EQ(published, kSteps);
  EXPECT_EQ(latest_checkpoint(root.string()), step_dir(root, kSteps));
  EXPECT_EQ(checkpoint_digests(step_dir(root, kSteps)),
            checkpoint_digests(save_checkpoint(sync_root.string(), r.meta(kSteps), r.model, &r.opt)));
  fs::remove_all(root);
  fs::remove_all(sync_root);
}

// `difftron train --ckpt_every=1`, async (the default) against --async_save=false: the same
// checkpoints at every step; `prefix` runs it under mpirun.
void cli_async_matches_sync(const std::string& prefix, const std::string& grid, const std::string& tag) {
  const fs::path dir = temp_root(tag);
  const std::string args = " train --device=cpu --data=synthetic:copy --seq=16 --batch=2 --d_model=32 --n_heads=2 "
                           "--n_kv_heads=2 --log_every=1 --steps=4 --ckpt_every=1" + grid;
  const std::string bin = std::string(DIFFTRON_BINARY_DIR) + "/difftron";
  auto r = testing::run_command(prefix + bin + args + " --ckpt_dir=" + (dir / "async").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("checkpoint step 2: snapshot took"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("checkpoint written: " + step_dir(dir / "async", 2) + " (write "), std::string::npos)
      << r.output;
  r = testing::run_command(prefix + bin + args + " --async_save=false --ckpt_dir=" + (dir / "sync").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output.find("snapshot took"), std::string::npos) << r.output;
  for (int64_t s = 1; s <= 4; ++s)
    EXPECT_EQ(checkpoint_digests(step_dir(dir / "async", s)), checkpoint_digests(step_dir(dir / "sync", s)))
        << "step " << s;
  EXPECT_EQ(latest_checkpoint((dir / "async").string()), step_dir(dir / "async", 4));
  fs::remove_all(dir);
}

TEST(AsyncCheckpoint, TrainCommandOneProcess) { cli_async_matches_sync("", "", "cli1"); }

// A background write that fails half-way (EFBIG: `ulimit -f`, SIGXFSZ ignored) ends the run
// at the next save's start with rc 1 and a message naming the file and the OS error; `latest`
// stays on the checkpoint before.
TEST(AsyncCheckpoint, TrainCommandFailedBackgroundWrite) {
  const fs::path dir = temp_root("clifail");
  const std::string run = std::string(DIFFTRON_BINARY_DIR) + "/difftron train --device=cpu --data=synthetic:copy "
                          "--seq=16 --batch=2 --d_model=32 --n_heads=2 --log_every=1 --ckpt_every=1 --ckpt_dir=" +
                          dir.string();
  auto r = testing::run_command(run + " --steps=3");
  ASSERT_EQ(r.status, 0) << r.output;
  // 8 KiB: the lock file fits, a rank file (~400 KiB) does not
  r = testing::run_command("bash -c \"trap '' XFSZ; ulimit -f 8; exec " + run + " --steps=6\"");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("checkpoint step 4: snapshot took"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find((dir / ".tmp.step_00000004" / "rank_00000.h5").string()), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("File too large"), std::string::npos) << r.output;
  EXPECT_EQ(latest_checkpoint(dir.string()), step_dir(dir, 3));
  fs::remove_all(dir);
}

TEST(AsyncCheckpoint, TrainCommandTwoRanks) {
  if (std::system("command -v mpirun > /dev/null 2>&1") != 0) GTEST_SKIP() << "mpirun not found";
  cli_async_matches_sync(
      "timeout 300 mpirun --allow-run-as-root --oversubscribe -x OPENBLAS_NUM_THREADS=1 -x OMP_NUM_THREADS=1 -np 2 ",
      " --dp=2", "cli2");
}

}  // namespace
}  // namespace difftron
