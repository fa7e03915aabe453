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
#ifndef DIFF_FLASH_WG64_MIN_BLOCKS
#define DIFF_FLASH_WG64_MIN_BLOCKS 2  // dh 64: CTAs per SM the registers are budgeted for
#endif

namespace difftron::cuda {
namespace flash {

template <int DH>
struct WgFwdCfg {
  static constexpr int THREADS = 256;          // two warpgroups: map 1, map 2
  static constexpr int BM = 64, BN = DIFF_FLASH_WG_FWD_BN;  // query rows per CTA, keys per tile
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
template <int DH, bool STD, bool KV1 = false>
__global__ void __launch_bounds__(WgFwdCfg<DH>::THREADS, WgFwdCfg<DH>::MIN_BLOCKS)
    diff_flash_fwd_wgmma_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  namespace w = wgmma;
  using C = WgFwdCfg<DH>;
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
  load_groups<C::BN, KVROW, C::THREADS>(sb + C::OFF_V, vg, kv_rs, (n_kt - 1) * C::BN, S, tid);
  cp_async_commit();

  float o[OT][4];
#pragma unroll
  for (int n = 0; n < OT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int row0 = q0 + wl * 16;  // this warp's first query row
  const uint32_t sQ = sb + C::OFF_Q + map * (DH / 64) * C::BM * 128;

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
  using C = flash::WgFwdCfg<DH>;
  auto kernel = flash::diff_flash_fwd_wgmma_kernel<DH, STD, KV1>;
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
