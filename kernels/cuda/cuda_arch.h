// Whether a build's CUDA architecture list can run on a device, decided before the first kernel
// launch so that a mismatch is reported as such (not as "no kernel image is available" from
// whichever kernel happens to run first).
#pragma once
#include <string>

namespace difftron::cuda {

// archs: the build's list as CMake takes it ("90a", "80;90a", "90-real", ...; "," also separates). Returns "" when
// the list has machine code for compute capability major.minor (an entry equal to it, with or
// without the "a" suffix) or PTX the driver can compile for it (a plain entry, not "-real",
// of a lower or equal capability; "a" entries' PTX runs only on their own capability);
// otherwise a message naming the build's list, the device and the CMake setting to change.
// Lists without numbered entries ("native", "all") are not checked.
std::string arch_mismatch(const std::string& archs, int major, int minor,
                          const std::string& device_name);

// The list this library was compiled for (the DIFFTRON_CUDA_ARCHS CMake setting).
const char* built_archs();

}  // namespace difftron::cuda
