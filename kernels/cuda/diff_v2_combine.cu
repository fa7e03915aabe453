// Differential Transformer V2's pairwise subtraction on the GPU (reference:
// kernels/cpu/diff_v2_combine.cpp; docs/MODEL.md section 5). att [rows, 2H, dh] holds the
// two query heads of each pair side by side, so output row r = token * H + pair reads att
// rows 2r and 2r + 1. Arithmetic in f32; att, z, out, dout, datt, dz share one dtype.
//   forward:  element-wise over out, 8-wide vectors when dh % 8 == 0 and the pointers are
//             16-byte aligned (a vector then never crosses a row).
//   backward: one warp per output row: datt of both heads, and dz from a warp sum of
//             <dout, att2> (fixed order: deterministic).
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
struct CombineForwardOp {
  const T* att;
  const T* z;
  T* out;
  int64_t dh;
  template <int V>
  __device__ void apply(int64_t i) const {
    const int64_t r = i / dh, c = i - r * dh;
    const float s = sigmoidf(to_float(z[r]));
    float a1[V], a2[V], o[V];
    load_floats<V>(att + (2 * r) * dh + c, a1);
    load_floats<V>(att + (2 * r + 1) * dh + c, a2);
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = a1[j] - s * a2[j];
    store_floats<V>(out + i, o);
  }
};

constexpr int kRowsPerBlock = 8;  // warps (output rows) per block

template <int V, typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    combine_backward_kernel(const T* __restrict__ att, const T* __restrict__ z, const T* __restrict__ dout,
                            T* __restrict__ datt, T* __restrict__ dz, int64_t rows, int dh) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;
  const float s = sigmoidf(to_float(z[r]));
  const T* a2 = att + (2 * r + 1) * dh;
  const T* d = dout + r * dh;
  T* d1 = datt + (2 * r) * dh;
  T* d2 = d1 + dh;
  float dot = 0;
  for (int c = lane * V; c < dh; c += 32 * V) {
    float g[V], a[V], m[V];
    load_floats<V>(d + c, g);
    load_floats<V>(a2 + c, a);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      dot += g[j] * a[j];
      m[j] = -s * g[j];
    }
    store_floats<V>(d1 + c, g);
    store_floats<V>(d2 + c, m);
  }
  dot = warp_sum(dot);
  if (lane == 0) dz[r] = from_float<T>(-dot * s * (1.0f - s));
}

template <int V, typename T>
void launch_backward(CudaContext& ctx, const T* att, const T* z, const T* dout, T* datt, T* dz, int64_t rows,
                     int64_t dh) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  combine_backward_kernel<V, T><<<unsigned(blocks), kRowsPerBlock * 32, 0, ctx.stream()>>>(att, z, dout, datt, dz,
                                                                                            rows, int(dh));
  DT_CUDA_LAUNCHED();
}

}  // namespace

void diff_v2_combine_forward(CudaContext& ctx, const Tensor& att, const Tensor& z, Tensor& out) {
  const int64_t dh = att.dim(3);
  const bool vec = dh % 8 == 0 && aligned16(att.raw()) && aligned16(out.raw());
  dispatch_float(att.dtype(), [&](auto t) {
    using T = typename decltype(t)::type;
    launch_elementwise(ctx, out.numel(), vec, CombineForwardOp<T>{att.data<T>(), z.data<T>(), out.data<T>(), dh});
  });
}

void diff_v2_combine_backward(CudaContext& ctx, const Tensor& att, const Tensor& z, const Tensor& dout,
                              Tensor& datt, Tensor& dz) {
  const int64_t dh = att.dim(3), rows = z.numel();
  if (rows == 0) return;
  const bool vec = dh % 8 == 0 && aligned16(att.raw()) && aligned16(dout.raw()) && aligned16(datt.raw());
  dispatch_float(att.dtype(), [&](auto t) {
    using T = typename decltype(t)::type;
    if (vec)
      launch_backward<8, T>(ctx, att.data<T>(), z.data<T>(), dout.data<T>(), datt.data<T>(), dz.data<T>(), rows, dh);
    else
      launch_backward<1, T>(ctx, att.data<T>(), z.data<T>(), dout.data<T>(), datt.data<T>(), dz.data<T>(), rows, dh);
  });
}

}  // namespace difftron::cuda
