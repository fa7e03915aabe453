// DIR/.lock: see run_lock.h.
#include "io/run_lock.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <glog/logging.h>

#include "base/error.h"

namespace fs = std::filesystem;

namespace difftron {
namespace {

std::string this_host() {
  char h[256] = {0};
  if (gethostname(h, sizeof h - 1) != 0) return "unknown-host";
  return h;
}

std::string read_all(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Creates the lock file with `text` if it does not exist; false if it does.
bool create_exclusive(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST) return false;
    throw_error(path, ": cannot create the run lock: ", std::strerror(errno),
                " (is the checkpoint directory writable?)");
  }
  const bool ok = ::write(fd, text.data(), text.size()) == ssize_t(text.size()) && ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok) {
    ::unlink(path.c_str());
    throw_error(path, ": cannot write the run lock: ", std::strerror(err));
  }
  return true;
}

}  // namespace

RunDirLock::RunDirLock(const std::string& dir) {
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw_error("checkpoint directory ", dir, " exists and is not a directory");
  fs::create_directories(dir, ec);
  if (ec) throw_error("cannot create checkpoint directory ", dir, ": ", ec.message());
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    throw_error("checkpoint directory ", dir, " is not writable: ", std::strerror(errno));
  path_ = (fs::path(dir) / ".lock").string();
  mine_ = this_host() + " " + std::to_string(::getpid()) + "\n";
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (create_exclusive(path_, mine_)) return;
    std::istringstream holder(read_all(path_));
    std::string host;
    long pid = 0;
    holder >> host >> pid;
    const bool same_host = host == this_host();
    if (same_host && pid > 0 && ::kill(pid_t(pid), 0) != 0 && errno == ESRCH) {
      LOG(WARNING) << path_ << ": taking over a stale lock of process " << pid << " on " << host
                   << ", which no longer runs";
      ::unlink(path_.c_str());
      continue;
    }
    throw_error("checkpoint directory ", dir, " is in use by process ", pid, " on host ", host.empty() ? "?" : host,
                " (", path_, "); two jobs must not share a --ckpt_dir. If that job is gone",
                same_host ? "" : " (another host: its state cannot be checked from here)", ", delete ", path_);
  }
  throw_error(path_, ": cannot take the run lock (it keeps reappearing)");
}

RunDirLock::~RunDirLock() {
  if (!path_.empty() && read_all(path_) == mine_) ::unlink(path_.c_str());
}

}  // namespace difftron
