// `difftron train` checkpoints through what large, preempted runs meet: a deep model (48
// layers; the piece index outgrew HDF5's 64 KiB attribute limit at 20) saves, resumes and
// reshards, also from a 4-rank ZeRO layout; write failures injected with strace at many points
// (EIO, ENOSPC; pwrite64, fsync, rename) end with rc 1..127 and a message naming the file,
// and leave a loadable `latest`; kill -9 at random moments, 20+ times, resumes to weights
// bit-identical with an uninterrupted run; and the preflight refuses mistakes before step 1
// (short validation data, a --ckpt_dir that is a file, a second job on the same directory,
// model flags that conflict with the checkpoint, overflowing flags).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "io/checkpoint.h"
#include "tests/run_command.h"

namespace fs = std::filesystem;

namespace difftron {
namespace {

const std::string kBin = std::string(DIFFTRON_BINARY_DIR) + "/difftron";
// 48 layers of width 16: the paper's depth (and then some) at a cost CI can pay
const std::string kDeep = " --device=cpu --data=synthetic:copy --seq=16 --batch=2 --d_model=16 --n_heads=1 --n_layers=48 --log_every=1";
const std::string kSmall = " --device=cpu --data=synthetic:copy --seq=16 --batch=2 --d_model=32 --n_heads=2 --log_every=1";

using testing::CommandResult;
CommandResult run(const std::string& cmd) { return testing::run_command(cmd); }

std::string read_file(const fs::path& p) { return difftron::testing::read_text_file(p); }
fs::path fresh(const char* tag) { return difftron::testing::fresh_dir("difftron_durability_", tag); }

bool have(const char* tool) { return std::system((std::string("command -v ") + tool + " > /dev/null 2>&1").c_str()) == 0; }

TEST(Durability, DeepModelSavesResumesAndReshards) {
  const fs::path dir = fresh("deep");
  const std::string ck = " --ckpt_dir=" + (dir / "ck").string();
  CommandResult r = run(kBin + " train" + kDeep + ck + " --steps=2");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("checkpoint written: " + (dir / "ck").string() + "/step_00000002"), std::string::npos) << r.output;
  r = run(kBin + " train" + kDeep + ck + " --steps=3");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("at step 2"), std::string::npos) << r.output;
  if (!have("mpirun")) GTEST_SKIP() << "mpirun not found: the 4-rank part did not run";
  const std::string mpirun =
      "timeout 300 mpirun --allow-run-as-root --oversubscribe -x OPENBLAS_NUM_THREADS=1 -x OMP_NUM_THREADS=1 -np 4 ";
  // one process -> TP=2 x DP=2 (ZeRO: each DP rank saves its shard) -> DP=4 -> one process
  r = run(mpirun + kBin + " train --tp=2 --dp=2" + kDeep + " --n_kv_heads=2 --n_heads=2 --d_model=32" +
          " --ckpt_dir=" + (dir / "z").string() + " --steps=2");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir / "z" / "step_00000002" / "rank_00003.h5")) << r.output;
  r = run(mpirun + kBin + " train --dp=4" + kDeep + " --n_kv_heads=2 --n_heads=2 --d_model=32" + " --ckpt_dir=" +
          (dir / "z").string() + " --steps=3");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("at step 2"), std::string::npos) << r.output;
  r = run(kBin + " train" + kDeep + " --n_kv_heads=2 --n_heads=2 --d_model=32 --ckpt_dir=" + (dir / "z").string() +
          " --steps=4");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("at step 3"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

TEST(Durability, InjectedWriteFailuresLeaveALoadableLatest) {
  if (!have("strace")) GTEST_SKIP() << "strace not found (tools/setup.sh installs it)";
  if (std::system("strace -f -o /dev/null true > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "strace cannot trace here (ptrace not permitted): fault injection did not run";
  const fs::path dir = fresh("inject");
  const std::string ck = (dir / "ck").string();
  CommandResult r = run(kBin + " train" + kDeep + " --ckpt_dir=" + ck + " --steps=2");
  ASSERT_EQ(r.status, 0) << r.output;
  struct Fault {
    const char* call;
    const char* error;
    int nth;
  };
  // pwrite64: HDF5's data and metadata writes (a 48-layer save makes ~1300); fsync: the rank
  // file, the directories, meta.json, latest; rename: meta.json, the directory, latest.
  const Fault faults[] = {{"pwrite64", "EIO", 1},    {"pwrite64", "EIO", 7},     {"pwrite64", "ENOSPC", 60},
                          {"pwrite64", "EIO", 400},  {"pwrite64", "ENOSPC", 1000}, {"fsync", "EIO", 1},
                          {"fsync", "EIO", 2},       {"fsync", "EIO", 3},        {"fsync", "EIO", 5},
                          {"rename", "EIO", 1},      {"rename", "EXDEV", 2},     {"rename", "EIO", 3}};
  for (const Fault& f : faults) {
    const std::string what = std::string(f.call) + " " + f.error + " from call " + std::to_string(f.nth);
    r = run("strace -f -o /dev/null -e trace=" + std::string(f.call) + " -e inject=" + f.call + ":error=" + f.error +
            ":when=" + std::to_string(f.nth) + "+ " + kBin + " train" + kDeep + " --ckpt_dir=" + ck + " --steps=3");
    EXPECT_GE(r.status, 1) << what << "\n" << r.output;
    EXPECT_LE(r.status, 127) << what << ": crashed\n" << r.output;
    EXPECT_NE(r.output.find(ck), std::string::npos) << what << ": the message names no file\n" << r.output;
    EXPECT_EQ(read_file(fs::path(ck) / "latest"), "step_00000002\n") << what;
    // latest loads: the run resumes from it (and, at --steps=2, re-saves that very step)
    r = run(kBin + " train" + kDeep + " --ckpt_dir=" + ck + " --steps=2");
    EXPECT_EQ(r.status, 0) << what << "\n" << r.output;
    EXPECT_NE(r.output.find("resumed from " + ck + "/step_00000002"), std::string::npos) << what << "\n" << r.output;
  }
  fs::remove_all(dir);
}

// Starts `cmd` (argv, no shell), kills it with SIGKILL after `ms`; true if it had exited 0 first.
bool run_and_kill(const std::vector<std::string>& cmd, int ms) {
  const pid_t pid = fork();
  if (pid == 0) {
    std::freopen("/dev/null", "w", stdout);
    std::freopen("/dev/null", "w", stderr);
    std::vector<char*> argv;
    for (auto& a : cmd) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  int st = 0;
  while (std::chrono::steady_clock::now() < end) {
    if (waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) && WEXITSTATUS(st) == 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  kill(pid, SIGKILL);
  waitpid(pid, &st, 0);
  return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream is(s);
  for (std::string w; is >> w;) out.push_back(w);
  return out;
}

TEST(Durability, KillNineAnywhereResumesBitIdentical) {
  const fs::path dir = fresh("kill9");
  const int64_t steps = 12;
  const std::string args = kSmall + " --n_layers=4 --ckpt_every=1 --steps=" + std::to_string(steps);
  CommandResult r = run(kBin + " train" + args + " --ckpt_dir=" + (dir / "straight").string());
  ASSERT_EQ(r.status, 0) << r.output;
  const auto want = checkpoint_digests(latest_checkpoint((dir / "straight").string()));

  std::vector<std::string> cmd = split(kBin + " train" + args + " --ckpt_dir=" + (dir / "killed").string());
  std::mt19937 rng(12345);
  // how long one uninterrupted run takes here, so the kills land across all of it
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(run(kBin + " train" + args + " --ckpt_dir=" + (dir / "timing").string()).status, 0);
  const int run_ms = int(std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count());
  int kills = 0;
  bool finished = false;
  for (int attempt = 0; attempt < 400 && !(finished && kills >= 20); ++attempt) {
    if (finished) {  // start over to collect more kills
      fs::remove_all(dir / "killed");
      finished = false;
    }
    const int ms = std::uniform_int_distribution<int>(5, std::max(10, run_ms))(rng);
    finished = run_and_kill(cmd, ms);
    if (!finished) ++kills;
    // whatever moment it died at, `latest` (if any) is a whole checkpoint
    if (fs::exists(dir / "killed" / "latest")) EXPECT_NO_THROW(read_checkpoint_meta(latest_checkpoint((dir / "killed").string())));
  }
  // finish the run (no more kills) and compare every tensor's checksum
  if (!finished) ASSERT_TRUE(run_and_kill(cmd, 600000));
  EXPECT_GE(kills, 20);
  std::printf("%d kills at random moments (run takes ~%d ms)\n", kills, run_ms);
  const std::string got_dir = latest_checkpoint((dir / "killed").string());
  EXPECT_EQ(fs::path(got_dir).filename(), "step_00000012");
  EXPECT_EQ(checkpoint_digests(got_dir), want) << "weights or moments differ from the uninterrupted run";
  fs::remove_all(dir);
}

TEST(Durability, PreflightRefusesMistakesBeforeTheFirstStep) {
  const fs::path dir = fresh("preflight");
  // --ckpt_dir is a file
  std::ofstream(dir / "afile") << "x";
  CommandResult r = run(kBin + " train" + kSmall + " --steps=2 --ckpt_dir=" + (dir / "afile").string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find((dir / "afile").string() + " exists and is not a directory"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("step      1/"), std::string::npos) << r.output;

  // a second job on the same directory: the lock names the holder (here: this live process)
  fs::create_directories(dir / "busy");
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  std::ofstream(dir / "busy" / ".lock") << host << " " << getpid() << "\n";
  r = run(kBin + " train" + kSmall + " --steps=2 --ckpt_dir=" + (dir / "busy").string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("is in use by process " + std::to_string(getpid()) + " on host " + host), std::string::npos)
      << r.output;
  // a stale lock (a process that no longer runs) is taken over
  const pid_t dead = fork();
  if (dead == 0) _exit(0);
  waitpid(dead, nullptr, 0);
  std::ofstream(dir / "busy" / ".lock") << host << " " << dead << "\n";
  r = run(kBin + " train" + kSmall + " --steps=2 --ckpt_dir=" + (dir / "busy").string());
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("taking over a stale lock of process " + std::to_string(dead)), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "busy" / ".lock")) << "the lock outlived its job";

  // resuming with model flags that conflict with the checkpoint, and a changed schedule
  r = run(kBin + " train" + kSmall + " --steps=3 --d_model=64 --ckpt_dir=" + (dir / "busy").string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--d_model=64, the checkpoint has 32"), std::string::npos) << r.output;
  r = run(kBin + " train" + kSmall + " --steps=3 --attention=standard --ckpt_dir=" + (dir / "busy").string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--attention=standard, the checkpoint has diff"), std::string::npos) << r.output;
  r = run(kBin + " train" + kSmall + " --steps=3 --ckpt_dir=" + (dir / "busy").string());
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--steps changed on resume: 2 -> 3"), std::string::npos) << r.output;

  // overflowing flags
  r = run(kBin + " train" + kSmall + " --steps=2 --grad_accum=9223372036854775807");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--grad_accum=9223372036854775807 is out of range"), std::string::npos) << r.output;
  r = run(kBin + " train" + kSmall + " --steps=1099511627776 --batch=16777216 --seq=16777216");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("overflow"), std::string::npos) << r.output;
  r = run(kBin + " train" + kSmall + " --steps=2 --n_layers=100000000");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("n_layers (100000000) must be at most"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

TEST(Durability, ShortValidationDataIsRefusedBeforeTheFirstStep) {
  const fs::path dir = fresh("val");
  std::ofstream(dir / "train.txt") << std::string(20000, 'a') + "\n";
  std::ofstream(dir / "val.txt") << "tiny\n";
  CommandResult r = run(kBin + " prepare --input=" + (dir / "train.txt").string() + " --out=" + (dir / "t").string() +
                        " --val_fraction=0");
  ASSERT_EQ(r.status, 0) << r.output;
  r = run(kBin + " prepare --input=" + (dir / "val.txt").string() + " --out=" + (dir / "v").string() + " --val_fraction=0");
  ASSERT_EQ(r.status, 0) << r.output;
  r = run(kBin + " train --device=cpu --data=" + (dir / "t" / "train").string() + " --val_data=" +
          (dir / "v" / "train").string() + " --seq=64 --batch=2 --d_model=32 --n_heads=2 --steps=3 --log_every=1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--val_data="), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("step      1/"), std::string::npos) << "refused only after training:\n" << r.output;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace difftron
