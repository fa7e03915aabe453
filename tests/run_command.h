// Runs a shell command for the tests that drive the `difftron` program (directly or under
// mpirun): its exit status (-1 when it did not exit normally) and its stdout + stderr.
#pragma once
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace difftron::testing {

struct CommandResult {
  int status;
  std::string output;
};

inline CommandResult run_command(const std::string& cmd) {
  CommandResult r{-1, ""};
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// `difftron <args>` from this build
inline CommandResult run_difftron(const std::string& args) {
  return run_command(std::string(DIFFTRON_BINARY_DIR) + "/difftron " + args);
}

}  // namespace difftron::testing
