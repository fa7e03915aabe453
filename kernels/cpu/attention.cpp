// Standard causal softmax attention with grouped K/V heads: the baseline Transformer's
// attention and the semantics its CUDA kernel is tested against.
#include <cmath>
#include <vector>

#include "kernels/cpu/causal_softmax_row.h"
#include "kernels/cpu/reference.h"

namespace difftron::cpu {

template <typename T>
void attention_forward(const T* q, const T* k, const T* v, T* out, T* lse, int64_t B, int64_t S,
                       int64_t H, int64_t H_kv, int64_t dh) {
  const int64_t group = H / H_kv;
  const double scale = 1.0 / std::sqrt(double(dh));
  const int64_t q_stride = H * dh, kv_stride = H_kv * dh;
  // (b, head) pairs are independent: spread over threads (OpenMP), results unchanged.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < H; ++i) {
      const int64_t g = i / group;
      std::vector<double> p(S), acc(dh);
      for (int64_t t = 0; t < S; ++t) {
        const T* qt = q + (b * S + t) * q_stride + i * dh;
        lse[(b * H + i) * S + t] = detail::causal_softmax_row(qt, k + b * S * kv_stride + g * dh,
                                                              kv_stride, t, dh, scale, p.data());
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t u = 0; u <= t; ++u) {
          const T* vu = v + (b * S + u) * kv_stride + g * dh;
          for (int64_t c = 0; c < dh; ++c) acc[c] += p[u] * double(vu[c]);
        }
        for (int64_t c = 0; c < dh; ++c) out[(b * S + t) * q_stride + i * dh + c] = T(acc[c]);
      }
    }
}

template <typename T>
void attention_backward(const T* q, const T* k, const T* v, const T* out, const T* lse,
                        const T* dout, T* dq, T* dk, T* dv, int64_t B, int64_t S, int64_t H,
                        int64_t H_kv, int64_t dh) {
  const int64_t group = H / H_kv;
  const double scale = 1.0 / std::sqrt(double(dh));
  const int64_t q_stride = H * dh, kv_stride = H_kv * dh;
  std::fill(dq, dq + B * S * q_stride, T(0));
  std::fill(dk, dk + B * S * kv_stride, T(0));
  std::fill(dv, dv + B * S * kv_stride, T(0));
  // (b, group) pairs write disjoint dq/dk/dv rows: spread over threads (OpenMP); inside, heads
  // and queries run in order, so results do not depend on the thread count.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < H_kv; ++g) {
      std::vector<double> p(S), dp(S);
      for (int64_t i = g * group; i < (g + 1) * group; ++i)
        for (int64_t t = 0; t < S; ++t) {
          const T* qt = q + (b * S + t) * q_stride + i * dh;
          const T* kb = k + b * S * kv_stride + g * dh;
          const T* vb = v + b * S * kv_stride + g * dh;
          const T* dot_row = dout + (b * S + t) * q_stride + i * dh;
          detail::causal_probs_from_lse(qt, kb, kv_stride, t, dh, scale,
                                        double(lse[(b * H + i) * S + t]), p.data());
          double D = 0;
          for (int64_t u = 0; u <= t; ++u) {
            double s = 0;
            for (int64_t c = 0; c < dh; ++c) s += double(dot_row[c]) * double(vb[u * kv_stride + c]);
            dp[u] = s;
            D += p[u] * s;
          }
          for (int64_t u = 0; u <= t; ++u) {
            double ds = p[u] * (dp[u] - D);
            T* dku = dk + (b * S + u) * kv_stride + g * dh;
            T* dvu = dv + (b * S + u) * kv_stride + g * dh;
            for (int64_t c = 0; c < dh; ++c) {
              dq[(b * S + t) * q_stride + i * dh + c] += T(scale * ds * double(kb[u * kv_stride + c]));
              dku[c] += T(scale * ds * double(qt[c]));
              dvu[c] += T(p[u] * double(dot_row[c]));
            }
          }
        }
    }
}

#define INSTANTIATE(T)                                                                       \
  template void attention_forward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t,  \
                                     int64_t, int64_t, int64_t);                              \
  template void attention_backward<T>(const T*, const T*, const T*, const T*, const T*,       \
                                      const T*, T*, T*, T*, int64_t, int64_t, int64_t, int64_t, \
                                      int64_t);
INSTANTIATE(float)
INSTANTIATE(double)

}  // namespace difftron::cpu
