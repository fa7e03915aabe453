// arch_mismatch (kernels/cuda/cuda_arch.h): which build architecture lists run on which GPUs,
// and that a mismatch names the list, the device and the setting to change. Needs the CUDA
// build, not a GPU.
#include <string>

#include <gtest/gtest.h>

#if DIFFTRON_HAVE_CUDA
#include "kernels/cuda/cuda_arch.h"
#endif

namespace difftron {
namespace {

#if DIFFTRON_HAVE_CUDA
using cuda::arch_mismatch;

TEST(CudaArch, MachineCodeOrCompatiblePtxRuns) {
  EXPECT_EQ(arch_mismatch("90a", 9, 0, "H200"), "");
  EXPECT_EQ(arch_mismatch("90", 9, 0, "H100"), "");
  EXPECT_EQ(arch_mismatch("80;90a", 8, 0, "A100"), "");
  EXPECT_EQ(arch_mismatch("80,90a", 8, 6, "A6000"), "");      // sm_80 PTX, compiled by the driver
  EXPECT_EQ(arch_mismatch("90", 10, 0, "B200"), "");          // plain 90 carries PTX
  EXPECT_EQ(arch_mismatch("native", 8, 0, "A100"), "");       // CMake's own choice: unchecked
}

TEST(CudaArch, MismatchIsExplained) {
  const std::string why = arch_mismatch("90a", 8, 0, "NVIDIA A100-SXM4-80GB");
  EXPECT_NE(why.find("\"90a\""), std::string::npos) << why;
  EXPECT_NE(why.find("A100"), std::string::npos) << why;
  EXPECT_NE(why.find("8.0"), std::string::npos) << why;
  EXPECT_NE(why.find("-DDIFFTRON_CUDA_ARCHS=\"80;90a\""), std::string::npos) << why;
  EXPECT_NE(arch_mismatch("90a", 10, 0, "B200"), "");      // "a" PTX runs on 9.0 only
  EXPECT_NE(arch_mismatch("90-real", 10, 0, "B200"), "");  // no PTX at all
  EXPECT_NE(arch_mismatch("90", 8, 9, "L40"), "");         // newer PTX never runs on older GPUs
  EXPECT_NE(cuda::built_archs(), nullptr);
}
#else
TEST(CudaArch, NeedsCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif

}  // namespace
}  // namespace difftron
