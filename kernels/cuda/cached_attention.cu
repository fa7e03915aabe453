// Attention of new tokens against a K/V cache (generation; kernels/ops.h,
// Ops::cached_attention; reference kernels/cpu/cached_attention.cpp). Two kernels:
//  1. append: each new token's keys rotated (RoPE at its position, cos/sin from the context's
//     f32 table, as rope.cu) and, with its values, written into the caches;
//  2. attend: one block per (query head, new token); its warps split the cache rows
//     [0, pos] among them, each keeping an online softmax per map (f32) and its share of
//     the P V sums (lane-strided columns), merged across warps in shared memory at the end.
//     The differential variant runs both maps of a head over the same rows and writes
//     O1 / l1 - lambda O2 / l2.
// Rows at or past the cache's capacity are skipped (the host cannot see the positions).
#include <cmath>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

constexpr int kWarps = 8;

// One block per new token (b, t): rotated keys and the values into row start[b] + t.
template <typename T>
__global__ void append_kernel(const T* __restrict__ k, const T* __restrict__ v,
                              const int32_t* __restrict__ start, const float2* __restrict__ rope, T* k_cache,
                              T* v_cache, int T_, int C, int kv_row, int dh) {
  const int row = blockIdx.x, b = row / T_, t = row % T_;
  const int pos = start[b] + t;
  if (pos < 0 || pos >= C) return;
  const int half = dh / 2;
  const T* kt = k + int64_t(row) * kv_row;
  const T* vt = v + int64_t(row) * kv_row;
  T* kc = k_cache + (int64_t(b) * C + pos) * kv_row;
  T* vc = v_cache + (int64_t(b) * C + pos) * kv_row;
  const int pairs = kv_row / 2;  // (kv_row / dh) maps of half pairs each
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int m = i / half, c = i % half;
    const float2 cs = rope[int64_t(pos) * half + c];
    const float a = to_float(kt[m * dh + c]), bb = to_float(kt[m * dh + c + half]);
    kc[m * dh + c] = from_float<T>(a * cs.x - bb * cs.y);
    kc[m * dh + c + half] = from_float<T>(bb * cs.x + a * cs.y);
  }
  for (int i = threadIdx.x; i < kv_row; i += blockDim.x) vc[i] = vt[i];
}

// M maps per head (2: differential, 1: standard) of width dh over V rows of W = M * dh;
// PL >= W / 32 columns per lane.
template <typename T, int M, int PL>
__global__ void __launch_bounds__(kWarps * 32)
    attend_kernel(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                  const int32_t* __restrict__ start, const float* __restrict__ lambda,
                  const float2* __restrict__ rope, T* __restrict__ out, int T_, int C, int heads,
                  int kv_heads, int dh, float scale) {
  extern __shared__ float smem[];
  const int W = M * dh, half = dh / 2;
  float* qs = smem;                              // [M * dh] rotated query
  float* wm = qs + W;                            // [kWarps][M] running maxima
  float* wl = wm + kWarps * M;                   // [kWarps][M] sums
  float* wacc = wl + kWarps * M;                 // [kWarps][M][W] P V partial sums
  const int i = blockIdx.x, row = blockIdx.y, b = row / T_, t = row % T_;
  const int pos = start[b] + t;
  if (pos < 0 || pos >= C) return;
  const int g = i / (heads / kv_heads);
  const int64_t kv_row = int64_t(kv_heads) * W;
  const T* qh = q + (int64_t(row) * heads + i) * W;
  for (int p = threadIdx.x; p < M * half; p += blockDim.x) {
    const int j = p / half, c = p % half;
    const float2 cs = rope[int64_t(pos) * half + c];
    const float a = to_float(qh[j * dh + c]), bb = to_float(qh[j * dh + c + half]);
    qs[j * dh + c] = a * cs.x - bb * cs.y;
    qs[j * dh + c + half] = bb * cs.x + a * cs.y;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float mx[M], l[M], acc[M][PL];
#pragma unroll
  for (int j = 0; j < M; ++j) {
    mx[j] = -INFINITY;
    l[j] = 0.0f;
#pragma unroll
    for (int e = 0; e < PL; ++e) acc[j][e] = 0.0f;
  }
  const T* kb = k_cache + int64_t(b) * C * kv_row + int64_t(g) * W;
  const T* vb = v_cache + int64_t(b) * C * kv_row + int64_t(g) * W;
  for (int u = warp; u <= pos; u += kWarps) {
    const T* ku = kb + int64_t(u) * kv_row;
    const T* vu = vb + int64_t(u) * kv_row;
    float s[M];
#pragma unroll
    for (int j = 0; j < M; ++j) {
      s[j] = 0.0f;
      for (int c = lane; c < dh; c += 32) s[j] += qs[j * dh + c] * to_float(ku[j * dh + c]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int j = 0; j < M; ++j) s[j] += __shfl_xor_sync(0xffffffffu, s[j], o);
    float vv[PL];
#pragma unroll
    for (int e = 0; e < PL; ++e) vv[e] = lane + 32 * e < W ? to_float(vu[lane + 32 * e]) : 0.0f;
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float sc = s[j] * scale, m_new = fmaxf(mx[j], sc);
      const float corr = __expf(mx[j] - m_new), p = __expf(sc - m_new);
      l[j] = l[j] * corr + p;
#pragma unroll
      for (int e = 0; e < PL; ++e) acc[j][e] = acc[j][e] * corr + p * vv[e];
      mx[j] = m_new;
    }
  }
  // merge the warps' partial softmaxes
#pragma unroll
  for (int j = 0; j < M; ++j) {
    if (lane == 0) {
      wm[warp * M + j] = mx[j];
      wl[warp * M + j] = l[j];
    }
#pragma unroll
    for (int e = 0; e < PL; ++e)
      if (lane + 32 * e < W) wacc[(warp * M + j) * W + lane + 32 * e] = acc[j][e];
  }
  __syncthreads();
  const float lam = M == 2 ? lambda[0] : 0.0f;
  T* o = out + (int64_t(row) * heads + i) * W;
  for (int c = threadIdx.x; c < W; c += blockDim.x) {
    float res = 0.0f;
#pragma unroll
    for (int j = 0; j < M; ++j) {
      float m_all = -INFINITY;
      for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, wm[w * M + j]);
      float lsum = 0.0f, osum = 0.0f;
      for (int w = 0; w < kWarps; ++w) {
        const float f = wl[w * M + j] > 0.0f ? __expf(wm[w * M + j] - m_all) : 0.0f;  // idle warps: 0
        lsum += wl[w * M + j] * f;
        osum += wacc[(w * M + j) * W + c] * f;
      }
      res += (j == 0 ? 1.0f : -lam) * osum / lsum;
    }
    o[c] = from_float<T>(res);
  }
}

template <typename T, int M>
void launch_attend(CudaContext& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                   const Tensor& start, const float* lambda, const float2* rope, Tensor& out, int B, int T_,
                   int C, int heads, int kv_heads, int dh) {
  const int W = M * dh;
  const dim3 grid(unsigned(heads), unsigned(B * T_));
  const size_t shmem = sizeof(float) * (W + 2 * kWarps * M + size_t(kWarps) * M * W);
  const float scale = float(1.0 / std::sqrt(double(dh)));
  auto go = [&](auto kernel) {
    if (shmem > 48 * 1024) DT_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shmem)));
    kernel<<<grid, kWarps * 32, shmem, ctx.stream()>>>(q.data<T>(), k_cache.data<T>(), v_cache.data<T>(),
                                                        start.data<int32_t>(), lambda, rope, out.data<T>(), T_, C,
                                                        heads, kv_heads, dh, scale);
    DT_CUDA_LAUNCHED();
  };
  if (W <= 64)
    go(attend_kernel<T, M, 2>);
  else if (W <= 128)
    go(attend_kernel<T, M, 4>);
  else if (W <= 256)
    go(attend_kernel<T, M, 8>);
  else
    go(attend_kernel<T, M, 16>);
}

}  // namespace

void cached_attention(CudaContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& start,
                      const Tensor& lambda, double rope_theta, Tensor& k_cache, Tensor& v_cache, Tensor& out) {
  const bool diff = q.ndim() == 5;
  const int B = int(q.dim(0)), T_ = int(q.dim(1)), heads = int(q.dim(2)), kv_heads = int(k.dim(2));
  const int dh = int(q.dim(q.ndim() - 1)), C = int(k_cache.dim(1));
  const int kv_row = int(k.numel() / (int64_t(B) * T_));
  if (q.numel() == 0) return;
  const float2* rope = static_cast<const float2*>(ctx.rope_table(C, dh, rope_theta));
  dispatch_float(q.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    append_kernel<T><<<unsigned(B * T_), 128, 0, ctx.stream()>>>(k.data<T>(), v.data<T>(), start.data<int32_t>(),
                                                                 rope, k_cache.data<T>(), v_cache.data<T>(), T_, C,
                                                                 kv_row, dh);
    DT_CUDA_LAUNCHED();
    if (diff)
      launch_attend<T, 2>(ctx, q, k_cache, v_cache, start, lambda.data<float>(), rope, out, B, T_, C, heads,
                          kv_heads, dh);
    else
      launch_attend<T, 1>(ctx, q, k_cache, v_cache, start, nullptr, rope, out, B, T_, C, heads, kv_heads, dh);
  });
}

}  // namespace difftron::cuda
