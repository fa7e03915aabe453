// Fused differential flash-attention forward (issue 4): one pass over the K/V tiles computes
// both online softmaxes of a differential head, each V tile is read once from shared memory
// for both maps, and the epilogue writes O = O1/l1 - lambda O2/l2 (bf16) and both lse (f32).
// Design and math: diff_flash.cuh. Also the host API's argument checks (diff_flash.h).
#include <cmath>
#include <string>

#include "base/error.h"
#include "kernels/cuda/diff_flash.cuh"
#include "kernels/cuda/diff_flash_wgmma.h"

namespace difftron::cuda {
namespace flash {

void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_error("diff_flash: ", what, " launch failed: ", cudaGetErrorString(e));
}

// Writes O = Oa/la - lambda Ob/lb style epilogue values for one warp's 16 rows: o1/o2 hold map 1's
// and map 2's unnormalised outputs over OT n-tiles starting at column col0 of the 2dh row.
template <int OT>
__device__ __forceinline__ void store_out(bf16* out_row0, int64_t row_stride, int row0, int S,
                                          int col0, const float (&o1)[OT][4],
                                          const float (&o2)[OT][4], const float (&i1)[2],
                                          const float (&i2)[2], int lane) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + g + 8 * hh;
    if (row >= S) continue;
    bf16* orow = out_row0 + int64_t(row) * row_stride + col0 + 2 * t4;
#pragma unroll
    for (int n = 0; n < OT; ++n) {
      const float x0 = o1[n][2 * hh] * i1[hh] - o2[n][2 * hh] * i2[hh];
      const float x1 = o1[n][2 * hh + 1] * i1[hh] - o2[n][2 * hh + 1] * i2[hh];
      *reinterpret_cast<uint32_t*>(orow + n * 8) = pack_bf16(x0, x1);
    }
  }
}

// ---- map-split pairs (dh 128) --------------------------------------------------------------
// Grid: x = b * h + head (heads of one K/V group adjacent, for L2 reuse of K/V),
//       y = query tile, longest (last) tiles first.
// Warp (pair, map) computes S_map for the pair's 16 rows; both warps accumulate both maps'
// outputs over their half of the 2dh columns: oa for their own map (P from registers), ob for
// the partner's (P read from the partner's exchange slot).
template <int DH>
__global__ void __launch_bounds__(FwdCfg<DH>::THREADS, FwdCfg<DH>::MIN_BLOCKS)
    diff_flash_fwd_kernel(const FwdParams p) {
  using C = FwdCfg<DH>;
  constexpr int NT = C::BN / 8;   // score n-tiles per warp
  constexpr int OT = DH / 8;      // output n-tiles per warp and map (half of 2dh)
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sb = smem_addr(smem);
  uint4* xp = reinterpret_cast<uint4*>(smem + C::OFF_XP);
  float2* xa = reinterpret_cast<float2*>(smem + C::OFF_XA);
  float2* xl = reinterpret_cast<float2*>(smem + C::OFF_XL);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int pair = warp % C::WM, map = warp / C::WM, partner = map ? pair : pair + C::WM;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = grid_head() / p.h, hd = grid_head() % p.h, kvg = hd / p.group;
  const int q0 = (grid_tiles() - 1 - grid_tile()) * C::BM;
  const int S = p.S;
  const int64_t q_rs = int64_t(p.h) * 2 * DH, kv_rs = int64_t(p.h_kv) * 2 * DH;
  const bf16* qg = p.q + (int64_t(b) * S * p.h + hd) * 2 * DH;
  const bf16* kg = p.k + (int64_t(b) * S * p.h_kv + kvg) * 2 * DH;
  const bf16* vg = p.v + (int64_t(b) * S * p.h_kv + kvg) * 2 * DH;
  const int kv_end = min(q0 + C::BM, S);
  const int n_kt = (kv_end + C::BN - 1) / C::BN;

  load_tile<C::BM, C::ROW, C::THREADS>(sb + C::OFF_Q, qg, q_rs, q0, S, tid);
  load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_K, kg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_V, vg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  cp_async_commit();

  float oa[OT][4], ob[OT][4];
#pragma unroll
  for (int n = 0; n < OT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) oa[n][e] = ob[n][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t qf[C::Q_REGS ? DH / 16 : 1][4];
  const int row0 = q0 + pair * 16;  // first query row of this warp
  const int cq = map * (DH / 8);     // chunk column of this warp's map in Q and K
  const int cv = map * (DH / 8);     // chunk column of this warp's half of V / O
  const Ldsm<C::ROW> la(lane, kA), ln(lane, kN);
  const uint32_t sQ = sb + C::OFF_Q + (pair * 16 * C::ROW + cq * 8) * 2;  // this warp's Q block

  for (int it = 0; it < n_kt; ++it) {
    const int kt = n_kt - 1 - it, st = it & 1;
    cp_async_wait<0>();
    __syncthreads();
    if constexpr (C::Q_REGS) {
      if (it == 0) {
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) ldsm_x4(qf[kk], la.at(sQ, 0, 2 * kk));
      }
    }
    if (it + 1 < n_kt) {
      const int nst = st ^ 1;
      load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_K + nst * C::TILE_KV, kg, kv_rs,
                                           (kt - 1) * C::BN, S, tid);
      load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_V + nst * C::TILE_KV, vg, kv_rs,
                                           (kt - 1) * C::BN, S, tid);
    }
    cp_async_commit();
    // this stage's K (map columns) and V (this warp's column half)
    const uint32_t sK = sb + C::OFF_K + st * C::TILE_KV + cq * 16;
    const uint32_t sV = sb + C::OFF_V + st * C::TILE_KV + cv * 16;

    // S_map = Q_map K_map^T, 16 x BN per warp
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
      uint32_t af[4];
      if constexpr (C::Q_REGS) {
#pragma unroll
        for (int e = 0; e < 4; ++e) af[e] = qf[kk][e];
      } else {
        ldsm_x4(af, la.at(sQ, 0, 2 * kk));
      }
#pragma unroll
      for (int nn = 0; nn < C::BN / 16; ++nn) {
        uint32_t bf[4];
        ldsm_x4(bf, ln.at(sK, nn * 16, 2 * kk));
        mma16816(s[2 * nn], af, bf[0], bf[1]);
        mma16816(s[2 * nn + 1], af, bf[2], bf[3]);
      }
    }
    const int k0 = kt * C::BN;
    if (k0 + C::BN - 1 > row0) causal_mask(s, k0, row0, lane);
    float alpha[2];
    uint32_t pf[NT][2];
    softmax_step(s, p.scale_log2, m, l, alpha, pf);

    // exchange P and alpha with the partner warp (same rows, other map)
#pragma unroll
    for (int kk = 0; kk < C::XP_U4; ++kk)
      xp[(warp * C::XP_U4 + kk) * 32 + lane] =
          make_uint4(pf[2 * kk][0], pf[2 * kk][1], pf[2 * kk + 1][0], pf[2 * kk + 1][1]);
    xa[warp * 32 + lane] = make_float2(alpha[0], alpha[1]);
    pair_barrier(pair);
    const float2 ap = xa[partner * 32 + lane];
#pragma unroll
    for (int n = 0; n < OT; ++n) {
      oa[n][0] *= alpha[0]; oa[n][1] *= alpha[0]; oa[n][2] *= alpha[1]; oa[n][3] *= alpha[1];
      ob[n][0] *= ap.x; ob[n][1] *= ap.x; ob[n][2] *= ap.y; ob[n][3] *= ap.y;
    }

    // O_own[:, half] += P_own V[:, half], O_partner[:, half] += P_partner V[:, half]
#pragma unroll
    for (int kk = 0; kk < C::BN / 16; ++kk) {
      const uint4 up = xp[(partner * C::XP_U4 + kk) * 32 + lane];
      const uint32_t fa[4] = {pf[2 * kk][0], pf[2 * kk][1], pf[2 * kk + 1][0], pf[2 * kk + 1][1]};
      const uint32_t fb[4] = {up.x, up.y, up.z, up.w};
#pragma unroll
      for (int nn = 0; nn < DH / 16; ++nn) {
        uint32_t bf[4];
        ldsm_x4_t(bf, la.at(sV, kk * 16, 2 * nn));
        mma16816(oa[2 * nn], fa, bf[0], bf[1]);
        mma16816(oa[2 * nn + 1], fa, bf[2], bf[3]);
        mma16816(ob[2 * nn], fb, bf[0], bf[1]);
        mma16816(ob[2 * nn + 1], fb, bf[2], bf[3]);
      }
    }
  }

  // epilogue: full row sums, exchange l, write O and this warp's lse
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
  }
  xl[warp * 32 + lane] = make_float2(l[0], l[1]);
  pair_barrier(pair);
  const float2 lp = xl[partner * 32 + lane];
  const float lam = *p.lambda;
  // map 1 warp: O = oa/l - lambda ob/lp; map 2 warp: O = ob/lp - lambda oa/l
  const float ca = map ? -lam : 1.f, cb = map ? 1.f : -lam;
  const float ia[2] = {l[0] > 0.f ? ca / l[0] : 0.f, l[1] > 0.f ? ca / l[1] : 0.f};
  const float ib[2] = {lp.x > 0.f ? -cb / lp.x : 0.f, lp.y > 0.f ? -cb / lp.y : 0.f};
  store_out(p.out + (int64_t(b) * S * p.h + hd) * 2 * DH, q_rs, row0, S, map * DH, oa, ob, ia,
            ib, lane);
  if (p.o2) {  // O2n = map 2's normalised output over this warp's columns
    const float ja[2] = {map && l[0] > 0.f ? 1.f / l[0] : 0.f, map && l[1] > 0.f ? 1.f / l[1] : 0.f};
    const float jb[2] = {!map && lp.x > 0.f ? -1.f / lp.x : 0.f,
                         !map && lp.y > 0.f ? -1.f / lp.y : 0.f};
    store_out(p.o2 + (int64_t(b) * S * p.h + hd) * 2 * DH, q_rs, row0, S, map * DH, oa, ob, ja,
              jb, lane);
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + g + 8 * hh;
    if (t4 == 0 && row < S)
      p.lse[(int64_t(b * p.h + hd) * 2 + map) * S + row] = (m[hh] + __log2f(l[hh])) * kLn2;
  }
}

// ---- dual warps (dh 64) ---------------------------------------------------------------------
// Each warp owns 16 query rows: both maps' scores, both online softmaxes and all 2dh output
// columns; every V fragment loaded from shared memory feeds both maps' P V products.
template <int DH>
__global__ void __launch_bounds__(FwdDualCfg<DH>::THREADS, FwdDualCfg<DH>::MIN_BLOCKS)
    diff_flash_fwd_dual_kernel(const FwdParams p) {
  using C = FwdDualCfg<DH>;
  constexpr int NT = C::BN / 8;   // score n-tiles per map
  constexpr int OT = 2 * DH / 8;  // output n-tiles per map
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sb = smem_addr(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = grid_head() / p.h, hd = grid_head() % p.h, kvg = hd / p.group;
  const int q0 = (grid_tiles() - 1 - grid_tile()) * C::BM;
  const int S = p.S;
  const int64_t q_rs = int64_t(p.h) * 2 * DH, kv_rs = int64_t(p.h_kv) * 2 * DH;
  const bf16* qg = p.q + (int64_t(b) * S * p.h + hd) * 2 * DH;
  const bf16* kg = p.k + (int64_t(b) * S * p.h_kv + kvg) * 2 * DH;
  const bf16* vg = p.v + (int64_t(b) * S * p.h_kv + kvg) * 2 * DH;
  const int kv_end = min(q0 + C::BM, S);
  const int n_kt = (kv_end + C::BN - 1) / C::BN;

  load_tile<C::BM, C::ROW, C::THREADS>(sb + C::OFF_Q, qg, q_rs, q0, S, tid);
  load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_K, kg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_V, vg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  cp_async_commit();

  float o1[OT][4], o2[OT][4];
#pragma unroll
  for (int n = 0; n < OT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o1[n][e] = o2[n][e] = 0.f;
  float m1[2] = {-INFINITY, -INFINITY}, l1[2] = {0.f, 0.f};
  float m2[2] = {-INFINITY, -INFINITY}, l2[2] = {0.f, 0.f};
  const int row0 = q0 + warp * 16;
  const Ldsm<C::ROW> la(lane, kA), ln(lane, kN);
  const uint32_t sQ = sb + C::OFF_Q + warp * 16 * C::ROW * 2;

  for (int it = 0; it < n_kt; ++it) {
    const int kt = n_kt - 1 - it, st = it & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < n_kt) {
      const int nst = st ^ 1;
      load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_K + nst * C::TILE_KV, kg, kv_rs,
                                           (kt - 1) * C::BN, S, tid);
      load_tile<C::BN, C::ROW, C::THREADS>(sb + C::OFF_V + nst * C::TILE_KV, vg, kv_rs,
                                           (kt - 1) * C::BN, S, tid);
    }
    cp_async_commit();
    const uint32_t sK = sb + C::OFF_K + st * C::TILE_KV, sV = sb + C::OFF_V + st * C::TILE_KV;

    float s1[NT][4], s2[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s1[n][e] = s2[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
      uint32_t a1[4], a2[4];
      ldsm_x4(a1, la.at(sQ, 0, 2 * kk));
      ldsm_x4(a2, la.at(sQ, 0, DH / 8 + 2 * kk));
#pragma unroll
      for (int nn = 0; nn < C::BN / 16; ++nn) {
        uint32_t b1[4], b2[4];
        ldsm_x4(b1, ln.at(sK, nn * 16, 2 * kk));
        ldsm_x4(b2, ln.at(sK, nn * 16, DH / 8 + 2 * kk));
        mma16816(s1[2 * nn], a1, b1[0], b1[1]);
        mma16816(s1[2 * nn + 1], a1, b1[2], b1[3]);
        mma16816(s2[2 * nn], a2, b2[0], b2[1]);
        mma16816(s2[2 * nn + 1], a2, b2[2], b2[3]);
      }
    }
    const int k0 = kt * C::BN;
    if (k0 + C::BN - 1 > row0) {
      causal_mask(s1, k0, row0, lane);
      causal_mask(s2, k0, row0, lane);
    }
    float al1[2], al2[2];
    uint32_t p1[NT][2], p2[NT][2];
    softmax_step(s1, p.scale_log2, m1, l1, al1, p1);
    softmax_step(s2, p.scale_log2, m2, l2, al2, p2);
#pragma unroll
    for (int n = 0; n < OT; ++n) {
      o1[n][0] *= al1[0]; o1[n][1] *= al1[0]; o1[n][2] *= al1[1]; o1[n][3] *= al1[1];
      o2[n][0] *= al2[0]; o2[n][1] *= al2[0]; o2[n][2] *= al2[1]; o2[n][3] *= al2[1];
    }
#pragma unroll
    for (int kk = 0; kk < C::BN / 16; ++kk) {
      const uint32_t f1[4] = {p1[2 * kk][0], p1[2 * kk][1], p1[2 * kk + 1][0], p1[2 * kk + 1][1]};
      const uint32_t f2[4] = {p2[2 * kk][0], p2[2 * kk][1], p2[2 * kk + 1][0], p2[2 * kk + 1][1]};
#pragma unroll
      for (int nn = 0; nn < 2 * DH / 16; ++nn) {
        uint32_t bf[4];
        ldsm_x4_t(bf, la.at(sV, kk * 16, 2 * nn));
        mma16816(o1[2 * nn], f1, bf[0], bf[1]);
        mma16816(o1[2 * nn + 1], f1, bf[2], bf[3]);
        mma16816(o2[2 * nn], f2, bf[0], bf[1]);
        mma16816(o2[2 * nn + 1], f2, bf[2], bf[3]);
      }
    }
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l1[hh] += __shfl_xor_sync(0xffffffffu, l1[hh], 1);
    l1[hh] += __shfl_xor_sync(0xffffffffu, l1[hh], 2);
    l2[hh] += __shfl_xor_sync(0xffffffffu, l2[hh], 1);
    l2[hh] += __shfl_xor_sync(0xffffffffu, l2[hh], 2);
  }
  const float lam = *p.lambda;
  const float i1[2] = {l1[0] > 0.f ? 1.f / l1[0] : 0.f, l1[1] > 0.f ? 1.f / l1[1] : 0.f};
  const float i2[2] = {l2[0] > 0.f ? lam / l2[0] : 0.f, l2[1] > 0.f ? lam / l2[1] : 0.f};
  store_out(p.out + (int64_t(b) * S * p.h + hd) * 2 * DH, q_rs, row0, S, 0, o1, o2, i1, i2, lane);
  if (p.o2) {  // O2n = o2 / l2
    const float z[2] = {0.f, 0.f};
    const float j2[2] = {l2[0] > 0.f ? -1.f / l2[0] : 0.f, l2[1] > 0.f ? -1.f / l2[1] : 0.f};
    store_out(p.o2 + (int64_t(b) * S * p.h + hd) * 2 * DH, q_rs, row0, S, 0, o1, o2, z, j2, lane);
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + g + 8 * hh;
    if (t4 == 0 && row < S) {
      float* lrow = p.lse + int64_t(b * p.h + hd) * 2 * S + row;
      lrow[0] = (m1[hh] + __log2f(l1[hh])) * kLn2;
      lrow[S] = (m2[hh] + __log2f(l2[hh])) * kLn2;
    }
  }
}

}  // namespace flash

bool diff_flash_supported(const DiffFlashDims& d, std::string* why) {
  auto no = [&](const std::string& w) {
    if (why) *why = w;
    return false;
  };
  if (d.B <= 0 || d.S <= 0 || d.h <= 0 || d.h_kv <= 0) return no("all dims must be positive");
  if (d.dh != 64 && d.dh != 128)
    return no("head dim " + std::to_string(d.dh) + " (the fused kernels support 64 and 128)");
  if (d.h % d.h_kv != 0)
    return no("h (" + std::to_string(d.h) + ") must be a multiple of h_kv (" +
              std::to_string(d.h_kv) + ")");
  if (d.B * d.h > 2147483647LL || d.S > (1LL << 30)) return no("B*h or S too large");
  return true;
}

namespace {
template <typename T>
void check_aligned(const T* p, const char* name) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    throw_error("diff_flash: tensor ", name, " is not 16-byte aligned");
}

template <typename C, typename K>
void launch_fwd(const DiffFlashDims& d, K kernel, const flash::FwdParams& p,
                cudaStream_t stream) {
  cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess)
    throw_error("diff_flash: cannot give the forward kernel ", C::SMEM,
                " bytes of shared memory: ", cudaGetErrorString(e));
  const dim3 grid = flash::tile_grid(int((d.S + C::BM - 1) / C::BM), int(d.B * d.h));
  kernel<<<grid, C::THREADS, C::SMEM, stream>>>(p);
  flash::check_launch("forward");
}
}  // namespace

void diff_flash_forward(const DiffFlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const float* lambda, __nv_bfloat16* out,
                        float* lse, cudaStream_t stream, __nv_bfloat16* o2, const FlashOptions& opts) {
  std::string why;
  if (!diff_flash_supported(d, &why)) throw_error("diff_flash_forward: unsupported: ", why);
  check_aligned(q, "q");
  check_aligned(k, "k");
  check_aligned(v, "v");
  check_aligned(out, "out");
  check_aligned(o2, "o2");
  if (d.S > 65535LL * flash::FwdCfg<64>::BM) throw_error("diff_flash_forward: S too large");
  flash::FwdParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.lambda = lambda;
  p.out = out;
  p.lse = lse;
  p.o2 = o2;
  p.S = int(d.S);
  p.h = int(d.h);
  p.h_kv = int(d.h_kv);
  p.group = int(d.h / d.h_kv);
  p.scale_log2 = float(flash::kLog2e / std::sqrt(double(d.dh)));
  if (diff_flash_wgmma_enabled(opts)) {
    diff_flash_forward_wgmma(d, p, stream);
    return;
  }
  if (d.dh == 64) {
    launch_fwd<flash::FwdDualCfg<64>>(d, flash::diff_flash_fwd_dual_kernel<64>, p, stream);
  } else {
    launch_fwd<flash::FwdCfg<128>>(d, flash::diff_flash_fwd_kernel<128>, p, stream);
  }
}

}  // namespace difftron::cuda
