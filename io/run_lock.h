// An exclusive claim on a run directory (--ckpt_dir), so that two jobs never write the same
// checkpoints and `latest`: DIR/.lock holds "host pid". A second job is refused with the
// holder's host and pid; a lock left by a process that is gone (same host, pid not alive) is
// taken over with a warning. A lock from another host cannot be checked and is refused.
#pragma once
#include <string>

namespace difftron {

class RunDirLock {
 public:
  // Creates `dir` if needed, checks that it is a writable directory, and takes the lock;
  // throws difftron::Error naming the directory (and the holder) when it cannot.
  explicit RunDirLock(const std::string& dir);
  ~RunDirLock();  // removes the lock file if it is still ours
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;

 private:
  std::string path_, mine_;
};

}  // namespace difftron
