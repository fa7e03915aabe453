// Runs a shell command for the tests that drive the `difftron` program (directly or under
// mpirun): its exit status (-1 when it did not exit normally) and its stdout + stderr; and the
// small file helpers those tests share.
#pragma once
#include <sys/wait.h>

#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

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

// The JSON line of a command's output that starts with `{"<key>"` (a failure when none does).
inline nlohmann::json json_line(const CommandResult& r, const std::string& key) {
  std::stringstream ss(r.output);
  for (std::string line; std::getline(ss, line);)
    if (line.rfind("{\"" + key + "\"", 0) == 0) return nlohmann::json::parse(line);
  ADD_FAILURE() << "no JSON line starting with " << key << " in:\n" << r.output;
  return nlohmann::json::object();
}

// A file's whole content ("" if it cannot be read).
inline std::string read_text_file(const std::filesystem::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// An empty folder TMP/<prefix><tag>_<pid> (removed first if it exists).
inline std::filesystem::path fresh_dir(const std::string& prefix, const char* tag) {
  namespace fs = std::filesystem;
  fs::path p = fs::temp_directory_path() / (prefix + tag + "_" + std::to_string(getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

}  // namespace difftron::testing
