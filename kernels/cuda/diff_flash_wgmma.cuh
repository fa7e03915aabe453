// Device code shared by the Hopper (wgmma) fused attention kernels, diff_flash_fwd_wgmma.cu
// and diff_flash_bwd_wgmma.cu: global -> shared tile loads in the layout wgmma.cuh describes.
#pragma once
#include "kernels/cuda/diff_flash.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace difftron::cuda::flash {

// Rows [row0, row0 + R) of a [*, COLS] slice of a global matrix into COLS / 64 Tile<64>
// column groups (group c at byte offset c * R * 128); rows >= n_rows are zero-filled.
template <int R, int COLS, int THREADS>
__device__ __forceinline__ void load_groups(uint32_t dst, const bf16* src, int64_t row_stride,
                                            int row0, int n_rows, int tid) {
  constexpr int CH = COLS / 8, TOTAL = R * CH;
  static_assert(TOTAL % THREADS == 0, "tile chunks must divide evenly among threads");
#pragma unroll
  for (int x = 0; x < TOTAL / THREADS; ++x) {
    const int idx = x * THREADS + tid, r = idx / CH, c = idx % CH;
    const int row = row0 + r;
    const bool ok = row < n_rows;
    const bf16* ptr = src + static_cast<int64_t>(ok ? row : 0) * row_stride + c * 8;
    cp_async_16(dst + (c >> 3) * R * 128 + Tile<64>::off(r, c & 7), ptr, ok ? 16 : 0);
  }
}

}  // namespace difftron::cuda::flash
