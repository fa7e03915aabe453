// Reductions and BLAS-1 updates: sum_squares (deterministic: a fixed grid of per-block fp64
// partials summed on the host in a fixed order), axpy (y += alpha x) and scale (x *= alpha).
#include <algorithm>
#include <vector>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

// The grid does not depend on the device, so the summation order (and the result bits)
// depend only on n: kSumBlocks blocks, fewer for small tensors (each thread at least
// kSumPerThread elements), so that a norm weight or a lambda vector costs one block, not 512
// (the gradient norm launches one grid per parameter tensor, 219-339 of them at 24 layers).
constexpr int kSumBlocks = 512;
constexpr int kSumThreads = 256;
constexpr int64_t kSumPerThread = 64;
int sum_blocks(int64_t n) {
  const int64_t per_block = kSumThreads * kSumPerThread;
  return int(std::min<int64_t>(kSumBlocks, std::max<int64_t>(1, (n + per_block - 1) / per_block)));
}

template <int V, typename T>
__global__ void sum_squares_kernel(const T* x, int64_t n, double* partials) {
  __shared__ double red[33];
  const int64_t nchunks = n / V;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  double acc = 0;
  for (int64_t c = tid; c < nchunks; c += stride) {
    float f[V];
    load_floats<V>(x + c * V, f);
#pragma unroll
    for (int j = 0; j < V; ++j) acc += double(f[j]) * double(f[j]);
  }
  if (tid < n - nchunks * V) {
    double f = to_float(x[nchunks * V + tid]);
    acc += f * f;
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename X, typename Y>
struct AxpyOp {
  float alpha;
  const X* x;
  Y* y;
  template <int V>
  __device__ void apply(int64_t i) const {
    float a[V], b[V];
    load_floats<V>(x + i, a);
    load_floats<V>(y + i, b);
#pragma unroll
    for (int j = 0; j < V; ++j) b[j] += alpha * a[j];
    store_floats<V>(y + i, b);
  }
};

template <typename T>
struct ScaleOp {
  float alpha;
  T* x;
  template <int V>
  __device__ void apply(int64_t i) const {
    float a[V];
    load_floats<V>(x + i, a);
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] *= alpha;
    store_floats<V>(x + i, a);
  }
};

}  // namespace

namespace {
// sum_blocks(n) partials of x's sum of squares into `partials` (nothing for an empty x)
void launch_sum_squares(CudaContext& ctx, const Tensor& x, double* partials) {
  if (x.numel() == 0) return;
  const unsigned blocks = unsigned(sum_blocks(x.numel()));
  dispatch_float(x.dtype(), [&](auto t) {
    using T = typename decltype(t)::type;
    if (aligned16(x.raw()))
      sum_squares_kernel<8, T><<<blocks, kSumThreads, 0, ctx.stream()>>>(x.data<T>(), x.numel(), partials);
    else
      sum_squares_kernel<1, T><<<blocks, kSumThreads, 0, ctx.stream()>>>(x.data<T>(), x.numel(), partials);
    DT_CUDA_LAUNCHED();
  });
}
}  // namespace

double sum_squares(CudaContext& ctx, const Tensor& x) {
  return x.numel() == 0 ? 0.0 : sum_squares_each(ctx, {x})[0];
}

std::vector<double> sum_squares_each(CudaContext& ctx, const std::vector<Tensor>& xs) {
  std::vector<double> out(xs.size(), 0.0);
  if (xs.empty()) return out;
  // one row of kSumBlocks slots per tensor (its first sum_blocks(n) used), one copy and one
  // synchronisation for all; each row summed on the host in the same order as a lone
  // sum_squares, so the bits are its bits
  const size_t row = kSumBlocks;
  double* partials = static_cast<double*>(ctx.scratch(xs.size() * row * sizeof(double)));
  for (size_t i = 0; i < xs.size(); ++i) launch_sum_squares(ctx, xs[i], partials + i * row);
  std::vector<double> host(xs.size() * row);
  DT_CUDA(cudaMemcpyAsync(host.data(), partials, host.size() * sizeof(double), cudaMemcpyDeviceToHost,
                          ctx.stream()));
  DT_CUDA(cudaStreamSynchronize(ctx.stream()));
  for (size_t i = 0; i < xs.size(); ++i) {
    if (xs[i].numel() == 0) continue;  // its row was never written
    double s = 0;
    for (int b = 0; b < sum_blocks(xs[i].numel()); ++b) s += host[i * row + b];
    out[i] = s;
  }
  return out;
}

void axpy(CudaContext& ctx, float alpha, const Tensor& x, Tensor& y) {
  const bool vec = aligned16(x.raw()) && aligned16(y.raw());
  dispatch_float(x.dtype(), [&](auto xt) {
    using X = typename decltype(xt)::type;
    dispatch_float(y.dtype(), [&](auto yt) {
      using Y = typename decltype(yt)::type;
      launch_elementwise(ctx, x.numel(), vec, AxpyOp<X, Y>{alpha, x.data<X>(), y.data<Y>()});
    });
  });
}

void scale(CudaContext& ctx, Tensor& x, float alpha) {
  dispatch_float(x.dtype(), [&](auto xt) {
    using X = typename decltype(xt)::type;
    launch_elementwise(ctx, x.numel(), aligned16(x.raw()), ScaleOp<X>{alpha, x.data<X>()});
  });
}

}  // namespace difftron::cuda
