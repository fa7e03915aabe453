// Every CPU reference op's backward against fp64 central finite differences of its forward,
// on fresh random inputs. Loss = <forward output, R> with a random R, so dL/dout = R.
#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "base/error.h"
#include "kernels/cpu/diff_v2_combine.h"
#include "kernels/cpu/reference.h"
#include "kernels/ops.h"
#include "tests/grad_check.h"

namespace difftron {
namespace {

using namespace difftron::testing;
using V = std::vector<double>;

TEST(OpGrad, RmsNorm) {
  const int64_t rows = 5, cols = 12;
  const double scale = 0.7, eps = 1e-5;
  V x = randn(rows * cols, 1), w = randn(cols, 2), R = randn(rows * cols, 3);
  auto loss = [&] {
    V y(rows * cols), rs(rows);
    cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rs.data(), rows, cols, eps, scale);
    return dot(y, R);
  };
  V y(rows * cols), rs(rows), dx = randn(rows * cols, 4), dw(cols, 0.0);
  V dx0 = dx;  // backward accumulates into dx: the residual add
  cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rs.data(), rows, cols, eps, scale);
  cpu::rmsnorm_backward(x.data(), w.data(), rs.data(), R.data(), dx.data(), dw.data(), rows, cols, scale);
  for (size_t i = 0; i < dx.size(); ++i) dx[i] -= dx0[i];
  expect_grad("rmsnorm dx", dx, numeric_grad(loss, x));
  expect_grad("rmsnorm dw", dw, numeric_grad(loss, w));
}

TEST(OpGrad, Embedding) {
  const int64_t vocab = 7, d = 5, n = 9;
  std::vector<int32_t> tok = {3, 0, 6, 3, 3, 1, 6, 2, 5};  // repeats exercise the scatter-add
  V table = randn(vocab * d, 5), R = randn(n * d, 6);
  auto loss = [&] {
    V out(n * d);
    cpu::embedding_forward(tok.data(), table.data(), out.data(), n, d, vocab);
    return dot(out, R);
  };
  V dtable(vocab * d, 0.0);
  cpu::embedding_backward(tok.data(), R.data(), dtable.data(), n, d, vocab);
  expect_grad("embedding dtable", dtable, numeric_grad(loss, table));
}

TEST(OpGrad, EmbeddingRejectsOutOfRangeToken) {
  std::vector<int32_t> tok = {1, 7};
  V table(7 * 2), out(4);
  EXPECT_THROW(cpu::embedding_forward(tok.data(), table.data(), out.data(), 2, 2, 7), std::exception);
}

TEST(OpGrad, Rope) {
  const int64_t B = 2, S = 5, H = 3, dh = 8;
  V x = randn(B * S * H * dh, 7), R = randn(B * S * H * dh, 8);
  auto loss = [&] {
    V y = x;
    cpu::rope(y.data(), B, S, H, dh, 10000.0, false);
    return dot(y, R);
  };
  V g = R;
  cpu::rope(g.data(), B, S, H, dh, 10000.0, true);
  expect_grad("rope dx", g, numeric_grad(loss, x));
}

TEST(OpGrad, SwiGLU) {
  const int64_t n = 40;
  V gate = randn(n, 9, 2.0), up = randn(n, 10), R = randn(n, 11);
  auto loss = [&] {
    V out(n);
    cpu::swiglu_forward(gate.data(), up.data(), out.data(), n);
    return dot(out, R);
  };
  V dg(n), du(n);
  cpu::swiglu_backward(gate.data(), up.data(), R.data(), dg.data(), du.data(), n);
  expect_grad("swiglu dgate", dg, numeric_grad(loss, gate));
  expect_grad("swiglu dup", du, numeric_grad(loss, up));
}

TEST(OpGrad, CrossEntropy) {
  const int64_t n = 5, vocab = 9;
  std::vector<int32_t> tg = {3, -1, 8, 0, 3};
  V logits = randn(n * vocab, 12, 2.0);
  const double dloss = 0.37;
  auto loss = [&] {
    V l(n), lse(n);
    cpu::cross_entropy_forward(logits.data(), tg.data(), l.data(), lse.data(), n, vocab);
    double s = 0;
    for (double v : l) s += v;
    return dloss * s;
  };
  V l(n), lse(n), d(n * vocab);
  cpu::cross_entropy_forward(logits.data(), tg.data(), l.data(), lse.data(), n, vocab);
  EXPECT_EQ(l[1], 0.0) << "ignored target must contribute no loss";
  // independent forward check: -log softmax at the target
  double mx = -1e300, sum = 0;
  for (int64_t c = 0; c < vocab; ++c) mx = std::max(mx, logits[2 * vocab + c]);
  for (int64_t c = 0; c < vocab; ++c) sum += std::exp(logits[2 * vocab + c] - mx);
  EXPECT_NEAR(l[2], -(logits[2 * vocab + 8] - mx - std::log(sum)), 1e-12);
  cpu::cross_entropy_backward(logits.data(), tg.data(), lse.data(), dloss, d.data(), n, vocab);
  expect_grad("cross_entropy dlogits", d, numeric_grad(loss, logits));
}

TEST(OpGrad, DiffLambda) {
  const int64_t dh = 6;
  V lq1 = randn(dh, 13, 0.3), lk1 = randn(dh, 14, 0.3), lq2 = randn(dh, 15, 0.3), lk2 = randn(dh, 16, 0.3);
  const double li = 0.5, c = 1.7;
  auto loss = [&] {
    return c * cpu::diff_lambda_forward(lq1.data(), lk1.data(), lq2.data(), lk2.data(), dh, li);
  };
  // the formula itself, computed independently
  double e1 = std::exp(dot(lq1, lk1)), e2 = std::exp(dot(lq2, lk2));
  EXPECT_NEAR(loss() / c, e1 - e2 + li, 1e-12);
  V g1(dh, 0.0), g2(dh, 0.0), g3(dh, 0.0), g4(dh, 0.0);
  cpu::diff_lambda_backward(lq1.data(), lk1.data(), lq2.data(), lk2.data(), dh, c, g1.data(), g2.data(),
                            g3.data(), g4.data());
  expect_grad("lambda dlq1", g1, numeric_grad(loss, lq1));
  expect_grad("lambda dlk1", g2, numeric_grad(loss, lk1));
  expect_grad("lambda dlq2", g3, numeric_grad(loss, lq2));
  expect_grad("lambda dlk2", g4, numeric_grad(loss, lk2));
}

struct AttnCase { int64_t B, S, h, h_kv, dh; };

class DiffAttentionGrad : public ::testing::TestWithParam<AttnCase> {};

TEST_P(DiffAttentionGrad, MatchesFiniteDifferences) {
  auto [B, S, h, h_kv, dh] = GetParam();
  V q = randn(B * S * h * 2 * dh, 17), k = randn(B * S * h_kv * 2 * dh, 18);
  V v = randn(B * S * h_kv * 2 * dh, 19), R = randn(B * S * h * 2 * dh, 20);
  double lambda = 0.63;
  auto loss = [&] {
    V out(B * S * h * 2 * dh), lse(B * h * 2 * S);
    cpu::diff_attention_forward(q.data(), k.data(), v.data(), lambda, out.data(), lse.data(), B, S, h, h_kv, dh);
    return dot(out, R);
  };
  V out(q.size()), lse(B * h * 2 * S), dq(q.size()), dk(k.size()), dv(v.size());
  double dlambda = 0;
  cpu::diff_attention_forward(q.data(), k.data(), v.data(), lambda, out.data(), lse.data(), B, S, h, h_kv, dh);
  cpu::diff_attention_backward(q.data(), k.data(), v.data(), lambda, lse.data(), R.data(), dq.data(),
                               dk.data(), dv.data(), &dlambda, B, S, h, h_kv, dh);
  expect_grad("diff_attention dq", dq, numeric_grad(loss, q));
  expect_grad("diff_attention dk", dk, numeric_grad(loss, k));
  expect_grad("diff_attention dv", dv, numeric_grad(loss, v));
  V lam = {lambda};
  auto loss_lam = [&] { lambda = lam[0]; return loss(); };
  V n = numeric_grad(loss_lam, lam);
  lambda = lam[0];
  expect_grad("diff_attention dlambda", {dlambda}, n);
}

INSTANTIATE_TEST_SUITE_P(Shapes, DiffAttentionGrad,
                         ::testing::Values(AttnCase{2, 5, 2, 2, 4},    // MHA
                                           AttnCase{1, 6, 4, 2, 4},    // GQA, 2 heads per group
                                           AttnCase{2, 3, 3, 1, 2}));  // all heads share one group

TEST(OpGrad, StandardAttentionGQA) {
  const int64_t B = 2, S = 5, H = 4, Hkv = 2, dh = 4;
  V q = randn(B * S * H * dh, 21), k = randn(B * S * Hkv * dh, 22), v = randn(B * S * Hkv * dh, 23);
  V R = randn(B * S * H * dh, 24);
  auto loss = [&] {
    V out(q.size()), lse(B * H * S);
    cpu::attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), B, S, H, Hkv, dh);
    return dot(out, R);
  };
  V out(q.size()), lse(B * H * S), dq(q.size()), dk(k.size()), dv(v.size());
  cpu::attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), B, S, H, Hkv, dh);
  cpu::attention_backward(q.data(), k.data(), v.data(), out.data(), lse.data(), R.data(), dq.data(),
                          dk.data(), dv.data(), B, S, H, Hkv, dh);
  expect_grad("attention dq", dq, numeric_grad(loss, q));
  expect_grad("attention dk", dk, numeric_grad(loss, k));
  expect_grad("attention dv", dv, numeric_grad(loss, v));
}

// Differential Transformer V2's subtraction: out[r, i] = att[r, 2i] - sigmoid(z[r, i]) att[r, 2i + 1].
TEST(OpGrad, DiffV2Combine) {
  const int64_t rows = 6, H = 3, dh = 5;
  V att = randn(rows * 2 * H * dh, 31), z = randn(rows * H, 32, 2.0), R = randn(rows * H * dh, 33);
  auto loss = [&] {
    V out(rows * H * dh);
    cpu::diff_v2_combine_forward(att.data(), z.data(), out.data(), rows, H, dh);
    return dot(out, R);
  };
  // the formula itself, element (row 4, pair 2, column 3), computed independently
  V out(rows * H * dh);
  cpu::diff_v2_combine_forward(att.data(), z.data(), out.data(), rows, H, dh);
  const double s = 1.0 / (1.0 + std::exp(-z[4 * H + 2]));
  EXPECT_NEAR(out[(4 * H + 2) * dh + 3],
              att[(4 * 2 * H + 2 * 2) * dh + 3] - s * att[(4 * 2 * H + 2 * 2 + 1) * dh + 3], 1e-12);
  V datt(att.size(), 7.0), dz(z.size(), 7.0);  // overwritten
  cpu::diff_v2_combine_backward(att.data(), z.data(), R.data(), datt.data(), dz.data(), rows, H, dh);
  expect_grad("diff_v2_combine datt", datt, numeric_grad(loss, att));
  expect_grad("diff_v2_combine dz", dz, numeric_grad(loss, z));
}

// The Ops methods (the CPU backend's default) agree with the raw reference and check shapes.
TEST(OpGrad, DiffV2CombineOpsChecksShapes) {
  auto ops = make_cpu_ops();
  const int64_t B = 2, S = 3, H = 2, dh = 4;
  Tensor att = ops->empty({B, S, 2 * H, dh}, DType::F64), z = ops->empty({B * S, H}, DType::F64);
  Tensor out = ops->empty({B, S, H, dh}, DType::F64);
  V a = randn(att.numel(), 34), zz = randn(z.numel(), 35);
  ops->upload(att, a.data());
  ops->upload(z, zz.data());
  ops->diff_v2_combine_forward(att, z, out);
  V got(out.numel()), want(out.numel());
  ops->download(out, got.data());
  cpu::diff_v2_combine_forward(a.data(), zz.data(), want.data(), B * S, H, dh);
  EXPECT_EQ(got, want);
  Tensor odd = ops->empty({B, S, 3, dh}, DType::F64);
  try {
    ops->diff_v2_combine_forward(odd, z, out);
    FAIL() << "an odd number of query heads was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("even number of query heads"), std::string::npos) << e.what();
  }
  Tensor z_bad = ops->empty({B * S, H + 1}, DType::F64);
  EXPECT_THROW(ops->diff_v2_combine_forward(att, z_bad, out), Error);
  Tensor z32 = ops->empty({B * S, H}, DType::F32);
  EXPECT_THROW(ops->diff_v2_combine_forward(att, z32, out), Error);
}

TEST(OpGrad, MatmulMatchesNaiveLoopsForEveryTranspose) {
  const int64_t M = 4, N = 5, K = 3;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      V a = randn(M * K, 25 + ta), b = randn(K * N, 27 + tb), y = randn(M * N, 29), y0 = y;
      cpu::matmul(a.data(), ta, b.data(), tb, y.data(), M, N, K, 0.5, 2.0);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          double s = 0;
          for (int64_t p = 0; p < K; ++p)
            s += (ta ? a[p * M + i] : a[i * K + p]) * (tb ? b[j * K + p] : b[p * N + j]);
          EXPECT_NEAR(y[i * N + j], 0.5 * s + 2.0 * y0[i * N + j], 1e-12) << ta << tb;
        }
    }
}

}  // namespace
}  // namespace difftron
