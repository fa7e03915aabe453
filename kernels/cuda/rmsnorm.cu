// RMSNorm on the GPU (reference: kernels/cpu/rmsnorm.cpp): forward with an output scale,
// backward with the residual add fused (dx +=) and a deterministic weight gradient: each
// block owns a fixed range of rows and keeps its dw partial (in registers or shared memory,
// every thread only touching its own columns), then a second kernel sums the partials in
// block order. Rows of up to 2048 (forward) / 1024 (backward) columns with 16-byte vectors
// run one warp per row with the row in registers; other rows one block per row.
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

// ---- L lanes per row (32: a warp; 16 or 8 for rows of <= 128 / 64 columns, so that narrow
// rows, e.g. the sub-norm's 2dh = 128, keep every lane busy: 32 / L rows per warp), the row's
// K 8-wide vectors per lane in registers. Needs cols % 8 == 0, cols <= 8 L K and 16-byte
// aligned rows.

constexpr int kRowWarps = 8;  // warps per block

// Sum over the L-lane group of this lane (groups aligned to L; xor offsets below L stay in
// the group). L = 32 is warp_sum's order.
template <int L>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = L / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int K, int L, typename T, typename W>
__global__ void __launch_bounds__(kRowWarps * 32)
    rmsnorm_forward_warp_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                T* __restrict__ y, float* __restrict__ rstd, int64_t rows,
                                int cols, float eps, float scale) {
  constexpr int RPW = 32 / L;  // rows per warp
  const int lane = threadIdx.x & 31, sub = lane % L;
  const int64_t r = (int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5)) * RPW + lane / L;
  if (r - lane / L >= rows) return;  // the warp's first row: warp-uniform
  const bool valid = r < rows;
  const T* xr = x + (valid ? r : 0) * cols;
  float v[K][8];
  float ss = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = (k * L + sub) * 8;
    if (valid && c < cols) {
      load_floats<8>(xr + c, v[k]);
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += v[k][j] * v[k][j];
    }
  }
  ss = group_sum<L>(ss);
  if (!valid) return;
  const float rs = 1.0f / sqrtf(ss / float(cols) + eps);
  if (sub == 0) rstd[r] = rs;
  T* yr = y + r * cols;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = (k * L + sub) * 8;
    if (c < cols) {
      float g[8];
      load_floats<8>(w + c, g);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[k][j] = v[k][j] * rs * g[j] * scale;
      store_floats<8>(yr + c, v[k]);
    }
  }
}

// Block b owns rows [b P, (b + 1) P); warp w of it the rows b P + (w + 8 i) RPW + lane / L,
// one row per lane group at a time; each lane keeps dw for its columns in registers; the lane
// groups' sums are added (xor shuffles, fixed order), then the warps' in warp order.
template <int K, int L, typename T, typename W>
__global__ void __launch_bounds__(kRowWarps * 32)
    rmsnorm_backward_warp_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                 const float* __restrict__ rstd, const T* __restrict__ dy,
                                 T* __restrict__ dx, float* __restrict__ partial, int64_t rows,
                                 int cols, int64_t rows_per_block, float scale) {
  extern __shared__ float dw_block[];  // [cols]
  constexpr int RPW = 32 / L;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = lane % L;
  float dwa[K][8];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < 8; ++j) dwa[k][j] = 0.0f;
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  for (int64_t base = r0 + warp * RPW; base < r1; base += kRowWarps * RPW) {  // warp-uniform
    const int64_t r = base + lane / L;
    const bool valid = r < r1;
    float xv[K][8], dv[K][8], ov[K][8];
    float dot = 0.0f;
    const float q = valid ? rstd[r] : 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (k * L + sub) * 8;
      if (valid && c < cols) {
        float g[8];
        load_floats<8>(x + r * cols + c, xv[k]);
        load_floats<8>(dy + r * cols + c, dv[k]);
        load_floats<8>(dx + r * cols + c, ov[k]);  // with x, dy: one round trip a row
        load_floats<8>(w + c, g);
#pragma unroll
        for (int j = 0; j < 8; ++j) dot += dv[k][j] * g[j] * xv[k][j];
      }
    }
    dot = group_sum<L>(dot);
    if (!valid) continue;
    const float m = dot / float(cols);
    T* dxr = dx + r * cols;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = (k * L + sub) * 8;
      if (c < cols) {
        float g[8];
        load_floats<8>(w + c, g);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          ov[k][j] += scale * q * (dv[k][j] * g[j] - xv[k][j] * q * q * m);
          dwa[k][j] += dv[k][j] * xv[k][j] * q * scale;
        }
        store_floats<8>(dxr + c, ov[k]);
      }
    }
  }
  // the lane groups of a warp hold the same columns: add them, then the warps in order
#pragma unroll
  for (int o = L; o < 32; o <<= 1)
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int j = 0; j < 8; ++j) dwa[k][j] += __shfl_xor_sync(0xffffffffu, dwa[k][j], o);
  for (int ww = 0; ww < kRowWarps; ++ww) {
    if (warp == ww && lane < L) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = (k * L + sub) * 8;
        if (c < cols)
#pragma unroll
          for (int j = 0; j < 8; ++j) dw_block[c + j] = (ww == 0 ? 0.0f : dw_block[c + j]) + dwa[k][j];
      }
    }
    __syncthreads();
  }
  float* out = partial + int64_t(blockIdx.x) * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) out[c] = dw_block[c];
}

// Calls f(std::integral_constant<int, K>, std::integral_constant<int, L>) with K 8-wide vectors
// per lane and L lanes per row covering cols, K in {1, 2, 4, 8} up to max_k (L = 32 when K > 1);
// returns false when the warp kernels do not apply.
template <typename F>
bool with_row_vectors(int64_t cols, bool vec, int max_k, F&& f) {
  using std::integral_constant;
  if (!vec) return false;
  const int64_t need = (cols + 255) / 256;
  if (need > max_k) return false;
  if (cols <= 64) f(integral_constant<int, 1>{}, integral_constant<int, 8>{});
  else if (cols <= 128) f(integral_constant<int, 1>{}, integral_constant<int, 16>{});
  else if (need <= 1) f(integral_constant<int, 1>{}, integral_constant<int, 32>{});
  else if (need <= 2) f(integral_constant<int, 2>{}, integral_constant<int, 32>{});
  else if (need <= 4) f(integral_constant<int, 4>{}, integral_constant<int, 32>{});
  else f(integral_constant<int, 8>{}, integral_constant<int, 32>{});
  return true;
}

// dw[c] += sum_b partial[b, c]: block (32, kReduceRows) covers 32 columns; row ty of the block
// sums partials b = ty, ty + kReduceRows, ...; those sums are added in ty order (fixed:
// deterministic). 32 rows of threads keep more loads in flight per column than 8 did (with 8,
// and 2048 partial rows, the 256-column sub-norm backward took 0.108 ms on the H200, against
// 0.083 ms with 32 and at most 1024).
constexpr int kReduceRows = 32;
template <typename DW>
__global__ void __launch_bounds__(32 * kReduceRows)
    rmsnorm_dw_reduce_kernel(const float* __restrict__ partial, int nblocks, int cols,
                             DW* __restrict__ dw) {
  __shared__ float sums[kReduceRows][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float s = 0;
  if (c < cols)
    for (int b = threadIdx.y; b < nblocks; b += kReduceRows) s += partial[int64_t(b) * cols + c];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float t = 0;
#pragma unroll
    for (int k = 0; k < kReduceRows; ++k) t += sums[k][threadIdx.x];
    dw[c] = from_float<DW>(to_float(dw[c]) + t);
  }
}

}  // namespace

void rmsnorm_forward(CudaContext& ctx, const Tensor& x, const Tensor& w, double eps, float scale,
                     Tensor& y, Tensor& rstd) {
  const int64_t rows = x.rows(), cols = x.cols();
  if (rows == 0) return;
  const bool vec = cols % 8 == 0 && aligned16(x.raw()) && aligned16(w.raw()) && aligned16(y.raw());
  dispatch_float(x.dtype(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    dispatch_float(w.dtype(), [&](auto wt) {
      using W = typename decltype(wt)::type;
      const bool warp_path = with_row_vectors(cols, vec, 8, [&](auto kk, auto ll) {
        constexpr int K = decltype(kk)::value, L = decltype(ll)::value;
        const int64_t rows_per_block = kRowWarps * (32 / L);
        rmsnorm_forward_warp_kernel<K, L, T, W>
            <<<unsigned((rows + rows_per_block - 1) / rows_per_block), kRowWarps * 32, 0, ctx.stream()>>>(
                x.data<T>(), w.data<W>(), y.data<T>(), rstd.data<float>(), rows, int(cols),
                float(eps), scale);
      });
      if (!warp_path) {
        const int threads = row_threads(cols, vec ? 8 : 1);
        auto kernel = vec ? rmsnorm_forward_kernel<8, T, W> : rmsnorm_forward_kernel<1, T, W>;
        kernel<<<unsigned(rows), threads, 0, ctx.stream()>>>(x.data<T>(), w.data<W>(), y.data<T>(),
                                                             rstd.data<float>(), int(cols),
                                                             float(eps), scale);
      }
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
  // Rows of up to 512 columns: a warp per row. Wider rows (the model's d): a block per row; at
  // 1024 columns the warp kernel needs 128 registers a thread (x, dy and dw in registers), two
  // blocks per SM, and reached only 38% of copy bandwidth on the H200 (16384 x 1024 bf16).
  constexpr int kWarpMaxK = 2;
  const bool warp_path = vec && (cols + 255) / 256 <= kWarpMaxK;
  const int threads = warp_path ? kRowWarps * 32 : row_threads(cols, vec ? 8 : 1);
  // Enough blocks to fill any GPU, a count that depends on the shape only (determinism).
  // (The warp path: at most 512 partial rows of dw for the reduction to read, and blocks long
  // enough to amortise their final warp-by-warp dw sum.)
  int64_t nblocks = warp_path ? std::min<int64_t>((rows + kRowWarps - 1) / kRowWarps, 512)
                              : std::min<int64_t>(rows, std::max<int64_t>(1024, 262144 / threads));
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
      const bool launched = warp_path && with_row_vectors(cols, vec, kWarpMaxK, [&](auto kk, auto ll) {
        constexpr int K = decltype(kk)::value, L = decltype(ll)::value;
        // One row in flight per lane group: two (a former R = 2 for K <= 2) measured slower on
        // the H200 (131072 x 256 bf16: 50.8% of copy bandwidth against 60.8% with one).
        if constexpr (K <= kWarpMaxK)
          rmsnorm_backward_warp_kernel<K, L, T, W><<<unsigned(nblocks), threads, smem, ctx.stream()>>>(
              x.data<T>(), w.data<W>(), rstd.data<float>(), dy.data<T>(), dx.data<T>(), partial,
              rows, int(cols), rows_per_block, scale);
      });
      if (!launched) {
        auto kernel = vec ? rmsnorm_backward_kernel<8, T, W> : rmsnorm_backward_kernel<1, T, W>;
        if (smem > 48 * 1024)
          DT_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        kernel<<<unsigned(nblocks), threads, smem, ctx.stream()>>>(
            x.data<T>(), w.data<W>(), rstd.data<float>(), dy.data<T>(), dx.data<T>(), partial, rows,
            int(cols), rows_per_block, scale);
      }
      DT_CUDA_LAUNCHED();
    });
  });
  dispatch_float(dw.dtype(), [&](auto dt) {
    using DW = typename decltype(dt)::type;
    rmsnorm_dw_reduce_kernel<DW><<<unsigned((cols + 31) / 32), dim3(32, kReduceRows), 0, ctx.stream()>>>(
        partial, int(nblocks), int(cols), dw.data<DW>());
    DT_CUDA_LAUNCHED();
  });
}

}  // namespace difftron::cuda
