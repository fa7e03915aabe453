// Shared device code of the fused differential flash-attention kernels (diff_flash_fwd.cu,
// diff_flash_bwd.cu): tile configurations, PTX wrappers (mma.sync m16n8k16 bf16, ldmatrix,
// cp.async, named barriers) and the swizzled shared-memory tile layout.
//
// ---- The math (one differential head i, its K/V group g; s = scale = 1/sqrt(dh)) ----------
// Forward:  S_j = s Q_j K_j^T (+ causal mask), P_j = softmax(S_j), lse_j = logsumexp(S_j),
//           O = P_1 V - lambda P_2 V = O1n - lambda O2n          (V is 2dh wide, shared)
// Backward, with dP = dO V^T (ONE product, shared by both maps):
//           dP_1 = dP,  dP_2 = -lambda dP
//           D1  = rowsum(P_1 o dP)   = dO . O1n
//           D2' = rowsum(P_2 o dP)   = dO . O2n
//           delta = dO . O = D1 - lambda D2'        =>  D1 = delta + lambda D2'
//           dS_1 = P_1 o (dP - D1),   dS_2 = -lambda P_2 o (dP - D2')
//           dQ_j = s dS_j K_j,  dK_j = s dS_j^T Q_j,  dV = (P_1 - lambda P_2)^T dO   (one product)
//           dlambda = -sum over (b, i, t, u) of P_2 o dP     (= -sum over rows of D2')
// The forward saves O, the two lse and, optionally (kernels/ops.h `saved`, kept by default in
// training), O2n in bf16. With O2n, D2' = dO . O2n (bf16 inputs, f32 sum; like the D term
// FlashAttention takes from its bf16 O); without it the dQ kernel recomputes D2' in a first
// pass over the key tiles computing S_2 and dP (6 dh FLOP per query-key pair); D1 follows from
// delta. D2' only enters dS_2 and D1. dlambda never uses it: the dK/dV kernel, which recomputes
// P_2 and dP per tile anyway, sums P_2 o dP from those f32 values (each query-key pair once),
// one partial per CTA, so dlambda is equally accurate in both modes (summed from the bf16 O2n
// it was 2e-3..5e-2 off, docs/PERFORMANCE.md). Executed MMA work per (query, key) pair:
// forward 12 dh FLOP (2 QK maps of dh, 2 PV over 2dh), backward 34 dh without O2n (dQ kernel:
// 6 for D2' + 12 for dQ; dK/dV kernel 16), 28 dh with it; the minimum is 20 dh.
//
// ---- Kernel design ------------------------------------------------------------------------
// Hopper (sm_90a): diff_flash_fwd_wgmma.cu / diff_flash_bwd_wgmma.cu, warpgroup MMAs
// (wgmma.cuh); their design is described at the top of each file. The rest of this comment
// and of this header is about the mma.sync kernels (diff_flash_fwd.cu, diff_flash_bwd.cu),
// which run on every other GPU; the wgmma kernels share the PTX wrappers, Tile<64>, the
// softmax step and the parameter structs below.
// mma.sync m16n8k16 (bf16 in, f32 accumulate), ldmatrix from XOR-swizzled shared memory,
// cp.async double buffering (one __syncthreads per tile). A warp owns 16 rows of a tile; the
// accumulators of the 2dh-wide outputs (O, dV) and of both maps would not fit one warp's
// registers at dh 128, so warps work in pairs that own the same 16 rows:
// - dual warps (forward dh 64): no pair; each warp holds both maps' O over all 2dh columns.
// - map-split pairs (forward dh 128, dK/dV dh 128): warp j computes map j's scores only (each
//   QK^T once); both warps accumulate over their half of the 2dh columns. The partner's
//   probabilities, rescale factors or half of dP's 2dh contraction go through a per-warp
//   shared-memory slot in the MMA accumulator layout: both warps hold the same (row, col) in
//   the same lane, so the exchange is lane-to-lane (16-byte, conflict free) behind a 64-thread
//   named barrier; each warp keeps its own values in registers.
// - key-split pairs (dQ) / query-split pairs (dK/dV dh 64): each warp takes half of every
//   key (query) tile for both maps; the pair's partial sums meet once, at the end, in a fixed
//   order (deterministic).
// Single-buffered exchange slots are safe because each tile iteration starts with the
// __syncthreads of the cp.async pipeline, which the partner passes only after its reads.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/diff_flash.h"

namespace difftron::cuda::flash {

using bf16 = __nv_bfloat16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- configurations --------------------------------------------------------------------
// Tile sizes (the measured best; variants measured slower, such as map-split pairs for the
// dh 64 forward and dK/dV or a head-major grid, are in docs/PERFORMANCE.md's tuning history):
#ifndef DIFF_FLASH_FWD64_BN
#define DIFF_FLASH_FWD64_BN 32
#endif
#ifndef DIFF_FLASH_DQ64_BN
#define DIFF_FLASH_DQ64_BN 64  // keys per tile of the dh 64 dQ kernel
#endif
#ifndef DIFF_FLASH_DKV64_BM
#define DIFF_FLASH_DKV64_BM 64  // queries per tile of the dh 64 dK/dV kernel
#endif

// Forward, map-split pairs (dh 128; dh 64 uses the dual-warp kernel).
template <int DH>
struct FwdCfg {
  static constexpr int WM = 4, WARPS = 2 * WM, THREADS = 32 * WARPS;
  static constexpr int BM = 16 * WM;  // query rows per CTA
  static constexpr int BN = 64;       // keys per tile
  static constexpr int ROW = 2 * DH;  // bf16 per shared-memory row (both maps, or V)
  static constexpr int TILE_Q = BM * ROW * 2, TILE_KV = BN * ROW * 2;  // bytes
  static constexpr int XP_U4 = BN / 16;  // uint4 per lane: P of one warp, bf16 pairs
  static constexpr int OFF_Q = 0, OFF_K = OFF_Q + TILE_Q, OFF_V = OFF_K + 2 * TILE_KV;
  static constexpr int OFF_XP = OFF_V + 2 * TILE_KV;
  static constexpr int OFF_XA = OFF_XP + WARPS * XP_U4 * 32 * 16;  // float2 alpha per lane
  static constexpr int OFF_XL = OFF_XA + WARPS * 32 * 8;           // float2 l per lane
  static constexpr int SMEM = OFF_XL + WARPS * 32 * 8;
  static constexpr int MIN_BLOCKS = 1;
  static constexpr bool Q_REGS = DH == 64;  // Q fragments kept in registers across tiles
};

// Forward, dual warps: each warp owns 16 query rows, both maps and all 2dh output columns.
template <int DH>
struct FwdDualCfg {
  static constexpr int WARPS = 4, THREADS = 32 * WARPS;
  static constexpr int BM = 16 * WARPS;
  static constexpr int BN = DIFF_FLASH_FWD64_BN;
  static constexpr int ROW = 2 * DH;
  static constexpr int TILE_Q = BM * ROW * 2, TILE_KV = BN * ROW * 2;
  static constexpr int OFF_Q = 0, OFF_K = TILE_Q, OFF_V = OFF_K + 2 * TILE_KV;
  static constexpr int SMEM = OFF_V + 2 * TILE_KV;
  static constexpr int MIN_BLOCKS = 2;
};

// dQ kernel (+ D1, D2'): query-major, key-split pairs (each
// warp of a pair takes half of every key tile for both maps; the dQ partials meet once).
template <int DH>
struct DqCfg {
  static constexpr int WM = 4, WARPS = 2 * WM, THREADS = 32 * WARPS;
  static constexpr int BM = 16 * WM;
  static constexpr int BN = DH == 64 ? DIFF_FLASH_DQ64_BN : 32;
  static constexpr int ROW = 2 * DH;
  static constexpr int TILE_Q = BM * ROW * 2, TILE_KV = BN * ROW * 2;
  static constexpr int OFF_Q = 0, OFF_DO = TILE_Q, OFF_K = OFF_DO + TILE_Q;
  static constexpr int OFF_V = OFF_K + 2 * TILE_KV;
  static constexpr int OFF_XR = OFF_V + 2 * TILE_KV;      // float2 per lane and warp
  static constexpr int SMEM = OFF_XR + WARPS * 32 * 8;
  static constexpr int MIN_BLOCKS = 1;
  // the final dQ exchange (one map's partial per warp) reuses the K/V buffers
  static_assert(WARPS * DH * 16 * 4 <= 4 * TILE_KV, "dQ exchange must fit in the K/V buffers");
};

// dK/dV kernel, map-split pairs (dh 128): key-major, loops over the heads of the K/V group
// and their query tiles.
template <int DH>
struct DkvCfg {
  static constexpr int WM = 4, WARPS = 2 * WM, THREADS = 32 * WARPS;
  static constexpr int BN = 16 * WM;               // key rows per CTA
  static constexpr int BM = DH == 64 ? 64 : 32;    // query rows per tile
  static constexpr bool KV_REGS = DH == 64;        // K_j, V half fragments kept in registers
  static constexpr int ROW = 2 * DH;
  static constexpr int TILE_KV = BN * ROW * 2, TILE_Q = BM * ROW * 2;
  static constexpr int STAT = 4 * BM * 4;          // lse_1, lse_2, D1, D2' of one query tile
  static constexpr int XP_U4 = BM / 16, XD_F4 = BM / 8;
  static constexpr int OFF_K = 0, OFF_V = TILE_KV, OFF_Q = 2 * TILE_KV;
  static constexpr int OFF_DO = OFF_Q + 2 * TILE_Q, OFF_ST = OFF_DO + 2 * TILE_Q;
  static constexpr int OFF_XP = OFF_ST + 2 * STAT;
  static constexpr int OFF_XD = OFF_XP + WARPS * XP_U4 * 32 * 16;
  static constexpr int SMEM = OFF_XD + WARPS * XD_F4 * 32 * 16;
  static constexpr int MIN_BLOCKS = 1;
};

// dK/dV kernel, query-split pairs (dh 64): both warps of a pair own the same 16 keys and
// take half of every query tile each, for both maps; their partials meet once at the end.
template <int DH>
struct DkvQCfg {
  static constexpr int WM = 4, WARPS = 2 * WM, THREADS = 32 * WARPS;
  static constexpr int BN = 16 * WM;  // key rows per CTA
  static constexpr int BM = DIFF_FLASH_DKV64_BM;  // query rows per tile (half per warp)
  static constexpr int ROW = 2 * DH;
  static constexpr int TILE_KV = BN * ROW * 2, TILE_Q = BM * ROW * 2;
  static constexpr int STAT = 4 * BM * 4;
  static constexpr int OFF_K = 0, OFF_V = TILE_KV, OFF_Q = 2 * TILE_KV;
  static constexpr int OFF_DO = OFF_Q + 2 * TILE_Q, OFF_ST = OFF_DO + 2 * TILE_Q;
  static constexpr int SMEM = OFF_ST + 2 * STAT;
  static constexpr int MIN_BLOCKS = 1;
  // the final exchange (dK of one map + half of dV per warp) reuses the Q/dO buffers
  static_assert(WARPS * 2 * DH * 16 * 4 <= 4 * TILE_Q, "dK/dV exchange must fit");
};

// ---- PTX wrappers ----------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; src_bytes 0 zero-fills (rows past S).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Barrier for the two warps of a map-split pair (ids 1..WM; 0 is __syncthreads).
__device__ __forceinline__ void pair_barrier(int pair) {
  asm volatile("bar.sync %0, 64;\n" ::"r"(pair + 1) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c[16x8] += a[16x16] b[16x8], bf16 operands, f32 accumulators.
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ float2 unpack_bf16(uint32_t w) {
  __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&w);
  return __bfloat1622float2(v);
}

// ---- shared-memory tiles ---------------------------------------------------------------
// A tile of rows x COLS bf16, row-major, 16-byte chunks XOR-swizzled by (row & 7) so that
// ldmatrix over 8 consecutive rows of one chunk column hits 8 distinct bank groups.
template <int COLS>
struct Tile {
  static_assert(COLS % 64 == 0, "tile rows must be whole 128-byte lines");
  static constexpr int CHUNKS = COLS / 8;
  __device__ __forceinline__ static uint32_t off(int r, int c) {
    return static_cast<uint32_t>(r * COLS * 2 + ((c ^ (r & 7)) << 4));
  }
};

// Rows [row0, row0 + R) of a [*, COLS]-wide slice of a global matrix (row stride in
// elements) into a swizzled tile; rows >= n_rows are zero-filled. SRC_COLS < COLS: the slice
// is SRC_COLS wide and repeated across the tile's row (standard attention with both heads of
// a pair on one K/V head: the two "maps" of the tile hold the same K or V).
template <int R, int COLS, int THREADS, int SRC_COLS = COLS>
__device__ __forceinline__ void load_tile(uint32_t dst, const bf16* src, int64_t row_stride,
                                          int row0, int n_rows, int tid) {
  constexpr int CH = COLS / 8, TOTAL = R * CH;
  static_assert(TOTAL % THREADS == 0, "tile chunks must divide evenly among threads");
  static_assert(COLS % SRC_COLS == 0 && SRC_COLS % 8 == 0, "source columns must tile the row");
#pragma unroll
  for (int x = 0; x < TOTAL / THREADS; ++x) {
    const int idx = x * THREADS + tid, r = idx / CH, c = idx % CH;
    const int row = row0 + r;
    const bool ok = row < n_rows;
    const bf16* p =
        src + static_cast<int64_t>(ok ? row : 0) * row_stride + (c % (SRC_COLS / 8)) * 8;
    cp_async_16(dst + Tile<COLS>::off(r, c), p, ok ? 16 : 0);
  }
}

// Per-lane ldmatrix.x4 addressing on a swizzled Tile<COLS>, with the swizzle folded into 4
// precomputed offsets so that unrolled loops only add immediates:
// - kA: A operand (16 rows x 16 cols, row-major) -> a[0..3]; also the B operand from a
//       [k][n] row-major tile (V rows as k) with ldsm_x4_t -> b0,b1 of n-tile 0, then n-tile 1
// - kN: B operand from a [n][k] row-major tile (K rows as n) -> b0,b1 of n-tile 0, n-tile 1
enum LdsmKind { kA, kN };
template <int COLS>
struct Ldsm {
  uint32_t row_off;  // bytes: this lane's row within a 16-row block
  uint32_t xo[4];    // bytes: swizzled chunk (2i + this lane's chunk bit) within 8 chunks
  __device__ __forceinline__ Ldsm(int lane, LdsmKind kind) {
    const int sw = lane & 7;
    const int rb = kind == kN ? (lane >> 4) : ((lane >> 3) & 1);
    const int cb = kind == kN ? ((lane >> 3) & 1) : (lane >> 4);
    row_off = static_cast<uint32_t>((sw + rb * 8) * COLS * 2);
#pragma unroll
    for (int i = 0; i < 4; ++i) xo[i] = static_cast<uint32_t>(((2 * i + cb) ^ sw) << 4);
  }
  // tile: tile base; r0: first row (multiple of 8); c0: first 16-byte chunk (even)
  __device__ __forceinline__ uint32_t at(uint32_t tile, int r0, int c0) const {
    return tile + row_off + static_cast<uint32_t>(r0 * COLS * 2 + ((c0 & ~7) << 4)) +
           xo[(c0 & 7) >> 1];
  }
};

// ---- score-tile helpers (16 rows x 8 NT columns per warp, accumulator layout) ----------
// -inf where the key column is past the query row (causal); col0/row0: first key / query.
template <int NT>
__device__ __forceinline__ void causal_mask(float (&s)[NT][4], int col0, int row0, int lane) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (col0 + n * 8 + 2 * t4 + (e & 1) > row0 + g + 8 * (e >> 1)) s[n][e] = -INFINITY;
}

// One online-softmax step in log2 units (sl2 = scale * log2 e): updates the running max m and
// this thread's partial row sums l of rows g, g + 8, returns the factor alpha that rescales the
// old state, and the probabilities as bf16 pairs pf[n] = {row g, row g + 8} (A-fragment order).
// LAZY: the max the probabilities are taken against only moves when the tile's max exceeds it by
// more than kLazyLog2 (probabilities up to 2^8: exact in the f32 sums, and bf16 keeps its
// relative precision), decided per warp; alpha is then 1 for both rows. Returns whether the max
// moved, i.e. whether the caller must rescale its outputs by alpha (always true without LAZY).
constexpr float kLazyLog2 = 8.f;
// The step itself; out(n, p0, p1, p2, p3) receives tile n's probabilities (rows g: p0, p1;
// row g + 8: p2, p3) after they are computed. softmax_step packs them into bf16 fragments,
// softmax_step_f32 (diff_flash_wgmma.cuh) writes them back over the scores.
template <int NT, bool LAZY, typename Out>
__device__ __forceinline__ bool softmax_step_into(const float (&s)[NT][4], float sl2, float (&m)[2],
                                                  float (&l)[2], float (&alpha)[2], Out&& out) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
    mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
  }
  bool move = !LAZY;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
    mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
    mx[hh] *= sl2;
    if (LAZY) move |= mx[hh] > m[hh] + kLazyLog2;  // true for a row's first unmasked key
  }
  if (LAZY) move = __any_sync(0xffffffffu, move);
  float mu[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    if (move) {
      const float mn = fmaxf(m[hh], mx[hh]);
      mu[hh] = mn == -INFINITY ? 0.f : mn;  // a row with no key yet: keep exp2 finite
      alpha[hh] = fast_exp2(m[hh] - mu[hh]);
      m[hh] = mn;
    } else {
      mu[hh] = m[hh] == -INFINITY ? 0.f : m[hh];
      alpha[hh] = 1.f;
    }
  }
  float rs[2] = {0.f, 0.f};
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const float p0 = fast_exp2(fmaf(s[n][0], sl2, -mu[0]));
    const float p1 = fast_exp2(fmaf(s[n][1], sl2, -mu[0]));
    const float p2 = fast_exp2(fmaf(s[n][2], sl2, -mu[1]));
    const float p3 = fast_exp2(fmaf(s[n][3], sl2, -mu[1]));
    rs[0] += p0 + p1;
    rs[1] += p2 + p3;
    out(n, p0, p1, p2, p3);
  }
  l[0] = l[0] * alpha[0] + rs[0];
  l[1] = l[1] * alpha[1] + rs[1];
  return move;
}

template <int NT, bool LAZY = false>
__device__ __forceinline__ bool softmax_step(const float (&s)[NT][4], float sl2, float (&m)[2],
                                             float (&l)[2], float (&alpha)[2],
                                             uint32_t (&pf)[NT][2]) {
  return softmax_step_into<NT, LAZY>(s, sl2, m, l, alpha, [&](int n, float p0, float p1, float p2, float p3) {
    pf[n][0] = pack_bf16(p0, p1);
    pf[n][1] = pack_bf16(p2, p3);
  });
}

// ---- kernel parameters -----------------------------------------------------------------
struct FwdParams {
  const bf16 *q, *k, *v;
  const float* lambda;
  bf16* out;
  float* lse;
  bf16* o2;  // optional: O2n = P_2 V

  int S, h, h_kv, group;
  float scale_log2;
};

struct BwdParams {
  const bf16 *q, *k, *v, *out, *dout;
  const bf16* o2;   // optional saved O2n: D2' = dO . O2n directly, no pass A (not dlambda)
  const float *lambda, *lse;
  bf16 *dq, *dk, *dv;
  float* D;         // [B, h, 2, S]: D1, D2'
  float* dlam_part; // one partial sum of P_2 o dP per dK/dV CTA (linear block id), f32
  float* dlambda;
  int S, h, h_kv, group;
  float scale, scale_log2;
  float* dq_acc = nullptr;  // fused-dQ path (diff_flash_bwd_wgmma.cu): f32 [B, S, h, 2dh], zeroed
};

void check_launch(const char* what);

// Grid mapping: blockIdx.x = batch * heads (every head's heavy tiles start first), blockIdx.y =
// tile. Tiles are numbered so that the CTA with the most work of a head starts first.
__host__ __device__ inline dim3 tile_grid(int tiles, int heads) { return dim3(unsigned(heads), unsigned(tiles)); }
__device__ __forceinline__ int grid_tile() { return blockIdx.y; }
__device__ __forceinline__ int grid_tiles() { return gridDim.y; }
__device__ __forceinline__ int grid_head() { return blockIdx.x; }

}  // namespace difftron::cuda::flash
