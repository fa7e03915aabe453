// Softmax cross-entropy over the vocabulary on the GPU (reference:
// kernels/cpu/cross_entropy.cpp), for the LM head's row chunks (Model::head_loss). Forward:
// one block per row, a single pass with an online max/sum in f32 (logits read once).
// Backward: one pass, dlogits = softmax * dloss - onehot * dloss, may overwrite the logits.
// logits/dlogits f32 or bf16; losses, lse f32; targets < 0 are ignored, >= V raise an Error.
#include <climits>
#include <cmath>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

constexpr int kThreads = 256;

// (m, s) represents s * exp(m); merges two such sums.
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) {
    m = mn;
    s = 0.0f;
    return;
  }
  s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}

template <int V, typename T>
__global__ void cross_entropy_forward_kernel(const T* __restrict__ logits,
                                             const int32_t* __restrict__ targets,
                                             float* __restrict__ losses, float* __restrict__ lse,
                                             int64_t vocab, int* flag) {
  __shared__ float red_m[32], red_s[32];
  const int64_t r = blockIdx.x;
  const T* x = logits + r * vocab;
  float m = -INFINITY, s = 0.0f;
  for (int64_t c = int64_t(threadIdx.x) * V; c < vocab; c += int64_t(blockDim.x) * V) {
    float f[V];
    load_floats<V>(x + c, f);
    float cm = f[0];
#pragma unroll
    for (int j = 1; j < V; ++j) cm = fmaxf(cm, f[j]);
    float cs = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) cs += __expf(f[j] - cm);
    merge_max_sum(m, s, cm, cs);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge_max_sum(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float M = red_m[0], Ssum = red_s[0];
    for (int w = 1; w < nwarps; ++w) merge_max_sum(M, Ssum, red_m[w], red_s[w]);
    const float l = M + logf(Ssum);
    lse[r] = l;
    const int32_t t = targets[r];
    if (t >= vocab) {
      atomicMin(flag, int(r));
      losses[r] = 0.0f;
    } else {
      losses[r] = t < 0 ? 0.0f : l - to_float(x[t]);
    }
  }
}

template <int V, typename T>
__global__ void cross_entropy_backward_kernel(const T* logits, const int32_t* __restrict__ targets,
                                              const float* __restrict__ lse, float dloss,
                                              T* dlogits, int64_t vocab) {
  const int64_t r = blockIdx.x;
  const int32_t t = targets[r];
  const float l = lse[r];
  const T* x = logits + r * vocab;
  T* d = dlogits + r * vocab;
  for (int64_t c = int64_t(threadIdx.x) * V; c < vocab; c += int64_t(blockDim.x) * V) {
    float f[V];
    load_floats<V>(x + c, f);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      f[j] = t < 0 ? 0.0f : __expf(f[j] - l) * dloss;
      if (c + j == t) f[j] -= dloss;
    }
    store_floats<V>(d + c, f);
  }
}

}  // namespace

void cross_entropy_forward(CudaContext& ctx, const Tensor& logits, const Tensor& targets,
                           Tensor& losses, Tensor& lse) {
  const int64_t rows = logits.rows(), vocab = logits.cols();
  if (rows == 0) return;
  int* flag = ctx.reset_flag();
  const bool vec = vocab % 8 == 0 && aligned16(logits.raw());
  dispatch_float(logits.dtype(), [&](auto tt) {
    using T = typename decltype(tt)::type;
    auto kernel = vec ? cross_entropy_forward_kernel<8, T> : cross_entropy_forward_kernel<1, T>;
    kernel<<<unsigned(rows), kThreads, 0, ctx.stream()>>>(logits.data<T>(), targets.data<int32_t>(),
                                                          losses.data<float>(), lse.data<float>(),
                                                          vocab, flag);
    DT_CUDA_LAUNCHED();
  });
  const int bad = ctx.read_flag();
  if (bad != INT_MAX) {
    int32_t t = 0;
    DT_CUDA(cudaMemcpy(&t, targets.data<int32_t>() + bad, sizeof(int32_t), cudaMemcpyDeviceToHost));
    throw_error("cuda cross_entropy_forward: target id ", t, " at row ", bad,
                " is outside the vocabulary [0, ", vocab, ") (logits ", logits.str(), ")");
  }
}

void cross_entropy_backward(CudaContext& ctx, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, float dloss, Tensor& dlogits) {
  const int64_t rows = logits.rows(), vocab = logits.cols();
  if (rows == 0) return;
  const bool vec = vocab % 8 == 0 && aligned16(logits.raw()) && aligned16(dlogits.raw());
  dispatch_float(logits.dtype(), [&](auto tt) {
    using T = typename decltype(tt)::type;
    auto kernel = vec ? cross_entropy_backward_kernel<8, T> : cross_entropy_backward_kernel<1, T>;
    kernel<<<unsigned(rows), kThreads, 0, ctx.stream()>>>(logits.data<T>(), targets.data<int32_t>(),
                                                          lse.data<float>(), dloss,
                                                          dlogits.data<T>(), vocab);
    DT_CUDA_LAUNCHED();
  });
}

}  // namespace difftron::cuda
