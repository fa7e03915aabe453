// The watchdog thread: polls the watched operations, and on the first one past its
// timeout runs the abort hooks and the timeout action (by default: message, exit).
#include "parallel/watchdog.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace difftron {

double Watchdog::now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

Watchdog::Watchdog(WatchdogOptions options, std::string who, TimeoutAction on_timeout)
    : opt_(options), who_(std::move(who)), action_(std::move(on_timeout)) {
  if (!action_) {
    action_ = [](const std::string& message) {
      std::fprintf(stderr, "%s\n", message.c_str());
      std::fflush(stderr);
      std::_Exit(kWatchdogExitCode);
    };
  }
  if (!(opt_.poll_interval_s > 0)) opt_.poll_interval_s = 0.05;
  thread_ = std::thread([this] { loop(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

Watchdog::Id Watchdog::begin(const std::string& group, const std::string& op, double timeout_s) {
  if (!(timeout_s > 0)) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  Id id = next_id_++;
  entries_[id] = Entry{group, op, now_s(), timeout_s, {}};
  return id;
}

void Watchdog::end(Id id) {
  if (id == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  entries_.erase(id);
}

void Watchdog::watch(const std::string& group, const std::string& op, double timeout_s,
                     std::function<bool()> done) {
  if (!(timeout_s > 0) || !done) return;
  std::lock_guard<std::mutex> lock(mu_);
  entries_[next_id_++] = Entry{group, op, now_s(), timeout_s, std::move(done)};
}

void Watchdog::add_abort_hook(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(mu_);
  hooks_.push_back(std::move(hook));
}

bool Watchdog::fired() const {
  std::lock_guard<std::mutex> lock(mu_);
  return fired_;
}

size_t Watchdog::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.size();
}

void Watchdog::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, std::chrono::duration<double>(opt_.poll_interval_s));
    if (stop_) break;
    const double t = now_s();
    const Entry* late = nullptr;
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->second.done && it->second.done()) {
        it = entries_.erase(it);
        continue;
      }
      if (t - it->second.start_s > it->second.timeout_s && !late) late = &it->second;
      ++it;
    }
    if (!late) continue;
    std::ostringstream msg;
    msg << "difftron watchdog: " << who_ << ": " << late->op << " on " << late->group
        << " did not finish within " << late->timeout_s << " s (running for "
        << (t - late->start_s) << " s); aborting the communicators and exiting with status "
        << kWatchdogExitCode;
    fired_ = true;
    auto hooks = hooks_;
    entries_.clear();
    lock.unlock();
    for (auto& h : hooks) h();
    action_(msg.str());
    return;  // fires once
  }
}

}  // namespace difftron
