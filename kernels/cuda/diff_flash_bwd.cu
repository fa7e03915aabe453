// Fused differential flash-attention backward (issue 4), deterministic (fixed-order sums, no
// atomics): (1) a query-major kernel that takes D2' = rowsum(P_2 o dP) from the forward's
// saved O2n (dO . O2n) or else recomputes it in a first pass, derives D1 = dO.O + lambda D2',
// writes both for (2), and accumulates dQ_1, dQ_2 in a second pass; (2) a key-major kernel
// accumulating dK_1, dK_2 and dV over the query tiles of every head of the K/V group, and the
// CTA's partial sum of P_2 o dP for dlambda (f32, from its recomputed tiles, never from O2n);
// (3) a one-block sum of those per-CTA partials. Math and the warp-pair design: diff_flash.cuh.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "base/error.h"
#include "kernels/cuda/diff_flash.cuh"
#include "kernels/cuda/diff_flash_wgmma.h"

namespace difftron::cuda {
namespace flash {

// Writes the CTA's partial of dlambda's sum P_2 o dP (this thread's share in v) to
// part[linear block id]: a fixed shuffle tree per warp, then thread 0 adds warps w0..WARPS-1 in
// order (deterministic). red: WARPS floats of shared memory that no thread uses any more (the
// caller synchronises before); every thread of the CTA must call it.
template <int WARPS>
__device__ __forceinline__ void store_dlambda_partial(float v, int w0, float* red, float* part) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int w = w0; w < WARPS; ++w) sum += red[w];
    part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = sum;
  }
}

// ---- dQ, D1, D2' ------------------------------------------------------------------------
// Grid: x = b * h + head, y = query tile (longest first). Key-split pairs: warp (pair, half)
// owns the pair's 16 query rows and keys [half * BN/2, (half + 1) * BN/2) of every key tile,
// for both maps, so no per-tile exchange is needed: only D2' (after pass A) and the dQ
// partials (at the end) meet, each once, in fixed order.
// STD: standard attention (std_flash_backward, deterministic): the maps are heads 2i, 2i + 1
// with their own V columns and dO halves: dP_j = dO_j V_j^T, D_j = dO_j . O_j (written to p.D
// as D1, D2'), dS_j = P_j o (dP_j - D_j), no lambda, no pass A. KV1 (with STD): both heads
// read one dh-wide K/V head, loaded into both halves of the 2dh-wide K/V tiles.
template <int DH, bool STD = false, bool KV1 = false>
__global__ void __launch_bounds__(DqCfg<DH>::THREADS, DqCfg<DH>::MIN_BLOCKS)
    diff_flash_dq_kernel(const BwdParams p) {
  using C = DqCfg<DH>;
  static_assert(STD || !KV1, "one K/V head per pair is standard attention only");
  constexpr int KVROW = KV1 ? DH : C::ROW;  // bf16 per global K/V row
  constexpr int NH = C::BN / 16;  // key n-tiles of half a tile
  constexpr int QT = DH / 8;      // dQ_j n-tiles
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sb = smem_addr(smem);
  float2* xr = reinterpret_cast<float2*>(smem + C::OFF_XR);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int pair = warp % C::WM, half = warp / C::WM, partner = half ? pair : pair + C::WM;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = grid_head() / p.h, hd = grid_head() % p.h, kvg = hd / p.group;
  const int q0 = (grid_tiles() - 1 - grid_tile()) * C::BM;
  const int S = p.S;
  const int64_t q_rs = int64_t(p.h) * 2 * DH, kv_rs = int64_t(p.h_kv) * KVROW;
  const int64_t qoff = (int64_t(b) * S * p.h + hd) * 2 * DH;
  const bf16* kg = p.k + (int64_t(b) * S * p.h_kv + kvg) * KVROW;
  const bf16* vg = p.v + (int64_t(b) * S * p.h_kv + kvg) * KVROW;
  const int64_t bh = int64_t(b) * p.h + hd;
  const int kv_end = min(q0 + C::BM, S);
  const int n_kt = (kv_end + C::BN - 1) / C::BN;
  const int n_it = 2 * n_kt;  // pass A then pass B, both over the key tiles, last first

  load_tile<C::BM, C::ROW, C::THREADS>(sb + C::OFF_Q, p.q + qoff, q_rs, q0, S, tid);
  load_tile<C::BM, C::ROW, C::THREADS>(sb + C::OFF_DO, p.dout + qoff, q_rs, q0, S, tid);
  load_tile<C::BN, C::ROW, C::THREADS, KVROW>(sb + C::OFF_K, kg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  load_tile<C::BN, C::ROW, C::THREADS, KVROW>(sb + C::OFF_V, vg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  cp_async_commit();

  const int row0 = q0 + pair * 16;
  const float lam = STD ? 0.f : *p.lambda;
  // delta = dO . O (and D2' = dO . O2n when the forward saved O2n) for rows g and g + 8 of
  // this warp: lane -> (row lane/2, column half lane&1)
  float delta[2], d2s[2], dstd[2][2];  // dstd (STD): D_j = dO_j . O_j of rows g, g + 8
  {
    const int r = row0 + (lane >> 1);
    float acc = 0.f, acc2 = 0.f;
    if (r < S) {
      const int64_t off = qoff + int64_t(r) * q_rs + (lane & 1) * DH;
      const uint4* o4 = reinterpret_cast<const uint4*>(p.out + off);
      const uint4* d4 = reinterpret_cast<const uint4*>(p.dout + off);
      const uint4* e4 = reinterpret_cast<const uint4*>(p.o2 ? p.o2 + off : p.out + off);
#pragma unroll 4
      for (int c = 0; c < DH / 8; ++c) {
        const uint4 ov = o4[c], dv = d4[c];
        const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w}, dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 a = unpack_bf16(ow[e]), d = unpack_bf16(dw[e]);
          acc = fmaf(a.x, d.x, fmaf(a.y, d.y, acc));
        }
        if (p.o2) {
          const uint4 ev = e4[c];
          const uint32_t ew[4] = {ev.x, ev.y, ev.z, ev.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 a = unpack_bf16(ew[e]), d = unpack_bf16(dw[e]);
            acc2 = fmaf(a.x, d.x, fmaf(a.y, d.y, acc2));
          }
        }
      }
    }
    // STD: this lane's column half is head (lane & 1)'s dh
    if (STD)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int j = 0; j < 2; ++j) dstd[hh][j] = __shfl_sync(0xffffffffu, acc, 2 * g + 16 * hh + j);
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc2 += __shfl_xor_sync(0xffffffffu, acc2, 1);
    delta[0] = __shfl_sync(0xffffffffu, acc, 2 * g);
    delta[1] = __shfl_sync(0xffffffffu, acc, 2 * g + 16);
    d2s[0] = __shfl_sync(0xffffffffu, acc2, 2 * g);
    d2s[1] = __shfl_sync(0xffffffffu, acc2, 2 * g + 16);
  }
  float lse1[2], lse2[2];  // log2 units; +inf past S makes P = 0
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + g + 8 * hh;
    lse1[hh] = row < S ? p.lse[(bh * 2 + 0) * S + row] * kLog2e : INFINITY;
    lse2[hh] = row < S ? p.lse[(bh * 2 + 1) * S + row] * kLog2e : INFINITY;
  }

  const Ldsm<C::ROW> la(lane, kA), ln(lane, kN);
  const uint32_t sQ = sb + C::OFF_Q + pair * 16 * C::ROW * 2;    // this warp's rows
  const uint32_t sDO = sb + C::OFF_DO + pair * 16 * C::ROW * 2;
  const int kb = half * (C::BN / 2);                              // this warp's keys in a tile
  float acc[2] = {0.f, 0.f};  // pass A: partial rowsum(P_2 o dP) over this warp's keys
  float D1[2] = {0.f, 0.f}, D2[2] = {0.f, 0.f};
  // D1 = delta + lambda D2'; both go out for the dK/dV kernel (dlambda does not use D2': the
  // dK/dV kernel sums P_2 o dP itself)
  auto finish_d = [&]() {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      if (!STD) D1[hh] = fmaf(lam, D2[hh], delta[hh]);
      const int row = row0 + g + 8 * hh;
      if (row < S && t4 == 0) p.D[(bh * 2 + half) * S + row] = half ? D2[hh] : D1[hh];
    }
  };
  // one step of the K/V pipeline: waits for iteration it's tile, prefetches it + 1's; returns
  // the stage. Iterations 0..n_kt-1 are pass A, n_kt..2 n_kt-1 pass B, both last tile first.
  const int it0 = STD || p.o2 ? n_kt : 0;
  auto pipeline_step = [&](int it) {
    const int st = (it - it0) & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < n_it) {
      const int nkt = n_kt - 1 - (it + 1 >= n_kt ? it + 1 - n_kt : it + 1);
      load_tile<C::BN, C::ROW, C::THREADS, KVROW>(sb + C::OFF_K + (st ^ 1) * C::TILE_KV, kg,
                                                  kv_rs, nkt * C::BN, S, tid);
      load_tile<C::BN, C::ROW, C::THREADS, KVROW>(sb + C::OFF_V + (st ^ 1) * C::TILE_KV, vg,
                                                  kv_rs, nkt * C::BN, S, tid);
    }
    cp_async_commit();
    return st;
  };

  if (STD) {  // D_j of each head, no pass A
    D1[0] = dstd[0][0];
    D1[1] = dstd[1][0];
    D2[0] = dstd[0][1];
    D2[1] = dstd[1][1];
    finish_d();
  } else if (p.o2) {  // D2' known: no pass A
    D2[0] = d2s[0];
    D2[1] = d2s[1];
    finish_d();
  } else {
    // pass A: rowsum(P_2 o dP) over this warp's keys; Q_2 and dO fragments stay in registers
    // (the dQ accumulators are not live yet)
    uint32_t qf[DH / 16][4], of[2 * DH / 16][4];
    for (int it = 0; it < n_kt; ++it) {
      const int st = pipeline_step(it), kt = n_kt - 1 - it;
      if (it == 0) {
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) ldsm_x4(qf[kk], la.at(sQ, 0, DH / 8 + 2 * kk));
#pragma unroll
        for (int kk = 0; kk < 2 * DH / 16; ++kk) ldsm_x4(of[kk], la.at(sDO, 0, 2 * kk));
      }
      const uint32_t sK = sb + C::OFF_K + st * C::TILE_KV + kb * C::ROW * 2;
      const uint32_t sV = sb + C::OFF_V + st * C::TILE_KV + kb * C::ROW * 2;
      const int c0 = kt * C::BN + kb;
      const bool masked = c0 + C::BN / 2 - 1 > row0;
      float s2[NH][4], dp[NH][4];
#pragma unroll
      for (int n = 0; n < NH; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s2[n][e] = dp[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < DH / 16; ++kk)
#pragma unroll
        for (int nn = 0; nn < NH / 2; ++nn) {
          uint32_t b2[4];
          ldsm_x4(b2, ln.at(sK, nn * 16, DH / 8 + 2 * kk));
          mma16816(s2[2 * nn], qf[kk], b2[0], b2[1]);
          mma16816(s2[2 * nn + 1], qf[kk], b2[2], b2[3]);
        }
#pragma unroll
      for (int kk = 0; kk < 2 * DH / 16; ++kk)
#pragma unroll
        for (int nn = 0; nn < NH / 2; ++nn) {
          uint32_t bf[4];
          ldsm_x4(bf, ln.at(sV, nn * 16, 2 * kk));
          mma16816(dp[2 * nn], of[kk], bf[0], bf[1]);
          mma16816(dp[2 * nn + 1], of[kk], bf[2], bf[3]);
        }
#pragma unroll
      for (int n = 0; n < NH; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float pr = fast_exp2(fmaf(s2[n][e], p.scale_log2, -lse2[e >> 1]));
          if (masked && c0 + n * 8 + 2 * t4 + (e & 1) > row0 + g + 8 * (e >> 1)) pr = 0.f;
          acc[e >> 1] = fmaf(pr, dp[n][e], acc[e >> 1]);
        }
    }
    // end of pass A: D2' = half 0 + half 1 (fixed order); D1 = delta + lambda D2'
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      acc[hh] += __shfl_xor_sync(0xffffffffu, acc[hh], 1);
      acc[hh] += __shfl_xor_sync(0xffffffffu, acc[hh], 2);
    }
    xr[warp * 32 + lane] = make_float2(acc[0], acc[1]);
    pair_barrier(pair);
    const float2 x0 = xr[pair * 32 + lane], x1 = xr[(pair + C::WM) * 32 + lane];
    D2[0] = x0.x + x1.x;
    D2[1] = x0.y + x1.y;
    finish_d();
  }

  // pass B: dS_1 = P_1 o (dP - D1), dS_2 = -lambda P_2 o (dP - D2'); dQ_j += dS_j K_j
  float dq1[QT][4], dq2[QT][4];
#pragma unroll
  for (int n = 0; n < QT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq1[n][e] = dq2[n][e] = 0.f;
  for (int it = n_kt; it < n_it; ++it) {
    const int st = pipeline_step(it), kt = n_kt - 1 - (it - n_kt);
    const uint32_t sK = sb + C::OFF_K + st * C::TILE_KV + kb * C::ROW * 2;
    const uint32_t sV = sb + C::OFF_V + st * C::TILE_KV + kb * C::ROW * 2;
    const int c0 = kt * C::BN + kb;  // first key of this warp
    const bool masked = c0 + C::BN / 2 - 1 > row0;
    float s1[NH][4], s2[NH][4], dp[NH][4], dpb[NH][4];  // dpb (STD only): dP_2
#pragma unroll
    for (int n = 0; n < NH; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s1[n][e] = s2[n][e] = dp[n][e] = dpb[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
      uint32_t a1[4], a2[4];
      ldsm_x4(a1, la.at(sQ, 0, 2 * kk));
      ldsm_x4(a2, la.at(sQ, 0, DH / 8 + 2 * kk));
#pragma unroll
      for (int nn = 0; nn < NH / 2; ++nn) {
        uint32_t b1[4], b2[4];
        ldsm_x4(b1, ln.at(sK, nn * 16, 2 * kk));
        ldsm_x4(b2, ln.at(sK, nn * 16, DH / 8 + 2 * kk));
        mma16816(s1[2 * nn], a1, b1[0], b1[1]);
        mma16816(s1[2 * nn + 1], a1, b1[2], b1[3]);
        mma16816(s2[2 * nn], a2, b2[0], b2[1]);
        mma16816(s2[2 * nn + 1], a2, b2[2], b2[3]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < 2 * DH / 16; ++kk) {
      uint32_t af[4];
      ldsm_x4(af, la.at(sDO, 0, 2 * kk));
#pragma unroll
      for (int nn = 0; nn < NH / 2; ++nn) {
        uint32_t bf[4];
        ldsm_x4(bf, ln.at(sV, nn * 16, 2 * kk));
        if (STD && kk >= DH / 16) {  // STD: the second dh of the contraction is dP_2 = dO_2 V_2^T
          mma16816(dpb[2 * nn], af, bf[0], bf[1]);
          mma16816(dpb[2 * nn + 1], af, bf[2], bf[3]);
        } else {
          mma16816(dp[2 * nn], af, bf[0], bf[1]);
          mma16816(dp[2 * nn + 1], af, bf[2], bf[3]);
        }
      }
    }
    uint32_t f1[NH][2], f2[NH][2];
#pragma unroll
    for (int n = 0; n < NH; ++n) {
      float d1[4], d2[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pr1 = fast_exp2(fmaf(s1[n][e], p.scale_log2, -lse1[e >> 1]));
        float pr2 = fast_exp2(fmaf(s2[n][e], p.scale_log2, -lse2[e >> 1]));
        if (masked && c0 + n * 8 + 2 * t4 + (e & 1) > row0 + g + 8 * (e >> 1)) pr1 = pr2 = 0.f;
        d1[e] = pr1 * (dp[n][e] - D1[e >> 1]);
        d2[e] = STD ? pr2 * (dpb[n][e] - D2[e >> 1]) : -lam * pr2 * (dp[n][e] - D2[e >> 1]);
      }
      f1[n][0] = pack_bf16(d1[0], d1[1]);
      f1[n][1] = pack_bf16(d1[2], d1[3]);
      f2[n][0] = pack_bf16(d2[0], d2[1]);
      f2[n][1] = pack_bf16(d2[2], d2[3]);
    }
#pragma unroll
    for (int kk = 0; kk < NH / 2; ++kk) {
      const uint32_t a1[4] = {f1[2 * kk][0], f1[2 * kk][1], f1[2 * kk + 1][0], f1[2 * kk + 1][1]};
      const uint32_t a2[4] = {f2[2 * kk][0], f2[2 * kk][1], f2[2 * kk + 1][0], f2[2 * kk + 1][1]};
#pragma unroll
      for (int nn = 0; nn < DH / 16; ++nn) {
        uint32_t b1[4], b2[4];
        ldsm_x4_t(b1, la.at(sK, kk * 16, 2 * nn));
        ldsm_x4_t(b2, la.at(sK, kk * 16, DH / 8 + 2 * nn));
        mma16816(dq1[2 * nn], a1, b1[0], b1[1]);
        mma16816(dq1[2 * nn + 1], a1, b1[2], b1[3]);
        mma16816(dq2[2 * nn], a2, b2[0], b2[1]);
        mma16816(dq2[2 * nn + 1], a2, b2[2], b2[3]);
      }
    }
  }

  // the two key halves' dQ partials meet: half 0 finishes dQ_1, half 1 dQ_2; each hands the
  // other map's partial over through the (now idle) K/V buffers
  __syncthreads();
  float4* xq = reinterpret_cast<float4*>(smem + C::OFF_K);
#pragma unroll
  for (int n = 0; n < QT; ++n) {
    // (selects per element: a run-time choice between whole arrays would put them in memory)
    xq[(warp * QT + n) * 32 + lane] =
        half ? make_float4(dq1[n][0], dq1[n][1], dq1[n][2], dq1[n][3])
             : make_float4(dq2[n][0], dq2[n][1], dq2[n][2], dq2[n][3]);
  }
  pair_barrier(pair);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + g + 8 * hh;
    if (row >= S) continue;
    bf16* drow = p.dq + qoff + int64_t(row) * q_rs + half * DH + 2 * t4;
#pragma unroll
    for (int n = 0; n < QT; ++n) {
      const float4 o = xq[(partner * QT + n) * 32 + lane];
      const float k0 = half ? dq2[n][2 * hh] : dq1[n][2 * hh];
      const float k1 = half ? dq2[n][2 * hh + 1] : dq1[n][2 * hh + 1];
      const float x0 = (hh ? o.z : o.x) + k0, x1 = (hh ? o.w : o.y) + k1;
      *reinterpret_cast<uint32_t*>(drow + n * 8) = pack_bf16(x0 * p.scale, x1 * p.scale);
    }
  }
}

// ---- dK, dV -----------------------------------------------------------------------------
// Grid: x = b * h_kv + group, y = key tile (first tiles see the most queries: launched first).
// Map-split pairs: warp (pair, map) computes S^T_map of the pair's 16 keys and half of dP^T's
// 2dh contraction; the partner's half of dP^T and its P_map come through shared memory. The
// dlambda partial: the P_2 warps (map == 1) sum P_2 o dP (f32 P_2, full f32 dP) over every
// query tile of every head of the group; each (query, key) product is counted there once.
template <int DH>
__global__ void __launch_bounds__(DkvCfg<DH>::THREADS, DkvCfg<DH>::MIN_BLOCKS)
    diff_flash_dkdv_kernel(const BwdParams p) {
  using C = DkvCfg<DH>;
  constexpr int NT = C::BM / 8;  // query n-tiles per tile
  constexpr int KT = DH / 8;     // dK_j / dV-half n-tiles
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sb = smem_addr(smem);
  uint4* xp = reinterpret_cast<uint4*>(smem + C::OFF_XP);
  float4* xd = reinterpret_cast<float4*>(smem + C::OFF_XD);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int pair = warp % C::WM, map = warp / C::WM, partner = map ? pair : pair + C::WM;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = grid_head() / p.h_kv, kvg = grid_head() % p.h_kv;
  const int k0 = grid_tile() * C::BN;
  const int S = p.S;
  const int64_t q_rs = int64_t(p.h) * 2 * DH, kv_rs = int64_t(p.h_kv) * 2 * DH;
  const int64_t kvoff = (int64_t(b) * S * p.h_kv + kvg) * 2 * DH;
  const int n_qt = (S + C::BM - 1) / C::BM, qt_first = k0 / C::BM;
  const int nq = n_qt - qt_first, n_it = p.group * nq;

  // Q, dO and the four statistics rows of iteration `it` into stage `st`
  auto load_q = [&](int it, int st) {
    const int hd = kvg * p.group + it / nq, q0 = (qt_first + it % nq) * C::BM;
    const int64_t qoff = (int64_t(b) * S * p.h + hd) * 2 * DH;
    load_tile<C::BM, C::ROW, C::THREADS>(sb + C::OFF_Q + st * C::TILE_Q, p.q + qoff, q_rs, q0, S,
                                         tid);
    load_tile<C::BM, C::ROW, C::THREADS>(sb + C::OFF_DO + st * C::TILE_Q, p.dout + qoff, q_rs,
                                         q0, S, tid);
    if (tid < 4 * C::BM) {
      const int which = tid / C::BM, x = tid % C::BM;
      const float* base = (which < 2 ? p.lse : p.D) + ((int64_t(b) * p.h + hd) * 2 + (which & 1)) * S;
      const bool ok = q0 + x < S;
      cp_async_4(sb + C::OFF_ST + st * C::STAT + tid * 4, base + (ok ? q0 + x : 0), ok ? 4 : 0);
    }
  };
  load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_K, p.k + kvoff, kv_rs, k0, S, tid);
  load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_V, p.v + kvoff, kv_rs, k0, S, tid);
  load_q(0, 0);
  cp_async_commit();

  const float lam = *p.lambda;
  const float coef = map == 0 ? 1.f : -lam;
  const int krow0 = k0 + pair * 16;  // first key row of this warp
  const int cq = map * (DH / 8);
  const Ldsm<C::ROW> la(lane, kA), ln(lane, kN);
  const uint32_t sK = sb + C::OFF_K + (pair * 16 * C::ROW + cq * 8) * 2;  // K_map, my rows
  const uint32_t sV = sb + C::OFF_V + (pair * 16 * C::ROW + cq * 8) * 2;  // V half, my rows
  uint32_t kf[C::KV_REGS ? DH / 16 : 1][4], vf[C::KV_REGS ? DH / 16 : 1][4];
  float dk[KT][4], dv[KT][4];
#pragma unroll
  for (int n = 0; n < KT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
  // this thread's sum of P_map o dP; only the P_2 warps' (map == 1) sums are used
  float dlam = 0.f;

  for (int it = 0; it < n_it; ++it) {
    const int st = it & 1;
    const int q0 = (qt_first + it % nq) * C::BM;
    cp_async_wait<0>();
    __syncthreads();
    if constexpr (C::KV_REGS) {
      if (it == 0) {
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
          ldsm_x4(kf[kk], la.at(sK, 0, 2 * kk));
          ldsm_x4(vf[kk], la.at(sV, 0, 2 * kk));
        }
      }
    }
    if (it + 1 < n_it) load_q(it + 1, st ^ 1);
    cp_async_commit();
    const uint32_t sQ = sb + C::OFF_Q + st * C::TILE_Q + cq * 16;
    const uint32_t sDO = sb + C::OFF_DO + st * C::TILE_Q + cq * 16;
    const float* stat = reinterpret_cast<const float*>(smem + C::OFF_ST + st * C::STAT);

    // S^T_map = K_map Q_map^T and this warp's half of dP^T = V dO^T (keys x queries)
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
      uint32_t ka[4], va[4];
      if constexpr (C::KV_REGS) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ka[e] = kf[kk][e];
          va[e] = vf[kk][e];
        }
      } else {
        ldsm_x4(ka, la.at(sK, 0, 2 * kk));
        ldsm_x4(va, la.at(sV, 0, 2 * kk));
      }
#pragma unroll
      for (int nn = 0; nn < NT / 2; ++nn) {
        uint32_t qb[4], db[4];
        ldsm_x4(qb, ln.at(sQ, nn * 16, 2 * kk));
        ldsm_x4(db, ln.at(sDO, nn * 16, 2 * kk));
        mma16816(s[2 * nn], ka, qb[0], qb[1]);
        mma16816(s[2 * nn + 1], ka, qb[2], qb[3]);
        mma16816(dp[2 * nn], va, db[0], db[1]);
        mma16816(dp[2 * nn + 1], va, db[2], db[3]);
      }
    }
    // P^T_map (rows: keys u, cols: queries t), masked where t < u or t >= S
    const bool masked = q0 < krow0 + 15 || q0 + C::BM > S;
    const float* lse_row = stat + map * C::BM;
    const float* d_row = stat + (2 + map) * C::BM;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const float2 ls = *reinterpret_cast<const float2*>(lse_row + n * 8 + 2 * t4);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = q0 + n * 8 + 2 * t4 + (e & 1), row = krow0 + g + 8 * (e >> 1);
        float pr = fast_exp2(fmaf(s[n][e], p.scale_log2, -((e & 1) ? ls.y : ls.x) * kLog2e));
        if (masked && (col < row || col >= S)) pr = 0.f;
        s[n][e] = pr;
      }
    }
    // hand P_map (bf16) and this half of dP to the partner; keep both in registers
    uint32_t pw[NT][2];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      pw[n][0] = pack_bf16(s[n][0], s[n][1]);
      pw[n][1] = pack_bf16(s[n][2], s[n][3]);
    }
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk)
      xp[(warp * (NT / 2) + kk) * 32 + lane] =
          make_uint4(pw[2 * kk][0], pw[2 * kk][1], pw[2 * kk + 1][0], pw[2 * kk + 1][1]);
#pragma unroll
    for (int n = 0; n < NT; ++n)
      xd[(warp * NT + n) * 32 + lane] = make_float4(dp[n][0], dp[n][1], dp[n][2], dp[n][3]);
    pair_barrier(pair);

    // dS^T_map = coef P_map o (dP - D_map[t]) as bf16 A fragments; dP = own + partner's half
    // (the same sum in both warps: float addition commutes). dlam += P_map o dP (both f32;
    // masked entries have P = 0); the P_1 warps' (map == 0) sums are discarded, no branch
    uint32_t dsw[NT][2];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const float4 w = xd[(partner * NT + n) * 32 + lane];
      const float2 dd = *reinterpret_cast<const float2*>(d_row + n * 8 + 2 * t4);
      const float f0 = dp[n][0] + w.x, f1 = dp[n][1] + w.y;
      const float f2 = dp[n][2] + w.z, f3 = dp[n][3] + w.w;
      dlam = fmaf(s[n][0], f0, dlam);
      dlam = fmaf(s[n][1], f1, dlam);
      dlam = fmaf(s[n][2], f2, dlam);
      dlam = fmaf(s[n][3], f3, dlam);
      const float d0 = coef * s[n][0] * (f0 - dd.x);
      const float d1 = coef * s[n][1] * (f1 - dd.y);
      const float d2 = coef * s[n][2] * (f2 - dd.x);
      const float d3 = coef * s[n][3] * (f3 - dd.y);
      dsw[n][0] = pack_bf16(d0, d1);
      dsw[n][1] = pack_bf16(d2, d3);
    }
    // dV[:, half] += (P_1 - lambda P_2)^T dO[:, half], both P rounded to bf16 first:
    // own map's P times ca plus the partner's times cb
    const float ca = map ? -lam : 1.f, cb = map ? 1.f : -lam;
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      const uint4 ub = xp[(partner * (NT / 2) + kk) * 32 + lane];
      const uint32_t wa[4] = {pw[2 * kk][0], pw[2 * kk][1], pw[2 * kk + 1][0], pw[2 * kk + 1][1]};
      const uint32_t wb[4] = {ub.x, ub.y, ub.z, ub.w};
      uint32_t pc[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = unpack_bf16(wa[e]), y = unpack_bf16(wb[e]);
        pc[e] = pack_bf16(fmaf(cb, y.x, ca * x.x), fmaf(cb, y.y, ca * x.y));
      }
      const uint32_t af[4] = {dsw[2 * kk][0], dsw[2 * kk][1], dsw[2 * kk + 1][0],
                              dsw[2 * kk + 1][1]};
#pragma unroll
      for (int nn = 0; nn < DH / 16; ++nn) {
        uint32_t ob[4], qb[4];
        ldsm_x4_t(ob, la.at(sDO, kk * 16, 2 * nn));
        ldsm_x4_t(qb, la.at(sQ, kk * 16, 2 * nn));
        mma16816(dv[2 * nn], pc, ob[0], ob[1]);
        mma16816(dv[2 * nn + 1], pc, ob[2], ob[3]);
        mma16816(dk[2 * nn], af, qb[0], qb[1]);
        mma16816(dk[2 * nn + 1], af, qb[2], qb[3]);
      }
    }
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = krow0 + g + 8 * hh;
    if (row >= S) continue;
    bf16* krow = p.dk + kvoff + int64_t(row) * kv_rs + map * DH + 2 * t4;
    bf16* vrow = p.dv + kvoff + int64_t(row) * kv_rs + map * DH + 2 * t4;
#pragma unroll
    for (int n = 0; n < KT; ++n) {
      *reinterpret_cast<uint32_t*>(krow + n * 8) =
          pack_bf16(dk[n][2 * hh] * p.scale, dk[n][2 * hh + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(vrow + n * 8) = pack_bf16(dv[n][2 * hh], dv[n][2 * hh + 1]);
    }
  }
  // the CTA's dlambda partial: the P_2 warps (WM..WARPS-1) in order, through the (now idle)
  // exchange slots once every warp has left the loop
  __syncthreads();
  store_dlambda_partial<C::WARPS>(dlam, C::WM, reinterpret_cast<float*>(smem + C::OFF_XD),
                                  p.dlam_part);
}

// ---- dK, dV: query-split pairs (dh 64) -----------------------------------------------------
// Grid as above. Warp (pair, half) owns the pair's 16 keys and queries [half * BM/2,
// (half + 1) * BM/2) of every query tile, for both maps (S_1^T, S_2^T, dP^T over the full 2dh):
// no per-tile exchange; the two halves' dK_1, dK_2, dV partials meet once at the end. Every
// warp sums P_2 o dP (f32) over its own queries for the CTA's dlambda partial (the halves'
// queries are disjoint: each (query, key) product is counted once).
template <int DH>
__global__ void __launch_bounds__(DkvQCfg<DH>::THREADS, DkvQCfg<DH>::MIN_BLOCKS)
    diff_flash_dkdv_qsplit_kernel(const BwdParams p) {
  using C = DkvQCfg<DH>;
  constexpr int NQ = C::BM / 16;  // query n-tiles of half a tile
  constexpr int KT = DH / 8;      // dK_j n-tiles
  constexpr int VT = 2 * DH / 8;  // dV n-tiles
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sb = smem_addr(smem);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int pair = warp % C::WM, half = warp / C::WM, partner = half ? pair : pair + C::WM;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = grid_head() / p.h_kv, kvg = grid_head() % p.h_kv;
  const int k0 = grid_tile() * C::BN;
  const int S = p.S;
  const int64_t q_rs = int64_t(p.h) * 2 * DH, kv_rs = int64_t(p.h_kv) * 2 * DH;
  const int64_t kvoff = (int64_t(b) * S * p.h_kv + kvg) * 2 * DH;
  const int n_qt = (S + C::BM - 1) / C::BM, qt_first = k0 / C::BM;
  const int nq = n_qt - qt_first, n_it = p.group * nq;

  auto load_q = [&](int it, int st) {
    const int hd = kvg * p.group + it / nq, q0 = (qt_first + it % nq) * C::BM;
    const int64_t qoff = (int64_t(b) * S * p.h + hd) * 2 * DH;
    load_tile<C::BM, C::ROW, C::THREADS>(sb + C::OFF_Q + st * C::TILE_Q, p.q + qoff, q_rs, q0, S,
                                         tid);
    load_tile<C::BM, C::ROW, C::THREADS>(sb + C::OFF_DO + st * C::TILE_Q, p.dout + qoff, q_rs,
                                         q0, S, tid);
    if (tid < 4 * C::BM) {
      const int which = tid / C::BM, x = tid % C::BM;
      const float* base =
          (which < 2 ? p.lse : p.D) + ((int64_t(b) * p.h + hd) * 2 + (which & 1)) * S;
      const bool ok = q0 + x < S;
      cp_async_4(sb + C::OFF_ST + st * C::STAT + tid * 4, base + (ok ? q0 + x : 0), ok ? 4 : 0);
    }
  };
  load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_K, p.k + kvoff, kv_rs, k0, S, tid);
  load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_V, p.v + kvoff, kv_rs, k0, S, tid);
  load_q(0, 0);
  cp_async_commit();

  const float lam = *p.lambda;
  const int krow0 = k0 + pair * 16;   // first key row of this warp
  const int qh = half * (C::BM / 2);  // this warp's first query within a tile
  const Ldsm<C::ROW> la(lane, kA), ln(lane, kN);
  const uint32_t sK = sb + C::OFF_K + pair * 16 * C::ROW * 2;
  const uint32_t sV = sb + C::OFF_V + pair * 16 * C::ROW * 2;
  float dk1[KT][4], dk2[KT][4], dv[VT][4];
#pragma unroll
  for (int n = 0; n < KT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk1[n][e] = dk2[n][e] = 0.f;
#pragma unroll
  for (int n = 0; n < VT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dv[n][e] = 0.f;
  float dlam = 0.f;  // this thread's sum of P_2 o dP (dlambda)

  for (int it = 0; it < n_it; ++it) {
    const int st = it & 1;
    const int q0 = (qt_first + it % nq) * C::BM;
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < n_it) load_q(it + 1, st ^ 1);
    cp_async_commit();
    const uint32_t sQ = sb + C::OFF_Q + st * C::TILE_Q + qh * C::ROW * 2;
    const uint32_t sDO = sb + C::OFF_DO + st * C::TILE_Q + qh * C::ROW * 2;
    const float* stat = reinterpret_cast<const float*>(smem + C::OFF_ST + st * C::STAT) + qh;

    // S_1^T, S_2^T = K_j Q_j^T and dP^T = V dO^T (keys x this warp's queries)
    float s1[NQ][4], s2[NQ][4], dp[NQ][4];
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s1[n][e] = s2[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
      uint32_t a1[4], a2[4];
      ldsm_x4(a1, la.at(sK, 0, 2 * kk));
      ldsm_x4(a2, la.at(sK, 0, DH / 8 + 2 * kk));
#pragma unroll
      for (int nn = 0; nn < NQ / 2; ++nn) {
        uint32_t b1[4], b2[4];
        ldsm_x4(b1, ln.at(sQ, nn * 16, 2 * kk));
        ldsm_x4(b2, ln.at(sQ, nn * 16, DH / 8 + 2 * kk));
        mma16816(s1[2 * nn], a1, b1[0], b1[1]);
        mma16816(s1[2 * nn + 1], a1, b1[2], b1[3]);
        mma16816(s2[2 * nn], a2, b2[0], b2[1]);
        mma16816(s2[2 * nn + 1], a2, b2[2], b2[3]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < 2 * DH / 16; ++kk) {
      uint32_t af[4];
      ldsm_x4(af, la.at(sV, 0, 2 * kk));
#pragma unroll
      for (int nn = 0; nn < NQ / 2; ++nn) {
        uint32_t bf[4];
        ldsm_x4(bf, ln.at(sDO, nn * 16, 2 * kk));
        mma16816(dp[2 * nn], af, bf[0], bf[1]);
        mma16816(dp[2 * nn + 1], af, bf[2], bf[3]);
      }
    }

    // P_j^T (masked where query t < key u or t >= S), dS_1^T, dS_2^T and (P_1 - lambda P_2)^T
    const int t0 = q0 + qh;
    const bool masked = t0 < krow0 + 15 || t0 + C::BM / 2 > S;
    uint32_t f1[NQ][2], f2[NQ][2], fc[NQ][2];
#pragma unroll
    for (int n = 0; n < NQ; ++n) {
      const int c = n * 8 + 2 * t4;
      const float2 l1 = *reinterpret_cast<const float2*>(stat + c);
      const float2 l2 = *reinterpret_cast<const float2*>(stat + C::BM + c);
      const float2 e1 = *reinterpret_cast<const float2*>(stat + 2 * C::BM + c);
      const float2 e2 = *reinterpret_cast<const float2*>(stat + 3 * C::BM + c);
      float d1[4], d2[4], pc[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool odd = e & 1;
        float p1 = fast_exp2(fmaf(s1[n][e], p.scale_log2, -(odd ? l1.y : l1.x) * kLog2e));
        float p2 = fast_exp2(fmaf(s2[n][e], p.scale_log2, -(odd ? l2.y : l2.x) * kLog2e));
        const int col = t0 + c + (e & 1), row = krow0 + g + 8 * (e >> 1);
        if (masked && (col < row || col >= S)) p1 = p2 = 0.f;
        dlam = fmaf(p2, dp[n][e], dlam);
        d1[e] = p1 * (dp[n][e] - (odd ? e1.y : e1.x));
        d2[e] = -lam * p2 * (dp[n][e] - (odd ? e2.y : e2.x));
        pc[e] = fmaf(-lam, p2, p1);
      }
      f1[n][0] = pack_bf16(d1[0], d1[1]);
      f1[n][1] = pack_bf16(d1[2], d1[3]);
      f2[n][0] = pack_bf16(d2[0], d2[1]);
      f2[n][1] = pack_bf16(d2[2], d2[3]);
      fc[n][0] = pack_bf16(pc[0], pc[1]);
      fc[n][1] = pack_bf16(pc[2], pc[3]);
    }
    // dK_j += dS_j^T Q_j and dV += (P_1 - lambda P_2)^T dO over this warp's queries
#pragma unroll
    for (int kk = 0; kk < NQ / 2; ++kk) {
      const uint32_t a1[4] = {f1[2 * kk][0], f1[2 * kk][1], f1[2 * kk + 1][0], f1[2 * kk + 1][1]};
      const uint32_t a2[4] = {f2[2 * kk][0], f2[2 * kk][1], f2[2 * kk + 1][0], f2[2 * kk + 1][1]};
      const uint32_t ac[4] = {fc[2 * kk][0], fc[2 * kk][1], fc[2 * kk + 1][0], fc[2 * kk + 1][1]};
#pragma unroll
      for (int nn = 0; nn < DH / 16; ++nn) {
        uint32_t b1[4], b2[4];
        ldsm_x4_t(b1, la.at(sQ, kk * 16, 2 * nn));
        ldsm_x4_t(b2, la.at(sQ, kk * 16, DH / 8 + 2 * nn));
        mma16816(dk1[2 * nn], a1, b1[0], b1[1]);
        mma16816(dk1[2 * nn + 1], a1, b1[2], b1[3]);
        mma16816(dk2[2 * nn], a2, b2[0], b2[1]);
        mma16816(dk2[2 * nn + 1], a2, b2[2], b2[3]);
      }
#pragma unroll
      for (int nn = 0; nn < 2 * DH / 16; ++nn) {
        uint32_t bf[4];
        ldsm_x4_t(bf, la.at(sDO, kk * 16, 2 * nn));
        mma16816(dv[2 * nn], ac, bf[0], bf[1]);
        mma16816(dv[2 * nn + 1], ac, bf[2], bf[3]);
      }
    }
  }

  // the halves' partials meet through the (now idle) Q/dO buffers: half 0 finishes dK_1 and
  // dV[:, :dh], half 1 dK_2 and dV[:, dh:]; each hands over the other's share. First the
  // CTA's dlambda partial (all warps in order), through the (now idle) statistics rows.
  __syncthreads();
  store_dlambda_partial<C::WARPS>(dlam, 0, reinterpret_cast<float*>(smem + C::OFF_ST),
                                  p.dlam_part);
  constexpr int SLOT = KT + VT / 2;
  float4* xo = reinterpret_cast<float4*>(smem + C::OFF_Q);
#pragma unroll
  for (int n = 0; n < KT; ++n)
    xo[(warp * SLOT + n) * 32 + lane] =
        half ? make_float4(dk1[n][0], dk1[n][1], dk1[n][2], dk1[n][3])
             : make_float4(dk2[n][0], dk2[n][1], dk2[n][2], dk2[n][3]);
#pragma unroll
  for (int n = 0; n < VT / 2; ++n)
    xo[(warp * SLOT + KT + n) * 32 + lane] =
        half ? make_float4(dv[n][0], dv[n][1], dv[n][2], dv[n][3])
             : make_float4(dv[VT / 2 + n][0], dv[VT / 2 + n][1], dv[VT / 2 + n][2],
                           dv[VT / 2 + n][3]);
  pair_barrier(pair);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = krow0 + g + 8 * hh;
    if (row >= S) continue;
    bf16* krow = p.dk + kvoff + int64_t(row) * kv_rs + half * DH + 2 * t4;
    bf16* vrow = p.dv + kvoff + int64_t(row) * kv_rs + half * DH + 2 * t4;
#pragma unroll
    for (int n = 0; n < KT; ++n) {
      const float4 o = xo[(partner * SLOT + n) * 32 + lane];
      const float m0 = half ? dk2[n][2 * hh] : dk1[n][2 * hh];
      const float m1 = half ? dk2[n][2 * hh + 1] : dk1[n][2 * hh + 1];
      *reinterpret_cast<uint32_t*>(krow + n * 8) =
          pack_bf16((m0 + (hh ? o.z : o.x)) * p.scale, (m1 + (hh ? o.w : o.y)) * p.scale);
    }
#pragma unroll
    for (int n = 0; n < VT / 2; ++n) {
      const float4 o = xo[(partner * SLOT + KT + n) * 32 + lane];
      const float m0 = half ? dv[VT / 2 + n][2 * hh] : dv[n][2 * hh];
      const float m1 = half ? dv[VT / 2 + n][2 * hh + 1] : dv[n][2 * hh + 1];
      *reinterpret_cast<uint32_t*>(vrow + n * 8) =
          pack_bf16(m0 + (hh ? o.z : o.x), m1 + (hh ? o.w : o.y));
    }
  }
}

// dlambda[0] = -(sum of the dK/dV kernel's per-CTA partials of P_2 o dP), one block, fixed
// order.
__global__ void diff_flash_dlambda_kernel(const float* part, int n, float* dlambda) {
  __shared__ float sh[256];
  float v = 0.f;
  for (int i = threadIdx.x; i < n; i += 256) v += part[i];
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) dlambda[0] = -sh[0];
}

}  // namespace flash

namespace {
constexpr size_t kAlign = 256;
size_t round_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

size_t d_bytes(const DiffFlashDims& d) { return round_up(size_t(d.B * d.h * 2 * d.S) * 4); }
// Key rows per CTA of the dK/dV kernel launch_bwd runs for this head_dim.
constexpr int dkv_bn(int64_t dh) {
  return dh != 64 ? flash::DkvCfg<128>::BN : flash::DkvQCfg<64>::BN;
}
// dK/dV CTAs = dlambda partials (one each); the workspace holds this many.
int64_t dkv_ctas(const DiffFlashDims& d) {
  const int bn = dkv_bn(d.dh);
  return d.B * d.h_kv * ((d.S + bn - 1) / bn);
}

template <typename K>
void set_smem(K kernel, int bytes, const char* what) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess)
    throw_error("diff_flash: cannot give the ", what, " kernel ", bytes,
                " bytes of shared memory: ", cudaGetErrorString(e));
}

// dlambda from the n_part per-CTA partials of the dK/dV kernel that ran (room for max_part).
void launch_dlambda(const flash::BwdParams& p, int64_t n_part, int64_t max_part,
                    cudaStream_t stream) {
  DT_CHECK(n_part > 0 && n_part <= max_part, "diff_flash: ", n_part,
           " dlambda partials do not fit the workspace's ", max_part);
  flash::diff_flash_dlambda_kernel<<<1, 256, 0, stream>>>(p.dlam_part, int(n_part), p.dlambda);
  flash::check_launch("backward dlambda");
}

template <int DH>
void launch_bwd(const DiffFlashDims& d, const flash::BwdParams& p, cudaStream_t stream, const FlashOptions& opts) {
  using Q = flash::DqCfg<DH>;
  set_smem(flash::diff_flash_dq_kernel<DH>, Q::SMEM, "dQ");
  const dim3 gq = flash::tile_grid(int((d.S + Q::BM - 1) / Q::BM), int(d.B * d.h));
  flash::diff_flash_dq_kernel<DH><<<gq, Q::THREADS, Q::SMEM, stream>>>(p);
  flash::check_launch("backward dQ");
  // every dK/dV kernel writes one dlambda partial per CTA of its grid: n_part of them
  int64_t n_part = 0;
  auto launch_dkdv = [&](auto kernel, auto cfg) {
    using KV = decltype(cfg);
    static_assert(KV::BN == dkv_bn(DH), "dkv_bn must match the launched dK/dV kernel");
    set_smem(kernel, KV::SMEM, "dK/dV");
    const dim3 gkv = flash::tile_grid(int((d.S + KV::BN - 1) / KV::BN), int(d.B * d.h_kv));
    kernel<<<gkv, KV::THREADS, KV::SMEM, stream>>>(p);
    flash::check_launch("backward dK/dV");
    n_part = int64_t(gkv.x) * gkv.y;
  };
  if (diff_flash_wgmma_enabled(opts)) {  // Hopper: diff_flash_bwd_wgmma.cu
    diff_flash_dkdv_wgmma(d, p, stream);
    n_part = diff_flash_dkdv_wgmma_ctas(d);
  } else if constexpr (DH == 64)
    launch_dkdv(flash::diff_flash_dkdv_qsplit_kernel<DH>, flash::DkvQCfg<DH>{});
  else
    launch_dkdv(flash::diff_flash_dkdv_kernel<DH>, flash::DkvCfg<DH>{});
  launch_dlambda(p, n_part, dkv_ctas(d), stream);
}

// The fused-dQ backward (diff_flash_bwd_wgmma.cu) runs on the wgmma kernels when the
// forward saved O2n, unless opts.deterministic asks for bitwise repeatability; its f32 dQ
// accumulator is workspace only then.
bool fused_dq(const FlashOptions& opts) { return diff_flash_wgmma_enabled(opts) && !opts.deterministic; }
size_t dq_acc_bytes(const DiffFlashDims& d, const FlashOptions& opts) {
  return fused_dq(opts) ? round_up(size_t(d.B * d.S * d.h * 2 * d.dh) * 4) : 0;
}
}  // namespace

void std_flash_dq_mma(const DiffFlashDims& d2, const flash::BwdParams& p, bool kv1,
                      cudaStream_t stream) {
  auto launch = [&](auto kernel, auto cfg) {
    using Q = decltype(cfg);
    set_smem(kernel, Q::SMEM, "standard dQ");
    const dim3 gq = flash::tile_grid(int((d2.S + Q::BM - 1) / Q::BM), int(d2.B * d2.h));
    kernel<<<gq, Q::THREADS, Q::SMEM, stream>>>(p);
    flash::check_launch("standard backward dQ");
  };
  if (d2.dh == 64)
    kv1 ? launch(flash::diff_flash_dq_kernel<64, true, true>, flash::DqCfg<64>{})
        : launch(flash::diff_flash_dq_kernel<64, true, false>, flash::DqCfg<64>{});
  else
    kv1 ? launch(flash::diff_flash_dq_kernel<128, true, true>, flash::DqCfg<128>{})
        : launch(flash::diff_flash_dq_kernel<128, true, false>, flash::DqCfg<128>{});
}

size_t diff_flash_backward_workspace_bytes(const DiffFlashDims& d, const FlashOptions& opts) {
  return d_bytes(d) + round_up(size_t(dkv_ctas(d)) * 4) + dq_acc_bytes(d, opts);
}

void diff_flash_backward(const DiffFlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k,
                         const __nv_bfloat16* v, const float* lambda, const __nv_bfloat16* out,
                         const float* lse, const __nv_bfloat16* dout, __nv_bfloat16* dq,
                         __nv_bfloat16* dk, __nv_bfloat16* dv, float* dlambda, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream,
                         const __nv_bfloat16* o2, const FlashOptions& opts) {
  std::string why;
  if (!diff_flash_supported(d, &why)) throw_error("diff_flash_backward: unsupported: ", why);
  const size_t need = diff_flash_backward_workspace_bytes(d, opts);
  if (workspace_bytes < need || workspace == nullptr)
    throw_error("diff_flash_backward: workspace of ", workspace_bytes, " bytes, need ", need);
  const void* ptrs[] = {q, k, v, out, dout, dq, dk, dv, workspace, o2};
  const char* names[] = {"q", "k", "v", "out", "dout", "dq", "dk", "dv", "workspace", "o2"};
  for (int i = 0; i < 10; ++i)
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0)
      throw_error("diff_flash_backward: ", names[i], " is not 16-byte aligned");
  float* D = static_cast<float*>(workspace);
  float* part = reinterpret_cast<float*>(static_cast<char*>(workspace) + d_bytes(d));
  flash::BwdParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.dout = dout;
  p.o2 = o2;
  p.lambda = lambda;
  p.lse = lse;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.D = D;
  p.dlam_part = part;
  p.dlambda = dlambda;
  p.S = int(d.S);
  p.h = int(d.h);
  p.h_kv = int(d.h_kv);
  p.group = int(d.h / d.h_kv);
  p.scale = float(1.0 / std::sqrt(double(d.dh)));
  p.scale_log2 = float(flash::kLog2e / std::sqrt(double(d.dh)));
  if (o2 && fused_dq(opts)) {
    p.dq_acc = reinterpret_cast<float*>(static_cast<char*>(workspace) + d_bytes(d) +
                                        round_up(size_t(dkv_ctas(d)) * 4));
    diff_flash_bwd_fused_dq(d, p, stream);
    launch_dlambda(p, diff_flash_dkdv_wgmma_ctas(d), dkv_ctas(d), stream);
  } else if (d.dh == 64) {
    launch_bwd<64>(d, p, stream, opts);
  } else {
    launch_bwd<128>(d, p, stream, opts);
  }
}

}  // namespace difftron::cuda
