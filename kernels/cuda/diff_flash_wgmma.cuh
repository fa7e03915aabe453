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

// softmax_step (diff_flash.cuh) with the probabilities left in s as f32, the same operations in
// the same order: the pipelined forward packs them into A fragments (pack_probs) only once the
// previous P V product, which reads the fragment registers, has finished.
template <int NT, bool LAZY = false>
__device__ __forceinline__ bool softmax_step_f32(float (&s)[NT][4], float sl2, float (&m)[2],
                                                 float (&l)[2], float (&alpha)[2]) {
  return softmax_step_into<NT, LAZY>(s, sl2, m, l, alpha, [&](int n, float p0, float p1, float p2, float p3) {
    s[n][0] = p0;
    s[n][1] = p1;
    s[n][2] = p2;
    s[n][3] = p3;
  });
}
// f32 probabilities (accumulator layout) -> bf16 A fragments, as softmax_step packs them.
template <int NT>
__device__ __forceinline__ void pack_probs(const float (&s)[NT][4], uint32_t (&pf)[NT][2]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    pf[n][0] = pack_bf16(s[n][0], s[n][1]);
    pf[n][1] = pack_bf16(s[n][2], s[n][3]);
  }
}

}  // namespace difftron::cuda::flash
