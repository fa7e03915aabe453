// arch_mismatch: see cuda_arch.h.
#include "kernels/cuda/cuda_arch.h"

#include <cctype>
#include <sstream>
#include <string>

namespace difftron::cuda {

std::string arch_mismatch(const std::string& archs, int major, int minor,
                          const std::string& device_name) {
  const int cc = major * 10 + minor;
  std::string norm = archs;
  for (char& c : norm)
    if (c == ',') c = ';';
  std::stringstream list(norm);
  std::string entry;
  bool numeric = false;
  while (std::getline(list, entry, ';')) {
    size_t i = 0;
    while (i < entry.size() && std::isdigit(static_cast<unsigned char>(entry[i]))) ++i;
    if (i == 0) continue;  // "native", "all", ...: CMake chose; nothing to check
    numeric = true;
    const int arch = std::stoi(entry.substr(0, i));
    const std::string rest = entry.substr(i);
    const bool specific = !rest.empty() && rest[0] == 'a';  // "90a": this capability only
    const bool real_only = rest.find("-real") != std::string::npos;
    if (arch == cc) return "";
    if (!specific && !real_only && arch < cc) return "";  // PTX, compiled by the driver
  }
  if (!numeric) return "";
  return "this build has GPU code for CUDA architectures \"" + archs + "\" only; device " +
         device_name + " is compute capability " + std::to_string(major) + "." +
         std::to_string(minor) + ": rebuild with -DDIFFTRON_CUDA_ARCHS=\"" +
         std::to_string(cc) + ";" + archs + "\" (e.g. tools/build.sh -DDIFFTRON_CUDA_ARCHS=...)";
}

const char* built_archs() {
#ifdef DIFFTRON_CUDA_ARCHS_LIST
  return DIFFTRON_CUDA_ARCHS_LIST;
#else
  return "";
#endif
}

}  // namespace difftron::cuda
