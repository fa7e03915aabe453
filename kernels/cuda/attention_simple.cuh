// The simple, correct GPU attention shared by attention_simple.cu (NM = 1 softmax map per
// head: standard causal attention) and diff_attention_simple.cu (NM = 2 maps: out =
// (A1 - lambda A2) V). SIMT fp32 arithmetic, no tensor cores: correctness over speed.
//   forward:  one warp per query row (8 rows per block). Keys come in tiles of 32 (one per
//             lane) staged in shared memory as f32; scores with an online softmax per map,
//             P V with the lanes over the value columns.
//   backward: recomputes probabilities from the saved lse, deterministically, in three
//             kernels: (1) per query row: D_m = sum_u P_m dP-ish terms (two passes over the
//             keys) and dQ; (2) per key row: dK and dV summed over the query rows and the
//             group's heads; (3) dlambda = -sum D_2 (diff only), one block, fixed order.
// Nothing is accumulated with atomics, so results are bit-reproducible.
#pragma once
#include <cmath>

#include "kernels/cuda/cuda_common.cuh"

namespace difftron::cuda::simple_attention {

constexpr int kWarps = 8;  // rows per block, one warp each
constexpr int kTile = 32;  // rows of the other side per shared-memory tile, one per lane

// Element strides and sizes. Offsets (b: batch, t/u: query/key position, i: query head,
// g = i / (H / Hkv): its key/value group, m: map):
//   q/dq     (b*S + t) * q_row + (i*NM + m) * dh        k/dk  (b*S + u) * k_row + (g*NM + m) * dh
//   v/dv     (b*S + u) * v_row + g * dv                 out/dout  (b*S + t) * o_row + i * dv
//   lse/D    ((b*H + i) * NM + m) * S + t
struct Layout {
  int64_t B, S, H, Hkv;
  int dh, dv;
  int64_t q_row, k_row, v_row, o_row;
  float scale;
};

// Odd row strides keep "lane j reads row j" shared-memory accesses free of bank conflicts.
__host__ __device__ inline int odd(int n) { return n | 1; }

template <int NM>
__device__ __forceinline__ void map_coefs(const float* lambda, float (&coef)[NM]) {
  coef[0] = 1.0f;
  if constexpr (NM == 2) coef[1] = -lambda[0];
}

__device__ __forceinline__ float dot_smem(const float* a, const float* b, int n) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int c = 0;
  for (; c + 4 <= n; c += 4) {
    s0 += a[c] * b[c];
    s1 += a[c + 1] * b[c + 1];
    s2 += a[c + 2] * b[c + 2];
    s3 += a[c + 3] * b[c + 3];
  }
  for (; c < n; ++c) s0 += a[c] * b[c];
  return (s0 + s1) + (s2 + s3);
}

// Loads rows [r0, r0 + kTile) of the NM dh-wide maps of one head (zeros past S) into
// dst[m][j][stride] as f32. src_head points at position 0 of that head.
template <typename T, int NM>
__device__ __forceinline__ void load_map_tile(float* dst, int stride, const T* src_head,
                                              int64_t row_stride, int64_t r0, int64_t S, int dh) {
  for (int idx = threadIdx.x; idx < kTile * NM * dh; idx += blockDim.x) {
    const int j = idx / (NM * dh), r = idx % (NM * dh), m = r / dh, c = r % dh;
    const int64_t row = r0 + j;
    dst[(m * kTile + j) * stride + c] = row < S ? to_float(src_head[row * row_stride + r]) : 0.0f;
  }
}

// Loads rows [r0, r0 + kTile) of a width-wide row block (zeros past S) into dst[j][stride].
template <typename T>
__device__ __forceinline__ void load_row_tile(float* dst, int stride, const T* src_head,
                                              int64_t row_stride, int64_t r0, int64_t S,
                                              int width) {
  for (int idx = threadIdx.x; idx < kTile * width; idx += blockDim.x) {
    const int j = idx / width, c = idx % width;
    const int64_t row = r0 + j;
    dst[j * stride + c] = row < S ? to_float(src_head[row * row_stride + c]) : 0.0f;
  }
}

// ---- forward ------------------------------------------------------------------------

inline size_t forward_smem_floats(int NM, int dh, int dv) {
  return size_t(NM) * kTile * odd(dh) + size_t(kTile) * dv + size_t(kWarps) * NM * dh;
}

// CQ = columns of dh per lane (dh <= 32 CQ); value columns per lane CV = NM * CQ.
template <typename T, int NM, int CQ>
__global__ void __launch_bounds__(kWarps * 32)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const float* __restrict__ lambda, T* __restrict__ out,
                   float* __restrict__ lse, Layout L) {
  constexpr int CV = NM * CQ;
  extern __shared__ float smem[];
  const int dh = L.dh, dv = L.dv, ks = odd(dh);
  float* Ks = smem;                      // [NM][kTile][ks]
  float* Vs = Ks + NM * kTile * ks;      // [kTile][dv]
  float* Qs = Vs + kTile * dv;           // [kWarps][NM][dh]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t S = L.S, b = blockIdx.z, i = blockIdx.y, g = i / (L.H / L.Hkv);
  const int64_t t = int64_t(blockIdx.x) * kWarps + warp;
  const int64_t t_last_tile = int64_t(blockIdx.x) * kWarps + kWarps - 1;
  const int64_t t_last = t_last_tile < S - 1 ? t_last_tile : S - 1;
  const bool active = t < S;
  float* qw = Qs + warp * NM * dh;
  if (active) {
    const T* qp = q + (b * S + t) * L.q_row + i * NM * dh;
    for (int c = lane; c < NM * dh; c += 32) qw[c] = to_float(qp[c]);
  }
  float coef[NM];
  map_coefs<NM>(lambda, coef);
  float M[NM], Lsum[NM], acc[NM][CV];
#pragma unroll
  for (int m = 0; m < NM; ++m) {
    M[m] = -INFINITY;
    Lsum[m] = 0.0f;
#pragma unroll
    for (int cc = 0; cc < CV; ++cc) acc[m][cc] = 0.0f;
  }
  const T* k_head = k + b * S * L.k_row + g * NM * dh;
  const T* v_head = v + b * S * L.v_row + g * dv;
  for (int64_t u0 = 0; u0 <= t_last; u0 += kTile) {
    __syncthreads();
    load_map_tile<T, NM>(Ks, ks, k_head, L.k_row, u0, S, dh);
    load_row_tile<T>(Vs, dv, v_head, L.v_row, u0, S, dv);
    __syncthreads();
    if (active && u0 <= t) {  // warp-uniform
      const bool valid = u0 + lane <= t;
      float p[NM];
#pragma unroll
      for (int m = 0; m < NM; ++m) {
        float s = dot_smem(qw + m * dh, Ks + (m * kTile + lane) * ks, dh);
        s = valid ? s * L.scale : -INFINITY;
        const float mn = fmaxf(M[m], warp_max(s));
        const float alpha = __expf(M[m] - mn);
        p[m] = valid ? __expf(s - mn) : 0.0f;
        Lsum[m] = Lsum[m] * alpha + p[m];
#pragma unroll
        for (int cc = 0; cc < CV; ++cc) acc[m][cc] *= alpha;
        M[m] = mn;
      }
      const int nk = t - u0 + 1 < kTile ? int(t - u0 + 1) : kTile;
      for (int jj = 0; jj < nk; ++jj) {
        const float* vr = Vs + jj * dv;
#pragma unroll
        for (int m = 0; m < NM; ++m) {
          const float pj = __shfl_sync(0xffffffffu, p[m], jj);
#pragma unroll
          for (int cc = 0; cc < CV; ++cc) {
            const int col = lane + 32 * cc;
            if (col < dv) acc[m][cc] += pj * vr[col];
          }
        }
      }
    }
  }
  if (active) {
    float o[CV];
#pragma unroll
    for (int cc = 0; cc < CV; ++cc) o[cc] = 0.0f;
#pragma unroll
    for (int m = 0; m < NM; ++m) {
      const float l = warp_sum(Lsum[m]);
      if (lane == 0) lse[((b * L.H + i) * NM + m) * S + t] = M[m] + logf(l);
      const float w = coef[m] / l;
#pragma unroll
      for (int cc = 0; cc < CV; ++cc) o[cc] += w * acc[m][cc];
    }
    T* op = out + (b * S + t) * L.o_row + i * dv;
#pragma unroll
    for (int cc = 0; cc < CV; ++cc) {
      const int col = lane + 32 * cc;
      if (col < dv) op[col] = from_float<T>(o[cc]);
    }
  }
}

// ---- backward: query side (D and dQ) ------------------------------------------------------
// dov_u = dO_t . V_u; D_m = sum_u P_m[u] dov_u; dS_m = coef_m P_m (dov - D_m);
// dQ_m = scale sum_u dS_m[u] K_m[u].

inline size_t backward_dq_smem_floats(int NM, int dh, int dv) {
  return size_t(NM) * kTile * odd(dh) + size_t(kTile) * odd(dv) + size_t(kWarps) * (NM * dh + dv);
}

template <typename T, int NM, int CQ>
__global__ void __launch_bounds__(kWarps * 32)
    backward_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const float* __restrict__ lambda, const float* __restrict__ lse,
                       const T* __restrict__ dout, T* __restrict__ dq, float* __restrict__ D_out,
                       Layout L) {
  extern __shared__ float smem[];
  const int dh = L.dh, dv = L.dv, ks = odd(dh), vs = odd(dv);
  float* Ks = smem;                        // [NM][kTile][ks]
  float* Vs = Ks + NM * kTile * ks;        // [kTile][vs]
  float* Qs = Vs + kTile * vs;             // [kWarps][NM][dh]
  float* Os = Qs + kWarps * NM * dh;       // [kWarps][dv]  (dO rows)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t S = L.S, b = blockIdx.z, i = blockIdx.y, g = i / (L.H / L.Hkv);
  const int64_t t = int64_t(blockIdx.x) * kWarps + warp;
  const int64_t t_last_tile = int64_t(blockIdx.x) * kWarps + kWarps - 1;
  const int64_t t_last = t_last_tile < S - 1 ? t_last_tile : S - 1;
  const bool active = t < S;
  float* qw = Qs + warp * NM * dh;
  float* ow = Os + warp * dv;
  float lse_t[NM];
#pragma unroll
  for (int m = 0; m < NM; ++m) lse_t[m] = 0.0f;
  if (active) {
    const T* qp = q + (b * S + t) * L.q_row + i * NM * dh;
    for (int c = lane; c < NM * dh; c += 32) qw[c] = to_float(qp[c]);
    const T* dp = dout + (b * S + t) * L.o_row + i * dv;
    for (int c = lane; c < dv; c += 32) ow[c] = to_float(dp[c]);
#pragma unroll
    for (int m = 0; m < NM; ++m) lse_t[m] = lse[((b * L.H + i) * NM + m) * S + t];
  }
  float coef[NM];
  map_coefs<NM>(lambda, coef);
  const T* k_head = k + b * S * L.k_row + g * NM * dh;
  const T* v_head = v + b * S * L.v_row + g * dv;

  float D[NM];
#pragma unroll
  for (int m = 0; m < NM; ++m) D[m] = 0.0f;
  float acc[NM][CQ];
#pragma unroll
  for (int m = 0; m < NM; ++m)
#pragma unroll
    for (int cc = 0; cc < CQ; ++cc) acc[m][cc] = 0.0f;

  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t u0 = 0; u0 <= t_last; u0 += kTile) {
      __syncthreads();
      load_map_tile<T, NM>(Ks, ks, k_head, L.k_row, u0, S, dh);
      load_row_tile<T>(Vs, vs, v_head, L.v_row, u0, S, dv);
      __syncthreads();
      if (!(active && u0 <= t)) continue;  // warp-uniform
      const bool valid = u0 + lane <= t;
      const float dov = valid ? dot_smem(ow, Vs + lane * vs, dv) : 0.0f;
      float p[NM];
#pragma unroll
      for (int m = 0; m < NM; ++m) {
        const float s = dot_smem(qw + m * dh, Ks + (m * kTile + lane) * ks, dh);
        p[m] = valid ? __expf(s * L.scale - lse_t[m]) : 0.0f;
      }
      if (pass == 0) {
#pragma unroll
        for (int m = 0; m < NM; ++m) D[m] += p[m] * dov;  // per-lane partial until the pass ends
        continue;
      }
      float ds[NM];
#pragma unroll
      for (int m = 0; m < NM; ++m) ds[m] = coef[m] * p[m] * (dov - D[m]);
      const int nk = t - u0 + 1 < kTile ? int(t - u0 + 1) : kTile;
      for (int jj = 0; jj < nk; ++jj) {
#pragma unroll
        for (int m = 0; m < NM; ++m) {
          const float dsj = __shfl_sync(0xffffffffu, ds[m], jj);
          const float* kr = Ks + (m * kTile + jj) * ks;
#pragma unroll
          for (int cc = 0; cc < CQ; ++cc) {
            const int col = lane + 32 * cc;
            if (col < dh) acc[m][cc] += dsj * kr[col];
          }
        }
      }
    }
    if (pass == 0 && active) {
#pragma unroll
      for (int m = 0; m < NM; ++m) D[m] = warp_sum(D[m]);
    }
  }
  if (active) {
#pragma unroll
    for (int m = 0; m < NM; ++m) {
      if (lane == 0) D_out[((b * L.H + i) * NM + m) * S + t] = D[m];
      T* dp = dq + (b * S + t) * L.q_row + (i * NM + m) * dh;
#pragma unroll
      for (int cc = 0; cc < CQ; ++cc) {
        const int col = lane + 32 * cc;
        if (col < dh) dp[col] = from_float<T>(L.scale * acc[m][cc]);
      }
    }
  }
}

// ---- backward: key side (dK, dV) -------------------------------------------------------
// dK_m[u] = scale sum_{i in group, t >= u} dS_m[t, u] Q_m[t];
// dV[u] = sum_{i, t >= u} (sum_m coef_m P_m[t, u]) dO[t].

inline size_t backward_dkdv_smem_floats(int NM, int dh, int dv) {
  return size_t(NM) * kTile * odd(dh) + size_t(kTile) * odd(dv) + size_t(2) * NM * kTile +
         size_t(kWarps) * (NM * dh + dv);
}

template <typename T, int NM, int CQ>
__global__ void __launch_bounds__(kWarps * 32)
    backward_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const float* __restrict__ lambda,
                         const float* __restrict__ lse, const float* __restrict__ Dg,
                         const T* __restrict__ dout, T* __restrict__ dk, T* __restrict__ dv_out,
                         Layout L) {
  constexpr int CV = NM * CQ;
  extern __shared__ float smem[];
  const int dh = L.dh, dv = L.dv, qs = odd(dh), os = odd(dv);
  float* Qs = smem;                      // [NM][kTile][qs]
  float* Os = Qs + NM * kTile * qs;      // [kTile][os]   (dO rows)
  float* lse_s = Os + kTile * os;        // [NM][kTile]
  float* D_s = lse_s + NM * kTile;       // [NM][kTile]
  float* Kw = D_s + NM * kTile;          // [kWarps][NM][dh]
  float* Vw = Kw + kWarps * NM * dh;     // [kWarps][dv]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t S = L.S, b = blockIdx.z, g = blockIdx.y, group = L.H / L.Hkv;
  const int64_t u_first = int64_t(blockIdx.x) * kWarps;
  const int64_t u = u_first + warp;
  const bool active = u < S;
  float* kw = Kw + warp * NM * dh;
  float* vw = Vw + warp * dv;
  if (active) {
    const T* kp = k + (b * S + u) * L.k_row + g * NM * dh;
    for (int c = lane; c < NM * dh; c += 32) kw[c] = to_float(kp[c]);
    const T* vp = v + (b * S + u) * L.v_row + g * dv;
    for (int c = lane; c < dv; c += 32) vw[c] = to_float(vp[c]);
  }
  float coef[NM];
  map_coefs<NM>(lambda, coef);
  float acc_k[NM][CQ], acc_v[CV];
#pragma unroll
  for (int m = 0; m < NM; ++m)
#pragma unroll
    for (int cc = 0; cc < CQ; ++cc) acc_k[m][cc] = 0.0f;
#pragma unroll
  for (int cc = 0; cc < CV; ++cc) acc_v[cc] = 0.0f;

  for (int64_t i = g * group; i < (g + 1) * group; ++i) {
    const T* q_head = q + b * S * L.q_row + i * NM * dh;
    const T* o_head = dout + b * S * L.o_row + i * dv;
    const int64_t stat0 = (b * L.H + i) * NM * S;
    for (int64_t t0 = u_first; t0 < S; t0 += kTile) {
      __syncthreads();
      load_map_tile<T, NM>(Qs, qs, q_head, L.q_row, t0, S, dh);
      load_row_tile<T>(Os, os, o_head, L.o_row, t0, S, dv);
      for (int idx = threadIdx.x; idx < NM * kTile; idx += blockDim.x) {
        const int m = idx / kTile, j = idx % kTile;
        const int64_t tt = t0 + j;
        lse_s[idx] = tt < S ? lse[stat0 + m * S + tt] : 0.0f;
        D_s[idx] = tt < S ? Dg[stat0 + m * S + tt] : 0.0f;
      }
      __syncthreads();
      if (!(active && t0 + kTile - 1 >= u)) continue;  // warp-uniform
      const int64_t tt = t0 + lane;
      const bool valid = tt >= u && tt < S;
      const float dov = valid ? dot_smem(Os + lane * os, vw, dv) : 0.0f;
      float ds[NM], pv = 0.0f;
#pragma unroll
      for (int m = 0; m < NM; ++m) {
        const float s = dot_smem(Qs + (m * kTile + lane) * qs, kw + m * dh, dh);
        const float p = valid ? __expf(s * L.scale - lse_s[m * kTile + lane]) : 0.0f;
        ds[m] = coef[m] * p * (dov - D_s[m * kTile + lane]);
        pv += coef[m] * p;
      }
      const int j0 = u > t0 ? int(u - t0) : 0, j1 = S - t0 < kTile ? int(S - t0) : kTile;
      for (int jj = j0; jj < j1; ++jj) {
#pragma unroll
        for (int m = 0; m < NM; ++m) {
          const float dsj = __shfl_sync(0xffffffffu, ds[m], jj);
          const float* qr = Qs + (m * kTile + jj) * qs;
#pragma unroll
          for (int cc = 0; cc < CQ; ++cc) {
            const int col = lane + 32 * cc;
            if (col < dh) acc_k[m][cc] += dsj * qr[col];
          }
        }
        const float pvj = __shfl_sync(0xffffffffu, pv, jj);
        const float* orow = Os + jj * os;
#pragma unroll
        for (int cc = 0; cc < CV; ++cc) {
          const int col = lane + 32 * cc;
          if (col < dv) acc_v[cc] += pvj * orow[col];
        }
      }
    }
  }
  if (active) {
#pragma unroll
    for (int m = 0; m < NM; ++m) {
      T* kp = dk + (b * S + u) * L.k_row + (g * NM + m) * dh;
#pragma unroll
      for (int cc = 0; cc < CQ; ++cc) {
        const int col = lane + 32 * cc;
        if (col < dh) kp[col] = from_float<T>(L.scale * acc_k[m][cc]);
      }
    }
    T* vp = dv_out + (b * S + u) * L.v_row + g * dv;
#pragma unroll
    for (int cc = 0; cc < CV; ++cc) {
      const int col = lane + 32 * cc;
      if (col < dv) vp[col] = from_float<T>(acc_v[cc]);
    }
  }
}

// dlambda = -sum over (b, i, t) of D_2 (the second map's D), one block, fixed order.
template <int NM>
__global__ void dlambda_kernel(const float* __restrict__ D, int64_t BH, int64_t S,
                               float* __restrict__ dlambda) {
  __shared__ double red[33];
  double s = 0;
  for (int64_t idx = threadIdx.x; idx < BH * S; idx += blockDim.x) {
    const int64_t bh = idx / S, t = idx % S;
    s += double(D[(bh * NM + NM - 1) * S + t]);
  }
  s = block_sum(s, red);
  if (threadIdx.x == 0) dlambda[0] = float(-s);
}

// ---- launchers ------------------------------------------------------------------------

// Calls f(std::integral_constant<int, CQ>) with CQ = dh / 32 rounded up to 1, 2, 4 or 8;
// max_cq bounds it (value columns per lane NM * CQ must stay <= 8).
template <typename F>
void with_cols_per_lane(int dh, int max_cq, const char* op, F&& f) {
  const int cq = dh <= 32 ? 1 : dh <= 64 ? 2 : dh <= 128 ? 4 : 8;
  if (dh > 32 * max_cq)
    throw_error("cuda ", op, ": head_dim ", dh, " is larger than the simple attention supports (",
                32 * max_cq, ")");
  switch (cq) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: if (max_cq >= 4) f(std::integral_constant<int, 4>{}); break;
    default: if (max_cq >= 8) f(std::integral_constant<int, 8>{}); break;
  }
}

template <typename Kernel>
void prepare_smem(CudaContext& ctx, Kernel kernel, size_t bytes, const char* op) {
  if (bytes > size_t(ctx.props().sharedMemPerBlockOptin))
    throw_error("cuda ", op, ": needs ", bytes, " bytes of shared memory per block, the device has ",
                ctx.props().sharedMemPerBlockOptin);
  if (bytes > 48 * 1024)
    DT_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <typename T, int NM>
void launch_forward(CudaContext& ctx, const Layout& L, const T* q, const T* k, const T* v,
                    const float* lambda, T* out, float* lse, const char* op) {
  if (L.B == 0 || L.S == 0 || L.H == 0) return;
  constexpr int max_cq = NM == 2 ? 4 : 8;
  with_cols_per_lane(L.dh, max_cq, op, [&](auto cq) {
    constexpr int CQ = decltype(cq)::value;
    if constexpr (NM * CQ <= 8) {
      auto kernel = forward_kernel<T, NM, CQ>;
      const size_t smem = forward_smem_floats(NM, L.dh, L.dv) * sizeof(float);
      prepare_smem(ctx, kernel, smem, op);
      const dim3 grid(unsigned((L.S + kWarps - 1) / kWarps), unsigned(L.H), unsigned(L.B));
      kernel<<<grid, kWarps * 32, smem, ctx.stream()>>>(q, k, v, lambda, out, lse, L);
      DT_CUDA_LAUNCHED();
    }
  });
}

// D: scratch [B, H, NM, S] f32. dlambda: [1] f32 (NM == 2) or null.
template <typename T, int NM>
void launch_backward(CudaContext& ctx, const Layout& L, const T* q, const T* k, const T* v,
                     const float* lambda, const float* lse, const T* dout, T* dq, T* dk, T* dv,
                     float* D, float* dlambda, const char* op) {
  if (L.B == 0 || L.S == 0 || L.H == 0) return;
  constexpr int max_cq = NM == 2 ? 4 : 8;
  with_cols_per_lane(L.dh, max_cq, op, [&](auto cq) {
    constexpr int CQ = decltype(cq)::value;
    if constexpr (NM * CQ <= 8) {
      auto k1 = backward_dq_kernel<T, NM, CQ>;
      const size_t smem1 = backward_dq_smem_floats(NM, L.dh, L.dv) * sizeof(float);
      prepare_smem(ctx, k1, smem1, op);
      const dim3 grid1(unsigned((L.S + kWarps - 1) / kWarps), unsigned(L.H), unsigned(L.B));
      k1<<<grid1, kWarps * 32, smem1, ctx.stream()>>>(q, k, v, lambda, lse, dout, dq, D, L);
      DT_CUDA_LAUNCHED();

      auto k2 = backward_dkdv_kernel<T, NM, CQ>;
      const size_t smem2 = backward_dkdv_smem_floats(NM, L.dh, L.dv) * sizeof(float);
      prepare_smem(ctx, k2, smem2, op);
      const dim3 grid2(unsigned((L.S + kWarps - 1) / kWarps), unsigned(L.Hkv), unsigned(L.B));
      k2<<<grid2, kWarps * 32, smem2, ctx.stream()>>>(q, k, v, lambda, lse, D, dout, dk, dv, L);
      DT_CUDA_LAUNCHED();
    }
  });
  if constexpr (NM == 2) {
    dlambda_kernel<NM><<<1, 1024, 0, ctx.stream()>>>(D, L.B * L.H, L.S, dlambda);
    DT_CUDA_LAUNCHED();
  }
}

}  // namespace difftron::cuda::simple_attention
