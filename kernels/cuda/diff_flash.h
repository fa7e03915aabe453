// Fused differential flash attention (issue 4): forward and backward CUDA kernels over raw
// device pointers, bf16 in / fp32 accumulate, causal, GQA, dh 64 or 128. Layouts are those of
// kernels/ops.h (q [B,S,h,2,dh], k [B,S,h_kv,2,dh], v [B,S,h_kv,2dh], out [B,S,h,2dh],
// lse [B,h,2,S] f32, lambda [1] f32 on the device). Math and kernel design: diff_flash.cuh.
// Two kernel families: Hopper wgmma kernels (diff_flash_*_wgmma.cu; builds with sm_90a on
// compute capability 9.x devices, unless FlashOptions::hopper_kernels is false) and mma.sync
// kernels (diff_flash_fwd.cu, diff_flash_bwd.cu) everywhere else.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace difftron::cuda {

struct DiffFlashDims {
  int64_t B = 0, S = 0, h = 0, h_kv = 0, dh = 0;
};

// How the kernels run, chosen by the caller (the CUDA backend's options, from `train` flags).
struct FlashOptions {
  bool deterministic = false;   // fixed-order reductions only (no f32 atomics for dQ)
  bool hopper_kernels = true;   // the wgmma kernels where the build and the GPU have them
};

// True when the fused kernels handle these dims (dh 64 or 128, h_kv divides h, all > 0,
// sizes that fit 32-bit row indices). Otherwise false, with the reason in *why if given.
bool diff_flash_supported(const DiffFlashDims& d, std::string* why = nullptr);

// out = (A1 - lambda A2) V per differential head and lse of both maps (natural log).
// o2 (optional, layout of out): also writes O2n = A2 V, which lets the backward skip
// recomputing dO . O2n (the CUDA backend keeps it in the op's `saved` state, kernels/ops.h).
// Throws difftron::Error for unsupported dims, misaligned pointers or a failed launch.
void diff_flash_forward(const DiffFlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const float* lambda, __nv_bfloat16* out,
                        float* lse, cudaStream_t stream, __nv_bfloat16* o2 = nullptr,
                        const FlashOptions& opts = {});

// Bytes of device scratch diff_flash_backward needs for these dims (16-byte aligned start).
size_t diff_flash_backward_workspace_bytes(const DiffFlashDims& d, const FlashOptions& opts = {});

// dq, dk, dv (bf16, overwritten) and dlambda[0] (f32, overwritten) = -sum P_2 o (dO V^T) over
// all query-key pairs (= -sum_rows dO . O2n), summed in f32 from the dK/dV kernel's recomputed
// P_2 and dP whether or not o2 is given. o2: the forward's optional O2n output, used for
// D2' = dO . O2n in dS_2 (null: recomputed, one extra pass over the key tiles in the dQ kernel).
// Determinism: with o2 on the wgmma kernels, dQ is accumulated with f32 atomics in the dK/dV
// kernel (the fastest path; dq may differ in the last bits between runs); everything else, and
// every path when opts.deterministic (`train --deterministic`),
// runs its reductions in a fixed order without atomics and is bitwise repeatable.
void diff_flash_backward(const DiffFlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k,
                         const __nv_bfloat16* v, const float* lambda, const __nv_bfloat16* out,
                         const float* lse, const __nv_bfloat16* dout, __nv_bfloat16* dq,
                         __nv_bfloat16* dk, __nv_bfloat16* dv, float* dlambda, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream,
                         const __nv_bfloat16* o2 = nullptr, const FlashOptions& opts = {});

// ---- standard causal attention on the same Hopper kernels -----------------------------------
// The baseline Transformer's and Diff V2's attention: q, out [B, S, H, dh], k, v [B, S, H_kv,
// dh] (query head i reads K/V head i / (H / H_kv)), lse [B, H, S] f32, bf16. Heads 2i and
// 2i + 1 run as the two maps of one differential head, each with its own V columns and output;
// no lambda. Without GQA the K/V heads pair up the same way; with GQA (an even group H / H_kv,
// as Diff V2's) both heads of a pair read the same K/V head, and its dK, dV are the sums over
// its heads in a fixed order. d = {B, S, H, H_kv, dh}. Supported when diff_flash_wgmma_enabled(),
// H even, H / H_kv 1 or even and dh 64 or 128, forward and backward; otherwise callers take
// another path (false, with the reason in *why). The backward sums dQ with f32 atomics (dq may
// differ in the last bits between runs; dk, dv do not) unless opts.deterministic, which runs the
// mma.sync dQ kernel instead (fixed order, bitwise repeatable, slower).
bool std_flash_supported(const DiffFlashDims& d, bool backward, const FlashOptions& opts = {},
                         std::string* why = nullptr);
void std_flash_forward(const DiffFlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, __nv_bfloat16* out, float* lse, cudaStream_t stream,
                       const FlashOptions& opts = {});
size_t std_flash_backward_workspace_bytes(const DiffFlashDims& d, const FlashOptions& opts = {});
void std_flash_backward(const DiffFlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k,
                        const __nv_bfloat16* v, const __nv_bfloat16* out, const float* lse,
                        const __nv_bfloat16* dout, __nv_bfloat16* dq, __nv_bfloat16* dk,
                        __nv_bfloat16* dv, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream, const FlashOptions& opts = {});

}  // namespace difftron::cuda
