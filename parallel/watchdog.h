// The collective watchdog: a thread that watches every collective (and each training
// step) and, when one does not finish within its timeout, aborts the communicators and
// ends the process with a message naming the rank, the group and the operation, so that
// a lost rank fails the job instead of hanging it. One per process, owned by the
// ParallelContext (parallel/grid.h) and handed to communicators explicitly.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace difftron {

struct WatchdogOptions {
  double collective_timeout_s = 600;  // a collective must finish within this; <= 0: unwatched
  double step_timeout_s = 0;          // a training step must finish within this; <= 0: unwatched
  double poll_interval_s = 0.05;      // how often the thread looks
};

// The exit status of a process ended by the watchdog.
constexpr int kWatchdogExitCode = 3;

class Watchdog {
 public:
  using TimeoutAction = std::function<void(const std::string& message)>;
  // `who` names this process in messages, e.g. "rank 3 (host gpu-12)". On a timeout the
  // abort hooks run, then `on_timeout(message)` on the watchdog thread; the default
  // action prints the message to stderr and ends the process with kWatchdogExitCode.
  Watchdog(WatchdogOptions options, std::string who, TimeoutAction on_timeout = {});
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  const WatchdogOptions& options() const { return opt_; }
  const std::string& who() const { return who_; }

  using Id = uint64_t;
  // Starts watching a blocking operation (e.g. an MPI collective): end(id) must follow
  // within timeout_s. timeout_s <= 0: not watched (returns 0, and end(0) does nothing).
  Id begin(const std::string& group, const std::string& op, double timeout_s);
  void end(Id id);
  // Watches work that finishes by itself (e.g. an NCCL kernel behind a CUDA event):
  // `done` is polled from the watchdog thread until it returns true, which must happen
  // within timeout_s. `done` must be cheap and thread-safe.
  void watch(const std::string& group, const std::string& op, double timeout_s,
             std::function<bool()> done);
  // Run on a timeout, in order of registration, before the action (e.g. ncclCommAbort).
  void add_abort_hook(std::function<void()> hook);
  bool fired() const;
  size_t pending() const;  // operations being watched now

  // begin() on construction, end() on destruction.
  class Scope {
   public:
    Scope(Watchdog* w, const std::string& group, const std::string& op, double timeout_s)
        : w_(w), id_(w ? w->begin(group, op, timeout_s) : 0) {}
    ~Scope() {
      if (w_) w_->end(id_);
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Watchdog* w_;
    Id id_;
  };

 private:
  struct Entry {
    std::string group, op;
    double start_s, timeout_s;
    std::function<bool()> done;  // empty: finished by end()
  };
  void loop();
  static double now_s();

  WatchdogOptions opt_;
  std::string who_;
  TimeoutAction action_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<Id, Entry> entries_;
  std::vector<std::function<void()>> hooks_;
  Id next_id_ = 1;
  bool stop_ = false, fired_ = false;
  std::thread thread_;
};

}  // namespace difftron
