// Subcommands of the one `difftron` program. Each tool registers itself at static-init
// time with DIFFTRON_COMMAND(name, summary, function); launch/main.cpp dispatches.
// A command's function gets argv with argv[0] = "difftron <name>" and parses its own
// gflags; it returns the process exit code. Errors thrown as difftron::Error are
// printed by main and exit with status 1. `difftron <name> --help` is answered by main:
// the flags defined in the file that registers the command (gflags records each flag's
// file), plus the flags of other files it reads (the table in launch/main.cpp).
#pragma once
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace difftron {

struct Command {
  std::string summary;
  std::function<int(int argc, char** argv)> run;
  std::string file;  // the source file that registers it (__FILE__, as gflags records flags)
};

std::map<std::string, Command>& command_registry();

struct CommandRegistrar {
  CommandRegistrar(const char* name, const char* summary, int (*fn)(int, char**), const char* file) {
    command_registry()[name] = Command{summary, fn, file};
  }
};

}  // namespace difftron

namespace difftron {
// The items of a comma-separated flag value ("a,b,,c" -> a, b, c; empty items dropped).
// One item of a flag's list read whole as a number (std::stoll for integers, std::stod for
// floating point): nullopt when it is not one (empty, out of range, characters left over).
// Callers name the flag and the accepted range in their own error.
template <class T>
std::optional<T> parse_whole(const std::string& item) {
  size_t used = 0;
  T v{};
  try {
    if constexpr (std::is_floating_point_v<T>)
      v = T(std::stod(item, &used));
    else
      v = T(std::stoll(item, &used));
  } catch (const std::exception&) {
    return std::nullopt;
  }
  if (used != item.size()) return std::nullopt;
  return v;
}

inline std::vector<std::string> split_flag_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}
}  // namespace difftron

#define DIFFTRON_CONCAT_INNER(a, b) a##b
#define DIFFTRON_CONCAT(a, b) DIFFTRON_CONCAT_INNER(a, b)
#define DIFFTRON_COMMAND(name, summary, fn) \
  static ::difftron::CommandRegistrar DIFFTRON_CONCAT(difftron_command_, __COUNTER__)(name, summary, fn, __FILE__)
