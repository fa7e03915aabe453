// Fused differential flash-attention forward on Hopper warpgroup MMAs (wgmma, sm_90a).
// Same contract as diff_flash_fwd.cu's kernels (diff_flash.h); diff_flash_forward picks this
// one on compute capability 9.x devices when the build includes sm_90a.
//
// Design: a CTA owns BM = 64 query rows of one differential head and has two warpgroups,
// one per softmax map. Warpgroup j computes S_j = Q_j K_j^T for the CTA's rows (wgmma, both
// operands from shared memory), runs its own online softmax, and accumulates
// O_j = P_j V over the whole 2dh-wide V (P_j from registers, V from shared memory). The maps'
// softmaxes are independent, so the warpgroups never exchange anything inside the loop; they
// share every K/V tile load, and meet once in the epilogue: warpgroup 2 hands O2/l2 over
// through shared memory, warpgroup 1 writes O = O1/l1 - lambda O2/l2 (and warpgroup 2 the
// optional O2n). K/V tiles are double-buffered with cp.async, diagonal tile first.
// At dh 128 each warpgroup runs a software pipeline (FlashAttention-3's intra-warpgroup overlap,
// PIPE below): the softmax of tile j+1 runs while the tensor cores compute P_j V. At dh 64 the
// serial loop stays (see DIFF_FLASH_WG_FWD_PIPE).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "base/error.h"
#include "kernels/cuda/diff_flash_wgmma.cuh"
#include "kernels/cuda/diff_flash_wgmma.h"

#ifndef DIFF_FLASH_WG_FWD_BN
#define DIFF_FLASH_WG_FWD_BN 64  // keys per K/V tile
#endif
#ifndef DIFF_FLASH_WG_FWD_PIPE
// Which variants run the software-pipelined loop (bits: 1 differential dh 64, 2 differential
// dh 128, 4 standard dh 64, 8 standard dh 128); the others keep the serial loop. Measured on
// the H200 (bench-attention, serial vs pipelined in the same call, two calls): the dh 128
// forwards 3-17% faster (differential B4 S4096 h8: 1.08 -> 0.92 ms, B1 S16384 h8: 3.86 ->
// 3.19-3.21; standard B8 S2048 H16: 0.52 -> 0.48-0.49); at dh 64 (two CTAs per SM, 128
// registers) the standard one 1-4% slower, the differential one (it only fits with 32-key
// tiles, DIFF_FLASH_WG_FWD_PIPE_BN64) 7-17% slower (B4 S4096 h16: 1.01 -> 1.14 ms).
#define DIFF_FLASH_WG_FWD_PIPE 10
#endif
#ifndef DIFF_FLASH_WG_FWD_PIPE_BN64
// keys per K/V tile of the pipelined differential dh-64 kernel (bit 1 above): with 64-key tiles
// its scores, the probabilities in flight and the 2dh-wide O need ~168 registers, and at the
// 128 of two CTAs per SM ptxas serializes the wgmmas; 32 fits (80 bytes of spills)
#define DIFF_FLASH_WG_FWD_PIPE_BN64 32
#endif
#ifndef DIFF_FLASH_WG64_MIN_BLOCKS
#define DIFF_FLASH_WG64_MIN_BLOCKS 2  // dh 64: CTAs per SM the registers are budgeted for
#endif

namespace difftron::cuda {
namespace flash {

template <int DH, int BN_ = DIFF_FLASH_WG_FWD_BN>
struct WgFwdCfg {
  static constexpr int THREADS = 256;          // two warpgroups: map 1, map 2
  static constexpr int BM = 64, BN = BN_;      // query rows per CTA, keys per tile
  static constexpr int ROW = 2 * DH;           // bf16 per global row: q (both maps), k, v
  static constexpr int TILE_Q = BM * ROW * 2;  // bytes; map j's groups: j * DH / 64 ...
  static constexpr int TILE_K = BN * ROW * 2, TILE_V = BN * ROW * 2;
  static constexpr int OFF_Q = 0, OFF_K = TILE_Q, OFF_V = OFF_K + 2 * TILE_K;
  static constexpr int SMEM = OFF_V + 2 * TILE_V + 1024;  // + 1024: base alignment slack
  static constexpr int MIN_BLOCKS = DH == 64 ? DIFF_FLASH_WG64_MIN_BLOCKS : 1;
  // the epilogue's O2/l2 hand-over (f32, BM x 2dh) reuses the K/V buffers
  static_assert(BM * ROW * 4 <= 2 * (TILE_K + TILE_V), "hand-over must fit in the K/V buffers");
};

// STD: standard attention (std_flash_forward): the two "maps" are two ordinary heads 2i, 2i+1
// with their own V (columns [j dh, (j + 1) dh) of the 2dh-wide row) and outputs; no lambda.
// KV1 (with STD, GQA with an even group): both heads read the same K/V head, whose rows are dh
// wide (p.h_kv K/V heads, p.group head pairs per K/V head); K and V are loaded once, dh wide.
// PIPE: the software-pipelined loop (below); BN: keys per K/V tile.
template <int DH, bool STD, bool KV1 = false, bool PIPE = false, int BN = DIFF_FLASH_WG_FWD_BN>
__global__ void __launch_bounds__(WgFwdCfg<DH, BN>::THREADS, WgFwdCfg<DH, BN>::MIN_BLOCKS)
    diff_flash_fwd_wgmma_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  namespace w = wgmma;
  using C = WgFwdCfg<DH, BN>;
  constexpr int NT = C::BN / 8;   // score n-tiles
  constexpr int OT = (STD ? DH : C::ROW) / 8;  // output n-tiles (2dh columns; STD: dh)
  static_assert(STD || !KV1, "one K/V head per pair is standard attention only");
  constexpr int KVROW = KV1 ? DH : C::ROW;     // bf16 per global K/V row
  extern __shared__ __align__(128) uint8_t smem_raw[];
  // wgmma's 128-byte swizzle is anchored to 1024-byte boundaries
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const uint32_t sb = smem_addr(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int map = warp >> 2, wl = warp & 3;  // warpgroup = map; warp within the warpgroup
  const int g = lane >> 2, t4 = lane & 3;
  const int b = grid_head() / p.h, hd = grid_head() % p.h, kvg = hd / p.group;
  const int q0 = (grid_tiles() - 1 - grid_tile()) * C::BM;
  const int S = p.S;
  const int64_t q_rs = int64_t(p.h) * C::ROW, kv_rs = int64_t(p.h_kv) * KVROW;
  const bf16* qg = p.q + (int64_t(b) * S * p.h + hd) * C::ROW;
  const bf16* kg = p.k + (int64_t(b) * S * p.h_kv + kvg) * KVROW;
  const bf16* vg = p.v + (int64_t(b) * S * p.h_kv + kvg) * KVROW;
  const int kv_end = min(q0 + C::BM, S);
  const int n_kt = (kv_end + C::BN - 1) / C::BN;

  load_groups<C::BM, C::ROW, C::THREADS>(sb + C::OFF_Q, qg, q_rs, q0, S, tid);
  load_groups<C::BN, KVROW, C::THREADS>(sb + C::OFF_K, kg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  if constexpr (PIPE) cp_async_commit();  // Q and K_0 first, V_0 (and K_1) in the next group
  load_groups<C::BN, KVROW, C::THREADS>(sb + C::OFF_V, vg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  if constexpr (!PIPE) cp_async_commit();

  float o[OT][4];
#pragma unroll
  for (int n = 0; n < OT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int row0 = q0 + wl * 16;  // this warp's first query row
  const uint32_t sQ = sb + C::OFF_Q + map * (DH / 64) * C::BM * 128;

  if constexpr (!PIPE) {
    for (int it = 0; it < n_kt; ++it) {
      const int kt = n_kt - 1 - it, st = it & 1;
      cp_async_wait<0>();
      w::fence_proxy_async();
      __syncthreads();  // tile kt landed; every warpgroup is done with the other buffer
      if (it + 1 < n_kt) {
        load_groups<C::BN, KVROW, C::THREADS>(sb + C::OFF_K + (st ^ 1) * C::TILE_K, kg, kv_rs,
                                              (kt - 1) * C::BN, S, tid);
        load_groups<C::BN, KVROW, C::THREADS>(sb + C::OFF_V + (st ^ 1) * C::TILE_V, vg, kv_rs,
                                              (kt - 1) * C::BN, S, tid);
      }
      cp_async_commit();
      // this map's K column groups (KV1: the one K head of both)
      const uint32_t sK = sb + C::OFF_K + st * C::TILE_K + (KV1 ? 0 : map * (DH / 64) * C::BN * 128);
      // V's column groups: all 2dh columns, or (STD) this head's dh (KV1: the shared V head)
      const uint32_t sV = sb + C::OFF_V + st * C::TILE_V +
                          (STD && !KV1 ? map * (DH / 64) * C::BN * 128 : 0);

      float s[NT][4];
      w::fence();
#pragma unroll
      for (int kk = 0; kk < DH / 16; ++kk)
        w::wgmma_ss<0, 0>(s, w::kmajor_desc(sQ + (kk >> 2) * C::BM * 128, kk & 3),
                          w::kmajor_desc(sK + (kk >> 2) * C::BN * 128, kk & 3), kk > 0);
      w::commit();
      w::wait<0>();
      w::fence_regs(s);

      const int k0 = kt * C::BN;
      if (k0 + C::BN - 1 > row0) causal_mask(s, k0, row0, lane);
      float alpha[2];
      uint32_t pf[NT][2];
      if (softmax_step<NT, true>(s, p.scale_log2, m, l, alpha, pf)) {  // lazy rescaling
#pragma unroll
        for (int n = 0; n < OT; ++n) {
          o[n][0] *= alpha[0];
          o[n][1] *= alpha[0];
          o[n][2] *= alpha[1];
          o[n][3] *= alpha[1];
        }
      }
      w::fence_regs(o);
      w::fence();
#pragma unroll
      for (int kk = 0; kk < C::BN / 16; ++kk) {
        const uint32_t a[4] = {pf[2 * kk][0], pf[2 * kk][1], pf[2 * kk + 1][0], pf[2 * kk + 1][1]};
        w::wgmma_rs<1>(o, a, w::mnmajor_desc(sV, C::BN * 128, kk), 1);
      }
      w::commit();
      w::wait<0>();
      w::fence_regs(o);
    }
  } else {
    // Software pipeline (FlashAttention-3's intra-warpgroup overlap): iteration it issues
    // S_{it+1} = Q K_{it+1}^T, then O += P_it V_it, waits for the scores only (wait<1>) and runs
    // the softmax of tile it+1 while the tensor cores work on P_it V_it; O is rescaled after the
    // second wait. K runs one tile ahead of V in the same two stages: K_i and V_i in slot i & 1;
    // iteration it loads K_{it+2} (over K_it, whose scores are done) and V_{it+1} (over V_{it-1}).
    // Same arithmetic in the same order as the loop above (O = alpha O + P V per tile).
    auto load_k = [&](int i) {
      load_groups<C::BN, KVROW, C::THREADS>(sb + C::OFF_K + (i & 1) * C::TILE_K, kg, kv_rs,
                                            (n_kt - 1 - i) * C::BN, S, tid);
    };
    auto load_v = [&](int i) {
      load_groups<C::BN, KVROW, C::THREADS>(sb + C::OFF_V + (i & 1) * C::TILE_V, vg, kv_rs,
                                            (n_kt - 1 - i) * C::BN, S, tid);
    };
    const uint32_t sK0 = sb + C::OFF_K + (KV1 ? 0 : map * (DH / 64) * C::BN * 128);
    const uint32_t sV0 = sb + C::OFF_V + (STD && !KV1 ? map * (DH / 64) * C::BN * 128 : 0);
    // S = Q K_i^T (one commit group)
    auto issue_s = [&](float (&s)[NT][4], int i) {
      const uint32_t sK = sK0 + (i & 1) * C::TILE_K;
#pragma unroll
      for (int kk = 0; kk < DH / 16; ++kk)
        w::wgmma_ss<0, 0>(s, w::kmajor_desc(sQ + (kk >> 2) * C::BM * 128, kk & 3),
                          w::kmajor_desc(sK + (kk >> 2) * C::BN * 128, kk & 3), kk > 0);
      w::commit();
    };
    // the causal mask on the diagonal tile
    auto mask = [&](float (&s)[NT][4], int i) {
      const int k0 = (n_kt - 1 - i) * C::BN;
      if (k0 + C::BN - 1 > row0) causal_mask(s, k0, row0, lane);
    };
    // O += P_i V_i from the probabilities pf (one commit group)
    auto issue_pv = [&](const uint32_t (&pf)[NT][2], int i) {
      const uint32_t sV = sV0 + (i & 1) * C::TILE_V;
#pragma unroll
      for (int kk = 0; kk < C::BN / 16; ++kk) {
        const uint32_t a[4] = {pf[2 * kk][0], pf[2 * kk][1], pf[2 * kk + 1][0], pf[2 * kk + 1][1]};
        w::wgmma_rs<1>(o, a, w::mnmajor_desc(sV, C::BN * 128, kk), 1);
      }
      w::commit();
    };
    // K_{it+1} and V_it landed; every warpgroup is done with K_it and V_{it-1}: their slots
    // take K_{it+2} and V_{it+1}
    auto sync_and_load = [&](int it) {
      cp_async_wait<0>();
      w::fence_proxy_async();
      __syncthreads();
      if (it + 2 < n_kt) load_k(it + 2);
      if (it + 1 < n_kt) load_v(it + 1);
      cp_async_commit();
    };

    // O = alpha O when the softmax moved its max (lazy rescaling, as in the loop above)
    auto rescale = [&](bool move, const float (&alpha)[2]) {
      if (move) {
#pragma unroll
        for (int n = 0; n < OT; ++n) {
          o[n][0] *= alpha[0];
          o[n][1] *= alpha[0];
          o[n][2] *= alpha[1];
          o[n][3] *= alpha[1];
        }
      }
    };

    // Step it (0 <= it < n_kt - 1): issue tile it+1's scores, then P_it V_it; wait for the
    // scores only and run tile it+1's softmax (f32, in the score registers) while P_it V_it
    // runs. The wait for P_it V_it, the rescale of O and the packing of the new probabilities
    // into pf (whose registers the product reads) open the next step: at the top of the loop
    // body, ptxas cannot hoist that wait above the softmax (within one basic block it
    // places it early). Every wgmma of a step is issued unconditionally (ptxas serializes
    // pipeline stages it cannot follow). Tried and slower on the H200: issuing the step's loads
    // after its MMAs and rescaling O while the scores run (FlashAttention-3's order): the dh 128
    // differential forward took 1.07 ms instead of 0.92 (B4 S4096 h8), the standard 0.57
    // instead of 0.49 (B8 S2048 H16).
    float s[NT][4];      // scores, then the f32 probabilities of the newest tile
    uint32_t pf[NT][2];  // bf16 probabilities of the tile whose P V comes next (A fragments)
    float alpha[2];
    bool move = false;
    {
      // prologue: Q and K_0 first; V_0 and K_1 land while tile 0's scores and softmax run
      if (n_kt > 1) load_k(1);
      cp_async_commit();  // V_0 + K_1
      cp_async_wait<1>();
      w::fence_proxy_async();
      __syncthreads();  // Q and K_0 landed
      w::fence();
      issue_s(s, 0);
      w::wait<0>();
      w::fence_regs(s);
      mask(s, 0);
      softmax_step_f32<NT, true>(s, p.scale_log2, m, l, alpha);  // O is still 0: no rescale
    }
    for (int it = 0; it + 1 < n_kt; ++it) {
      w::wait<0>();  // P_{it-1} V_{it-1} (none at it = 0)
      w::fence_regs(o);
      rescale(move, alpha);
      pack_probs(s, pf);
      sync_and_load(it);
      w::fence();
      issue_s(s, it + 1);
      issue_pv(pf, it);
      w::wait<1>();  // the scores; P_it V_it may still run
      w::fence_regs(s);
      mask(s, it + 1);
      move = softmax_step_f32<NT, true>(s, p.scale_log2, m, l, alpha);
      w::fence_regs(s);
    }
    w::wait<0>();
    w::fence_regs(o);
    rescale(move, alpha);
    pack_probs(s, pf);
    // the last tile: P V only
    sync_and_load(n_kt - 1);
    w::fence();
    issue_pv(pf, n_kt - 1);
    w::wait<0>();
    w::fence_regs(o);
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
  }
  const float inv[2] = {l[0] > 0.f ? 1.f / l[0] : 0.f, l[1] > 0.f ? 1.f / l[1] : 0.f};
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + g + 8 * hh;
    if (t4 == 0 && row < S)
      p.lse[(int64_t(b * p.h + hd) * 2 + map) * S + row] = (m[hh] + __log2f(l[hh])) * kLn2;
  }

  const int64_t out_off = (int64_t(b) * S * p.h + hd) * C::ROW;
  if constexpr (STD) {  // each head writes its own dh columns
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = row0 + g + 8 * hh;
      if (row >= S) continue;
      bf16* orow = p.out + out_off + int64_t(row) * q_rs + map * DH + 2 * t4;
#pragma unroll
      for (int n = 0; n < OT; ++n)
        *reinterpret_cast<uint32_t*>(orow + n * 8) =
            pack_bf16(o[n][2 * hh] * inv[hh], o[n][2 * hh + 1] * inv[hh]);
    }
    return;
  }

  // Epilogue: warpgroup 2 hands O2n = O2/l2 to warpgroup 1 in its accumulator layout (both
  // hold the same (row, column) in the same lane: 16-byte, conflict-free), over the K/V buffers.
  float4* xo = reinterpret_cast<float4*>(smem + C::OFF_K) + wl * OT * 32 + lane;
  __syncthreads();  // every warpgroup is done reading K/V
  if (map == 1) {
#pragma unroll
    for (int n = 0; n < OT; ++n)
      xo[n * 32] = make_float4(o[n][0] * inv[0], o[n][1] * inv[0], o[n][2] * inv[1],
                               o[n][3] * inv[1]);
    if (p.o2) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = row0 + g + 8 * hh;
        if (row >= S) continue;
        bf16* orow = p.o2 + out_off + int64_t(row) * q_rs + 2 * t4;
#pragma unroll
        for (int n = 0; n < OT; ++n)
          *reinterpret_cast<uint32_t*>(orow + n * 8) =
              pack_bf16(o[n][2 * hh] * inv[hh], o[n][2 * hh + 1] * inv[hh]);
      }
    }
  }
  __syncthreads();
  if (map == 0) {
    const float lam = *p.lambda;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = row0 + g + 8 * hh;
      if (row >= S) continue;
      bf16* orow = p.out + out_off + int64_t(row) * q_rs + 2 * t4;
#pragma unroll
      for (int n = 0; n < OT; ++n) {
        const float4 x = xo[n * 32];
        const float x0 = hh ? x.z : x.x, x1 = hh ? x.w : x.y;
        *reinterpret_cast<uint32_t*>(orow + n * 8) =
            pack_bf16(o[n][2 * hh] * inv[hh] - lam * x0, o[n][2 * hh + 1] * inv[hh] - lam * x1);
      }
    }
  }
#endif
}

}  // namespace flash

bool diff_flash_wgmma_enabled(const FlashOptions& opts) {
#if DIFFTRON_WGMMA
  if (!opts.hopper_kernels) return false;
  // the current device's answer, asked once per device (it is needed on every attention call)
  constexpr int kMaxDevices = 64;
  static std::atomic<signed char> cached[kMaxDevices] = {};  // 0 unknown, 1 yes, -1 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev >= 0 && dev < kMaxDevices && cached[dev] != 0) return cached[dev] > 0;
  int major = 0;
  const bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major == 9;
  if (dev >= 0 && dev < kMaxDevices) cached[dev] = yes ? 1 : -1;
  return yes;
#else
  (void)opts;
  return false;
#endif
}

namespace {
template <int DH, bool STD = false, bool KV1 = false>
void launch_fwd_wgmma(const DiffFlashDims& d, const flash::FwdParams& p, cudaStream_t stream) {
  constexpr bool kPipe = (DIFF_FLASH_WG_FWD_PIPE >> ((STD ? 2 : 0) + (DH == 128 ? 1 : 0))) & 1;
  constexpr int kBN = kPipe && !STD && DH == 64 ? DIFF_FLASH_WG_FWD_PIPE_BN64 : DIFF_FLASH_WG_FWD_BN;
  using C = flash::WgFwdCfg<DH, kBN>;
  auto kernel = flash::diff_flash_fwd_wgmma_kernel<DH, STD, KV1, kPipe, kBN>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess)
    throw_error("diff_flash: cannot give the wgmma forward kernel ", C::SMEM,
                " bytes of shared memory: ", cudaGetErrorString(e));
  const dim3 grid = flash::tile_grid(int((d.S + C::BM - 1) / C::BM), int(d.B * d.h));
  kernel<<<grid, C::THREADS, C::SMEM, stream>>>(p);
  flash::check_launch("wgmma forward");
}
}  // namespace

void diff_flash_forward_wgmma(const DiffFlashDims& d, const flash::FwdParams& p,
                              cudaStream_t stream) {
  if (d.dh == 64)
    launch_fwd_wgmma<64>(d, p, stream);
  else
    launch_fwd_wgmma<128>(d, p, stream);
}

DiffFlashDims std_flash_pair_dims(const DiffFlashDims& d) {
  // group 1: K/V heads 2i, 2i + 1 are the pair's two maps; even group g: both heads of a pair
  // read K/V head 2i / g, g / 2 pairs per K/V head
  const bool kv1 = d.h_kv > 0 && d.h_kv != d.h;
  return DiffFlashDims{d.B, d.S, d.h / 2, kv1 ? d.h_kv : d.h / 2, d.dh};
}

bool std_flash_supported(const DiffFlashDims& d, bool backward, const FlashOptions& opts, std::string* why) {
  (void)backward;  // forward and backward take the same shapes, in either determinism mode
  auto no = [&](const std::string& w) {
    if (why) *why = w;
    return false;
  };
  if (!diff_flash_wgmma_enabled(opts)) return no("needs the sm_90a kernels and a compute capability 9.x GPU");
  if (d.B <= 0 || d.S <= 0 || d.h <= 0 || d.h_kv <= 0 || d.h % 2 != 0)
    return no("needs an even number of heads");
  if (d.h % d.h_kv != 0) return no("H_kv must divide H");
  const int64_t g = d.h / d.h_kv;
  if (g != 1 && g % 2 != 0)
    return no("GQA group " + std::to_string(g) + " (heads per K/V head) must be 1 or even");
  if (d.dh != 64 && d.dh != 128) return no("head dim " + std::to_string(d.dh) + " (64 or 128)");
  if (d.S > 65535LL * 64) return no("S too large for the grid");
  std::string w;
  if (!diff_flash_supported(std_flash_pair_dims(d), &w)) return no(w);
  return true;
}

void std_flash_forward(const DiffFlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, __nv_bfloat16* out, float* lse,
                       cudaStream_t stream, const FlashOptions& opts) {
  std::string why;
  if (!std_flash_supported(d, false, opts, &why)) throw_error("std_flash_forward: unsupported: ", why);
  for (const void* ptr : {static_cast<const void*>(q), static_cast<const void*>(k),
                          static_cast<const void*>(v), static_cast<const void*>(out)})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
      throw_error("std_flash_forward: a tensor is not 16-byte aligned");
  const DiffFlashDims d2 = std_flash_pair_dims(d);
  const bool kv1 = d.h_kv != d.h;
  flash::FwdParams p{};  // no lambda, no o2: standard attention
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  p.S = int(d.S);
  p.h = int(d2.h);
  p.h_kv = int(d2.h_kv);
  p.group = int(d2.h / d2.h_kv);
  p.scale_log2 = float(flash::kLog2e / std::sqrt(double(d.dh)));
  if (d.dh == 64)
    kv1 ? launch_fwd_wgmma<64, true, true>(d2, p, stream) : launch_fwd_wgmma<64, true>(d2, p, stream);
  else
    kv1 ? launch_fwd_wgmma<128, true, true>(d2, p, stream) : launch_fwd_wgmma<128, true>(d2, p, stream);
}

}  // namespace difftron::cuda
