// A fixed set of worker threads taking jobs from one queue in order of submission. Jobs must
// not throw (they report failures their own way); the destructor runs every queued job, then
// joins. Where the system cannot start as many threads as asked, it runs with fewer (with none,
// submit() runs the job itself). Used where host work (checksums, conversions, file reads) runs beside the calling
// thread, which keeps everything else (Ops, MPI, HDF5 writes) to itself.
#pragma once
#include <algorithm>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace difftron {

class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    try {
      for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { work(); });
    } catch (const std::system_error&) {
    }
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    ready_.notify_all();
    for (auto& t : workers_) t.join();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()); }

  // With no workers the job runs here and now.
  void submit(std::function<void()> job) {
    if (workers_.empty()) {
      job();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(std::move(job));
    }
    ready_.notify_one();
  }

  // The machine's hardware threads, at least 1 and at most `cap`.
  static int hardware_threads(int cap) {
    return std::clamp(int(std::thread::hardware_concurrency()), 1, std::max(cap, 1));
  }

 private:
  void work() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ready_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
        if (jobs_.empty()) return;  // stopping, and nothing left to run
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }

  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace difftron
