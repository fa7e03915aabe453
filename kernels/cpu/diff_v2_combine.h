// The CPU reference of Differential Transformer V2's pairwise subtraction (kernels/ops.h,
// Ops::diff_v2_combine_forward / _backward), on raw pointers: rows = B*S tokens, H pairs of
// query heads, head width dh. Declared here rather than in reference.h: the default
// Ops methods in diff_v2_combine.cpp serve the CPU backend.
#pragma once
#include <cstdint>

namespace difftron::cpu {

// out[r, i, :] = att[r, 2i, :] - sigmoid(z[r, i]) att[r, 2i + 1, :]
template <typename T>
void diff_v2_combine_forward(const T* att, const T* z, T* out, int64_t rows, int64_t H, int64_t dh);
// datt, dz overwritten
template <typename T>
void diff_v2_combine_backward(const T* att, const T* z, const T* dout, T* datt, T* dz, int64_t rows,
                              int64_t H, int64_t dh);

}  // namespace difftron::cpu
