// init_normal on the GPU: the counter-based N(0, std^2) generator of kernels/ops.h
// (reference: kernels/cpu/init_normal.cpp), one element per thread in a grid-stride loop.
// The hash is integer arithmetic; log, cos and sqrt run in double precision (no fused or
// fast-math forms: the expression has no add for nvcc to contract into an FMA), so a value
// differs from the CPU's double only by the last bit of CUDA's log/cos, and its f32 / bf16
// rounding from the CPU's at most by one unit of the last place, rarely.
#include <algorithm>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t host_mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ void store_value(float* p, double v) { *p = float(v); }  // RN
__device__ __forceinline__ void store_value(bf16* p, double v) { *p = __float2bfloat16_rn(float(v)); }

template <typename T>
__global__ void init_normal_kernel(T* __restrict__ out, int64_t n, int64_t cols, uint64_t key,
                                   double std, uint64_t full_cols, uint64_t row0, uint64_t col0) {
  constexpr double kTwoPi = 2.0 * 3.14159265358979323846;  // 2.0 * M_PI, exactly
  constexpr double kInv2p53 = 1.0 / 9007199254740992.0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    const uint64_t g = (row0 + uint64_t(r)) * full_cols + col0 + uint64_t(c);
    const uint64_t h1 = mix64(key + (2 * g + 1) * 0x9E3779B97F4A7C15ull);
    const uint64_t h2 = mix64(key + (2 * g + 2) * 0x9E3779B97F4A7C15ull);
    const double u1 = double((h1 >> 11) + 1) * kInv2p53;  // (0, 1]
    const double u2 = double(h2 >> 11) * kInv2p53;        // [0, 1)
    const double v = std * (sqrt(-2.0 * log(u1)) * cos(kTwoPi * u2));
    store_value(out + i, v);
  }
}

}  // namespace

void init_normal(CudaContext& ctx, Tensor& out, int64_t rows, int64_t cols, uint64_t seed,
                 uint64_t tensor_id, double std, int64_t full_cols, int64_t row0, int64_t col0) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  const uint64_t key = host_mix64(host_mix64(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) ^
                                  (tensor_id * 0xD1B54A32D192ED03ull + 0x8CB92BA72F3D8DD7ull));
  constexpr int kThreads = 256;
  const int64_t want = (n + kThreads - 1) / kThreads;
  const int blocks = int(std::min<int64_t>(want, int64_t(ctx.num_sms()) * 16));
  if (out.dtype() == DType::BF16) {
    init_normal_kernel<<<blocks, kThreads, 0, ctx.stream()>>>(
        out.data<bf16>(), n, cols, key, std, uint64_t(full_cols), uint64_t(row0), uint64_t(col0));
  } else {
    init_normal_kernel<<<blocks, kThreads, 0, ctx.stream()>>>(
        out.data<float>(), n, cols, key, std, uint64_t(full_cols), uint64_t(row0), uint64_t(col0));
  }
  DT_CUDA_LAUNCHED();
}

}  // namespace difftron::cuda
