// The whole model: gradients of every parameter against fp64 finite differences (both
// variants, GQA, tied and untied head), parameter counts, determinism, and a tiny model of
// each variant learning the synthetic copy task to near-zero loss on the CPU.
#include <cmath>
#include <vector>

#include <gtest/gtest.h>

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
                                           GradCase{AttentionKind::Differential, false, Recompute::Full}));

// Recomputation runs the same ops on the same inputs again, so the gradients (and the loss)
// are those of the run that kept everything, bit for bit; and the modes keep less.
TEST(Model, RecomputationGivesBitIdenticalGradients) {
  for (auto kind : {AttentionKind::Differential, AttentionKind::Standard}) {
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
  for (auto kind : {AttentionKind::Differential, AttentionKind::Standard}) {
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
