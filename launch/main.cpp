// `difftron <command> [flags]`: dispatch to the registered subcommands (train, prepare,
// inspect, generate, ...). `difftron help` lists them; `difftron <command> --help` shows
// that command's flags in groups, `--helpfull` every flag of the program.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gflags/gflags.h>
#include <glog/logging.h>

#include "base/error.h"
#include "launch/command.h"

namespace difftron {
std::map<std::string, Command>& command_registry() {
  static std::map<std::string, Command> registry;
  return registry;
}
}  // namespace difftron

static int usage(std::ostream& os) {
  os << "usage: difftron <command> [--flag=value ...]\n\ncommands:\n";
  for (auto& [name, cmd] : difftron::command_registry())
    os << "  " << name << std::string(name.size() < 16 ? 16 - name.size() : 1, ' ') << cmd.summary << "\n";
  os << "\n`difftron <command> --help` lists a command's flags; `difftron <command> --helpfull` every flag.\n";
  return 2;
}

// ---- `difftron <command> --help` ------------------------------------------------------

namespace {

// The flags a command reads besides those defined in its own file (gflags names are global:
// a file DECLAREs the flags of another). Keep in step with the DECLARE_ lines of the
// command's file and what it calls (eval loads its model through generate's flags);
// tests/test_cli_help.cpp checks that every flag a command's file declares is listed.
const std::map<std::string, std::vector<std::string>>& shared_flags() {
  static const std::map<std::string, std::vector<std::string>> uses = {
      {"bench-checkpoint", {"device", "vocab_size", "d_model", "n_layers", "n_heads"}},
      {"convert", {"checkpoint", "overwrite", "eos_token", "prompt", "prompt_ids"}},
      {"eval", {"data", "seq", "batch", "device", "checkpoint", "from_hf"}},
      {"generate", {"device", "from_hf", "seed", "temperature", "top_k"}},
      {"plan",
       {"model_config", "attention", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
        "ffn_dim", "data", "seq", "batch", "grad_accum", "tp", "dp", "device", "keep_attention_state", "recompute"}},
      {"plot", {"out"}},
  };
  return uses;
}

// Groups of the flags `train` defines (and other commands share), in the order --help
// shows them. A flag in no group is shown under its command's name.
const std::vector<std::pair<std::string, std::vector<std::string>>>& flag_groups() {
  static const std::vector<std::pair<std::string, std::vector<std::string>>> groups = {
      {"model", {"model_config", "attention", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                 "head_dim", "ffn_dim"}},
      {"data and batch", {"data", "val_data", "seq", "batch", "grad_accum"}},
      {"optimizer and schedule",
       {"steps", "lr", "min_lr_ratio", "warmup", "lr_schedule", "beta1", "beta2", "weight_decay", "grad_clip"}},
      {"checkpoint", {"ckpt_dir", "ckpt_every", "ckpt_keep", "async_save", "resume", "init_from"}},
      {"evaluation and sampling",
       {"eval_every", "eval_batches", "sample_tokens", "sample_prompt", "temperature", "top_k"}},
      {"parallel (mpirun / srun)", {"tp", "dp", "grid", "collective_timeout", "step_timeout"}},
      {"device, memory and numerics", {"device", "recompute", "keep_attention_state", "deterministic", "seed"}},
      {"logging", {"log_every", "peak_tflops", "profile_ops"}},
  };
  return groups;
}

// A default as one types it: the shortest decimal that reads back as the same double
// (gflags stores 0.9 as "0.90000000000000002"); strings bare unless empty or spaced.
std::string readable_default(const gflags::CommandLineFlagInfo& f) {
  if (f.type == "double") {
    const double v = std::strtod(f.default_value.c_str(), nullptr);
    char buf[64];
    if (v == double(int64_t(v)) && std::abs(v) < 1e15) {  // 600, not 6e+02
      std::snprintf(buf, sizeof buf, "%.0f", v);
      return buf;
    }
    for (int precision = 1; precision <= 17; ++precision) {
      std::snprintf(buf, sizeof buf, "%.*g", precision, v);
      if (std::strtod(buf, nullptr) == v) break;
    }
    return buf;
  }
  if (f.type == "string" && (f.default_value.empty() || f.default_value.find(' ') != std::string::npos))
    return "\"" + f.default_value + "\"";
  return f.default_value;
}

// `  --name=default` then the description, wrapped to 100 columns under column 32.
void print_flag(std::ostream& os, const gflags::CommandLineFlagInfo& f, const std::string& drop_prefix) {
  constexpr size_t kColumn = 32, kWidth = 100;
  std::string head = "  --" + f.name + "=" + readable_default(f);
  std::string text = f.description;
  // "prepare: output dataset folder" under the heading "prepare": the prefix says it twice
  if (!drop_prefix.empty() && text.rfind(drop_prefix + ": ", 0) == 0) text.erase(0, drop_prefix.size() + 2);
  os << head;
  size_t col = head.size();
  if (col + 2 > kColumn) {
    os << "\n";
    col = 0;
  }
  os << std::string(kColumn - col, ' ');
  col = kColumn;
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find(' ', at);
    if (end == std::string::npos) end = text.size();
    const std::string word = text.substr(at, end - at);
    if (col > kColumn && col + 1 + word.size() > kWidth) {
      os << "\n" << std::string(kColumn, ' ');
      col = kColumn;
    } else if (col > kColumn) {
      os << ' ';
      ++col;
    }
    os << word;
    col += word.size();
    at = end + 1;
  }
  os << "\n";
}

// The repository's root as this file was compiled (".../launch/main.cpp" less the tail), to
// show flags' files relative to it.
std::string source_root() {
  const std::string self = __FILE__;
  const size_t at = self.rfind("launch/main.cpp");
  return at == std::string::npos ? std::string() : self.substr(0, at);
}

std::string relative_file(const std::string& file) {
  const std::string root = source_root();
  if (!root.empty() && file.rfind(root, 0) == 0) return file.substr(root.size());
  return file;
}

// `difftron <command> --help`: the command's own flags and the shared ones it reads, grouped.
void command_help(std::ostream& os, const std::string& name, const difftron::Command& cmd) {
  std::set<std::string> used;
  if (auto it = shared_flags().find(name); it != shared_flags().end()) used.insert(it->second.begin(), it->second.end());
  std::vector<gflags::CommandLineFlagInfo> all;
  gflags::GetAllFlags(&all);
  std::map<std::string, gflags::CommandLineFlagInfo> mine;  // by name
  for (const auto& f : all)
    if (f.filename == cmd.file || used.count(f.name)) mine[f.name] = f;

  os << "usage: difftron " << name << " [--flag=value ...]\n" << cmd.summary << "\n";
  auto section = [&](const std::string& title, const std::vector<std::string>& names) {
    bool first = true;
    for (const auto& n : names) {
      auto it = mine.find(n);
      if (it == mine.end()) continue;
      if (first) os << "\n" << title << ":\n";
      first = false;
      print_flag(os, it->second, name);
      mine.erase(it);
    }
  };
  std::set<std::string> grouped;
  for (const auto& [title, names] : flag_groups()) grouped.insert(names.begin(), names.end());
  std::vector<std::string> own;  // the command's flags in no group, first
  for (const auto& [n, f] : mine)
    if (!grouped.count(n)) own.push_back(n);
  section(name, own);
  for (const auto& [title, names] : flag_groups()) section(title, names);
  os << "\nEvery flag of the program (all commands, logging: --v, --minloglevel, ...): difftron " << name
     << " --helpfull\n";
}

// `--helpfull`: every flag the program has, by the file that defines it: the commands' files
// first, then the libraries' (glog's logging flags, gflags' own).
void full_help(std::ostream& os) {
  std::vector<gflags::CommandLineFlagInfo> all;
  gflags::GetAllFlags(&all);
  std::map<std::string, std::string> command_of;  // file -> command
  for (const auto& [name, cmd] : difftron::command_registry()) command_of[cmd.file] = name;
  std::map<std::string, std::vector<gflags::CommandLineFlagInfo>> ours, libraries;  // by heading
  for (const auto& f : all) {
    const std::string file = relative_file(f.filename);
    if (file != f.filename || command_of.count(f.filename)) {
      auto it = command_of.find(f.filename);
      ours[it == command_of.end() ? file : file + " (difftron " + it->second + ")"].push_back(f);
    } else {
      const bool gflags = file.find("gflags") != std::string::npos;
      const std::string base = file.substr(file.rfind('/') + 1);
      libraries[(gflags ? "gflags, " : "logging (glog), ") + base].push_back(f);
    }
  }
  os << "usage: difftron <command> [--flag=value ...]; every flag of the program, by the file that defines it\n";
  for (const auto* part : {&ours, &libraries})
    for (const auto& [heading, flags] : *part) {
      os << "\n" << heading << ":\n";
      for (const auto& f : flags) print_flag(os, f, "");
    }
}

// The help request among a command's arguments: "full" (--helpfull), the name of the command
// whose flags to show (--help, -h, --helpshort; --helpon=<command>), or "" (none). gflags'
// own --help would print all 280-odd flags and exit 1.
std::string help_request(const std::string& command, int argc, char** argv) {
  std::string request;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") break;
    if (a.rfind("--", 0) == 0) a.erase(0, 1);
    if (a == "-helpfull") return "full";
    if (a == "-help" || a == "-h" || a == "-helpshort" || a == "-help=true") request = command;
    if (a.rfind("-helpon=", 0) == 0 && difftron::command_registry().count(a.substr(8))) request = a.substr(8);
  }
  return request;
}

}  // namespace

// Library messages name config fields ("vocab_size (33) must be a multiple of tp (2)"); the
// user set them through flags of the same names. Name them as flags: `field (` followed by a
// number and `field=` become `--field (` and `--field=`, for every flag this program has.
std::string name_flags(std::string msg) {
  std::vector<gflags::CommandLineFlagInfo> flags;
  gflags::GetAllFlags(&flags);
  for (const auto& f : flags) {
    const std::string& n = f.name;
    for (size_t at = msg.find(n); at != std::string::npos; at = msg.find(n, at + n.size())) {
      const char before = at > 0 ? msg[at - 1] : ' ';
      if (std::isalnum(static_cast<unsigned char>(before)) || before == '_' || before == '-' || before == '.') continue;
      const size_t end = at + n.size();
      const bool call = msg.compare(end, 2, " (") == 0 && end + 2 < msg.size() &&
                        (std::isdigit(static_cast<unsigned char>(msg[end + 2])) || msg[end + 2] == '-');
      const bool assign = end + 1 < msg.size() && msg[end] == '=' && msg[end + 1] != ' ';
      if (!call && !assign) continue;
      msg.insert(at, "--");
      at += 2;
    }
  }
  return msg;
}

int main(int argc, char** argv) {
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv[0]);
  if (argc < 2) return usage(std::cerr);
  std::string name = argv[1];
  auto& reg = difftron::command_registry();
  if (name == "help" || name == "--help" || name == "-h") {
    // `difftron help train` is `difftron train --help`
    if (argc > 2 && reg.count(argv[2])) {
      command_help(std::cout, argv[2], reg.at(argv[2]));
      return 0;
    }
    usage(std::cout);
    return 0;
  }
  if (name == "--helpfull") {
    full_help(std::cout);
    return 0;
  }
  auto it = reg.find(name);
  if (it == reg.end()) {
    std::cerr << "difftron: unknown command '" << name << "'\n\n";
    return usage(std::cerr);
  }
  const std::string help = help_request(name, argc, argv);
  if (help == "full") {
    full_help(std::cout);
    return 0;
  }
  if (!help.empty()) {
    command_help(std::cout, help, reg.at(help));
    return 0;
  }
  std::string prog = std::string("difftron ") + name;
  std::vector<char*> args;
  args.push_back(prog.data());
  for (int i = 2; i < argc; ++i) args.push_back(argv[i]);
  int n = int(args.size());
  gflags::SetUsageMessage("difftron " + name + ": " + it->second.summary);
  std::string error;
  try {
    return it->second.run(n, args.data());
  } catch (const difftron::Error& e) {
    error = std::string("error: ") + e.what();
  } catch (const std::exception& e) {
    error = std::string("unexpected error: ") + e.what();
  }
  error = name_flags(error);
  // The command's objects (MPI included) are gone by now. Leave without the exit handlers:
  // after a failed write (disk full, I/O error) HDF5 1.10's handler tries to close the broken
  // file again and crashes, which would turn a clear rc 1 into a segfault.
  std::cerr << "difftron " << name << ": " << error << std::endl;
  google::FlushLogFiles(google::GLOG_INFO);
  std::fflush(nullptr);
  std::_Exit(1);
}
