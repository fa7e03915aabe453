// `difftron train` through failures, as a user meets them: SIGTERM (preemption) finishes the
// step, writes a checkpoint and exits 128 + 15, and the same command resumes from it; a run
// checkpointed on 2 MPI ranks (DP=2) resumes in one process and then on TP=2.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "tests/run_command.h"

namespace fs = std::filesystem;

namespace {

const std::string kBin = std::string(DIFFTRON_BINARY_DIR) + "/difftron";
const std::string kModel = " --device=cpu --data=synthetic:copy --seq=16 --batch=4 --d_model=32 --n_heads=2 --log_every=1";

using Result = difftron::testing::CommandResult;
Result run(const std::string& cmd) { return difftron::testing::run_command(cmd); }

std::string read_file(const fs::path& p) { return difftron::testing::read_text_file(p); }
fs::path fresh(const char* tag) { return difftron::testing::fresh_dir("difftron_resume_", tag); }

TEST(CliResume, SigtermCheckpointsAndTheSameCommandResumes) {
  const fs::path dir = fresh("sigterm");
  const fs::path log = dir / "log";
  const std::string ckpt = (dir / "ckpt").string();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // the training run, long enough to be interrupted
    FILE* f = std::freopen(log.c_str(), "w", stderr);
    (void)f;
    const std::string steps = "--steps=1000000", ck = "--ckpt_dir=" + ckpt;
    execl(kBin.c_str(), kBin.c_str(), "train", "--device=cpu", "--data=synthetic:copy", "--seq=16", "--batch=4",
          "--d_model=32", "--n_heads=2", "--log_every=1", steps.c_str(), ck.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // wait until it has trained a few steps, then preempt it
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (read_file(log).find("step      5/") == std::string::npos && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_NE(read_file(log).find("step      5/"), std::string::npos) << read_file(log);
  kill(pid, SIGTERM);
  int st = 0;
  waitpid(pid, &st, 0);
  ASSERT_TRUE(WIFEXITED(st)) << read_file(log);
  EXPECT_EQ(WEXITSTATUS(st), 128 + SIGTERM) << read_file(log);
  const std::string out = read_file(log);
  EXPECT_NE(out.find("stopped by signal 15 after step"), std::string::npos) << out;

  std::string latest = read_file(fs::path(ckpt) / "latest");
  ASSERT_EQ(latest.rfind("step_", 0), 0u) << latest;
  const long done = std::stol(latest.substr(5));
  EXPECT_GE(done, 5);
  Result r = run(kBin + " train" + kModel + " --ckpt_dir=" + ckpt + " --steps=" + std::to_string(done + 3));
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from " + ckpt + "/step_"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("at step " + std::to_string(done)), std::string::npos) << r.output;
  fs::remove_all(dir);
}

TEST(CliResume, TwoRankCheckpointResumesInOneProcessThenOnTensorParallel) {
  if (std::system("command -v mpirun > /dev/null 2>&1") != 0) GTEST_SKIP() << "mpirun not found";
  const fs::path dir = fresh("reshard");
  const std::string ckpt = " --ckpt_dir=" + (dir / "ckpt").string();
  const std::string mpirun = "timeout 120 mpirun --allow-run-as-root --oversubscribe -x OPENBLAS_NUM_THREADS=1 -x OMP_NUM_THREADS=1 -np 2 ";
  Result r = run(mpirun + kBin + " train --dp=2 --steps=4" + kModel + ckpt);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir / "ckpt" / "step_00000004" / "rank_00001.h5")) << r.output;
  r = run(kBin + " train --steps=6" + kModel + ckpt);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("at step 4"), std::string::npos) << r.output;
  r = run(mpirun + kBin + " train --tp=2 --steps=8" + kModel + ckpt);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("at step 6"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("step      8/8"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

}  // namespace
