// The backward of the fused differential flash attention on Hopper warpgroup MMAs (wgmma,
// sm_90a), dh 64 and 128: key-major kernels computing dK_1, dK_2, dV and the dlambda partials,
// and, in the default fused mode (the forward saved O2n), dQ as well. Math: diff_flash.cuh.
// diff_flash_backward (diff_flash_bwd.cu) picks them when diff_flash_wgmma_enabled():
// - fused (default with O2n): diff_flash_bwd_prep_kernel (D1, D2' per row), the dK/dV kernel
//   with FUSE_DQ (dQ_j = dS_j K_j added into an f32 accumulator with atomics: not bitwise
//   repeatable), diff_flash_dq_convert_kernel, then the shared dlambda reduction;
// - deterministic (no O2n, or FlashOptions::deterministic): the mma.sync dQ kernel (which
//   also writes D1, D2'), the dK/dV kernel without dQ, the dlambda reduction.
//
// dh 64 design: a CTA owns BN = 128 keys of one K/V group and has two warpgroups of 64 keys
// each; it walks the query tiles (BM = 64) of every head of the group, double-buffering Q, dO and
// the per-query statistics (lse_1, lse_2, D1, D2') with cp.async. Per tile, a warpgroup
// computes (keys as the 64 MMA rows, all operands but the probabilities from shared memory):
//   dP^T = V dO^T                      (one product over 2dh, shared by both maps)
//   S_1^T = K_1 Q_1^T -> P_1^T, dS_1^T = P_1^T o (dP^T - D1)
//   dV += P_1^T dO,  dK_1 += dS_1^T Q_1                   (A from registers)
//   S_2^T = K_2 Q_2^T -> P_2^T, dS_2^T = -lambda P_2^T o (dP^T - D2'), dlambda += P_2 o dP
//   dV += (-lambda P_2^T) dO,  dK_2 += dS_2^T Q_2
//   fused: dS_j^T to shared memory; warpgroup j: dQ_j += dS_j K_j over the CTA's 128 keys
// The maps run one after the other so that one score tile is live at a time (the 128 f32
// accumulator registers of dK_1, dK_2 and dV leave room for only one); dV therefore takes two
// products per tile instead of one over (P_1 - lambda P_2): 20 dh FLOP per (query, key) pair
// (24 with the fused dQ) against the mma.sync kernel's 16. dh 128: see WgDkv128Cfg.
#include <cmath>
#include <cstdint>
#include <string>

#include "base/error.h"
#include "kernels/cuda/diff_flash_wgmma.cuh"
#include "kernels/cuda/diff_flash_wgmma.h"

namespace difftron::cuda {
namespace flash {

// ---- shared by the dh 64 and dh 128 kernels -------------------------------------------------
// Which keys a dK/dV CTA owns and which query tiles it walks (every head of its K/V group,
// from the first tile that reaches its keys), and the loads of both. KVROW: bf16 per global K/V
// row (2dh; dh for standard attention with both heads of a pair on one K/V head).
template <typename C, int KVROW = C::ROW>
struct DkvWalk {
  int b, kvg, k0, S, qt_first, nq, n_it;
  int64_t q_rs, kv_rs, kvoff;
  __device__ explicit DkvWalk(const BwdParams& p)
      : b(grid_head() / p.h_kv), kvg(grid_head() % p.h_kv), k0(grid_tile() * C::BN), S(p.S),
        qt_first(k0 / C::BM), nq((p.S + C::BM - 1) / C::BM - qt_first), n_it(p.group * nq),
        q_rs(int64_t(p.h) * C::ROW), kv_rs(int64_t(p.h_kv) * KVROW),
        kvoff((int64_t(b) * p.S * p.h_kv + kvg) * KVROW) {}
  __device__ int head(const BwdParams& p, int it) const { return kvg * p.group + it / nq; }
  __device__ int q0(int it) const { return (qt_first + it % nq) * C::BM; }
  // K and V of the CTA's keys (column groups BN * 128 bytes apart)
  __device__ void load_kv(uint32_t sb, const BwdParams& p, int tid) const {
    load_groups<C::BN, KVROW, C::THREADS>(sb + C::OFF_K, p.k + kvoff, kv_rs, k0, S, tid);
    load_groups<C::BN, KVROW, C::THREADS>(sb + C::OFF_V, p.v + kvoff, kv_rs, k0, S, tid);
  }
  // Q, dO and the statistics (lse_1, lse_2, D1, D2') of query tile `it` into stage st
  __device__ void load_q(uint32_t sb, const BwdParams& p, int it, int st, int tid) const {
    const int hd = head(p, it), t0 = q0(it);
    const int64_t qoff = (int64_t(b) * S * p.h + hd) * C::ROW;
    load_groups<C::BM, C::ROW, C::THREADS>(sb + C::OFF_Q + st * C::TILE_Q, p.q + qoff, q_rs, t0,
                                           S, tid);
    load_groups<C::BM, C::ROW, C::THREADS>(sb + C::OFF_DO + st * C::TILE_Q, p.dout + qoff, q_rs,
                                           t0, S, tid);
    static_assert(4 * C::BM == C::THREADS, "one statistic per thread");
    const int which = tid / C::BM, x = tid % C::BM;
    const float* base = (which < 2 ? p.lse : p.D) + ((int64_t(b) * p.h + hd) * 2 + (which & 1)) * S;
    const bool ok = t0 + x < S;
    cp_async_4(sb + C::OFF_ST + st * C::STAT + tid * 4, base + (ok ? t0 + x : 0), ok ? 4 : 0);
  }
};

// One map's probabilities and dS for a warp's 16 keys x NQ * 8 queries (accumulator layout,
// keys as rows): P^T = exp(S^T - lse) (zero where the query precedes the key or is past S),
// fp = pscale P^T and fd = pscale P^T o (dP^T - D) as bf16 A fragments; dlam (map 2 only, else
// null) += P o dP. stat: the tile's statistics; map picks lse_map and D_map.
template <int NQ, int BM>
__device__ __forceinline__ void probs_ds(const float (&s)[NQ][4], const float (&dp)[NQ][4],
                                         const float* stat, int map, float pscale, float scale_log2,
                                         bool masked, int q0, int krow0, int S, int lane,
                                         float* dlam, uint32_t (&fp)[NQ][2], uint32_t (&fd)[NQ][2]) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
    const int c = n * 8 + 2 * t4;
    const float2 ls = *reinterpret_cast<const float2*>(stat + map * BM + c);
    const float2 dd = *reinterpret_cast<const float2*>(stat + (2 + map) * BM + c);
    float pr[4], ds[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool odd = e & 1;
      float pe = fast_exp2(fmaf(s[n][e], scale_log2, -(odd ? ls.y : ls.x) * kLog2e));
      const int col = q0 + c + (e & 1), row = krow0 + g + 8 * (e >> 1);
      if (masked && (col < row || col >= S)) pe = 0.f;
      if (dlam) *dlam = fmaf(pe, dp[n][e], *dlam);
      pr[e] = pscale * pe;
      ds[e] = pr[e] * (dp[n][e] - (odd ? dd.y : dd.x));
    }
    fp[n][0] = pack_bf16(pr[0], pr[1]);
    fp[n][1] = pack_bf16(pr[2], pr[3]);
    fd[n][0] = pack_bf16(ds[0], ds[1]);
    fd[n][1] = pack_bf16(ds[2], ds[3]);
  }
}

// A warp's bf16 fragments (rows r, r + 8; NQ * 8 columns) into a Tile<64> with rows = keys.
template <int NQ>
__device__ __forceinline__ void store_rows(uint8_t* tile, int r, const uint32_t (&f)[NQ][2],
                                           int lane) {
  uint8_t* t = tile + 4 * (lane & 3);
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
    *reinterpret_cast<uint32_t*>(t + Tile<64>::off(r, n)) = f[n][0];
    *reinterpret_cast<uint32_t*>(t + Tile<64>::off(r + 8, n)) = f[n][1];
  }
}

// base[row * row_stride + column] += a warp's accumulator tile d (rows row0 + g, row0 + g + 8 of
// the mma layout, NT n-tiles of 8 columns), rows >= S skipped; f32 atomics (float2).
template <int NT>
__device__ __forceinline__ void atomic_add_rows(float* base, int64_t row_stride, int row0, int S,
                                                const float (&d)[NT][4], int lane) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + (lane >> 2) + 8 * hh;
    if (row >= S) continue;
    float* acc = base + row * row_stride + 2 * (lane & 3);
#pragma unroll
    for (int n = 0; n < NT; ++n)
      atomicAdd(reinterpret_cast<float2*>(acc + n * 8), make_float2(d[n][2 * hh], d[n][2 * hh + 1]));
  }
}

// The CTA's dlambda partial: the threads' sums added in a fixed order (red: a float per warp).
template <int THREADS>
__device__ __forceinline__ void store_dlambda_partial(float dlam, float* red, float* part) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) dlam += __shfl_xor_sync(0xffffffffu, dlam, o);
  if (lane == 0) red[warp] = dlam;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int i = 0; i < THREADS / 32; ++i) sum += red[i];
    part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = sum;
  }
}

struct WgDkvCfg {
  static constexpr int DH = 64, ROW = 2 * DH;   // bf16 per row of q, k, v, dO
  static constexpr int THREADS = 256;           // two warpgroups of 64 keys
  static constexpr int BN = 128, BM = 64;       // keys per CTA, queries per tile
  static constexpr int TILE_KV = BN * ROW * 2;  // bytes; column groups BN * 128 apart
  static constexpr int TILE_Q = BM * ROW * 2;   // bytes; column groups BM * 128 apart
  static constexpr int STAT = 4 * BM * 4;       // lse_1, lse_2, D1, D2' of one query tile
  static constexpr int OFF_K = 0, OFF_V = TILE_KV, OFF_Q = 2 * TILE_KV;
  static constexpr int OFF_DO = OFF_Q + 2 * TILE_Q, OFF_ST = OFF_DO + 2 * TILE_Q;
  static constexpr int OFF_RED = OFF_ST + 2 * STAT;  // per-warp dlambda sums
  static constexpr int OFF_DS = OFF_RED + 1024;      // fused dQ: dS_1^T, dS_2^T [BN][BM] bf16
  static constexpr int TILE_DS = BN * BM * 2;
  static constexpr int SMEM = OFF_DS + 2 * TILE_DS + 1024;  // + 1024: base alignment slack
};

// FUSE_DQ: also dQ_j += dS_j K_j over the CTA's 128 keys (warpgroup j takes map j, dS from
// shared memory), added into p.dq_acc with float atomics (not deterministic).
// STD: standard attention (std_flash_backward): the maps are two ordinary heads 2i, 2i+1 with
// their own V and dO halves: dP_j^T = V_j dO_j^T per head, dV[:, half j] += P_j^T dO_j, no
// lambda and no dlambda.
// KV1 (with STD): both heads of every pair read the same dh-wide K/V head (GQA, even group);
// dK = dK_1 + dK_2 and dV = dV_1 + dV_2 of all its pairs, added in registers in a fixed order.
template <bool FUSE_DQ, bool STD = false, bool KV1 = false>
__global__ void __launch_bounds__(WgDkvCfg::THREADS, 1)
    diff_flash_dkdv_wgmma_kernel(const BwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  namespace w = wgmma;
  using C = WgDkvCfg;
  constexpr int DH = C::DH;
  constexpr int NQ = C::BM / 8;   // score n-tiles (queries)
  constexpr int KT = DH / 8;      // dK_j n-tiles
  constexpr int VT = C::ROW / 8;  // dV n-tiles
  static_assert(STD || !KV1, "one K/V head per pair is standard attention only");
  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const uint32_t sb = smem_addr(smem);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wg = warp >> 2, wl = warp & 3;
  const int g = lane >> 2, t4 = lane & 3;
  const DkvWalk<C, KV1 ? DH : C::ROW> wk(p);
  const int S = p.S, n_it = wk.n_it;
  wk.load_kv(sb, p, tid);
  wk.load_q(sb, p, 0, 0, tid);
  cp_async_commit();

  const float lam = STD ? 0.f : *p.lambda;
  const int kw0 = wk.k0 + wg * 64;    // this warpgroup's first key
  const int krow0 = kw0 + wl * 16;    // this warp's first key
  // this warpgroup's 64 rows of K_1 (group 0), K_2 (group 1) and V (groups 0, 1); KV1: one
  // K group and one V group, read by both maps
  const uint32_t sK1 = sb + C::OFF_K + wg * 64 * 128, sK2 = sK1 + (KV1 ? 0 : C::BN * 128);
  const uint32_t sV = sb + C::OFF_V + wg * 64 * 128;
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
    const int q0 = wk.q0(it);
    cp_async_wait<0>();
    w::fence_proxy_async();
    __syncthreads();  // tile it landed; every warpgroup is done with the other buffer
    if (it + 1 < n_it) wk.load_q(sb, p, it + 1, st ^ 1, tid);
    cp_async_commit();
    // every query of the tile precedes this warpgroup's keys (the fused dQ needs its zero dS)
    if (!FUSE_DQ && q0 + C::BM <= kw0) continue;
    const uint32_t sQ = sb + C::OFF_Q + st * C::TILE_Q, sDO = sb + C::OFF_DO + st * C::TILE_Q;
    const float* stat = reinterpret_cast<const float*>(smem + C::OFF_ST + st * C::STAT);

    // dP^T = V dO^T (STD: head 1's half, V_1 dO_1^T) and S_1^T = K_1 Q_1^T
    float dp[NQ][4], s[NQ][4];
    w::fence();
#pragma unroll
    for (int kk = 0; kk < (STD ? DH : C::ROW) / 16; ++kk)
      w::wgmma_ss<0, 0>(dp, w::kmajor_desc(sV + (kk >> 2) * C::BN * 128, kk & 3),
                        w::kmajor_desc(sDO + (kk >> 2) * C::BM * 128, kk & 3), kk > 0);
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk)
      w::wgmma_ss<0, 0>(s, w::kmajor_desc(sK1, kk), w::kmajor_desc(sQ, kk), kk > 0);
    w::commit();
    w::wait<0>();
    w::fence_regs(dp);
    w::fence_regs(s);

    // causal / ragged mask: query column t < key row u, or t >= S
    const bool masked = q0 < krow0 + 15 || q0 + C::BM > S;
    uint8_t* ds_rows = smem + C::OFF_DS;  // fused dQ: dS_j^T at map j's Tile<64> [BN][BM]
    const int r = wg * 64 + wl * 16 + g;  // this warp's first key row within the CTA
    // dV += P^T dO (dO MN-major, 2dh wide; STD: dV's half j += P_j^T dO_j), dK_j += dS_j^T Q_j
    // (Q_j MN-major)
    auto grads = [&](const uint32_t (&fp)[NQ][2], const uint32_t (&fd)[NQ][2],
                     float (&dk)[KT][4], uint32_t sQj, auto& dvt, uint32_t sDOt) {
#pragma unroll
      for (int kk = 0; kk < C::BM / 16; ++kk) {
        const uint32_t a[4] = {fp[2 * kk][0], fp[2 * kk][1], fp[2 * kk + 1][0], fp[2 * kk + 1][1]};
        w::wgmma_rs<1>(dvt, a, w::mnmajor_desc(sDOt, C::BM * 128, kk), 1);
      }
#pragma unroll
      for (int kk = 0; kk < C::BM / 16; ++kk) {
        const uint32_t a[4] = {fd[2 * kk][0], fd[2 * kk][1], fd[2 * kk + 1][0], fd[2 * kk + 1][1]};
        w::wgmma_rs<1>(dk, a, w::mnmajor_desc(sQj, C::BM * 128, kk), 1);
      }
    };

    uint32_t fp[NQ][2], fd[NQ][2];
    probs_ds<NQ, C::BM>(s, dp, stat, 0, 1.f, p.scale_log2, masked, q0, krow0, S, lane, nullptr,
                        fp, fd);
    if (FUSE_DQ) store_rows(ds_rows, r, fd, lane);
    // dV's halves (STD: one per head)
    float (&dv1)[VT / 2][4] = *reinterpret_cast<float (*)[VT / 2][4]>(&dv[0]);
    float (&dv2)[VT / 2][4] = *reinterpret_cast<float (*)[VT / 2][4]>(&dv[VT / 2]);
    w::fence_regs(dv);
    w::fence_regs(dk1);
    w::fence();
    if constexpr (STD)
      grads(fp, fd, dk1, sQ, dv1, sDO);
    else
      grads(fp, fd, dk1, sQ, dv, sDO);
    w::commit();
    // S_2^T = K_2 Q_2^T (STD: and dP_2^T = V_2 dO_2^T) while map 1's products run
    if constexpr (STD) {
#pragma unroll
      for (int kk = 0; kk < DH / 16; ++kk)
        w::wgmma_ss<0, 0>(dp, w::kmajor_desc(sV + (KV1 ? 0 : C::BN * 128), kk),
                          w::kmajor_desc(sDO + C::BM * 128, kk), kk > 0);
    }
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk)
      w::wgmma_ss<0, 0>(s, w::kmajor_desc(sK2, kk), w::kmajor_desc(sQ + C::BM * 128, kk), kk > 0);
    w::commit();
    w::wait<0>();
    w::fence_regs(s);
    w::fence_regs(dp);
    w::fence_regs(dv);
    w::fence_regs(dk1);

    probs_ds<NQ, C::BM>(s, dp, stat, 1, STD ? 1.f : -lam, p.scale_log2, masked, q0, krow0, S,
                        lane, STD ? nullptr : &dlam, fp, fd);
    if (FUSE_DQ) store_rows(ds_rows + C::TILE_DS, r, fd, lane);
    w::fence_regs(dk2);
    w::fence();
    if constexpr (STD)
      grads(fp, fd, dk2, sQ + C::BM * 128, dv2, sDO + C::BM * 128);
    else
      grads(fp, fd, dk2, sQ + C::BM * 128, dv, sDO);
    w::commit();
    w::wait<0>();
    w::fence_regs(dv);
    w::fence_regs(dk2);

    if constexpr (FUSE_DQ) {
      // dQ_j = dS_j K_j over the CTA's 128 keys (warpgroup j takes map j), both operands
      // MN-major (keys as rows)
      w::fence_proxy_async();
      __syncthreads();  // both warpgroups' dS rows are in shared memory
      const int hd = wk.head(p, it);
      float dq[KT][4];
      const uint32_t sDS = sb + C::OFF_DS + wg * C::TILE_DS;
      const uint32_t sKj = sb + C::OFF_K + (KV1 ? 0 : wg * C::BN * 128);
      w::fence();
#pragma unroll
      for (int kk = 0; kk < C::BN / 16; ++kk)
        w::wgmma_ss<1, 1>(dq, w::mnmajor_desc(sDS, C::BN * 128, kk),
                          w::mnmajor_desc(sKj, C::BN * 128, kk), kk > 0);
      w::commit();
      w::wait<0>();
      w::fence_regs(dq);
      atomic_add_rows(p.dq_acc + (int64_t(wk.b) * S * p.h + hd) * C::ROW + wg * DH,
                      int64_t(p.h) * C::ROW, q0 + wl * 16, S, dq, lane);
    }
  }

  if (!STD)
    store_dlambda_partial<C::THREADS>(dlam, reinterpret_cast<float*>(smem + C::OFF_RED), p.dlam_part);

  if constexpr (KV1) {  // dK = scale (dS_1^T Q_1 + dS_2^T Q_2), dV = dV_1 + dV_2: one K/V head
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = krow0 + g + 8 * hh;
      if (row >= S) continue;
      bf16* krow = p.dk + wk.kvoff + int64_t(row) * wk.kv_rs + 2 * t4;
      bf16* vrow = p.dv + wk.kvoff + int64_t(row) * wk.kv_rs + 2 * t4;
#pragma unroll
      for (int n = 0; n < KT; ++n) {
        *reinterpret_cast<uint32_t*>(krow + n * 8) =
            pack_bf16((dk1[n][2 * hh] + dk2[n][2 * hh]) * p.scale,
                      (dk1[n][2 * hh + 1] + dk2[n][2 * hh + 1]) * p.scale);
        *reinterpret_cast<uint32_t*>(vrow + n * 8) =
            pack_bf16(dv[n][2 * hh] + dv[VT / 2 + n][2 * hh],
                      dv[n][2 * hh + 1] + dv[VT / 2 + n][2 * hh + 1]);
      }
    }
  } else {
    // dK_j = scale dS_j^T Q_j, dV: straight from the accumulators
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = krow0 + g + 8 * hh;
      if (row >= S) continue;
      bf16* krow = p.dk + wk.kvoff + int64_t(row) * wk.kv_rs + 2 * t4;
      bf16* vrow = p.dv + wk.kvoff + int64_t(row) * wk.kv_rs + 2 * t4;
#pragma unroll
      for (int n = 0; n < KT; ++n) {
        *reinterpret_cast<uint32_t*>(krow + n * 8) =
            pack_bf16(dk1[n][2 * hh] * p.scale, dk1[n][2 * hh + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(krow + DH + n * 8) =
            pack_bf16(dk2[n][2 * hh] * p.scale, dk2[n][2 * hh + 1] * p.scale);
      }
#pragma unroll
      for (int n = 0; n < VT; ++n)
        *reinterpret_cast<uint32_t*>(vrow + n * 8) = pack_bf16(dv[n][2 * hh], dv[n][2 * hh + 1]);
    }
  }
#endif
}


// ---- dh 128 -------------------------------------------------------------------------------
// dK_j (64 keys x dh) and the 2dh-wide dV (64 keys x 256) of both maps do not fit one
// warpgroup's registers, so a CTA owns 64 keys and its warpgroup j owns map j: S_j^T, P_j^T,
// dS_j^T, dK_j, and dV's column half j. Both warpgroups compute the full dP^T = V dO^T (the
// dh 256 contraction, duplicated: cheaper than exchanging f32 partial sums) and hand each
// other their scaled probabilities (P_1^T, -lambda P_2^T, bf16) through shared memory, so that
//   dV[:, half j] += P_j^T dO[:, half j] (A from registers) + P_other^T dO[:, half j] (A from
//   shared memory).
// 24 dh FLOP per (query, key) pair (28 with the fused dQ_j = dS_j K_j).
// STD (standard attention, heads 2i, 2i + 1 as the maps): warpgroup j computes its head's own
// dP_j^T = V_j dO_j^T (dh contraction), dV[:, half j] += P_j^T dO_j only: no P exchange, 16 dh
// FLOP per pair (20 fused). KV1 (with STD): both heads read one dh-wide K/V head; the two
// warpgroups' dK and dV meet once at the end through shared memory (fixed order: 1 + 2).
struct WgDkv128Cfg {
  static constexpr int DH = 128, ROW = 2 * DH;  // bf16 per row: 4 Tile<64> column groups
  static constexpr int THREADS = 256;           // warpgroup j: map j
  static constexpr int BN = 64, BM = 64;        // keys per CTA, queries per tile
  static constexpr int TILE_KV = BN * ROW * 2;  // 32 KB; column groups BN * 128 apart
  static constexpr int TILE_Q = BM * ROW * 2;   // 32 KB; column groups BM * 128 apart
  static constexpr int STAT = 4 * BM * 4;
  static constexpr int TILE_P = BN * BM * 2;    // one map's P^T (or dS^T), rows = keys
  static constexpr int OFF_K = 0, OFF_V = TILE_KV, OFF_Q = 2 * TILE_KV;
  static constexpr int OFF_DO = OFF_Q + 2 * TILE_Q, OFF_ST = OFF_DO + 2 * TILE_Q;
  static constexpr int OFF_PX = OFF_ST + 2 * STAT, OFF_DS = OFF_PX + 2 * TILE_P;
  static constexpr int OFF_RED = OFF_DS + 2 * TILE_P;
  static constexpr int SMEM = OFF_RED + 8 * 4;  // no alignment slack: the base must be 1024-aligned
};

template <bool FUSE_DQ, bool STD = false, bool KV1 = false>
__global__ void __launch_bounds__(WgDkv128Cfg::THREADS, 1)
    diff_flash_dkdv128_wgmma_kernel(const BwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  namespace w = wgmma;
  using C = WgDkv128Cfg;
  constexpr int DH = C::DH;
  constexpr int NQ = C::BM / 8;  // score n-tiles (queries)
  constexpr int HT = DH / 8;     // n-tiles of dK_j, of dV's half, of dQ_j
  static_assert(STD || !KV1, "one K/V head per pair is standard attention only");
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t sb = smem_addr(smem);
  if ((sb & 1023) != 0) __trap();  // wgmma's 128-byte swizzle is anchored to 1024 bytes

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int map = warp >> 2, wl = warp & 3;
  const int g = lane >> 2, t4 = lane & 3;
  const DkvWalk<C, KV1 ? DH : C::ROW> wk(p);
  const int S = p.S, n_it = wk.n_it;
  wk.load_kv(sb, p, tid);
  wk.load_q(sb, p, 0, 0, tid);
  cp_async_commit();

  const float lam = STD ? 0.f : *p.lambda;
  const float pscale = STD || !map ? 1.f : -lam;
  const int krow0 = wk.k0 + wl * 16;
  // K_j: groups 2j, 2j + 1 (KV1: groups 0, 1 for both maps); STD: V_j likewise
  const uint32_t sKj = sb + C::OFF_K + (KV1 ? 0 : 2 * map * C::BN * 128);
  const uint32_t sV = sb + C::OFF_V;
  const uint32_t sVj = sV + (STD && !KV1 ? 2 * map * C::BN * 128 : 0);
  float dk[HT][4], dv[HT][4];  // dK_j; dV[:, map half]
#pragma unroll
  for (int n = 0; n < HT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
  float dlam = 0.f;

  for (int it = 0; it < n_it; ++it) {
    const int st = it & 1;
    const int q0 = wk.q0(it);
    cp_async_wait<0>();
    w::fence_proxy_async();
    __syncthreads();  // tile it landed; the other buffer and the P / dS slots are free
    if (it + 1 < n_it) wk.load_q(sb, p, it + 1, st ^ 1, tid);
    cp_async_commit();
    const uint32_t sQ = sb + C::OFF_Q + st * C::TILE_Q, sDO = sb + C::OFF_DO + st * C::TILE_Q;
    const float* stat = reinterpret_cast<const float*>(smem + C::OFF_ST + st * C::STAT);

    // dP^T = V dO^T (contraction 2dh = 4 groups; STD: V_j dO_j^T, 2 groups), S_j^T = K_j Q_j^T
    // (2 groups)
    float dp[NQ][4], sc[NQ][4];
    w::fence();
    if constexpr (STD) {
#pragma unroll
      for (int kk = 0; kk < DH / 16; ++kk)
        w::wgmma_ss<0, 0>(dp, w::kmajor_desc(sVj + (kk >> 2) * C::BN * 128, kk & 3),
                          w::kmajor_desc(sDO + (2 * map + (kk >> 2)) * C::BM * 128, kk & 3),
                          kk > 0);
    } else {
#pragma unroll
      for (int kk = 0; kk < C::ROW / 16; ++kk)
        w::wgmma_ss<0, 0>(dp, w::kmajor_desc(sV + (kk >> 2) * C::BN * 128, kk & 3),
                          w::kmajor_desc(sDO + (kk >> 2) * C::BM * 128, kk & 3), kk > 0);
    }
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk)
      w::wgmma_ss<0, 0>(sc, w::kmajor_desc(sKj + (kk >> 2) * C::BN * 128, kk & 3),
                        w::kmajor_desc(sQ + (2 * map + (kk >> 2)) * C::BM * 128, kk & 3),
                        kk > 0);
    w::commit();
    w::wait<0>();
    w::fence_regs(dp);
    w::fence_regs(sc);

    // P_j^T (scaled by 1 or -lambda), dS_j^T; both also to shared memory (P for the partner's
    // dV half, dS for the fused dQ)
    const bool masked = q0 < krow0 + 15 || q0 + C::BM > S;
    uint32_t fp[NQ][2], fd[NQ][2];
    probs_ds<NQ, C::BM>(sc, dp, stat, map, pscale, p.scale_log2, masked, q0, krow0, S, lane,
                        !STD && map ? &dlam : nullptr, fp, fd);
    if (!STD) store_rows(smem + C::OFF_PX + map * C::TILE_P, wl * 16 + g, fp, lane);
    if (FUSE_DQ) store_rows(smem + C::OFF_DS + map * C::TILE_P, wl * 16 + g, fd, lane);
    if (!STD || FUSE_DQ) {
      w::fence_proxy_async();
      __syncthreads();  // both maps' P^T (and dS^T) are in shared memory
    }

    // dV[:, half j] += P_j^T dO_j + P_other^T dO_j; dK_j += dS_j^T Q_j
    const uint32_t sDOj = sDO + 2 * map * C::BM * 128, sQj = sQ + 2 * map * C::BM * 128;
    const uint32_t sPo = sb + C::OFF_PX + (map ^ 1) * C::TILE_P;
    w::fence_regs(dv);
    w::fence_regs(dk);
    w::fence();
#pragma unroll
    for (int kk = 0; kk < C::BM / 16; ++kk) {
      const uint32_t a[4] = {fp[2 * kk][0], fp[2 * kk][1], fp[2 * kk + 1][0], fp[2 * kk + 1][1]};
      w::wgmma_rs<1>(dv, a, w::mnmajor_desc(sDOj, C::BM * 128, kk), 1);
    }
    if constexpr (!STD) {
#pragma unroll
      for (int kk = 0; kk < C::BM / 16; ++kk)
        w::wgmma_ss<0, 1>(dv, w::kmajor_desc(sPo, kk), w::mnmajor_desc(sDOj, C::BM * 128, kk), 1);
    }
#pragma unroll
    for (int kk = 0; kk < C::BM / 16; ++kk) {
      const uint32_t a[4] = {fd[2 * kk][0], fd[2 * kk][1], fd[2 * kk + 1][0], fd[2 * kk + 1][1]};
      w::wgmma_rs<1>(dk, a, w::mnmajor_desc(sQj, C::BM * 128, kk), 1);
    }
    w::commit();
    w::wait<0>();
    w::fence_regs(dv);
    w::fence_regs(dk);

    if constexpr (FUSE_DQ) {  // dQ_j = dS_j K_j over the CTA's 64 keys (own map's dS only)
      float dq[HT][4];
      w::fence();
#pragma unroll
      for (int kk = 0; kk < C::BN / 16; ++kk)
        w::wgmma_ss<1, 1>(dq, w::mnmajor_desc(sb + C::OFF_DS + map * C::TILE_P, C::BN * 128, kk),
                          w::mnmajor_desc(sKj, C::BN * 128, kk), kk > 0);
      w::commit();
      w::wait<0>();
      w::fence_regs(dq);
      const int hd = wk.head(p, it);
      atomic_add_rows(p.dq_acc + (int64_t(wk.b) * S * p.h + hd) * C::ROW + map * DH,
                      int64_t(p.h) * C::ROW, q0 + wl * 16, S, dq, lane);
    }
  }

  if (!STD)
    store_dlambda_partial<C::THREADS>(dlam, reinterpret_cast<float*>(smem + C::OFF_RED), p.dlam_part);

  if constexpr (KV1) {
    // one K/V head: warpgroup 2 hands its dK, dV (f32, accumulator layout: the same (row,
    // column) in the same lane) to warpgroup 1 through the idle Q/dO buffers; dK = dK_1 + dK_2
    static_assert(4 * 2 * HT * 32 * 16 <= 4 * C::TILE_Q, "the hand-over must fit the Q/dO buffers");
    float4* x = reinterpret_cast<float4*>(smem + C::OFF_Q) + wl * 2 * HT * 32 + lane;
    __syncthreads();  // every warpgroup is done with Q and dO
    if (map == 1) {
#pragma unroll
      for (int n = 0; n < HT; ++n) {
        x[n * 32] = make_float4(dk[n][0], dk[n][1], dk[n][2], dk[n][3]);
        x[(HT + n) * 32] = make_float4(dv[n][0], dv[n][1], dv[n][2], dv[n][3]);
      }
    }
    __syncthreads();
    if (map == 0) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = krow0 + g + 8 * hh;
        if (row >= S) continue;
        bf16* krow = p.dk + wk.kvoff + int64_t(row) * wk.kv_rs + 2 * t4;
        bf16* vrow = p.dv + wk.kvoff + int64_t(row) * wk.kv_rs + 2 * t4;
#pragma unroll
        for (int n = 0; n < HT; ++n) {
          const float4 ok = x[n * 32], ov = x[(HT + n) * 32];
          *reinterpret_cast<uint32_t*>(krow + n * 8) =
              pack_bf16((dk[n][2 * hh] + (hh ? ok.z : ok.x)) * p.scale,
                        (dk[n][2 * hh + 1] + (hh ? ok.w : ok.y)) * p.scale);
          *reinterpret_cast<uint32_t*>(vrow + n * 8) =
              pack_bf16(dv[n][2 * hh] + (hh ? ov.z : ov.x), dv[n][2 * hh + 1] + (hh ? ov.w : ov.y));
        }
      }
    }
  } else {  // dK_j, dV[:, half j] of this warpgroup's head
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = krow0 + g + 8 * hh;
      if (row >= S) continue;
      bf16* krow = p.dk + wk.kvoff + int64_t(row) * wk.kv_rs + map * DH + 2 * t4;
      bf16* vrow = p.dv + wk.kvoff + int64_t(row) * wk.kv_rs + map * DH + 2 * t4;
#pragma unroll
      for (int n = 0; n < HT; ++n) {
        *reinterpret_cast<uint32_t*>(krow + n * 8) =
            pack_bf16(dk[n][2 * hh] * p.scale, dk[n][2 * hh + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(vrow + n * 8) = pack_bf16(dv[n][2 * hh], dv[n][2 * hh + 1]);
      }
    }
  }
#endif
}

// D1 = dO . O + lambda D2', D2' = dO . O2n for every row (b, t, head): one warp per row.
// STD (two standard heads per row): D_j = dO_j . O_j over each dh half (half-warps).
template <int DH, bool STD = false>
__global__ void diff_flash_bwd_prep_kernel(const BwdParams p, int64_t rows) {
  constexpr int PER = 2 * DH / 32;  // bf16 per lane
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t off = r * 2 * DH + lane * PER;
  float d0 = 0.f, d2 = 0.f;
#pragma unroll
  for (int i = 0; i < PER; i += 2) {
    const float2 go = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p.dout + off + i));
    const float2 o = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p.out + off + i));
    d0 = fmaf(go.x, o.x, fmaf(go.y, o.y, d0));
    if (!STD) {
      const float2 o2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p.o2 + off + i));
      d2 = fmaf(go.x, o2.x, fmaf(go.y, o2.y, d2));
    }
  }
#pragma unroll
  for (int o = STD ? 8 : 16; o > 0; o >>= 1) {  // STD: within each half-warp (one head each)
    d0 += __shfl_xor_sync(0xffffffffu, d0, o);
    if (!STD) d2 += __shfl_xor_sync(0xffffffffu, d2, o);
  }
  const int64_t bt = r / p.h, hd = r % p.h, b = bt / p.S, t = bt % p.S;
  float* D = p.D + (b * p.h + hd) * 2 * p.S + t;
  if (STD) {
    if ((lane & 15) == 0) D[(lane >> 4) * p.S] = d0;
  } else if (lane == 0) {
    D[0] = fmaf(*p.lambda, d2, d0);
    D[p.S] = d2;
  }
}

// dq = bf16(scale * dq_acc)
__global__ void diff_flash_dq_convert_kernel(const float4* acc, float scale, __nv_bfloat162* dq,
                                             int64_t n4) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 a = acc[i];
    dq[2 * i] = __floats2bfloat162_rn(a.x * scale, a.y * scale);
    dq[2 * i + 1] = __floats2bfloat162_rn(a.z * scale, a.w * scale);
  }
}

}  // namespace flash

int diff_flash_dkdv_wgmma_ctas(const DiffFlashDims& d) {
  const int bn = d.dh == 64 ? flash::WgDkvCfg::BN : flash::WgDkv128Cfg::BN;
  return int(d.B * d.h_kv * ((d.S + bn - 1) / bn));
}

namespace {
template <typename C, typename K>
void launch_dkdv(const DiffFlashDims& d, K kernel, const flash::BwdParams& p,
                 cudaStream_t stream) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess)
    throw_error("diff_flash: cannot give the wgmma dK/dV kernel ", C::SMEM,
                " bytes of shared memory: ", cudaGetErrorString(e));
  const dim3 grid = flash::tile_grid(int((d.S + C::BN - 1) / C::BN), int(d.B * d.h_kv));
  kernel<<<grid, C::THREADS, C::SMEM, stream>>>(p);
  flash::check_launch("wgmma backward dK/dV");
}
}  // namespace

void diff_flash_dkdv_wgmma(const DiffFlashDims& d, const flash::BwdParams& p,
                           cudaStream_t stream) {
  if (d.dh == 64)
    launch_dkdv<flash::WgDkvCfg>(d, p.dq_acc ? flash::diff_flash_dkdv_wgmma_kernel<true>
                                             : flash::diff_flash_dkdv_wgmma_kernel<false>,
                                 p, stream);
  else
    launch_dkdv<flash::WgDkv128Cfg>(d, p.dq_acc ? flash::diff_flash_dkdv128_wgmma_kernel<true>
                                                : flash::diff_flash_dkdv128_wgmma_kernel<false>,
                                    p, stream);
}

void diff_flash_bwd_fused_dq(const DiffFlashDims& d, const flash::BwdParams& p,
                             cudaStream_t stream) {
  const int64_t rows = d.B * d.S * d.h, n = rows * 2 * d.dh;
  const unsigned blocks = unsigned((rows + 7) / 8);
  if (d.dh == 64)
    flash::diff_flash_bwd_prep_kernel<64><<<blocks, 256, 0, stream>>>(p, rows);
  else
    flash::diff_flash_bwd_prep_kernel<128><<<blocks, 256, 0, stream>>>(p, rows);
  flash::check_launch("backward D");
  cudaError_t e = cudaMemsetAsync(p.dq_acc, 0, size_t(n) * 4, stream);
  if (e != cudaSuccess) throw_error("diff_flash: clearing the dQ accumulator: ", cudaGetErrorString(e));
  diff_flash_dkdv_wgmma(d, p, stream);
  flash::diff_flash_dq_convert_kernel<<<1024, 256, 0, stream>>>(
      reinterpret_cast<const float4*>(p.dq_acc), p.scale,
      reinterpret_cast<__nv_bfloat162*>(p.dq), n / 4);
  flash::check_launch("backward dQ convert");
}

size_t std_flash_backward_workspace_bytes(const DiffFlashDims& d, const FlashOptions& opts) {
  auto up = [](size_t x) { return (x + 255) / 256 * 256; };
  const size_t acc = opts.deterministic ? 0 : up(size_t(d.B * d.S * d.h * d.dh) * 4);  // dq_acc
  return up(size_t(d.B * d.h * d.S) * 4) + acc;  // D
}

void std_flash_backward(const DiffFlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const __nv_bfloat16* out, const float* lse,
                        const __nv_bfloat16* dout, __nv_bfloat16* dq, __nv_bfloat16* dk,
                        __nv_bfloat16* dv, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream, const FlashOptions& opts) {
  std::string why;
  if (!std_flash_supported(d, true, opts, &why)) throw_error("std_flash_backward: unsupported: ", why);
  const size_t need = std_flash_backward_workspace_bytes(d, opts);
  if (workspace == nullptr || workspace_bytes < need)
    throw_error("std_flash_backward: workspace of ", workspace_bytes, " bytes, need ", need);
  for (const void* ptr : {static_cast<const void*>(q), static_cast<const void*>(k),
                          static_cast<const void*>(v), static_cast<const void*>(out),
                          static_cast<const void*>(dout), static_cast<const void*>(dq),
                          static_cast<const void*>(dk), static_cast<const void*>(dv),
                          static_cast<const void*>(workspace)})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
      throw_error("std_flash_backward: a tensor is not 16-byte aligned");
  const DiffFlashDims d2 = std_flash_pair_dims(d);
  float* D = static_cast<float*>(workspace);
  flash::BwdParams p{};  // no lambda, o2, dlambda: standard attention
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.dout = dout;
  p.lse = lse;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.D = D;
  p.S = int(d.S);
  p.h = int(d2.h);
  p.h_kv = int(d2.h_kv);
  p.group = int(d2.h / d2.h_kv);
  p.scale = float(1.0 / std::sqrt(double(d.dh)));
  p.scale_log2 = float(flash::kLog2e / std::sqrt(double(d.dh)));
  // deterministic: no dQ accumulator (the mma.sync dQ kernel sums in a fixed order)
  if (!opts.deterministic)
    p.dq_acc = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                        (size_t(d.B * d.h * d.S) * 4 + 255) / 256 * 256);
  std_flash_backward_wgmma(d2, p, /*kv1=*/d.h_kv != d.h, stream);
}

void std_flash_backward_wgmma(const DiffFlashDims& d2, const flash::BwdParams& p, bool kv1,
                              cudaStream_t stream) {
  using flash::diff_flash_dkdv128_wgmma_kernel;
  using flash::diff_flash_dkdv_wgmma_kernel;
  if (!p.dq_acc) {  // deterministic: dQ and D (mma.sync, fixed order), then dK/dV without dQ
    std_flash_dq_mma(d2, p, kv1, stream);
    if (d2.dh == 64)
      launch_dkdv<flash::WgDkvCfg>(d2, kv1 ? diff_flash_dkdv_wgmma_kernel<false, true, true>
                                            : diff_flash_dkdv_wgmma_kernel<false, true, false>,
                                   p, stream);
    else
      launch_dkdv<flash::WgDkv128Cfg>(d2, kv1 ? diff_flash_dkdv128_wgmma_kernel<false, true, true>
                                               : diff_flash_dkdv128_wgmma_kernel<false, true, false>,
                                      p, stream);
    return;
  }
  const int64_t rows = d2.B * d2.S * d2.h, n = rows * 2 * d2.dh;
  const unsigned blocks = unsigned((rows + 7) / 8);
  if (d2.dh == 64)
    flash::diff_flash_bwd_prep_kernel<64, true><<<blocks, 256, 0, stream>>>(p, rows);
  else
    flash::diff_flash_bwd_prep_kernel<128, true><<<blocks, 256, 0, stream>>>(p, rows);
  flash::check_launch("standard backward D");
  cudaError_t e = cudaMemsetAsync(p.dq_acc, 0, size_t(n) * 4, stream);
  if (e != cudaSuccess) throw_error("std_flash: clearing the dQ accumulator: ", cudaGetErrorString(e));
  if (d2.dh == 64)
    launch_dkdv<flash::WgDkvCfg>(d2, kv1 ? diff_flash_dkdv_wgmma_kernel<true, true, true>
                                          : diff_flash_dkdv_wgmma_kernel<true, true, false>,
                                 p, stream);
  else
    launch_dkdv<flash::WgDkv128Cfg>(d2, kv1 ? diff_flash_dkdv128_wgmma_kernel<true, true, true>
                                             : diff_flash_dkdv128_wgmma_kernel<true, true, false>,
                                    p, stream);
  flash::diff_flash_dq_convert_kernel<<<1024, 256, 0, stream>>>(
      reinterpret_cast<const float4*>(p.dq_acc), p.scale,
      reinterpret_cast<__nv_bfloat162*>(p.dq), n / 4);
  flash::check_launch("standard backward dQ convert");
}

}  // namespace difftron::cuda
