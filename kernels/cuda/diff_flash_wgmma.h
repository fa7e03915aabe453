// Internal entry points of the Hopper (wgmma, sm_90a) fused attention kernels, used by the
// host API in diff_flash_fwd.cu / diff_flash_bwd.cu (public API: diff_flash.h).
#pragma once
#include <cuda_runtime.h>

#include "kernels/cuda/diff_flash.h"

namespace difftron::cuda {
namespace flash {
struct FwdParams;
struct BwdParams;
}

// True when opts.hopper_kernels, this build has the sm_90a kernels and the current device has
// compute capability 9.x (asked once per device and cached).
bool diff_flash_wgmma_enabled(const FlashOptions& opts);

// The forward on wgmma; same contract as diff_flash_forward (dims already checked).
void diff_flash_forward_wgmma(const DiffFlashDims& d, const flash::FwdParams& p,
                              cudaStream_t stream);

// The dK/dV kernel on wgmma (dh 64 only) with its dlambda partials (one per CTA,
// diff_flash_dkdv_wgmma_ctas of them); same contract as diff_flash_bwd.cu's dK/dV kernels.
int diff_flash_dkdv_wgmma_ctas(const DiffFlashDims& d);
void diff_flash_dkdv_wgmma(const DiffFlashDims& d, const flash::BwdParams& p,
                           cudaStream_t stream);

// The fused-dQ backward (dh 64, needs the saved O2n and p.dq_acc): D1, D2' from dO, O, O2n;
// the dK/dV kernel also accumulating dQ with float atomics; dq = bf16(scale dq_acc). Faster
// but not bitwise repeatable; chosen by diff_flash_backward unless opts.deterministic.
void diff_flash_bwd_fused_dq(const DiffFlashDims& d, const flash::BwdParams& p,
                             cudaStream_t stream);

// Standard attention as pairs of heads (std_flash_*): the pair view of d = {B, S, H, H_kv, dh}
// is {B, S, H / 2, H_kv == H ? H / 2 : H_kv, dh}: without GQA the K/V heads pair up like the
// query heads (2dh-wide K/V rows); with an even GQA group both heads of a pair read one K/V head
// (dh-wide rows, "KV1"), H / (2 H_kv) pairs per K/V head.
DiffFlashDims std_flash_pair_dims(const DiffFlashDims& d);

// The standard-attention backward (std_flash_backward); d2: the pair view, p with no lambda and
// no dlambda; kv1: both heads of a pair on one dh-wide K/V head (H_kv != H: the pair view alone
// cannot tell, e.g. H_kv = H / 2 looks like H / 2 pairs over H / 2 pairs). p.dq_acc set: the fused-dQ path (D per head, dK/dV kernel with f32 dQ atomics,
// conversion); null: deterministic (the mma.sync dQ kernel, which also writes D, then the dK/dV
// kernel without dQ).
void std_flash_backward_wgmma(const DiffFlashDims& d2, const flash::BwdParams& p, bool kv1,
                              cudaStream_t stream);

// The deterministic standard dQ (mma.sync dQ kernel, diff_flash_bwd.cu): dq and D (D_j = dO_j .
// O_j per head) for the pair view d2; kv1: both heads of a pair on one dh-wide K/V head.
void std_flash_dq_mma(const DiffFlashDims& d2, const flash::BwdParams& p, bool kv1,
                      cudaStream_t stream);

}  // namespace difftron::cuda
