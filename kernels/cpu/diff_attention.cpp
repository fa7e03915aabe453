// Differential attention reference (Ye et al. 2025), row by row with O(S) extra memory:
// out_i = (A1 - lambda A2) V_g, A_j = causal softmax(Q_{i,j} K_{g,j}^T / sqrt(dh)), plus the
// lambda reparameterisation lambda = exp(<lq1,lk1>) - exp(<lq2,lk2>) + lambda_init.
// Layouts in kernels/ops.h.
#include <cmath>
#include <vector>

#include "kernels/cpu/causal_softmax_row.h"
#include "kernels/cpu/reference.h"

namespace difftron::cpu {

template <typename T>
static double dot(const T* a, const T* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

template <typename T>
T diff_lambda_forward(const T* lq1, const T* lk1, const T* lq2, const T* lk2, int64_t dh,
                      double lambda_init) {
  return T(std::exp(dot(lq1, lk1, dh)) - std::exp(dot(lq2, lk2, dh)) + lambda_init);
}

template <typename T>
void diff_lambda_backward(const T* lq1, const T* lk1, const T* lq2, const T* lk2, int64_t dh,
                          T dlambda, T* dlq1, T* dlk1, T* dlq2, T* dlk2) {
  T e1 = T(std::exp(dot(lq1, lk1, dh))), e2 = T(std::exp(dot(lq2, lk2, dh)));
  for (int64_t c = 0; c < dh; ++c) {
    dlq1[c] += dlambda * e1 * lk1[c];
    dlk1[c] += dlambda * e1 * lq1[c];
    dlq2[c] -= dlambda * e2 * lk2[c];
    dlk2[c] -= dlambda * e2 * lq2[c];
  }
}

template <typename T>
void diff_attention_forward(const T* q, const T* k, const T* v, T lambda, T* out, T* lse,
                            int64_t B, int64_t S, int64_t h, int64_t h_kv, int64_t dh) {
  const int64_t group = h / h_kv, dv = 2 * dh;
  const double scale = 1.0 / std::sqrt(double(dh));
  const int64_t q_stride = h * 2 * dh, k_stride = h_kv * 2 * dh, v_stride = h_kv * dv;
  // (b, head) pairs are independent: spread over threads (OpenMP), results unchanged.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < h; ++i) {
      const int64_t g = i / group;
      std::vector<double> p1(S), p2(S), acc(dv);
      for (int64_t t = 0; t < S; ++t) {
        const T* qt = q + (b * S + t) * q_stride + i * 2 * dh;
        const T* kb = k + b * S * k_stride + g * 2 * dh;
        T l1 = detail::causal_softmax_row(qt, kb, k_stride, t, dh, scale, p1.data());
        T l2 = detail::causal_softmax_row(qt + dh, kb + dh, k_stride, t, dh, scale, p2.data());
        lse[((b * h + i) * 2 + 0) * S + t] = l1;
        lse[((b * h + i) * 2 + 1) * S + t] = l2;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t u = 0; u <= t; ++u) {
          double a = p1[u] - double(lambda) * p2[u];
          const T* vu = v + (b * S + u) * v_stride + g * dv;
          for (int64_t c = 0; c < dv; ++c) acc[c] += a * double(vu[c]);
        }
        T* o = out + (b * S + t) * q_stride + i * dv;
        for (int64_t c = 0; c < dv; ++c) o[c] = T(acc[c]);
      }
    }
}

// With dP_1 = dO V^T, dP_2 = -lambda dO V^T and D_j = rowsum(P_j o dP_j):
// dS_j = P_j o (dP_j - D_j); dQ_j = scale dS_j K_j; dK_j = scale dS_j^T Q_j;
// dV = (P_1 - lambda P_2)^T dO; dlambda = -sum(dO o (P_2 V)).
template <typename T>
void diff_attention_backward(const T* q, const T* k, const T* v, T lambda, const T* lse,
                             const T* dout, T* dq, T* dk, T* dv_out, T* dlambda, int64_t B,
                             int64_t S, int64_t h, int64_t h_kv, int64_t dh) {
  const int64_t group = h / h_kv, dv = 2 * dh;
  const double scale = 1.0 / std::sqrt(double(dh));
  const int64_t q_stride = h * 2 * dh, k_stride = h_kv * 2 * dh, v_stride = h_kv * dv;
  std::fill(dq, dq + B * S * q_stride, T(0));
  std::fill(dk, dk + B * S * k_stride, T(0));
  std::fill(dv_out, dv_out + B * S * v_stride, T(0));
  // (b, group) pairs write disjoint dq/dk/dv rows: spread over threads (OpenMP). Inside, the
  // heads of the group and the queries run in order, and the per-pair dlambda partials are
  // summed in (b, group) order afterwards: the same result for any thread count.
  std::vector<double> dlam_part(B * h_kv, 0.0);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < h_kv; ++g) {
      std::vector<double> p1(S), p2(S), dov(S);
      double& dlam = dlam_part[b * h_kv + g];
      for (int64_t i = g * group; i < (g + 1) * group; ++i)
        for (int64_t t = 0; t < S; ++t) {
          const T* qt = q + (b * S + t) * q_stride + i * 2 * dh;
          const T* kb = k + b * S * k_stride + g * 2 * dh;
          const T* vb = v + b * S * v_stride + g * dv;
          const T* dot_row = dout + (b * S + t) * q_stride + i * dv;
          detail::causal_probs_from_lse(qt, kb, k_stride, t, dh, scale,
                                        double(lse[((b * h + i) * 2 + 0) * S + t]), p1.data());
          detail::causal_probs_from_lse(qt + dh, kb + dh, k_stride, t, dh, scale,
                                        double(lse[((b * h + i) * 2 + 1) * S + t]), p2.data());
          double D1 = 0, D2 = 0;
          for (int64_t u = 0; u <= t; ++u) {
            dov[u] = dot(dot_row, vb + u * v_stride, dv);
            D1 += p1[u] * dov[u];
            D2 += p2[u] * dov[u];
          }
          dlam -= D2;
          D2 *= -double(lambda);
          T* dqt = dq + (b * S + t) * q_stride + i * 2 * dh;
          for (int64_t u = 0; u <= t; ++u) {
            double ds1 = p1[u] * (dov[u] - D1);
            double ds2 = p2[u] * (-double(lambda) * dov[u] - D2);
            const T* ku = kb + u * k_stride;
            T* dku = dk + (b * S + u) * k_stride + g * 2 * dh;
            for (int64_t c = 0; c < dh; ++c) {
              dqt[c] += T(scale * ds1 * double(ku[c]));
              dqt[dh + c] += T(scale * ds2 * double(ku[dh + c]));
              dku[c] += T(scale * ds1 * double(qt[c]));
              dku[dh + c] += T(scale * ds2 * double(qt[dh + c]));
            }
            double a = p1[u] - double(lambda) * p2[u];
            T* dvu = dv_out + (b * S + u) * v_stride + g * dv;
            for (int64_t c = 0; c < dv; ++c) dvu[c] += T(a * double(dot_row[c]));
          }
        }
    }
  double dlam = 0;
  for (double x : dlam_part) dlam += x;
  *dlambda = T(dlam);
}

#define INSTANTIATE(T)                                                                        \
  template T diff_lambda_forward<T>(const T*, const T*, const T*, const T*, int64_t, double);  \
  template void diff_lambda_backward<T>(const T*, const T*, const T*, const T*, int64_t, T, T*, \
                                        T*, T*, T*);                                           \
  template void diff_attention_forward<T>(const T*, const T*, const T*, T, T*, T*, int64_t,     \
                                          int64_t, int64_t, int64_t, int64_t);                 \
  template void diff_attention_backward<T>(const T*, const T*, const T*, T, const T*, const T*, \
                                           T*, T*, T*, T*, int64_t, int64_t, int64_t, int64_t, \
                                           int64_t);
INSTANTIATE(float)
INSTANTIATE(double)

}  // namespace difftron::cpu
