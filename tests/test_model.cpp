// The whole model: gradients of every parameter against fp64 finite differences (every
// attention variant: V1, the baseline and V2; GQA, tied and untied head), parameter counts,
// determinism, and a tiny model of each variant learning the synthetic copy task to near-zero
// loss on the CPU.
#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "core/decode.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "core/trainer.h"
#include "io/synthetic_data.h"
#include "tests/grad_check.h"

namespace difftron {
namespace {

using namespace difftron::testing;

ModelConfig tiny_config(AttentionKind kind, bool tie) {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 4;
  c.ffn_dim = 24;
  c.max_seq_len = 8;
  c.init_std = 0.3;   // large enough that every gradient is well above finite-difference noise
  c.lambda_std = 0.3;
  c.attention = kind;
  c.tie_embeddings = tie;
  return c;
}

struct GradCase {
  AttentionKind kind;
  bool tie;
  Recompute recompute = Recompute::None;
};
class ModelGrad : public ::testing::TestWithParam<GradCase> {};

TEST_P(ModelGrad, EveryParameterMatchesFiniteDifferences) {
  auto ops = make_cpu_ops();
  ModelConfig cfg = tiny_config(GetParam().kind, GetParam().tie);
  const int64_t B = 2, S = 5;
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F64), B, S, {}, GetParam().recompute);
  model.init_weights(7);
  std::vector<int32_t> tok = {1, 4, 9, 2, 2, 10, 0, 3, 5, 7};
  std::vector<int32_t> tgt = {4, 9, 2, -1, 6, 0, 3, 5, 7, 8};  // one ignored target
  const float scale = 0.8f;  // grads are of scale * mean loss
  model.zero_grads();
  model.forward_backward(tok.data(), tgt.data(), B, S, scale);

  for (auto& p : model.params()) {
    std::vector<double> w(p.value.numel()), g(p.grad.numel());
    ops->download(p.value, w.data());
    ops->download(p.grad, g.data());
    auto loss = [&] {
      ops->upload(p.value, w.data());
      return double(scale) * model.forward_loss(tok.data(), tgt.data(), B, S);
    };
    auto num = numeric_grad(loss, w, 1e-6);
    ops->upload(p.value, w.data());
    expect_grad(p.name, g, num, 1e-6);
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, ModelGrad,
                         ::testing::Values(GradCase{AttentionKind::Differential, false},
                                           GradCase{AttentionKind::Differential, true},
                                           GradCase{AttentionKind::Standard, false},
                                           // the backward's second pass (bit-identical to
                                           // the others: RecomputationGivesBitIdenticalGradients)
                                           GradCase{AttentionKind::Differential, false, Recompute::Full},
                                           // V2: 8 query heads in pairs over 2 K/V heads (GQA)
                                           GradCase{AttentionKind::DifferentialV2, false},
                                           GradCase{AttentionKind::DifferentialV2, true},
                                           GradCase{AttentionKind::DifferentialV2, false, Recompute::Full},
                                           GradCase{AttentionKind::DifferentialV2, false, Recompute::Selective}));

// Recomputation runs the same ops on the same inputs again, so the gradients (and the loss)
// are those of the run that kept everything, bit for bit; and the modes keep less.
TEST(Model, RecomputationGivesBitIdenticalGradients) {
  for (auto kind : {AttentionKind::Differential, AttentionKind::Standard, AttentionKind::DifferentialV2}) {
    SCOPED_TRACE(attention_kind_name(kind));
    ModelConfig cfg = tiny_config(kind, false);
    cfg.n_layers = 3;
    const int64_t B = 2, S = 8;
    std::vector<int32_t> tok(B * S), tok2(B * S), tgt(B * S);
    for (int64_t i = 0; i < B * S; ++i) {
      tok[i] = int32_t((i * 7 + 3) % cfg.vocab_size);
      tok2[i] = int32_t((i * 3 + 2) % cfg.vocab_size);
      tgt[i] = i % 5 == 4 ? -1 : int32_t((i * 5 + 1) % cfg.vocab_size);
    }
    std::vector<std::vector<float>> grads;
    std::vector<double> losses;
    for (Recompute r : {Recompute::None, Recompute::Selective, Recompute::Full}) {
      auto ops = make_cpu_ops();
      Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), B, S, {}, r);
      EXPECT_EQ(model.recompute(), r);
      model.init_weights(11);
      model.zero_grads();
      // two micro-batches: the second backward must not see the first one's leftovers
      model.forward_backward(tok.data(), tgt.data(), B, S, 0.5f);
      losses.push_back(model.forward_backward(tok2.data(), tgt.data(), B, S, 0.5f));
      std::vector<float> g(model.flat_grads().numel());
      ops->download(model.flat_grads(), g.data());
      grads.push_back(std::move(g));
    }
    for (size_t r = 1; r < grads.size(); ++r) {
      SCOPED_TRACE(recompute_name(Recompute(r)));
      EXPECT_EQ(losses[r], losses[0]);
      ASSERT_EQ(grads[r].size(), grads[0].size());
      int64_t differ = 0;
      for (size_t i = 0; i < grads[0].size(); ++i) differ += grads[r][i] != grads[0][i];
      EXPECT_EQ(differ, 0) << "of " << grads[0].size() << " gradient elements";
    }
  }
}

TEST(Model, ParameterCountMatchesConfigAndBaselineDiffersOnlyByLambdaAndSubln) {
  auto ops = make_cpu_ops();
  for (auto kind : {AttentionKind::Differential, AttentionKind::Standard, AttentionKind::DifferentialV2}) {
    ModelConfig cfg = tiny_config(kind, false);
    Model m(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 4);
    int64_t n = 0;
    for (auto& p : m.params()) n += p.value.numel();
    EXPECT_EQ(n, m.config().num_parameters());
  }
  ModelConfig d = tiny_config(AttentionKind::Differential, false), s = tiny_config(AttentionKind::Standard, false);
  d.resolve_and_validate();
  s.resolve_and_validate();
  // 4 lambda vectors of dh and a 2dh sub-layer norm weight per layer
  EXPECT_EQ(d.num_parameters() - s.num_parameters(), d.n_layers * 6 * d.head_dim);
  // V2 over the baseline: a second Wq (4h query heads) and W_lambda [2h, d] per layer
  ModelConfig v2 = tiny_config(AttentionKind::DifferentialV2, false);
  v2.resolve_and_validate();
  EXPECT_EQ(v2.num_parameters() - s.num_parameters(),
            v2.n_layers * (v2.d_model * v2.q_dim() + 2 * v2.n_heads * v2.d_model));
  // and its attention FLOPs are twice the baseline's (docs/MODEL.md section 4)
  const double dense_gap = 6.0 * double(v2.num_parameters() - s.num_parameters());
  EXPECT_DOUBLE_EQ(v2.flops_per_token(8) - s.flops_per_token(8) - dense_gap,
                   3.0 * v2.n_layers * 8 * 4.0 * v2.q_dim() / 2.0);
}

TEST(Model, DiffV2ParametersAndShapes) {
  auto ops = make_cpu_ops();
  Model m(tiny_config(AttentionKind::DifferentialV2, false), *ops, ModelPrecision::uniform(DType::F32), 1, 4);
  // d 16, h 2, h_kv 1, dh 4: 8 query heads, 2 K/V heads, 4 output heads of dh
  EXPECT_EQ(m.param("model.layers.0.self_attn.q_proj.weight").value.shape(), (Shape{32, 16}));
  EXPECT_EQ(m.param("model.layers.0.self_attn.k_proj.weight").value.shape(), (Shape{8, 16}));
  EXPECT_EQ(m.param("model.layers.0.self_attn.v_proj.weight").value.shape(), (Shape{8, 16}));
  EXPECT_EQ(m.param("model.layers.1.self_attn.lambda_proj.weight").value.shape(), (Shape{4, 16}));
  EXPECT_EQ(m.param("model.layers.0.self_attn.o_proj.weight").value.shape(), (Shape{16, 16}));
  EXPECT_THROW(m.param("model.layers.0.self_attn.lambda_q1"), Error);  // no V1 lambda vectors
  EXPECT_THROW(m.param("model.layers.0.self_attn.subln.weight"), Error);  // no sub-layer norm
  EXPECT_EQ(parse_attention_kind("diff_v2"), AttentionKind::DifferentialV2);
  EXPECT_STREQ(attention_kind_name(AttentionKind::DifferentialV2), "diff_v2");
}

// The two query heads of a pair must read one K/V head: 4h query heads over 2h_kv K/V heads in
// groups of 2h / h_kv, whole pairs exactly when h_kv divides h.
TEST(Model, DiffV2RefusesPairsThatStraddleKvGroups) {
  ModelConfig c = tiny_config(AttentionKind::DifferentialV2, false);
  c.n_heads = 3;  // 12 query heads over 4 K/V heads: groups of 3, pair (2, 3) straddles two
  c.n_kv_heads = 2;
  c.d_model = 24;
  try {
    c.resolve_and_validate();
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("n_heads (3) must be a multiple of n_kv_heads (2)"), std::string::npos) << w;
    EXPECT_NE(w.find("diff_v2 subtracts query heads 2i and 2i + 1, which must lie in one K/V group"),
              std::string::npos)
        << w;
  }
}

TEST(Model, HuggingFaceParameterNames) {
  auto ops = make_cpu_ops();
  Model m(tiny_config(AttentionKind::Differential, false), *ops, ModelPrecision::uniform(DType::F32), 1, 4);
  for (const char* name :
       {"model.embed_tokens.weight", "model.layers.1.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.lambda_k2",
        "model.layers.1.self_attn.subln.weight", "model.layers.1.post_attention_layernorm.weight",
        "model.layers.0.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"})
    EXPECT_NO_THROW(m.param(name)) << name;
  EXPECT_EQ(m.param("model.layers.0.self_attn.k_proj.weight").value.shape(), (Shape{8, 16}));
}

TEST(Model, RejectsBadBatchesWithClearErrors) {
  auto ops = make_cpu_ops();
  Model m(tiny_config(AttentionKind::Differential, false), *ops, ModelPrecision::uniform(DType::F32), 2, 4);
  std::vector<int32_t> tok(8, 1), tgt(8, 2);
  tok[5] = 11;  // vocab is 11
  try {
    m.forward_loss(tok.data(), tgt.data(), 2, 4);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 11 at index 5"), std::string::npos) << e.what();
  }
  tok[5] = 1;
  EXPECT_THROW(m.forward_loss(tok.data(), tgt.data(), 2, 5), Error);  // S beyond the instance
}

std::vector<double> train_copy(AttentionKind kind, int64_t steps, uint64_t seed) {
  auto ops = make_cpu_ops();
  ModelConfig cfg;
  cfg.vocab_size = 16;
  cfg.d_model = 64;
  cfg.n_layers = 2;
  cfg.n_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.max_seq_len = 32;
  cfg.attention = kind;
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 16, 32);
  model.init_weights(seed);
  OptimizerConfig oc;
  oc.lr = 3e-3;
  oc.warmup_steps = 20;
  oc.total_steps = steps;
  AdamW opt(oc, model);
  auto data = make_synthetic_source("copy", 16, seed);
  TrainOptions to;
  to.steps = steps;
  to.batch = 16;
  to.seq = 32;
  to.log_every = 100;
  Trainer trainer(model, opt, *data, nullptr, to);
  return trainer.run().losses;
}

TEST(Model, DiffTransformerLearnsCopyTask) {
  auto losses = train_copy(AttentionKind::Differential, 300, 11);
  EXPECT_GT(losses.front(), 2.0);  // ~ln(14) at the start
  EXPECT_LT(losses.back(), 0.02);
}

TEST(Model, BaselineTransformerLearnsCopyTask) {
  auto losses = train_copy(AttentionKind::Standard, 300, 12);
  EXPECT_GT(losses.front(), 2.0);
  EXPECT_LT(losses.back(), 0.02);
}

// V2's forward pass written out independently on the host (docs/MODEL.md section 5; the math
// of the authors' multihead_flashdiffv2.py with difftron's rotate-half RoPE): one layer, the
// logits of the last position.
TEST(Model, DiffV2ForwardMatchesAHandWrittenLayer) {
  auto ops = make_cpu_ops();
  ModelConfig cfg = tiny_config(AttentionKind::DifferentialV2, false);
  cfg.n_layers = 1;
  cfg.n_heads = 2;
  cfg.n_kv_heads = 1;  // 8 query heads over 2 K/V heads: query heads 0-3 read K/V head 0
  const int64_t S = 6;
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F64), 1, S);
  model.init_weights(21);
  auto get = [&](const std::string& n) {
    const Param& p = model.param(n);
    std::vector<double> w(p.value.numel());
    ops->download(p.value, w.data());
    return w;
  };
  const int64_t d = cfg.d_model, dh = cfg.head_dim, Hq = 4 * cfg.n_heads, Hkv = 2 * cfg.n_kv_heads;
  const int64_t H = 2 * cfg.n_heads, F = cfg.ffn_dim, V = cfg.vocab_size;
  const std::string p = "model.layers.0.";
  auto E = get("model.embed_tokens.weight"), Wq = get(p + "self_attn.q_proj.weight"),
       Wk = get(p + "self_attn.k_proj.weight"), Wv = get(p + "self_attn.v_proj.weight"),
       Wl = get(p + "self_attn.lambda_proj.weight"), Wo = get(p + "self_attn.o_proj.weight"),
       n1 = get(p + "input_layernorm.weight"), n2 = get(p + "post_attention_layernorm.weight"),
       Wg = get(p + "mlp.gate_proj.weight"), Wu = get(p + "mlp.up_proj.weight"),
       Wd = get(p + "mlp.down_proj.weight"), nf = get("model.norm.weight"), Wh = get("lm_head.weight");
  auto rmsnorm = [&](const std::vector<double>& x, const std::vector<double>& w) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double r = 1.0 / std::sqrt(ss / double(x.size()) + cfg.norm_eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * w[i];
    return y;
  };
  auto linear = [](const std::vector<double>& x, const std::vector<double>& W, int64_t rows) {
    const int64_t cols = int64_t(x.size());
    std::vector<double> y(rows, 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) y[r] += W[r * cols + c] * x[c];
    return y;
  };
  auto rope = [&](double* head, int64_t pos) {
    for (int64_t c = 0; c < dh / 2; ++c) {
      const double ang = double(pos) * std::pow(cfg.rope_theta, -2.0 * double(c) / double(dh));
      const double a = head[c], b = head[c + dh / 2];
      head[c] = a * std::cos(ang) - b * std::sin(ang);
      head[c + dh / 2] = b * std::cos(ang) + a * std::sin(ang);
    }
  };
  std::vector<int32_t> tok = {3, 1, 4, 1, 5, 9};
  std::vector<std::vector<double>> x(S), ln(S), q(S), k(S), v(S);
  for (int64_t s = 0; s < S; ++s) {
    x[s].assign(E.begin() + tok[s] * d, E.begin() + (tok[s] + 1) * d);
    ln[s] = rmsnorm(x[s], n1);
    q[s] = linear(ln[s], Wq, Hq * dh);
    k[s] = linear(ln[s], Wk, Hkv * dh);
    v[s] = linear(ln[s], Wv, Hkv * dh);
    for (int64_t j = 0; j < Hq; ++j) rope(&q[s][j * dh], s);
    for (int64_t g = 0; g < Hkv; ++g) rope(&k[s][g * dh], s);
  }
  const int64_t s = S - 1;  // the last position attends to all
  std::vector<double> o(Hq * dh, 0.0);
  for (int64_t j = 0; j < Hq; ++j) {
    const int64_t g = j / (Hq / Hkv);
    std::vector<double> sc(S);
    double mx = -1e300, sum = 0;
    for (int64_t t = 0; t <= s; ++t) {
      double dotp = 0;
      for (int64_t c = 0; c < dh; ++c) dotp += q[s][j * dh + c] * k[t][g * dh + c];
      sc[t] = dotp / std::sqrt(double(dh));
      mx = std::max(mx, sc[t]);
    }
    for (int64_t t = 0; t <= s; ++t) sum += sc[t] = std::exp(sc[t] - mx);
    for (int64_t t = 0; t <= s; ++t)
      for (int64_t c = 0; c < dh; ++c) o[j * dh + c] += sc[t] / sum * v[t][g * dh + c];
  }
  const std::vector<double> z = linear(ln[s], Wl, H);
  std::vector<double> att(H * dh);
  for (int64_t i = 0; i < H; ++i) {
    const double lambda = 1.0 / (1.0 + std::exp(-z[i]));
    for (int64_t c = 0; c < dh; ++c) att[i * dh + c] = o[(2 * i) * dh + c] - lambda * o[(2 * i + 1) * dh + c];
  }
  std::vector<double> xm = x[s], proj = linear(att, Wo, d);
  for (int64_t c = 0; c < d; ++c) xm[c] += proj[c];
  const std::vector<double> l2 = rmsnorm(xm, n2), gate = linear(l2, Wg, F), up = linear(l2, Wu, F);
  std::vector<double> act(F);
  for (int64_t f = 0; f < F; ++f) act[f] = gate[f] / (1.0 + std::exp(-gate[f])) * up[f];
  std::vector<double> down = linear(act, Wd, d);
  for (int64_t c = 0; c < d; ++c) xm[c] += down[c];
  const std::vector<double> want = linear(rmsnorm(xm, nf), Wh, V);
  const std::vector<float> got = model.last_logits(tok.data(), S);
  ASSERT_EQ(int64_t(got.size()), V);
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  ASSERT_GT(scale, 0.1);
  for (int64_t i = 0; i < V; ++i) EXPECT_NEAR(got[i], want[i], 1e-6 * scale) << "logit " << i;
}

// Generation with the K/V cache (core/decode.cpp) gives V2 the full forward's logits at every
// position: a prompt in one pass and in chunks, then tokens one by one.
TEST(Model, DiffV2DecoderMatchesTheFullForward) {
  auto ops = make_cpu_ops();
  ModelConfig cfg = tiny_config(AttentionKind::DifferentialV2, false);
  cfg.max_seq_len = 12;
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F64), 1, cfg.max_seq_len);
  model.init_weights(17);
  const std::vector<int32_t> toks = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8};
  auto rel = [](const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < b.size(); ++i) {
      num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
      den = std::max(den, std::fabs(double(b[i])));
    }
    return num / den;
  };
  for (int64_t rows : {64, 2}) {
    SCOPED_TRACE("max_rows " + std::to_string(rows));
    Decoder dec(model, 1, cfg.max_seq_len, rows);
    std::vector<float> got = dec.append(0, 1, 4, toks.data());
    double worst = rel(got, model.last_logits(toks.data(), 4));
    for (int64_t t = 4; t < int64_t(toks.size()); ++t) {
      got = dec.step(1, &toks[t]);
      worst = std::max(worst, rel(got, model.last_logits(toks.data(), t + 1)));
    }
    EXPECT_LT(worst, 1e-6);  // the logits come back as floats
    std::vector<int32_t> other = toks;
    other[1] = (other[1] + 1) % int32_t(cfg.vocab_size);
    EXPECT_GT(rel(got, model.last_logits(other.data(), int64_t(toks.size()))), 1e-4);
  }
}

TEST(Model, DiffV2TransformerLearnsCopyTask) {
  auto losses = train_copy(AttentionKind::DifferentialV2, 300, 13);
  EXPECT_GT(losses.front(), 2.0);
  EXPECT_LT(losses.back(), 0.02);
}

TEST(Model, SameSeedGivesBitIdenticalLosses) {
  auto a = train_copy(AttentionKind::Differential, 15, 5);
  auto b = train_copy(AttentionKind::Differential, 15, 5);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "step " << i;
  auto c = train_copy(AttentionKind::Differential, 15, 6);
  EXPECT_NE(a.back(), c.back());  // and a different seed does change them
}

}  // namespace
}  // namespace difftron

namespace difftron {
namespace {

TEST(Model, PaddedVocabularyGivesEveryRankEqualAlignedSlices) {
  EXPECT_EQ(Model::padded_vocab(32000, 1), 32000);
  EXPECT_EQ(Model::padded_vocab(32000, 8), 32256);  // 4032 = 63 x 64 rows a rank
  EXPECT_EQ(Model::padded_vocab(50257, 1), 50304);
  EXPECT_EQ(Model::padded_vocab(257, 1), 320);
  EXPECT_EQ(Model::padded_vocab(257, 4), 320);      // 64-row slices would leave rank 3 only padding
  EXPECT_EQ(Model::padded_vocab(37, 4), 40);
  for (int64_t v : {1, 7, 37, 257, 1000, 32001})
    for (int tp : {1, 2, 3, 4, 8}) {
      if (v < tp) continue;
      const int64_t p = Model::padded_vocab(v, tp);
      EXPECT_GE(p, v);
      EXPECT_EQ(p % tp, 0);
      EXPECT_LT(p / tp * (tp - 1), v) << "the last rank must hold a real row: v " << v << " tp " << tp;
    }
}

// The loss over a padded vocabulary is the cross-entropy of the real logits alone: computed
// here from last_logits (which returns the real vocabulary only) for the last position.
TEST(Model, PaddingRowsStayOutOfTheLossAndTheLogits) {
  auto ops = make_cpu_ops();
  ModelConfig cfg = tiny_config(AttentionKind::Differential, false);  // vocab 11, padded to 64
  ASSERT_GT(Model::padded_vocab(cfg.vocab_size, 1), cfg.vocab_size);
  const int64_t S = 6;
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F64), 1, S);
  model.init_weights(5);
  EXPECT_EQ(model.param("lm_head.weight").value.dim(0), cfg.vocab_size);
  std::vector<int32_t> tok = {3, 1, 4, 1, 5, 9};
  std::vector<float> logits = model.last_logits(tok.data(), S);
  ASSERT_EQ(int64_t(logits.size()), cfg.vocab_size);
  const int32_t target = 7;
  double mx = -INFINITY, sum = 0;
  for (float l : logits) mx = std::max(mx, double(l));
  for (float l : logits) sum += std::exp(double(l) - mx);
  const double want = mx + std::log(sum) - logits[target];
  std::vector<int32_t> tgt(S, -1);
  tgt[S - 1] = target;
  EXPECT_NEAR(model.forward_loss(tok.data(), tgt.data(), 1, S), want, 1e-6 * want);
  // and the padding rows get no gradient: the flat buffer past the head's real rows stays 0
  model.zero_grads();
  model.forward_backward(tok.data(), tgt.data(), 1, S);
  const Param& head = model.param("lm_head.weight");
  const int64_t pad = (Model::padded_vocab(cfg.vocab_size, 1) - cfg.vocab_size) * cfg.d_model;
  std::vector<double> g(model.flat_grads().numel()), w(g.size());
  ops->download(model.flat_grads(), g.data());
  ops->download(model.flat_values(), w.data());
  const int64_t end = head.flat_offset + head.value.numel();
  for (int64_t i = end; i < end + pad; ++i) {
    ASSERT_EQ(g[i], 0.0) << "padding gradient at " << i - end;
    ASSERT_EQ(w[i], 0.0) << "padding weight at " << i - end;
  }
}

}  // namespace
}  // namespace difftron
