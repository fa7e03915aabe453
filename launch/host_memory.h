// Host memory the kernel says is available, for the commands' up-front checks (train,
// generate, convert refuse a model that cannot fit rather than meet the OOM killer).
#pragma once
#include <fstream>
#include <string>

namespace difftron {

// Bytes of MemAvailable (/proc/meminfo), or -1 if unknown.
inline double host_memory_available() {
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  double kb;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024.0;
  return -1;
}

}  // namespace difftron
