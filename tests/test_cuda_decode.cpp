// The CUDA kernel of Ops::cached_attention against the CPU reference (f64) on random inputs:
// both variants, GQA, several sequences at different positions, one new token (decode) and
// several (prompt chunks), f32 and bf16. The GPU's inputs (after rounding to its dtype) are
// given to the CPU; outputs are poisoned first. Compared by ||gpu - ref|| / ||ref|| for the
// output and for the cache rows written; the rows not written must keep their values. Then the
// whole decoder on the GPU (bf16) against Model::last_logits on the GPU. Exits 77 (skipped)
// when no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "base/rng.h"
#include "core/decode.h"
#include "core/model.h"
#include "kernels/ops.h"

namespace difftron {
namespace {

void skip_without_gpu() {
  if (!cuda_available()) {
    std::fprintf(stderr, "test_cuda_decode: no GPU visible (cuda_available() is false): skipping\n");
    std::exit(77);
  }
}

double rel_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

struct Case {
  const char* name;
  bool diff;
  int64_t B, T, C, heads, kv_heads, dh;
  DType dtype;
};

class CachedAttention : public ::testing::TestWithParam<Case> {};

TEST_P(CachedAttention, MatchesTheCpuReference) {
  skip_without_gpu();
  const Case& c = GetParam();
  auto gpu = make_cuda_ops(0);
  auto cpu = make_cpu_ops();
  Rng rng(17);
  const int64_t M = c.diff ? 2 : 1;
  const Shape qs = c.diff ? Shape{c.B, c.T, c.heads, 2, c.dh} : Shape{c.B, c.T, c.heads, c.dh};
  const Shape ks = c.diff ? Shape{c.B, c.T, c.kv_heads, 2, c.dh} : Shape{c.B, c.T, c.kv_heads, c.dh};
  const Shape vs = c.diff ? Shape{c.B, c.T, c.kv_heads, 2 * c.dh} : ks;
  const Shape kcs = c.diff ? Shape{c.B, c.C, c.kv_heads, 2, c.dh} : Shape{c.B, c.C, c.kv_heads, c.dh};
  const Shape vcs = c.diff ? Shape{c.B, c.C, c.kv_heads, 2 * c.dh} : kcs;
  const int64_t kv_row = c.kv_heads * M * c.dh;
  // positions: sequence b starts at a different place; the last one ends at the cache's end
  std::vector<int32_t> start(c.B);
  for (int64_t b = 0; b < c.B; ++b) start[b] = int32_t((c.C - c.T) * (b + 1) / c.B - (b * 7) % 3 * (b + 1 < c.B));
  // random values on the GPU, read back as the GPU holds them, then the same on the CPU
  auto make = [&](const Shape& s, double scale) {
    std::vector<double> host(shape_numel(s));
    for (auto& x : host) x = scale * rng.normal();
    Tensor g = gpu->empty(s, c.dtype);
    gpu->upload(g, host.data());
    gpu->download(g, host.data());
    Tensor h = cpu->empty(s, DType::F64);
    cpu->upload(h, host.data());
    return std::make_pair(g, h);
  };
  auto [q_g, q_c] = make(qs, 1.0);
  auto [k_g, k_c] = make(ks, 1.0);
  auto [v_g, v_c] = make(vs, 1.0);
  auto [kc_g, kc_c] = make(kcs, 1.0);  // earlier rows: the context
  auto [vc_g, vc_c] = make(vcs, 1.0);
  std::vector<double> kc_before(kc_g.numel());
  gpu->download(kc_g, kc_before.data());
  Tensor start_g = gpu->empty({c.B}, DType::I32), start_c = cpu->empty({c.B}, DType::I32);
  gpu->upload(start_g, start.data());
  cpu->upload(start_c, start.data());
  const double lam = 0.37;
  Tensor lam_g, lam_c;
  if (c.diff) {
    lam_g = gpu->empty({1}, DType::F32);
    lam_c = cpu->empty({1}, DType::F64);
    gpu->upload(lam_g, &lam);
    cpu->upload(lam_c, &lam);
  }
  Tensor out_g = gpu->empty(qs, c.dtype), out_c = cpu->empty(qs, DType::F64);
  std::vector<double> nan(out_g.numel(), std::numeric_limits<double>::quiet_NaN());
  gpu->upload(out_g, nan.data());
  const double theta = 10000.0;
  gpu->cached_attention(q_g, k_g, v_g, start_g, lam_g, theta, kc_g, vc_g, out_g);
  cpu->cached_attention(q_c, k_c, v_c, start_c, lam_c, theta, kc_c, vc_c, out_c);

  const double tol = c.dtype == DType::BF16 ? 1e-2 : 2e-5;
  std::vector<double> og(out_g.numel()), oc(out_c.numel());
  gpu->download(out_g, og.data());
  cpu->download(out_c, oc.data());
  const double err = rel_l2(og, oc);
  EXPECT_LT(err, tol) << "out";
  // the check can fail: the output depends on lambda / on the query
  std::vector<double> shifted(oc);
  for (size_t i = 0; i < shifted.size(); i += 3) shifted[i] += 0.1;
  EXPECT_GT(rel_l2(shifted, oc), 10 * tol);
  for (const auto& [g, h, name] : {std::make_tuple(kc_g, kc_c, "k_cache"), std::make_tuple(vc_g, vc_c, "v_cache")}) {
    std::vector<double> a(g.numel()), r(h.numel());
    gpu->download(g, a.data());
    cpu->download(h, r.data());
    std::vector<double> aw, rw;  // the rows written
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t t = 0; t < c.T; ++t)
        for (int64_t e = 0; e < kv_row; ++e) {
          const int64_t i = (b * c.C + start[b] + t) * kv_row + e;
          aw.push_back(a[i]);
          rw.push_back(r[i]);
        }
    EXPECT_LT(rel_l2(aw, rw), tol) << name;
    int64_t changed = 0;  // every other row keeps its value
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t p = 0; p < c.C; ++p) {
        if (p >= start[b] && p < start[b] + c.T) continue;
        for (int64_t e = 0; e < kv_row; ++e) {
          const int64_t i = (b * c.C + p) * kv_row + e;
          const double before = std::string(name) == "k_cache" ? kc_before[i] : r[i];
          changed += a[i] != before;
        }
      }
    EXPECT_EQ(changed, 0) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CachedAttention,
    ::testing::Values(Case{"diff_decode_bf16", true, 3, 1, 37, 4, 2, 128, DType::BF16},
                      Case{"diff_decode_f32", true, 3, 1, 37, 4, 2, 64, DType::F32},
                      Case{"diff_prefill_bf16", true, 2, 9, 40, 2, 1, 128, DType::BF16},
                      Case{"diff_long_bf16", true, 1, 1, 700, 8, 8, 128, DType::BF16},
                      Case{"diff_dh96_f32", true, 2, 3, 20, 3, 3, 96, DType::F32},
                      Case{"standard_decode_bf16", false, 4, 1, 33, 8, 2, 128, DType::BF16},
                      Case{"standard_prefill_f32", false, 2, 6, 25, 4, 4, 64, DType::F32},
                      Case{"standard_dh256_f32", false, 1, 2, 10, 2, 1, 256, DType::F32}),
    [](const ::testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// The whole decoder on the GPU (bf16 mixed precision): logits of every position against the
// full forward pass on the GPU, within bf16 tolerance.
TEST(CudaDecoder, MatchesTheFullForwardInBf16) {
  skip_without_gpu();
  auto ops = make_cuda_ops(0);
  for (AttentionKind kind : {AttentionKind::Differential, AttentionKind::Standard, AttentionKind::DifferentialV2}) {
    SCOPED_TRACE(attention_kind_name(kind));
    ModelConfig cfg;
    cfg.vocab_size = 200;
    cfg.d_model = 256;
    cfg.n_layers = 2;
    cfg.n_heads = 2;
    cfg.n_kv_heads = 1;
    cfg.head_dim = 64;
    cfg.ffn_dim = 384;
    cfg.max_seq_len = 40;
    cfg.init_std = 0.05;
    cfg.attention = kind;
    Model model(cfg, *ops, ModelPrecision::cuda_mixed(), 1, cfg.max_seq_len);
    model.init_weights(3);
    Decoder dec(model, 1, cfg.max_seq_len);
    Rng rng(5);
    std::vector<int32_t> toks(30);
    for (auto& t : toks) t = int32_t(rng.below(uint64_t(cfg.vocab_size)));
    std::vector<float> got = dec.append(0, 1, 12, toks.data());
    double worst = 0;
    for (int64_t t = 12; t <= int64_t(toks.size()); ++t) {
      if (t > 12) got = dec.step(1, &toks[t - 1]);
      std::vector<float> want = model.last_logits(toks.data(), t);
      std::vector<double> a(got.begin(), got.end()), b(want.begin(), want.end());
      worst = std::max(worst, rel_l2(a, b));
    }
    EXPECT_LT(worst, 2e-2);
  }
}

}  // namespace
}  // namespace difftron
