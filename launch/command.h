// Subcommands of the one `difftron` program. Each tool registers itself at static-init
// time with DIFFTRON_COMMAND(name, summary, function); launch/main.cpp dispatches.
// A command's function gets argv with argv[0] = "difftron <name>" and parses its own
// gflags; it returns the process exit code. Errors thrown as difftron::Error are
// printed by main and exit with status 1.
#pragma once
#include <functional>
#include <map>
#include <string>

namespace difftron {

struct Command {
  std::string summary;
  std::function<int(int argc, char** argv)> run;
};

std::map<std::string, Command>& command_registry();

struct CommandRegistrar {
  CommandRegistrar(const char* name, const char* summary, int (*fn)(int, char**)) {
    command_registry()[name] = Command{summary, fn};
  }
};

}  // namespace difftron

#define DIFFTRON_CONCAT_INNER(a, b) a##b
#define DIFFTRON_CONCAT(a, b) DIFFTRON_CONCAT_INNER(a, b)
#define DIFFTRON_COMMAND(name, summary, fn) \
  static ::difftron::CommandRegistrar DIFFTRON_CONCAT(difftron_command_, __COUNTER__)(name, summary, fn)
