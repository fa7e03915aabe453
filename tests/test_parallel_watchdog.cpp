// The collective watchdog: its timer logic in-process (a late operation fires once, with
// rank, group and operation in the message, after the abort hooks; finished or
// self-completing work does not), and end to end under mpirun: a rank that skips a
// collective makes its peer exit non-zero with the watchdog's message instead of hanging.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "parallel/grid.h"
#include "parallel/mpi_comm.h"
#include "parallel/watchdog.h"

namespace difftron {
namespace {

using namespace std::chrono_literals;

struct Recorder {
  std::mutex mu;
  std::vector<std::string> messages;
  std::atomic<int> aborts{0};
  Watchdog::TimeoutAction action() {
    return [this](const std::string& m) {
      std::lock_guard<std::mutex> lock(mu);
      messages.push_back(m);
    };
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(mu);
    return messages.size();
  }
};

WatchdogOptions fast() {
  WatchdogOptions o;
  o.poll_interval_s = 0.01;
  return o;
}

TEST(Watchdog, LateOperationFiresOnceAfterTheAbortHooks) {
  Recorder rec;
  std::atomic<int> hook_seen_messages{-1};
  Watchdog w(fast(), "rank 5 (host testhost)", rec.action());
  w.add_abort_hook([&] {
    rec.aborts++;
    hook_seen_messages = int(rec.count());  // hooks run before the action
  });
  auto id = w.begin("group 'dp' (rank 1 of 2)", "all_reduce of f32[4]", 0.2);
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(w.fired());
  std::this_thread::sleep_for(400ms);
  ASSERT_TRUE(w.fired());
  ASSERT_EQ(rec.count(), 1u);
  EXPECT_EQ(rec.aborts.load(), 1);
  EXPECT_EQ(hook_seen_messages.load(), 0);
  const std::string& m = rec.messages[0];
  EXPECT_NE(m.find("rank 5 (host testhost)"), std::string::npos) << m;
  EXPECT_NE(m.find("all_reduce of f32[4] on group 'dp' (rank 1 of 2)"), std::string::npos) << m;
  EXPECT_NE(m.find("did not finish within 0.2 s"), std::string::npos) << m;
  w.end(id);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(rec.count(), 1u);  // fires once
}

TEST(Watchdog, FinishedOperationsDoNotFire) {
  Recorder rec;
  Watchdog w(fast(), "rank 0", rec.action());
  for (int i = 0; i < 20; ++i) {
    Watchdog::Scope s(&w, "group 'tp' (rank 0 of 2)", "all_reduce", 0.15);
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(w.pending(), 0u);
  w.begin("the training loop", "step 1", 0.0);  // timeout 0: not watched
  std::this_thread::sleep_for(300ms);
  EXPECT_FALSE(w.fired());
  EXPECT_EQ(rec.count(), 0u);
}

TEST(Watchdog, PolledWorkFiresOnlyWhenItStaysUnfinished) {
  Recorder rec;
  Watchdog w(fast(), "rank 2", rec.action());
  std::atomic<bool> done{false};
  w.watch("group 'dp' (rank 0 of 4)", "reduce_scatter of bf16[1024]", 0.3, [&] { return done.load(); });
  std::this_thread::sleep_for(100ms);
  done = true;
  std::this_thread::sleep_for(400ms);
  EXPECT_FALSE(w.fired());
  EXPECT_EQ(w.pending(), 0u);
  w.watch("group 'dp' (rank 0 of 4)", "all_gather of bf16[1024]", 0.2, [] { return false; });
  std::this_thread::sleep_for(500ms);
  ASSERT_TRUE(w.fired());
  EXPECT_NE(rec.messages.at(0).find("all_gather of bf16[1024] on group 'dp'"), std::string::npos);
}

// ---- end to end under mpirun ---------------------------------------------------------------

// Runs only inside the mpirun launched below: rank 1 skips the all-reduce that rank 0 waits in.
TEST(WatchdogChild, RankSkipsACollective) {
  if (!std::getenv("DIFFTRON_WATCHDOG_CHILD")) GTEST_SKIP() << "runs as the mpirun child of MpiEndToEnd";
  int argc = 0;
  char** argv = nullptr;
  MpiRuntime mpi(&argc, &argv);
  GridOptions o;
  o.tp = 1;
  o.dp = 2;
  o.watchdog.collective_timeout_s = 1.0;
  auto ctx = ParallelContext::from_mpi_world(o);
  float x[4] = {1, 2, 3, 4};
  Tensor t = host_tensor(x, 4, DType::F32);
  if (ctx->dp_rank() == 0) ctx->dp().all_reduce(t);  // rank 1 never joins
  std::this_thread::sleep_for(30s);  // rank 1 waits here to be ended with the job
  FAIL() << "still running: the watchdog did not end the job";
}

TEST(Watchdog, MpiEndToEndRankSkippingACollectiveEndsTheJob) {
  if (std::getenv("DIFFTRON_WATCHDOG_CHILD")) GTEST_SKIP();
  if (std::system("command -v mpirun > /dev/null 2>&1") != 0) GTEST_SKIP() << "mpirun not found";
  char self[4096] = {0};
  ASSERT_GT(readlink("/proc/self/exe", self, sizeof self - 1), 0);
  const std::string cmd = std::string("timeout 60 mpirun --allow-run-as-root --oversubscribe -np 2 ") +
                          "-x DIFFTRON_WATCHDOG_CHILD=1 -x OPENBLAS_NUM_THREADS=1 " + self +
                          " --gtest_filter=WatchdogChild.RankSkipsACollective 2>&1";
  const auto t0 = std::chrono::steady_clock::now();
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int status = pclose(p);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(WIFEXITED(status)) << out;
  const int code = WEXITSTATUS(status);
  EXPECT_NE(code, 0) << out;
  EXPECT_NE(code, 124) << "the job hung until `timeout` ended it:\n" << out;
  EXPECT_NE(out.find("difftron watchdog: rank 0 (host "), std::string::npos) << out;
  EXPECT_NE(out.find("all_reduce of f32[4] on group 'dp' (rank 0 of 2) did not finish within 1 s"),
            std::string::npos)
      << out;
  EXPECT_LT(secs, 25.0) << "the job should end soon after the 1 s timeout";
  std::printf("mpirun exited with status %d after %.1f s\n", code, secs);
}

}  // namespace
}  // namespace difftron
