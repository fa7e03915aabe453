// RMSNorm on the GPU (reference: kernels/cpu/rmsnorm.cpp): forward with an output scale,
// backward with the residual add fused (dx +=) and a deterministic weight gradient: each
// block owns a fixed range of rows and keeps its dw partial in shared memory (every thread
// only touches its own columns), then a second kernel sums the partials in block order.
// x, y, dy, dx share one dtype (f32 or bf16); w f32 or bf16; rstd f32; dw f32 or bf16.
#include <algorithm>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

// Threads per row: enough for one V-vector each, a multiple of 32, at most 256.
int row_threads(int64_t cols, int V) {
  int64_t vecs = (cols + V - 1) / V;
  int64_t t = (vecs + 31) / 32 * 32;
  return int(std::clamp<int64_t>(t, 32, 256));
}

template <int V, typename T, typename W>
__global__ void rmsnorm_forward_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                       T* __restrict__ y, float* __restrict__ rstd, int cols,
                                       float eps, float scale) {
  __shared__ float red[33];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * cols;
  T* yr = y + r * cols;
  float ss = 0;
  for (int c = threadIdx.x * V; c < cols; c += blockDim.x * V) {
    float f[V];
    load_floats<V>(xr + c, f);
#pragma unroll
    for (int j = 0; j < V; ++j) ss += f[j] * f[j];
  }
  ss = block_sum(ss, red);
  const float rs = 1.0f / sqrtf(ss / float(cols) + eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  for (int c = threadIdx.x * V; c < cols; c += blockDim.x * V) {
    float f[V], g[V];
    load_floats<V>(xr + c, f);
    load_floats<V>(w + c, g);
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] = f[j] * rs * g[j] * scale;
    store_floats<V>(yr + c, f);
  }
}

// dx_c += s r (dy_c w_c - x_c r^2 mean_k(dy_k w_k x_k)); partial[block, c] = sum over the
// block's rows of dy_c x_c r s.
template <int V, typename T, typename W>
__global__ void rmsnorm_backward_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                        const float* __restrict__ rstd, const T* __restrict__ dy,
                                        T* __restrict__ dx, float* __restrict__ partial,
                                        int64_t rows, int cols, int64_t rows_per_block,
                                        float scale) {
  extern __shared__ float dw_acc[];  // [cols]
  __shared__ float red[33];
  for (int c = threadIdx.x * V; c < cols; c += blockDim.x * V)
#pragma unroll
    for (int j = 0; j < V; ++j) dw_acc[c + j] = 0.0f;
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  for (int64_t r = r0; r < r1; ++r) {
    const float rs = rstd[r];
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    T* dxr = dx + r * cols;
    float dot = 0;
    for (int c = threadIdx.x * V; c < cols; c += blockDim.x * V) {
      float a[V], g[V], d[V];
      load_floats<V>(xr + c, a);
      load_floats<V>(w + c, g);
      load_floats<V>(dyr + c, d);
#pragma unroll
      for (int j = 0; j < V; ++j) dot += d[j] * g[j] * a[j];
    }
    dot = block_sum(dot, red);
    const float m = dot / float(cols);
    for (int c = threadIdx.x * V; c < cols; c += blockDim.x * V) {
      float a[V], g[V], d[V], o[V];
      load_floats<V>(xr + c, a);
      load_floats<V>(w + c, g);
      load_floats<V>(dyr + c, d);
      load_floats<V>(dxr + c, o);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        o[j] += scale * rs * (d[j] * g[j] - a[j] * rs * rs * m);
        dw_acc[c + j] += d[j] * a[j] * rs * scale;
      }
      store_floats<V>(dxr + c, o);
    }
  }
  float* out = partial + int64_t(blockIdx.x) * cols;
  for (int c = threadIdx.x * V; c < cols; c += blockDim.x * V)
#pragma unroll
    for (int j = 0; j < V; ++j) out[c + j] = dw_acc[c + j];
}

// dw[c] += sum_b partial[b, c]: block (32, 8) covers 32 columns; row ty of the block sums
// partials b = ty, ty + 8, ...; the 8 sums are added in ty order (fixed: deterministic).
template <typename DW>
__global__ void rmsnorm_dw_reduce_kernel(const float* __restrict__ partial, int nblocks, int cols,
                                         DW* __restrict__ dw) {
  __shared__ float sums[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float s = 0;
  if (c < cols)
    for (int b = threadIdx.y; b < nblocks; b += 8) s += partial[int64_t(b) * cols + c];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float t = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += sums[k][threadIdx.x];
    dw[c] = from_float<DW>(to_float(dw[c]) + t);
  }
}

}  // namespace

void rmsnorm_forward(CudaContext& ctx, const Tensor& x, const Tensor& w, double eps, float scale,
                     Tensor& y, Tensor& rstd) {
  const int64_t rows = x.rows(), cols = x.cols();
  if (rows == 0) return;
  const bool vec = cols % 8 == 0 && aligned16(x.raw()) && aligned16(w.raw()) && aligned16(y.raw());
  const int threads = row_threads(cols, vec ? 8 : 1);
  dispatch_float(x.dtype(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    dispatch_float(w.dtype(), [&](auto wt) {
      using W = typename decltype(wt)::type;
      auto kernel = vec ? rmsnorm_forward_kernel<8, T, W> : rmsnorm_forward_kernel<1, T, W>;
      kernel<<<unsigned(rows), threads, 0, ctx.stream()>>>(x.data<T>(), w.data<W>(), y.data<T>(),
                                                           rstd.data<float>(), int(cols),
                                                           float(eps), scale);
      DT_CUDA_LAUNCHED();
    });
  });
}

void rmsnorm_backward(CudaContext& ctx, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      float scale, const Tensor& dy, Tensor& dx, Tensor& dw) {
  const int64_t rows = x.rows(), cols = x.cols();
  if (rows == 0) return;
  const bool vec = cols % 8 == 0 && aligned16(x.raw()) && aligned16(w.raw()) &&
                   aligned16(dy.raw()) && aligned16(dx.raw());
  const int threads = row_threads(cols, vec ? 8 : 1);
  // Enough blocks to fill any GPU, a count that depends on the shape only (determinism).
  int64_t nblocks = std::min<int64_t>(rows, std::max<int64_t>(1024, 262144 / threads));
  const int64_t rows_per_block = (rows + nblocks - 1) / nblocks;
  nblocks = (rows + rows_per_block - 1) / rows_per_block;
  const size_t smem = size_t(cols) * sizeof(float);
  if (smem > size_t(ctx.props().sharedMemPerBlockOptin) - 1024)
    throw_error("cuda rmsnorm_backward: rows of ", cols, " columns are too wide for the "
                "shared-memory weight-gradient accumulator (at most ",
                (ctx.props().sharedMemPerBlockOptin - 1024) / 4, ")");
  float* partial = static_cast<float*>(ctx.scratch(size_t(nblocks) * cols * sizeof(float)));
  dispatch_float(x.dtype(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    dispatch_float(w.dtype(), [&](auto wt) {
      using W = typename decltype(wt)::type;
      auto kernel = vec ? rmsnorm_backward_kernel<8, T, W> : rmsnorm_backward_kernel<1, T, W>;
      if (smem > 48 * 1024)
        DT_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<unsigned(nblocks), threads, smem, ctx.stream()>>>(
          x.data<T>(), w.data<W>(), rstd.data<float>(), dy.data<T>(), dx.data<T>(), partial, rows,
          int(cols), rows_per_block, scale);
      DT_CUDA_LAUNCHED();
    });
  });
  dispatch_float(dw.dtype(), [&](auto dt) {
    using DW = typename decltype(dt)::type;
    rmsnorm_dw_reduce_kernel<DW><<<unsigned((cols + 31) / 32), dim3(32, 8), 0, ctx.stream()>>>(
        partial, int(nblocks), int(cols), dw.data<DW>());
    DT_CUDA_LAUNCHED();
  });
}

}  // namespace difftron::cuda
