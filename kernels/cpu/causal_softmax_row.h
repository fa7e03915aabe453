// Internal helper of the CPU attention references: one query row's causal softmax.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace difftron::cpu::detail {

// p[u] = softmax_u(scale * <q, k_u>) for u in [0, t]; k_u = k + u * k_stride. Returns the
// log-sum-exp of the scaled scores. Accumulates in double.
template <typename T>
T causal_softmax_row(const T* q, const T* k, int64_t k_stride, int64_t t, int64_t dh, double scale,
                     double* p) {
  double mx = -INFINITY;
  for (int64_t u = 0; u <= t; ++u) {
    const T* ku = k + u * k_stride;
    double s = 0;
    for (int64_t c = 0; c < dh; ++c) s += double(q[c]) * double(ku[c]);
    p[u] = s * scale;
    mx = std::max(mx, p[u]);
  }
  double sum = 0;
  for (int64_t u = 0; u <= t; ++u) sum += std::exp(p[u] - mx);
  double lse = mx + std::log(sum);
  for (int64_t u = 0; u <= t; ++u) p[u] = std::exp(p[u] - lse);
  return T(lse);
}

// Recomputes p from a saved lse: p[u] = exp(scale * <q, k_u> - lse).
template <typename T>
void causal_probs_from_lse(const T* q, const T* k, int64_t k_stride, int64_t t, int64_t dh,
                           double scale, double lse, double* p) {
  for (int64_t u = 0; u <= t; ++u) {
    const T* ku = k + u * k_stride;
    double s = 0;
    for (int64_t c = 0; c < dh; ++c) s += double(q[c]) * double(ku[c]);
    p[u] = std::exp(s * scale - lse);
  }
}

}  // namespace difftron::cpu::detail
