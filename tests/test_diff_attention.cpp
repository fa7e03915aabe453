// Differential attention (and the baseline's attention) against an independent naive
// computation that materialises the full S x S attention matrices, with and without GQA.
// Also: the lambda formula and lambda_init per layer.
#include <cmath>
#include <limits>
#include <vector>

#include <gtest/gtest.h>

#include "core/config.h"
#include "kernels/cpu/reference.h"
#include "tests/grad_check.h"

namespace difftron {
namespace {

using namespace difftron::testing;
using V = std::vector<double>;
using Mat = std::vector<std::vector<double>>;

// Row-wise causal softmax of (Q K^T) * scale; Q, K are [S][dh].
Mat causal_softmax(const Mat& Q, const Mat& K, double scale) {
  const size_t S = Q.size();
  Mat A(S, V(S, 0.0));
  for (size_t t = 0; t < S; ++t) {
    V s(S, -std::numeric_limits<double>::infinity());
    double mx = -std::numeric_limits<double>::infinity();
    for (size_t u = 0; u <= t; ++u) {
      s[u] = 0;
      for (size_t c = 0; c < Q[t].size(); ++c) s[u] += Q[t][c] * K[u][c];
      s[u] *= scale;
      mx = std::max(mx, s[u]);
    }
    double z = 0;
    for (size_t u = 0; u <= t; ++u) z += std::exp(s[u] - mx);
    for (size_t u = 0; u <= t; ++u) A[t][u] = std::exp(s[u] - mx) / z;
  }
  return A;
}

struct Case { int64_t B, S, h, h_kv, dh; };
class DiffAttentionNaive : public ::testing::TestWithParam<Case> {};

TEST_P(DiffAttentionNaive, MatchesMaterialisedMatrices) {
  auto [B, S, h, h_kv, dh] = GetParam();
  V q = randn(B * S * h * 2 * dh, 101), k = randn(B * S * h_kv * 2 * dh, 102);
  V v = randn(B * S * h_kv * 2 * dh, 103);
  const double lambda = 0.42, scale = 1.0 / std::sqrt(double(dh));
  V out(B * S * h * 2 * dh), lse(B * h * 2 * S);
  cpu::diff_attention_forward(q.data(), k.data(), v.data(), lambda, out.data(), lse.data(), B, S, h, h_kv, dh);

  double max_err = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < h; ++i) {
      const int64_t g = i * h_kv / h;  // the group of diff head i
      Mat Q1(S, V(dh)), Q2(S, V(dh)), K1(S, V(dh)), K2(S, V(dh)), Vg(S, V(2 * dh));
      for (int64_t t = 0; t < S; ++t)
        for (int64_t c = 0; c < dh; ++c) {
          Q1[t][c] = q[(((b * S + t) * h + i) * 2 + 0) * dh + c];
          Q2[t][c] = q[(((b * S + t) * h + i) * 2 + 1) * dh + c];
          K1[t][c] = k[(((b * S + t) * h_kv + g) * 2 + 0) * dh + c];
          K2[t][c] = k[(((b * S + t) * h_kv + g) * 2 + 1) * dh + c];
        }
      for (int64_t t = 0; t < S; ++t)
        for (int64_t c = 0; c < 2 * dh; ++c) Vg[t][c] = v[((b * S + t) * h_kv + g) * 2 * dh + c];
      Mat A1 = causal_softmax(Q1, K1, scale), A2 = causal_softmax(Q2, K2, scale);
      for (int64_t t = 0; t < S; ++t) {
        for (int64_t c = 0; c < 2 * dh; ++c) {
          double o = 0;
          for (int64_t u = 0; u < S; ++u) o += (A1[t][u] - lambda * A2[t][u]) * Vg[u][c];
          max_err = std::max(max_err, std::abs(o - out[((b * S + t) * h + i) * 2 * dh + c]));
        }
        // the saved log-sum-exp of map 1
        double mx = -1e300, z = 0;
        V s(t + 1);
        for (int64_t u = 0; u <= t; ++u) {
          s[u] = 0;
          for (int64_t c = 0; c < dh; ++c) s[u] += Q1[t][c] * K1[u][c] * scale;
          mx = std::max(mx, s[u]);
        }
        for (int64_t u = 0; u <= t; ++u) z += std::exp(s[u] - mx);
        EXPECT_NEAR(lse[((b * h + i) * 2 + 0) * S + t], mx + std::log(z), 1e-12);
      }
    }
  EXPECT_LT(max_err, 1e-12);
}

INSTANTIATE_TEST_SUITE_P(Shapes, DiffAttentionNaive,
                         ::testing::Values(Case{2, 7, 2, 2, 4},    // no GQA
                                           Case{1, 9, 4, 2, 8},    // GQA: two heads per group
                                           Case{2, 5, 6, 2, 4},    // three heads per group
                                           Case{1, 4, 4, 1, 6}));  // one group for all heads

TEST(DiffAttentionNaive, LambdaZeroReducesToOrdinaryAttentionOfMapOne) {
  // With lambda = 0, differential attention is plain causal attention of map 1 over the 2dh-wide V.
  const int64_t B = 1, S = 6, h = 2, h_kv = 1, dh = 4;
  V q = randn(B * S * h * 2 * dh, 111), k = randn(B * S * h_kv * 2 * dh, 112), v = randn(B * S * 2 * dh, 113);
  V out(B * S * h * 2 * dh), lse(B * h * 2 * S);
  cpu::diff_attention_forward(q.data(), k.data(), v.data(), 0.0, out.data(), lse.data(), B, S, h, h_kv, dh);
  // expectation: softmax over map 1's scores only, applied to the full 2dh-wide V
  for (int64_t i = 0; i < h; ++i)
    for (int64_t t = 0; t < S; ++t) {
      V p(S, 0.0);
      double z = 0;
      for (int64_t u = 0; u <= t; ++u) {
        double s = 0;
        for (int64_t c = 0; c < dh; ++c) s += q[((t * h + i) * 2) * dh + c] * k[(u * 2) * dh + c];
        p[u] = std::exp(s / std::sqrt(double(dh)));
        z += p[u];
      }
      for (int64_t c = 0; c < 2 * dh; ++c) {
        double o = 0;
        for (int64_t u = 0; u <= t; ++u) o += p[u] / z * v[u * 2 * dh + c];
        EXPECT_NEAR(out[(t * h + i) * 2 * dh + c], o, 1e-12);
      }
    }
}

class StandardAttentionNaive : public ::testing::TestWithParam<Case> {};

TEST_P(StandardAttentionNaive, MatchesMaterialisedMatrices) {
  auto [B, S, H, Hkv, dh] = GetParam();
  V q = randn(B * S * H * dh, 121), k = randn(B * S * Hkv * dh, 122), v = randn(B * S * Hkv * dh, 123);
  V out(q.size()), lse(B * H * S);
  cpu::attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), B, S, H, Hkv, dh);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < H; ++i) {
      const int64_t g = i * Hkv / H;
      Mat Q(S, V(dh)), K(S, V(dh));
      for (int64_t t = 0; t < S; ++t)
        for (int64_t c = 0; c < dh; ++c) {
          Q[t][c] = q[((b * S + t) * H + i) * dh + c];
          K[t][c] = k[((b * S + t) * Hkv + g) * dh + c];
        }
      Mat A = causal_softmax(Q, K, 1.0 / std::sqrt(double(dh)));
      for (int64_t t = 0; t < S; ++t)
        for (int64_t c = 0; c < dh; ++c) {
          double o = 0;
          for (int64_t u = 0; u < S; ++u) o += A[t][u] * v[((b * S + u) * Hkv + g) * dh + c];
          EXPECT_NEAR(out[((b * S + t) * H + i) * dh + c], o, 1e-12);
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Shapes, StandardAttentionNaive,
                         ::testing::Values(Case{2, 7, 4, 4, 4}, Case{1, 9, 4, 2, 8}, Case{1, 5, 6, 1, 4}));

TEST(Lambda, InitFollowsThePaperPerLayer) {
  // lambda_init = 0.8 - 0.6 exp(-0.3 l), l 0-based
  const double expected[] = {0.2, 0.8 - 0.6 * 0.7408182206817179, 0.8 - 0.6 * 0.5488116360940264,
                             0.8 - 0.6 * 0.4065696597405991};
  for (int l = 0; l < 4; ++l) EXPECT_NEAR(ModelConfig::lambda_init(l), expected[l], 1e-15) << l;
  EXPECT_NEAR(ModelConfig::lambda_init(100), 0.8, 1e-12);
}

TEST(Lambda, ReparameterisationFormula) {
  V lq1 = {0.1, -0.2, 0.3, 0.05}, lk1 = {0.4, 0.1, -0.2, 0.3}, lq2 = {-0.3, 0.2, 0.1, 0.0},
    lk2 = {0.2, 0.2, 0.2, -0.1};
  // <lq1,lk1> = 0.04 - 0.02 - 0.06 + 0.015 = -0.025; <lq2,lk2> = -0.06 + 0.04 + 0.02 + 0 = 0
  double expected = std::exp(-0.025) - std::exp(0.0) + 0.2;
  EXPECT_NEAR(cpu::diff_lambda_forward(lq1.data(), lk1.data(), lq2.data(), lk2.data(), 4, 0.2), expected, 1e-15);
}

}  // namespace
}  // namespace difftron
