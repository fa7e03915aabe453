// `difftron <command> [flags]`: dispatch to the registered subcommands (train, prepare,
// inspect, generate, ...). `difftron help` lists them; `difftron <command> --help` shows
// a command's flags.
#include <cstring>
#include <iostream>

#include <gflags/gflags.h>
#include <glog/logging.h>

#include "core/error.h"
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
  try {
    return it->second.run(n, args.data());
  } catch (const difftron::Error& e) {
    std::cerr << "difftron " << name << ": error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "difftron " << name << ": unexpected error: " << e.what() << "\n";
    return 1;
  }
}
