// Fused differential flash-attention backward (issue 4), deterministic (fixed-order sums, no
// atomics): (1) a query-major kernel that recomputes D2' = rowsum(P_2 o dP) in a first pass,
// derives D1 = dO.O + lambda D2', writes both for (2), and accumulates dQ_1, dQ_2 in a second
// pass; (2) a key-major kernel accumulating dK_1, dK_2 and dV over the query tiles of every
// head of the K/V group; (3) a one-block sum of the per-CTA dlambda partials. Math and the
// warp-pair design: diff_flash.cuh.
#include <cmath>
#include <string>

#include "core/error.h"
#include "kernels/cuda/diff_flash.cuh"

namespace difftron::cuda {
namespace flash {

// ---- dQ, D1, D2' ------------------------------------------------------------------------
// Grid: x = b * h + head, y = query tile (longest first).
template <int DH>
__global__ void __launch_bounds__(DqCfg<DH>::THREADS, DqCfg<DH>::MIN_BLOCKS)
    diff_flash_dq_kernel(const BwdParams p) {
  using C = DqCfg<DH>;
  constexpr int NT = C::BN / 8;   // key n-tiles of a tile (pass B)
  constexpr int NH = C::BN / 16;  // key n-tiles of half a tile (pass A)
  constexpr int QT = DH / 8;      // dQ_j n-tiles
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sb = smem_addr(smem);
  float4* xd = reinterpret_cast<float4*>(smem + C::OFF_XD);
  float2* xr = reinterpret_cast<float2*>(smem + C::OFF_XR);
  float* red = reinterpret_cast<float*>(smem + C::OFF_RED);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int pair = warp % C::WM, map = warp / C::WM;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.x / p.h, hd = blockIdx.x % p.h, kvg = hd / p.group;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * C::BM;
  const int S = p.S;
  const int64_t q_rs = int64_t(p.h) * 2 * DH, kv_rs = int64_t(p.h_kv) * 2 * DH;
  const int64_t qoff = (int64_t(b) * S * p.h + hd) * 2 * DH;
  const bf16* kg = p.k + (int64_t(b) * S * p.h_kv + kvg) * 2 * DH;
  const bf16* vg = p.v + (int64_t(b) * S * p.h_kv + kvg) * 2 * DH;
  const int64_t bh = int64_t(b) * p.h + hd;
  const int kv_end = min(q0 + C::BM, S);
  const int n_kt = (kv_end + C::BN - 1) / C::BN;
  const int n_it = 2 * n_kt;  // pass A then pass B, both over the key tiles, last first

  load_tile<C::BM, C::ROW, C::THREADS>(sb + C::OFF_Q, p.q + qoff, q_rs, q0, S, tid);
  load_tile<C::BM, C::ROW, C::THREADS>(sb + C::OFF_DO, p.dout + qoff, q_rs, q0, S, tid);
  load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_K, kg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_V, vg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  cp_async_commit();

  const int row0 = q0 + pair * 16;
  const float lam = *p.lambda;
  // delta = dO . O for rows g and g + 8 of this warp: lane -> (row lane/2, column half lane&1)
  float delta[2];
  {
    const int r = row0 + (lane >> 1);
    float acc = 0.f;
    if (r < S) {
      const uint4* o4 = reinterpret_cast<const uint4*>(p.out + qoff + int64_t(r) * q_rs +
                                                        (lane & 1) * DH);
      const uint4* d4 = reinterpret_cast<const uint4*>(p.dout + qoff + int64_t(r) * q_rs +
                                                        (lane & 1) * DH);
#pragma unroll 4
      for (int c = 0; c < DH / 8; ++c) {
        const uint4 ov = o4[c], dv = d4[c];
        const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w}, dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 a = unpack_bf16(ow[e]), d = unpack_bf16(dw[e]);
          acc = fmaf(a.x, d.x, fmaf(a.y, d.y, acc));
        }
      }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    delta[0] = __shfl_sync(0xffffffffu, acc, 2 * g);
    delta[1] = __shfl_sync(0xffffffffu, acc, 2 * g + 16);
  }
  float lse_a[2], lse_b[2];  // log2 units: map 2's (pass A) and this warp's map's (pass B)
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + g + 8 * hh;
    lse_a[hh] = row < S ? p.lse[(bh * 2 + 1) * S + row] * kLog2e : INFINITY;
    lse_b[hh] = row < S ? p.lse[(bh * 2 + map) * S + row] * kLog2e : INFINITY;
  }

  const Ldsm<C::ROW> la(lane, kA), ln(lane, kN);
  const int cq = map * (DH / 8);
  const uint32_t sQ = sb + C::OFF_Q + pair * 16 * C::ROW * 2;    // this warp's rows
  const uint32_t sDO = sb + C::OFF_DO + pair * 16 * C::ROW * 2;
  float acc[2] = {0.f, 0.f};      // pass A: partial rowsum(P_2 o dP) over this warp's keys
  float dj[2] = {0.f, 0.f};       // D_j of this warp's map (D1 or D2')
  const float coef = map == 0 ? 1.f : -lam;
  float dq[QT][4];
#pragma unroll
  for (int n = 0; n < QT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[n][e] = 0.f;

  for (int it = 0; it < n_it; ++it) {
    const bool pass_b = it >= n_kt;
    const int kt = n_kt - 1 - (pass_b ? it - n_kt : it), st = it & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < n_it) {
      const int nkt = n_kt - 1 - (it + 1 >= n_kt ? it + 1 - n_kt : it + 1);
      load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_K + (st ^ 1) * C::TILE_KV, kg, kv_rs,
                                           nkt * C::BN, S, tid);
      load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_V + (st ^ 1) * C::TILE_KV, vg, kv_rs,
                                           nkt * C::BN, S, tid);
    }
    cp_async_commit();
    const uint32_t sK = sb + C::OFF_K + st * C::TILE_KV, sV = sb + C::OFF_V + st * C::TILE_KV;
    const int k0 = kt * C::BN;

    if (!pass_b) {
      // pass A: S_2 and dP over keys [map * BN/2, (map + 1) * BN/2) of the tile
      float s[NH][4], dp[NH][4];
#pragma unroll
      for (int n = 0; n < NH; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
      const int kb = map * (C::BN / 2);
#pragma unroll
      for (int kk = 0; kk < DH / 16; ++kk) {
        uint32_t af[4];
        ldsm_x4(af, la.at(sQ + DH * 2, 0, 2 * kk));
#pragma unroll
        for (int nn = 0; nn < NH / 2; ++nn) {
          uint32_t bf[4];
          ldsm_x4(bf, ln.at(sK + DH * 2 + kb * C::ROW * 2, nn * 16, 2 * kk));
          mma16816(s[2 * nn], af, bf[0], bf[1]);
          mma16816(s[2 * nn + 1], af, bf[2], bf[3]);
        }
      }
#pragma unroll
      for (int kk = 0; kk < 2 * DH / 16; ++kk) {
        uint32_t af[4];
        ldsm_x4(af, la.at(sDO, 0, 2 * kk));
#pragma unroll
        for (int nn = 0; nn < NH / 2; ++nn) {
          uint32_t bf[4];
          ldsm_x4(bf, ln.at(sV + kb * C::ROW * 2, nn * 16, 2 * kk));
          mma16816(dp[2 * nn], af, bf[0], bf[1]);
          mma16816(dp[2 * nn + 1], af, bf[2], bf[3]);
        }
      }
      const bool masked = k0 + kb + C::BN / 2 - 1 > row0;
#pragma unroll
      for (int n = 0; n < NH; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = k0 + kb + n * 8 + 2 * t4 + (e & 1), row = row0 + g + 8 * (e >> 1);
          float pr = fast_exp2(fmaf(s[n][e], p.scale_log2, -lse_a[e >> 1]));
          if (masked && col > row) pr = 0.f;
          acc[e >> 1] = fmaf(pr, dp[n][e], acc[e >> 1]);
        }
      if (it == n_kt - 1) {
        // end of pass A: D2' = both key halves, fixed order; D1 = delta + lambda D2'
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          acc[hh] += __shfl_xor_sync(0xffffffffu, acc[hh], 1);
          acc[hh] += __shfl_xor_sync(0xffffffffu, acc[hh], 2);
        }
        xr[warp * 32 + lane] = make_float2(acc[0], acc[1]);
        pair_barrier(pair);
        const float2 x0 = xr[pair * 32 + lane], x1 = xr[(pair + C::WM) * 32 + lane];
        const float d2[2] = {x0.x + x1.x, x0.y + x1.y};
        float part = 0.f;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          dj[hh] = map == 0 ? fmaf(lam, d2[hh], delta[hh]) : d2[hh];
          const int row = row0 + g + 8 * hh;
          if (row < S) {
            if (t4 == 0) p.D[(bh * 2 + map) * S + row] = dj[hh];
            part += d2[hh];
          }
        }
        if (map == 1) {
          part = t4 == 0 ? part : 0.f;
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
          if (lane == 0) red[pair] = part;
        }
      }
    } else {
      // pass B: S_map over the whole tile, dP's half-contraction over this warp's half of 2dh
      float s[NT][4], dp[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < DH / 16; ++kk) {
        uint32_t af[4], df[4];
        ldsm_x4(af, la.at(sQ + cq * 16, 0, 2 * kk));
        ldsm_x4(df, la.at(sDO + cq * 16, 0, 2 * kk));
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
          uint32_t bf[4], vf[4];
          ldsm_x4(bf, ln.at(sK + cq * 16, nn * 16, 2 * kk));
          ldsm_x4(vf, ln.at(sV + cq * 16, nn * 16, 2 * kk));
          mma16816(s[2 * nn], af, bf[0], bf[1]);
          mma16816(s[2 * nn + 1], af, bf[2], bf[3]);
          mma16816(dp[2 * nn], df, vf[0], vf[1]);
          mma16816(dp[2 * nn + 1], df, vf[2], vf[3]);
        }
      }
#pragma unroll
      for (int n = 0; n < NT; ++n)
        xd[(warp * NT + n) * 32 + lane] = make_float4(dp[n][0], dp[n][1], dp[n][2], dp[n][3]);
      pair_barrier(pair);
      const bool masked = k0 + C::BN - 1 > row0;
      uint32_t dsw[NT][2];  // dS_map as bf16 pairs (row g, row g + 8) per n-tile
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const float4 u = xd[(pair * NT + n) * 32 + lane];
        const float4 w = xd[((pair + C::WM) * NT + n) * 32 + lane];
        const float dpf[4] = {u.x + w.x, u.y + w.y, u.z + w.z, u.w + w.w};
        float ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = k0 + n * 8 + 2 * t4 + (e & 1), row = row0 + g + 8 * (e >> 1);
          float pr = fast_exp2(fmaf(s[n][e], p.scale_log2, -lse_b[e >> 1]));
          if (masked && col > row) pr = 0.f;
          ds[e] = coef * pr * (dpf[e] - dj[e >> 1]);
        }
        dsw[n][0] = pack_bf16(ds[0], ds[1]);
        dsw[n][1] = pack_bf16(ds[2], ds[3]);
      }
      // dQ_map += dS_map K_map
#pragma unroll
      for (int kk = 0; kk < C::BN / 16; ++kk) {
        const uint32_t af[4] = {dsw[2 * kk][0], dsw[2 * kk][1], dsw[2 * kk + 1][0],
                                dsw[2 * kk + 1][1]};
#pragma unroll
        for (int nn = 0; nn < DH / 16; ++nn) {
          uint32_t bf[4];
          ldsm_x4_t(bf, la.at(sK + cq * 16, kk * 16, 2 * nn));
          mma16816(dq[2 * nn], af, bf[0], bf[1]);
          mma16816(dq[2 * nn + 1], af, bf[2], bf[3]);
        }
      }
    }
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + g + 8 * hh;
    if (row >= S) continue;
    bf16* drow = p.dq + qoff + int64_t(row) * q_rs + map * DH + 2 * t4;
#pragma unroll
    for (int n = 0; n < QT; ++n)
      *reinterpret_cast<uint32_t*>(drow + n * 8) =
          pack_bf16(dq[n][2 * hh] * p.scale, dq[n][2 * hh + 1] * p.scale);
  }
  __syncthreads();
  if (tid == 0) {
    float sum = 0.f;
    for (int w = 0; w < C::WM; ++w) sum += red[w];
    p.dlam_part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = sum;
  }
}

// ---- dK, dV -----------------------------------------------------------------------------
// Grid: x = b * h_kv + group, y = key tile (first tiles see the most queries: launched first).
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
  const int pair = warp % C::WM, map = warp / C::WM;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.x / p.h_kv, kvg = blockIdx.x % p.h_kv;
  const int k0 = blockIdx.y * C::BN;
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
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk)
      xp[(warp * (NT / 2) + kk) * 32 + lane] =
          make_uint4(pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                     pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                     pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]));
#pragma unroll
    for (int n = 0; n < NT; ++n)
      xd[(warp * NT + n) * 32 + lane] = make_float4(dp[n][0], dp[n][1], dp[n][2], dp[n][3]);
    pair_barrier(pair);

    // dS^T_map = coef P_map o (dP - D_map[t]) as bf16 A fragments
    uint32_t dsw[NT][2];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const float4 u = xd[(pair * NT + n) * 32 + lane];
      const float4 w = xd[((pair + C::WM) * NT + n) * 32 + lane];
      const float2 dd = *reinterpret_cast<const float2*>(d_row + n * 8 + 2 * t4);
      const float d0 = coef * s[n][0] * (u.x + w.x - dd.x);
      const float d1 = coef * s[n][1] * (u.y + w.y - dd.y);
      const float d2 = coef * s[n][2] * (u.z + w.z - dd.x);
      const float d3 = coef * s[n][3] * (u.w + w.w - dd.y);
      dsw[n][0] = pack_bf16(d0, d1);
      dsw[n][1] = pack_bf16(d2, d3);
    }
    // dV[:, half] += (P_1 - lambda P_2)^T dO[:, half], with both P rounded to bf16 first
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      const uint4 ua = xp[(pair * (NT / 2) + kk) * 32 + lane];
      const uint4 ub = xp[((pair + C::WM) * (NT / 2) + kk) * 32 + lane];
      const uint32_t wa[4] = {ua.x, ua.y, ua.z, ua.w}, wb[4] = {ub.x, ub.y, ub.z, ub.w};
      uint32_t pc[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = unpack_bf16(wa[e]), y = unpack_bf16(wb[e]);
        pc[e] = pack_bf16(fmaf(-lam, y.x, x.x), fmaf(-lam, y.y, x.y));
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
}

// dlambda[0] = -(sum of the per-CTA partials of D2'), one block, fixed order.
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
int64_t dq_ctas(const DiffFlashDims& d) {
  const int bm = d.dh == 64 ? flash::DqCfg<64>::BM : flash::DqCfg<128>::BM;
  return d.B * d.h * ((d.S + bm - 1) / bm);
}

template <typename K>
void set_smem(K kernel, int bytes, const char* what) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess)
    throw_error("diff_flash: cannot give the ", what, " kernel ", bytes,
                " bytes of shared memory: ", cudaGetErrorString(e));
}

template <int DH>
void launch_bwd(const DiffFlashDims& d, const flash::BwdParams& p, cudaStream_t stream) {
  using Q = flash::DqCfg<DH>;
  using KV = flash::DkvCfg<DH>;
  set_smem(flash::diff_flash_dq_kernel<DH>, Q::SMEM, "dQ");
  set_smem(flash::diff_flash_dkdv_kernel<DH>, KV::SMEM, "dK/dV");
  dim3 gq(unsigned(d.B * d.h), unsigned((d.S + Q::BM - 1) / Q::BM));
  flash::diff_flash_dq_kernel<DH><<<gq, Q::THREADS, Q::SMEM, stream>>>(p);
  flash::check_launch("backward dQ");
  dim3 gkv(unsigned(d.B * d.h_kv), unsigned((d.S + KV::BN - 1) / KV::BN));
  flash::diff_flash_dkdv_kernel<DH><<<gkv, KV::THREADS, KV::SMEM, stream>>>(p);
  flash::check_launch("backward dK/dV");
  flash::diff_flash_dlambda_kernel<<<1, 256, 0, stream>>>(p.dlam_part, int(dq_ctas(d)), p.dlambda);
  flash::check_launch("backward dlambda");
}
}  // namespace

size_t diff_flash_backward_workspace_bytes(const DiffFlashDims& d) {
  return d_bytes(d) + round_up(size_t(dq_ctas(d)) * 4);
}

void diff_flash_backward(const DiffFlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k,
                         const __nv_bfloat16* v, const float* lambda, const __nv_bfloat16* out,
                         const float* lse, const __nv_bfloat16* dout, __nv_bfloat16* dq,
                         __nv_bfloat16* dk, __nv_bfloat16* dv, float* dlambda, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  std::string why;
  if (!diff_flash_supported(d, &why)) throw_error("diff_flash_backward: unsupported: ", why);
  const size_t need = diff_flash_backward_workspace_bytes(d);
  if (workspace_bytes < need || workspace == nullptr)
    throw_error("diff_flash_backward: workspace of ", workspace_bytes, " bytes, need ", need);
  const void* ptrs[] = {q, k, v, out, dout, dq, dk, dv, workspace};
  const char* names[] = {"q", "k", "v", "out", "dout", "dq", "dk", "dv", "workspace"};
  for (int i = 0; i < 9; ++i)
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0)
      throw_error("diff_flash_backward: ", names[i], " is not 16-byte aligned");
  float* D = static_cast<float*>(workspace);
  float* part = reinterpret_cast<float*>(static_cast<char*>(workspace) + d_bytes(d));
  flash::BwdParams p{q, k, v, out, dout, lambda, lse, dq, dk, dv, D, part, dlambda,
                     int(d.S), int(d.h), int(d.h_kv), int(d.h / d.h_kv),
                     float(1.0 / std::sqrt(double(d.dh))),
                     float(flash::kLog2e / std::sqrt(double(d.dh)))};
  if (d.dh == 64)
    launch_bwd<64>(d, p, stream);
  else
    launch_bwd<128>(d, p, stream);
}

}  // namespace difftron::cuda
