// Tolerances for comparing two runs that compute the same sums in another order: a TP or DP
// run against one process, two threads against one, one OpenBLAS kernel family against
// another (OpenBLAS picks its GEMM kernel per processor, which blocks every dot product
// differently). They follow from the arithmetic, not from one machine's rounding:
//
// Two orders of an f32 sum of n terms differ by at most 2 gamma_n sum|terms|, with
// gamma_n = n u / (1 - n u) and u = 2^-24 (the forward error bound of recursive summation,
// which holds for any order). A value at the end of a chain of k dependent reductions of at
// most n terms each differs, relative to the scale of its terms, by at most k 2 gamma_n. We
// take as that scale the loss, or a tensor's largest (or L2) gradient. These are worst cases:
// any processor's rounding stays inside them, while a real error (a wrong shard, a missing or
// doubled reduction) is of the order of the values themselves.
#pragma once
#include <algorithm>
#include <cstdint>

#include "core/config.h"

namespace difftron::testing {

constexpr double kF32UnitRoundoff = 0x1p-24;

// k 2 gamma_n for f32.
inline double reordered_sums_bound(int64_t n, int64_t k) {
  const double nu = double(n) * kF32UnitRoundoff;
  return double(k) * 2 * nu / (1 - nu);
}

// The reductions of the model's forward pass, per layer: RMSNorm (d_model), Q/K/V projections
// (d_model), scores (head_dim), softmax and P V (seq), output projection (q width), RMSNorm,
// FFN up (d_model) and down (ffn_dim): 8; then the final norm, the LM head and the
// cross-entropy's sum over the vocabulary: 3.
inline int64_t forward_chain(const ModelConfig& c) { return 8 * c.n_layers + 3; }
// The backward runs the chain back once more and sums each weight's gradient over the tokens.
inline int64_t backward_chain(const ModelConfig& c) { return 2 * forward_chain(c) + 1; }
// The longest of those reductions for `tokens` tokens in a step (all micro-batches).
inline int64_t longest_reduction(const ModelConfig& c, int64_t seq, int64_t tokens) {
  return std::max({c.d_model, c.ffn_dim, c.vocab_size, seq, c.q_dim(), tokens});
}

// Relative bounds for the loss of one forward pass and the gradients of one backward.
inline double loss_rel_bound(const ModelConfig& c, int64_t seq, int64_t tokens) {
  return reordered_sums_bound(longest_reduction(c, seq, tokens), forward_chain(c));
}
inline double grad_rel_bound(const ModelConfig& c, int64_t seq, int64_t tokens) {
  return reordered_sums_bound(longest_reduction(c, seq, tokens), backward_chain(c));
}

}  // namespace difftron::testing
