// `difftron <command> [flags]`: dispatch to the registered subcommands (train, prepare,
// inspect, generate, ...). `difftron help` lists them; `difftron <command> --help` shows
// a command's flags.
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
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
  os << "\n`difftron <command> --helpon=<command>` or --help lists a command's flags.\n";
  return 2;
}

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
  if (name == "help" || name == "--help" || name == "-h") {
    usage(std::cout);
    return 0;
  }
  auto& reg = difftron::command_registry();
  auto it = reg.find(name);
  if (it == reg.end()) {
    std::cerr << "difftron: unknown command '" << name << "'\n\n";
    return usage(std::cerr);
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
