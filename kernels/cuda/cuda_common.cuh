// Device-side helpers shared by the CUDA kernels: bf16/f32 conversion, vector loads of
// V consecutive elements as floats (V = 8: 16-byte accesses), warp/block reductions, a
// grid-stride elementwise driver and dtype dispatch. nvcc only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "base/tensor.h"
#include "kernels/cuda/cuda_context.h"

namespace difftron::cuda {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }

// f[0..V) = p[0..V) as floats. For V == 8, p must be 16-byte aligned.
template <int V, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&f)[V]) {
  if constexpr (V == 8 && std::is_same_v<T, bf16>) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  } else if constexpr (V == 8 && std::is_same_v<T, float>) {
    float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) f[i] = to_float(p[i]);
  }
}

// p[0..V) = f[0..V) converted to T (round to nearest even for bf16).
template <int V, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&f)[V]) {
  if constexpr (V == 8 && std::is_same_v<T, bf16>) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = u;
  } else if constexpr (V == 8 && std::is_same_v<T, float>) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = from_float<T>(f[i]);
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// `red` is shared memory of 33 Ts. Fixed order: deterministic. Safe to call repeatedly.
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();  // previous use of red is finished
  if (lane == 0) red[warp] = x;
  __syncthreads();
  if (warp == 0) {
    T y = lane < nwarps ? red[lane] : T(0);
    y = warp_sum(y);
    if (lane == 0) red[32] = y;
  }
  __syncthreads();
  return red[32];
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Runs op.template apply<V>(i) for i = 0, V, 2V, ... over n elements (V = 8 when every
// pointer is 16-byte aligned, else 1), the n % V tail with V = 1.
template <int V, typename Op>
__global__ void elementwise_kernel(int64_t n, Op op) {
  const int64_t nchunks = n / V;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t c = tid; c < nchunks; c += stride) op.template apply<V>(c * V);
  if (tid < n - nchunks * V) op.template apply<1>(nchunks * V + tid);
}

template <typename Op>
void launch_elementwise(CudaContext& ctx, int64_t n, bool vector_ok, const Op& op) {
  if (n <= 0) return;
  const int threads = 256;
  const int64_t max_blocks = int64_t(ctx.num_sms()) * 16;
  if (vector_ok) {
    int64_t chunks = n / 8;
    int64_t blocks = (std::max<int64_t>(chunks, 8) + threads - 1) / threads;
    blocks = std::min(blocks, max_blocks);
    elementwise_kernel<8, Op><<<unsigned(blocks), threads, 0, ctx.stream()>>>(n, op);
  } else {
    int64_t blocks = std::min((n + threads - 1) / threads, max_blocks);
    elementwise_kernel<1, Op><<<unsigned(blocks), threads, 0, ctx.stream()>>>(n, op);
  }
  DT_CUDA_LAUNCHED();
}

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<float>{}) or f(TypeTag<bf16>{}) by dtype; other dtypes are a bug here (the
// CudaOps layer has already rejected them with a proper message).
template <typename F>
void dispatch_float(DType t, F&& f) {
  if (t == DType::F32)
    f(TypeTag<float>{});
  else if (t == DType::BF16)
    f(TypeTag<bf16>{});
  else
    throw_error("cuda: internal: unsupported dtype ", dtype_name(t), " reached a kernel");
}

}  // namespace difftron::cuda
