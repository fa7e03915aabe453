// Rotary position embedding on the GPU, rotate-half convention (reference:
// kernels/cpu/rope.cpp): in place on x [B, S, H, dh]. cos/sin come from a per-context table
// [S, dh/2] computed in double on the device and rounded to f32, as the reference does.
#include <cmath>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

__global__ void rope_table_kernel(float2* table, int64_t S, int64_t dh, double theta) {
  const int64_t half = dh / 2;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= S * half) return;
  const int64_t s = i / half, c = i % half;
  const double inv_freq = pow(theta, -2.0 * double(c) / double(dh));
  const double ang = double(s) * inv_freq;
  table[i] = make_float2(float(cos(ang)), float(sin(ang)));
}

// One thread per V consecutive pairs (c, c + dh/2) of one head.
template <int V, typename T>
__global__ void rope_kernel(T* __restrict__ x, const float2* __restrict__ table, int64_t S,
                            int64_t H, int64_t half, int64_t total, float sign) {
  const int64_t per_head = half / V;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_head;  // (b, s, h)
    const int64_t c = (i % per_head) * V;
    const int64_t s = (row / H) % S;
    T* p = x + row * 2 * half;
    float a[V], b[V];
    load_floats<V>(p + c, a);
    load_floats<V>(p + half + c, b);
    const float2* cs = table + s * half + c;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float co = cs[j].x, sn = sign * cs[j].y;
      const float na = a[j] * co - b[j] * sn, nb = b[j] * co + a[j] * sn;
      a[j] = na;
      b[j] = nb;
    }
    store_floats<V>(p + c, a);
    store_floats<V>(p + half + c, b);
  }
}

}  // namespace

void build_rope_table(CudaContext& ctx, void* table, int64_t S, int64_t dh, double theta) {
  const int64_t n = S * (dh / 2);
  if (n == 0) return;
  rope_table_kernel<<<unsigned((n + 255) / 256), 256, 0, ctx.stream()>>>(
      static_cast<float2*>(table), S, dh, theta);
  DT_CUDA_LAUNCHED();
}

void rope(CudaContext& ctx, Tensor& x, double theta, bool inverse) {
  const int64_t B = x.dim(0), S = x.dim(1), H = x.dim(2), dh = x.dim(3), half = dh / 2;
  if (x.numel() == 0) return;
  const float2* table = static_cast<const float2*>(ctx.rope_table(S, dh, theta));
  const bool vec = half % 8 == 0 && aligned16(x.raw());
  const int V = vec ? 8 : 1;
  const int64_t total = B * S * H * (half / V);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t(ctx.num_sms()) * 32);
  const float sign = inverse ? -1.0f : 1.0f;
  dispatch_float(x.dtype(), [&](auto t) {
    using T = typename decltype(t)::type;
    if (vec)
      rope_kernel<8, T><<<unsigned(blocks), threads, 0, ctx.stream()>>>(x.data<T>(), table, S, H,
                                                                        half, total, sign);
    else
      rope_kernel<1, T><<<unsigned(blocks), threads, 0, ctx.stream()>>>(x.data<T>(), table, S, H,
                                                                        half, total, sign);
    DT_CUDA_LAUNCHED();
  });
}

}  // namespace difftron::cuda
