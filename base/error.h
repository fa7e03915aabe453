// Errors raised by library code (core, kernels, parallel, io). Library code throws
// difftron::Error with a message that names the file, flag or value at fault; only
// launch/ and tools/ decide to print it and exit.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace difftron {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Builds a message from streamable parts: throw_error("bad value ", x, " in ", path).
template <typename... Parts>
[[noreturn]] void throw_error(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(os.str());
}

}  // namespace difftron

// Internal invariant (a bug, not bad input): message carries file:line.
#define DT_CHECK(cond, ...)                                                           \
  do {                                                                                \
    if (!(cond))                                                                      \
      ::difftron::throw_error(__FILE__, ":", __LINE__, ": check failed: " #cond ": ", \
                              ##__VA_ARGS__);                                         \
  } while (0)
