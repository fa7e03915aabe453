// The evaluation tasks of core/eval_tasks.h and `difftron eval --task=...` on the CPU:
// fake quantisation and kurtosis against hand values; the activation statistics against the
// tensors the forward pass shows a recording probe (recomputed here by plain loops); the host
// attention (used when logits are quantised) against the model's own; quantised losses ordered
// by bits; the needle generator's sequences and the answer scorer; the attention-noise probe
// against maps computed here from the recorded q, k (and lambda, z), themselves checked against
// the model's attention output; the answer span's tokens; threaded host work against one thread,
// bit for bit; a CLI smoke run.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "base/rng.h"
#include "core/eval_tasks.h"
#include "core/model.h"
#include "io/tokenizer.h"
#include "tests/run_command.h"

namespace difftron {
namespace {

TEST(FakeQuantize, RoundsEachRowToItsAbsmaxGrid) {
  // row 0: absmax 1; 4 bits: 7 levels a side; row 1: absmax 2, 2 bits: one level a side
  std::vector<float> x = {1.0f, -0.5f, 0.26f, 0.0f, /* row 1 */ -2.0f, 0.9f, 1.1f, 0.0f};
  std::vector<float> a(x.begin(), x.begin() + 4), b(x.begin() + 4, x.end());
  fake_quantize_rows(a.data(), 1, 4, 4);
  EXPECT_FLOAT_EQ(a[0], 1.0f);
  EXPECT_FLOAT_EQ(a[1], -4.0f / 7.0f);  // -3.5 rounds away from zero
  EXPECT_FLOAT_EQ(a[2], 2.0f / 7.0f);   // 1.82 -> 2
  EXPECT_FLOAT_EQ(a[3], 0.0f);
  fake_quantize_rows(b.data(), 1, 4, 2);
  EXPECT_FLOAT_EQ(b[0], -2.0f);
  EXPECT_FLOAT_EQ(b[1], 0.0f);  // 0.45 -> 0
  EXPECT_FLOAT_EQ(b[2], 2.0f);  // 0.55 -> 1
  // rows are independent: both at once give the same
  fake_quantize_rows(x.data(), 2, 4, 4);
  EXPECT_FLOAT_EQ(x[1], -4.0f / 7.0f);
  EXPECT_FLOAT_EQ(x[5], 2.0f * std::round(0.9 * 7 / 2) / 7.0f);
  // 8 bits: error at most half a step
  std::vector<float> r(64);
  Rng rng(3);
  for (auto& v : r) v = float(rng.normal());
  std::vector<float> q = r;
  fake_quantize_rows(q.data(), 1, 64, 8);
  double m = 0;
  for (float v : r) m = std::max(m, std::fabs(double(v)));
  for (int i = 0; i < 64; ++i) EXPECT_LE(std::fabs(q[i] - r[i]), 0.5 * m / 127 + 1e-6);
  EXPECT_THROW(fake_quantize_rows(q.data(), 1, 64, 1), Error);
}

TEST(Kurtosis, KnownValues) {
  const float two_point[] = {1, -1, 1, -1};
  EXPECT_DOUBLE_EQ(kurtosis(two_point, 4), 1.0);
  const float spike[] = {0, 0, 0, 4};  // mean 1: deviations -1,-1,-1,3: m2 = 3, m4 = 21
  EXPECT_DOUBLE_EQ(kurtosis(spike, 4), 21.0 / 9.0);
  const float flat[] = {2, 2, 2};
  EXPECT_EQ(kurtosis(flat, 3), 0.0);
  std::vector<float> normal(200000);
  Rng rng(5);
  for (auto& v : normal) v = float(rng.normal());
  EXPECT_NEAR(kurtosis(normal.data(), int64_t(normal.size())), 3.0, 0.05);
}

ModelConfig tiny_config(AttentionKind kind) {
  ModelConfig c;
  c.vocab_size = 41;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 8;
  c.ffn_dim = 48;
  c.max_seq_len = 16;
  c.init_std = 0.2;
  c.lambda_std = 0.3;
  c.attention = kind;
  return c;
}

std::vector<int32_t> some_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = int32_t(rng.below(uint64_t(vocab)));
  return t;
}

// Keeps copies of what the forward pass shows: q, k of each layer and each layer's output.
struct RecordingProbe : ForwardProbe {
  Ops& ops;
  explicit RecordingProbe(Ops& o) : ops(o) {}
  std::vector<std::vector<float>> q, k, out;
  std::vector<Shape> q_shape, k_shape;
  std::vector<int> linear_calls = std::vector<int>(4, 0);
  static std::vector<float> host(Ops& ops, const Tensor& t) {
    std::vector<float> v(t.numel());
    ops.download(t, v.data());
    return v;
  }
  void linear_input(int64_t, LinearInput site, Tensor&) override { ++linear_calls[int(site)]; }
  bool attention(int64_t, const Tensor& qt, const Tensor& kt, const Tensor&, const Tensor&, Tensor&) override {
    q.push_back(host(ops, qt));
    k.push_back(host(ops, kt));
    q_shape.push_back(qt.shape());
    k_shape.push_back(kt.shape());
    return false;
  }
  void layer_output(int64_t, const Tensor& x) override { out.push_back(host(ops, x)); }
};

class EvalTasksKinds : public ::testing::TestWithParam<AttentionKind> {};

// ActivationStatsProbe's numbers equal plain loops over the recorded tensors, for two batches.
TEST_P(EvalTasksKinds, ActivationStatsEqualAHandComputation) {
  auto ops = make_cpu_ops();
  const ModelConfig cfg = tiny_config(GetParam());
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 2, 12);
  model.init_weights(7);
  const int64_t B = 2, S = 12, d = cfg.d_model, dh = cfg.head_dim;
  ActivationStatsProbe stats(*ops, cfg.n_layers);
  std::vector<double> top_logit(cfg.n_layers, -INFINITY), top_hidden(cfg.n_layers, 0), kurt(cfg.n_layers, 0);
  for (uint64_t batch = 0; batch < 2; ++batch) {
    const std::vector<int32_t> toks = some_tokens(B * S, cfg.vocab_size, 10 + batch), tg = some_tokens(B * S, cfg.vocab_size, 20 + batch);
    RecordingProbe rec(*ops);
    model.set_probe(&rec);
    const double plain = model.forward_loss(toks.data(), tg.data(), B, S);
    model.set_probe(&stats);
    EXPECT_EQ(model.forward_loss(toks.data(), tg.data(), B, S), plain);  // observing changes nothing
    model.set_probe(nullptr);
    ASSERT_EQ(rec.out.size(), size_t(cfg.n_layers));
    for (int site = 0; site < 4; ++site) EXPECT_EQ(rec.linear_calls[site], cfg.n_layers);
    for (int64_t l = 0; l < cfg.n_layers; ++l) {
      // the logits: heads of dh in memory order; K head of query head a by the layout rules
      const int64_t H = shape_numel(rec.q_shape[l]) / (B * S * dh), Hkv = shape_numel(rec.k_shape[l]) / (B * S * dh);
      const bool v1 = rec.q_shape[l].size() == 5;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t a = 0; a < H; ++a) {
          const int64_t g = v1 ? 2 * ((a / 2) / ((H / 2) / (Hkv / 2))) + a % 2 : a / (H / Hkv);
          for (int64_t t = 0; t < S; ++t)
            for (int64_t j = 0; j <= t; ++j) {
              double dot = 0;
              for (int64_t c = 0; c < dh; ++c)
                dot += double(rec.q[l][((b * S + t) * H + a) * dh + c]) * double(rec.k[l][((b * S + j) * Hkv + g) * dh + c]);
              top_logit[l] = std::max(top_logit[l], dot / std::sqrt(double(dh)));
            }
        }
      for (int64_t r = 0; r < B * S; ++r) {
        double mean = 0, m2 = 0, m4 = 0;
        for (int64_t c = 0; c < d; ++c) {
          const double x = rec.out[l][r * d + c];
          top_hidden[l] = std::max(top_hidden[l], std::fabs(x));
          mean += x / double(d);
        }
        for (int64_t c = 0; c < d; ++c) {
          const double dev = rec.out[l][r * d + c] - mean;
          m2 += dev * dev / double(d);
          m4 += dev * dev * dev * dev / double(d);
        }
        kurt[l] += m4 / (m2 * m2) / double(2 * B * S);
      }
    }
  }
  const std::vector<LayerActivationStats> got = stats.stats();
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    EXPECT_NEAR(got[l].max_attn_logit, top_logit[l], 1e-5 * std::fabs(top_logit[l]));
    EXPECT_GT(got[l].max_attn_logit, 0.0);
    EXPECT_EQ(got[l].hidden_max, top_hidden[l]);
    EXPECT_NEAR(got[l].hidden_kurtosis, kurt[l], 1e-6 * kurt[l]);
    EXPECT_EQ(got[l].tokens, 2 * B * S);
  }
}

// With logits quantised to 16 bits the attention the probe computes on the host gives the
// model's loss (the layouts, GQA and lambda are right); 8-bit activations barely move the loss,
// and fewer bits (activations or logits) move the logits further.
TEST_P(EvalTasksKinds, QuantisedLossesAreOrderedByBits) {
  auto ops = make_cpu_ops();
  const ModelConfig cfg = tiny_config(GetParam());
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 2, 12);
  model.init_weights(9);
  const std::vector<int32_t> toks = some_tokens(24, cfg.vocab_size, 1), tg = some_tokens(24, cfg.vocab_size, 2);
  const double base = model.forward_loss(toks.data(), tg.data(), 2, 12);
  auto loss_at = [&](int act, int logit) {
    QuantizeProbe p(*ops, act, logit);
    model.set_probe(&p);
    const double l = model.forward_loss(toks.data(), tg.data(), 2, 12);
    model.set_probe(nullptr);
    return l;
  };
  EXPECT_NEAR(loss_at(0, 16), base, 1e-4 * base);
  EXPECT_EQ(loss_at(0, 0), base);
  EXPECT_LT(std::fabs(loss_at(8, 0) - base), 0.01 * base);
  // how far the last position's logits move: a signed loss change of a random model need not
  // grow with the noise, this distance does
  const std::vector<float> ref = model.last_logits(toks.data(), 12);
  auto moved = [&](int act, int logit) {
    QuantizeProbe p(*ops, act, logit);
    model.set_probe(&p);
    const std::vector<float> got = model.last_logits(toks.data(), 12);
    model.set_probe(nullptr);
    double sq = 0;
    for (size_t i = 0; i < ref.size(); ++i) sq += (got[i] - ref[i]) * (got[i] - ref[i]);
    return std::sqrt(sq);
  };
  const double d8 = moved(8, 0), d4 = moved(4, 0), d2 = moved(2, 0);
  EXPECT_GT(d8, 0.0);
  EXPECT_GT(d4, 2 * d8);
  EXPECT_GT(d2, d4);  // 2 bits (one level a side) saturate
  EXPECT_GT(moved(0, 3), 2 * moved(0, 8));
  EXPECT_EQ(model.forward_loss(toks.data(), tg.data(), 2, 12), base);  // nothing left behind
}

// Everything the noise test needs of a forward pass, per layer: q, k, v, lambda (V1), ln1 and the
// input of o_proj.
struct NoiseRecorder : ForwardProbe {
  Ops& ops;
  explicit NoiseRecorder(Ops& o) : ops(o) {}
  std::vector<std::vector<float>> q, k, v, ln1, att_out;
  std::vector<double> lambda;
  void linear_input(int64_t, LinearInput site, Tensor& x) override {
    if (site == LinearInput::AttnNorm) ln1.push_back(RecordingProbe::host(ops, x));
    if (site == LinearInput::AttnOutput) att_out.push_back(RecordingProbe::host(ops, x));
  }
  bool attention(int64_t, const Tensor& qt, const Tensor& kt, const Tensor& vt, const Tensor& lt, Tensor&) override {
    q.push_back(RecordingProbe::host(ops, qt));
    k.push_back(RecordingProbe::host(ops, kt));
    v.push_back(RecordingProbe::host(ops, vt));
    double lam = 0;
    if (lt.defined()) ops.download(lt, &lam);
    lambda.push_back(lam);
    return false;
  }
};

// The noise probe's per-layer means equal those of effective rows computed here with plain loops
// (softmax in f64 of q.k/sqrt(dh); V1: A1 - lambda A2 with the model's lambda_value; V2:
// A[2i] - sigmoid(z) A[2i+1] with z = ln1 W_lambda^T). Those rows are first checked against the
// model: row x V is the model's attention output at the query position (V1: after its sub-layer
// norm, as the model feeds o_proj), so the expected numbers are the model's maps.
TEST_P(EvalTasksKinds, AttentionNoiseEqualsMapsComputedFromTheModel) {
  auto ops = make_cpu_ops();
  const ModelConfig cfg = tiny_config(GetParam());
  const AttentionKind kind = cfg.attention;
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 16);
  model.init_weights(11);
  const int64_t dh = cfg.head_dim, L = cfg.n_layers;
  // two prompts: (length, answer span)
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> prompts = {{12, 3, 6}, {9, 0, 2}};
  std::vector<double> answer(L, 0), noise(L, 0), noise_abs(L, 0), row_sum(L, 0);
  std::vector<int64_t> rows(L, 0);
  AttentionNoiseProbe probe(model);
  for (size_t pi = 0; pi < prompts.size(); ++pi) {
    const auto [S, b0, b1] = prompts[pi];
    const int64_t t = S - 1;
    const std::vector<int32_t> toks = some_tokens(S, cfg.vocab_size, 30 + pi);
    NoiseRecorder rec(*ops);
    model.set_probe(&rec);
    const std::vector<float> plain = model.last_logits(toks.data(), S);
    probe.set_query(t, b0, b1);
    model.set_probe(&probe);
    EXPECT_EQ(model.last_logits(toks.data(), S), plain);  // observing changes nothing
    model.set_probe(nullptr);
    for (int64_t l = 0; l < L; ++l) {
      SCOPED_TRACE("prompt " + std::to_string(pi) + " layer " + std::to_string(l));
      // query heads of dh, K/V heads; which K/V head each query head reads; maps per output head
      const int64_t QH = int64_t(rec.q[l].size()) / (S * dh), KH = int64_t(rec.k[l].size()) / (S * dh);
      const int64_t maps = kind == AttentionKind::Standard ? 1 : 2, OH = QH / maps;
      auto kv_of = [&](int64_t a) {  // V1: map j of diff head i reads map j of its group
        return kind == AttentionKind::Differential ? 2 * ((a / 2) / ((QH / 2) / (KH / 2))) + a % 2 : a / (QH / KH);
      };
      auto softmax_row = [&](int64_t a) {
        std::vector<double> p(t + 1);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < dh; ++c) dot += double(rec.q[l][(t * QH + a) * dh + c]) * double(rec.k[l][(j * KH + kv_of(a)) * dh + c]);
          p[j] = dot / std::sqrt(double(dh));
          mx = std::max(mx, p[j]);
        }
        for (auto& x : p) sum += x = std::exp(x - mx);
        for (auto& x : p) x /= sum;
        return p;
      };
      std::vector<double> second(OH, 0.0);  // what map 2 is multiplied by
      if (kind == AttentionKind::Differential) {
        std::fill(second.begin(), second.end(), model.lambda_value(l));
        EXPECT_NEAR(rec.lambda[l], second[0], 1e-6);
      }
      if (kind == AttentionKind::DifferentialV2) {
        const Tensor& w = model.param("model.layers." + std::to_string(l) + ".self_attn.lambda_proj.weight").value;
        const std::vector<float> wh = RecordingProbe::host(*ops, w);
        const int64_t d = cfg.d_model;
        ASSERT_EQ(int64_t(wh.size()), OH * d);
        for (int64_t i = 0; i < OH; ++i) {
          double z = 0;
          for (int64_t c = 0; c < d; ++c) z += double(rec.ln1[l][t * d + c]) * double(wh[i * d + c]);
          second[i] = 1 / (1 + std::exp(-z));
        }
      }
      for (int64_t i = 0; i < OH; ++i) {
        std::vector<double> e = softmax_row(i * maps);
        if (maps == 2) {
          const std::vector<double> p2 = softmax_row(i * maps + 1);
          for (int64_t j = 0; j <= t; ++j) e[j] -= second[i] * p2[j];
        }
        // the probe's own row of this head
        const std::vector<double>& got = probe.last_rows(l).at(i);
        ASSERT_EQ(int64_t(got.size()), t + 1);
        for (int64_t j = 0; j <= t; ++j) EXPECT_NEAR(got[j], e[j], 1e-6) << "head " << i << " key " << j;
        // anchor: e x V is what the model's attention produced at the query position
        const int64_t vw = kind == AttentionKind::Differential ? 2 * dh : dh;
        const int64_t VH = int64_t(rec.v[l].size()) / (S * vw);
        const int64_t vh = kind == AttentionKind::Differential ? kv_of(2 * i) / 2 : kv_of(i * maps);
        std::vector<double> o(vw, 0.0);
        for (int64_t j = 0; j <= t; ++j)
          for (int64_t c = 0; c < vw; ++c) o[c] += e[j] * rec.v[l][(j * VH + vh) * vw + c];
        if (kind == AttentionKind::Differential) {  // sub-layer norm: o / rms(o) * w_sub (1) * (1 - lambda_init)
          double ms = 0;
          for (double x : o) ms += x * x / double(vw);
          for (double& x : o) x *= (1 - ModelConfig::lambda_init(l)) / std::sqrt(ms + cfg.norm_eps);
        }
        const int64_t width = int64_t(rec.att_out[l].size()) / S;
        ASSERT_EQ(width, OH * vw);
        for (int64_t c = 0; c < vw; ++c)
          EXPECT_NEAR(rec.att_out[l][t * width + i * vw + c], o[c], 2e-5 + 1e-4 * std::fabs(o[c])) << "head " << i;
        double a = 0, n = 0, na = 0;
        for (int64_t j = 0; j <= t; ++j) {
          if (j >= b0 && j < b1) {
            a += e[j];
          } else {
            n += e[j];
            na += std::fabs(e[j]);
          }
        }
        const double want_sum = kind == AttentionKind::Standard ? 1.0 : 1.0 - second[i];
        EXPECT_NEAR(a + n, want_sum, 1e-9);
        answer[l] += a;
        noise[l] += n;
        noise_abs[l] += na;
        row_sum[l] += a + n;
        rows[l] += 1;
      }
    }
  }
  const std::vector<LayerNoiseStats> got = probe.stats();
  ASSERT_EQ(int64_t(got.size()), L);
  for (int64_t l = 0; l < L; ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const double n = double(rows[l]);
    EXPECT_EQ(got[l].rows, rows[l]);
    EXPECT_EQ(got[l].rows, 2 * (kind == AttentionKind::Differential ? cfg.n_heads : 2 * cfg.n_heads));
    EXPECT_NEAR(got[l].answer, answer[l] / n, 1e-6);
    EXPECT_NEAR(got[l].noise, noise[l] / n, 1e-6);
    EXPECT_NEAR(got[l].noise_abs, noise_abs[l] / n, 1e-6);
    EXPECT_NEAR(got[l].row_sum, row_sum[l] / n, 1e-6);
    EXPECT_NEAR(got[l].ratio(), answer[l] / noise_abs[l], 1e-5 * std::fabs(answer[l] / noise_abs[l]));
    EXPECT_GE(got[l].noise_abs, std::fabs(got[l].noise));
    if (kind == AttentionKind::Standard) {
      EXPECT_GT(got[l].answer, 0.0);
      EXPECT_NEAR(got[l].answer + got[l].noise, 1.0, 1e-12);
      EXPECT_EQ(got[l].noise, got[l].noise_abs);
    } else if (kind == AttentionKind::Differential) {
      EXPECT_NEAR(got[l].row_sum, 1.0 - model.lambda_value(l), 1e-6);  // (this random model's lambda may be < 0)
    } else {
      EXPECT_LT(got[l].row_sum, 1.0);  // sigmoid(z) in (0, 1) taken off
      EXPECT_GT(got[l].row_sum, 0.0);
    }
  }
  probe.set_query(3, 0, 2);  // a query position outside the pass is refused
  model.set_probe(&probe);
  const std::vector<int32_t> two = some_tokens(2, cfg.vocab_size, 1);
  EXPECT_THROW(model.last_logits(two.data(), 2), Error);
  model.set_probe(nullptr);
  EXPECT_THROW(probe.set_query(5, 4, 7), Error);  // the span must lie within keys 0..t
  EXPECT_THROW(probe.set_query(5, 2, 2), Error);
}

// The probes' host work on several threads gives what one thread gives, bit for bit (sequences of
// more than one block of query rows, two sequences, GQA).
TEST_P(EvalTasksKinds, ThreadedHostWorkIsBitwiseTheSingleThreadedOne) {
  auto ops = make_cpu_ops();
  ModelConfig cfg = tiny_config(GetParam());
  cfg.max_seq_len = 80;
  const int64_t B = 2, S = 75;
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), B, S);
  model.init_weights(13);
  const std::vector<int32_t> toks = some_tokens(B * S, cfg.vocab_size, 3), tg = some_tokens(B * S, cfg.vocab_size, 4);
  struct Result {
    double quant_loss = 0, quant_act_loss = 0;
    std::vector<float> logits;
    std::vector<LayerActivationStats> acts;
    std::vector<std::vector<std::vector<double>>> noise_rows;
  };
  auto run = [&](int threads) {
    set_host_threads(threads);
    EXPECT_EQ(host_threads(), threads);
    Result r;
    QuantizeProbe quant(*ops, 0, 6);
    model.set_probe(&quant);
    r.quant_loss = model.forward_loss(toks.data(), tg.data(), B, S);
    r.logits = model.last_logits(toks.data(), S);
    QuantizeProbe quant_act(*ops, 5, 0);
    model.set_probe(&quant_act);
    r.quant_act_loss = model.forward_loss(toks.data(), tg.data(), B, S);
    ActivationStatsProbe acts(*ops, cfg.n_layers);
    model.set_probe(&acts);
    model.forward_loss(toks.data(), tg.data(), B, S);
    r.acts = acts.stats();
    AttentionNoiseProbe noise(model);
    noise.set_query(S - 1, 10, 20);
    model.set_probe(&noise);
    model.last_logits(toks.data(), S);
    for (int64_t l = 0; l < cfg.n_layers; ++l) r.noise_rows.push_back(noise.last_rows(l));
    model.set_probe(nullptr);
    return r;
  };
  const Result one = run(1), many = run(5);
  set_host_threads(0);
  EXPECT_GE(host_threads(), 1);
  EXPECT_EQ(one.quant_loss, many.quant_loss);
  EXPECT_EQ(one.quant_act_loss, many.quant_act_loss);
  EXPECT_EQ(one.logits, many.logits);
  ASSERT_EQ(one.acts.size(), many.acts.size());
  for (size_t l = 0; l < one.acts.size(); ++l) {
    EXPECT_EQ(one.acts[l].max_attn_logit, many.acts[l].max_attn_logit);
    EXPECT_EQ(one.acts[l].hidden_max, many.acts[l].hidden_max);
    EXPECT_EQ(one.acts[l].hidden_kurtosis, many.acts[l].hidden_kurtosis);
  }
  EXPECT_EQ(one.noise_rows, many.noise_rows);
  // and the host attention is still the model's (16-bit logits: nearly no rounding)
  QuantizeProbe q16(*ops, 0, 16);
  set_host_threads(3);
  model.set_probe(&q16);
  const double host = model.forward_loss(toks.data(), tg.data(), B, S);
  model.set_probe(nullptr);
  set_host_threads(0);
  const double base = model.forward_loss(toks.data(), tg.data(), B, S);
  EXPECT_NEAR(host, base, 1e-4 * base);
  EXPECT_THROW(set_host_threads(-1), Error);
}

TEST(HostThreads, ParallelForRunsEachPieceOnceAndRethrows) {
  set_host_threads(4);
  std::vector<int> hits(1000, 0);
  parallel_for(1000, [&](int64_t i) { hits[i] += 1; });
  EXPECT_EQ(std::count(hits.begin(), hits.end(), 1), 1000);
  EXPECT_THROW(parallel_for(100, [](int64_t i) {
                 if (i == 37) throw_error("piece ", i);
               }),
               Error);
  set_host_threads(0);
}

INSTANTIATE_TEST_SUITE_P(Kinds, EvalTasksKinds,
                         ::testing::Values(AttentionKind::Differential, AttentionKind::Standard,
                                           AttentionKind::DifferentialV2),
                         [](const auto& info) { return std::string(attention_kind_name(info.param)) == "diff_v2" ? "diff_v2" : attention_kind_name(info.param); });

int64_t occurrences(const std::string& text, const std::string& what) {
  int64_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

TEST(Needles, SequencesHoldExactlyTheNeedlesAtTheirDepths) {
  const auto bytes = [](const std::string& s) { return int64_t(s.size()); };
  for (double depth : {0.0, 0.25, 0.5, 1.0}) {
    SCOPED_TRACE("depth " + std::to_string(depth));
    NeedleOptions o;
    o.context_tokens = 2000;
    o.depth = depth;
    o.needles = 6;
    o.queries = 2;
    o.seed = 42;
    const NeedleSample s = make_needle_sample(o, bytes);
    ASSERT_EQ(s.needles.size(), 6u);
    EXPECT_EQ(occurrences(s.context, "magic number"), 6);
    ASSERT_EQ(s.prompts.size(), 2u);
    ASSERT_EQ(s.answers.size(), 2u);
    int64_t queried = 0;
    std::vector<std::string> numbers;
    for (const Needle& n : s.needles) {
      EXPECT_EQ(s.context.compare(size_t(n.offset), n.sentence.size(), n.sentence), 0) << n.sentence;
      EXPECT_EQ(n.sentence, "The magic number of " + n.city + " is " + n.number + ". ");
      EXPECT_EQ(n.number.size(), 7u);
      EXPECT_EQ(occurrences(s.context, n.city), 1) << n.city;
      numbers.push_back(n.number);
      if (n.queried) {
        ++queried;
        EXPECT_NEAR(n.depth, depth, 0.03);
        // the filler before it is that fraction of all filler
        const double before = double(n.offset) / double(s.context.size());
        EXPECT_NEAR(before, depth, 0.1);
      }
    }
    EXPECT_EQ(queried, 2);
    std::sort(numbers.begin(), numbers.end());
    EXPECT_EQ(std::unique(numbers.begin(), numbers.end()), numbers.end());
    for (size_t q = 0; q < 2; ++q) {
      EXPECT_EQ(s.prompts[q], s.context + needle_question(s.queried_cities[q]));
      EXPECT_NE(s.context.find("magic number of " + s.queried_cities[q] + " is " + s.answers[q] + "."), std::string::npos);
      // the prompt fills the length up to less than one filler sentence
      EXPECT_LE(int64_t(s.prompts[q].size()), o.context_tokens);
      EXPECT_GT(int64_t(s.prompts[q].size()), o.context_tokens - 80);
    }
  }
  NeedleOptions bad;
  bad.queries = 7;
  EXPECT_THROW(make_needle_sample(bad, bytes), Error);
}

// The answer span: the needle's sentence in the prompt, mapped to the tokens that hold its bytes.
TEST(Needles, AnswerSpanMapsToTheSentencesTokens) {
  // hand offsets: tokens of 3, 2, 4, 1 bytes
  const std::vector<int64_t> off = {0, 3, 5, 9, 10};
  EXPECT_EQ(tokens_covering(off, 4, 9), std::make_pair(int64_t(1), int64_t(3)));
  EXPECT_EQ(tokens_covering(off, 5, 6), std::make_pair(int64_t(2), int64_t(3)));
  EXPECT_EQ(tokens_covering(off, 3, 5), std::make_pair(int64_t(1), int64_t(2)));
  EXPECT_EQ(tokens_covering(off, 0, 10), std::make_pair(int64_t(0), int64_t(4)));
  EXPECT_EQ(tokens_covering(off, 2, 4), std::make_pair(int64_t(0), int64_t(2)));
  EXPECT_THROW(tokens_covering(off, 4, 4), Error);
  EXPECT_THROW(tokens_covering(off, 8, 11), Error);

  const std::unique_ptr<Tokenizer> bytes = load_tokenizer("bytes");
  const std::unique_ptr<Tokenizer> bpe = load_tokenizer(std::string(DIFFTRON_SOURCE_DIR) + "/tests/data/bpe/gpt2_tokenizer.json");
  for (const Tokenizer* tok : {bytes.get(), bpe.get()}) {
    NeedleOptions o;
    o.context_tokens = 400;
    o.depth = 0.5;
    o.needles = 4;
    o.queries = 2;
    o.seed = 5;
    const NeedleSample s = make_needle_sample(o, [&](const std::string& x) { return int64_t(tok->encode(x).size()); });
    const auto decode_one = [tok](int32_t id) { return tok->decode({id}); };
    ASSERT_EQ(s.spans.size(), s.prompts.size());
    for (size_t q = 0; q < s.prompts.size(); ++q) {
      const std::string& p = s.prompts[q];
      const std::string sentence = "The magic number of " + s.queried_cities[q] + " is " + s.answers[q] + ".";
      const auto [b0, b1] = s.spans[q];
      EXPECT_EQ(p.substr(size_t(b0), size_t(b1 - b0)), sentence);
      EXPECT_EQ(find_needle_span(p, s.queried_cities[q], s.answers[q]), s.spans[q]);
      const std::vector<int32_t> ids = tok->encode(p);
      const std::vector<int64_t> offsets = token_byte_offsets(decode_one, ids, p);
      ASSERT_EQ(offsets.size(), ids.size() + 1);
      const auto [t0, t1] = tokens_covering(offsets, b0, b1);
      if (tok == bytes.get()) {  // one token per byte
        EXPECT_EQ(t0, b0);
        EXPECT_EQ(t1, b1);
      } else {
        EXPECT_LT(t1 - t0, b1 - b0);  // merges happen
      }
      // the tokens hold the sentence, and their first and last hold some of it
      const std::string covered = tok->decode(std::vector<int32_t>(ids.begin() + t0, ids.begin() + t1));
      EXPECT_NE(covered.find(sentence), std::string::npos) << covered;
      EXPECT_LE(offsets[t0], b0);
      EXPECT_GT(offsets[t0 + 1], b0);
      EXPECT_LT(offsets[t1 - 1], b1);
      EXPECT_GE(offsets[t1], b1);
      EXPECT_LT(t1, int64_t(ids.size()));  // the question follows: the query position is not in the span
    }
    EXPECT_THROW(token_byte_offsets(decode_one, tok->encode("abc"), "abd"), Error);
  }
  EXPECT_THROW(find_needle_span("no needle here", "Oslo", "12"), Error);
  const std::string twice = "The magic number of Oslo is 12. The magic number of Oslo is 12.";
  EXPECT_THROW(find_needle_span(twice, "Oslo", "12"), Error);
  EXPECT_EQ(find_needle_span("x The magic number of Oslo is 12. y", "Oslo", "12"), std::make_pair(int64_t(2), int64_t(33)));
}

TEST(Needles, ScorerCountsCorrectAnswers) {
  // what a model might generate after "... The magic number of Oslo is"
  const std::vector<std::pair<std::string, bool>> answers = {
      {" 4718263.", true}, {" 4718263", true}, {"4718263\n", true}, {" 47182630", false},
      {" 4718264.", false}, {" 471826", false}, {" the number", false}, {"", false}};
  int correct = 0;
  for (const auto& [text, ok] : answers) {
    EXPECT_EQ(needle_answer_correct(text, "4718263"), ok) << "'" << text << "'";
    correct += needle_answer_correct(text, "4718263");
  }
  EXPECT_EQ(correct, 3);
}

// `difftron needles` and `difftron eval --task=...` on a tiny byte-level checkpoint.
TEST(EvalTasksCli, NeedlesActivationsQuant) {
  namespace fs = std::filesystem;
  using testing::run_difftron;
  const fs::path dir = testing::fresh_dir("difftron_eval_tasks", "cli");
  const std::string d = dir.string();
  {
    std::ofstream f(d + "/a.txt");
    const char* words[] = {"the", "magic", "number", "of", "Oslo", "is", "1234567.", "grass", "green"};
    for (int i = 0; i < 3000; ++i) f << words[(i * 5 + i / 7) % 9] << (i % 13 == 12 ? "\n" : " ");
  }
  auto r = run_difftron("prepare --progress=false --val_fraction=0 --input=" + d + "/a.txt --out=" + d + "/data");
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_difftron("train --device=cpu --data=" + d + "/data/train --steps=20 --seq=256 --batch=2 --d_model=32 "
                   "--n_layers=2 --n_heads=2 --n_kv_heads=1 --log_every=10 --ckpt_dir=" + d + "/ck");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string ev = "eval --device=cpu --checkpoint=" + d + "/ck --data=" + d + "/data/train --seq=64 --batch=2 ";
  auto lines = [](const std::string& out, const std::string& task) {
    std::vector<nlohmann::json> js;
    std::stringstream ss(out);
    for (std::string line; std::getline(ss, line);)
      if (!line.empty() && line[0] == '{') {
        nlohmann::json j = nlohmann::json::parse(line);
        if (j.value("task", "") == task) js.push_back(j);
      }
    return js;
  };
  r = run_difftron(ev + "--task=activations --max_tokens=128");
  ASSERT_EQ(r.status, 0) << r.output;
  auto acts = lines(r.output, "activations");
  ASSERT_EQ(acts.size(), 3u) << r.output;  // two layers and "all"
  EXPECT_EQ(acts[2]["tokens"], 128);
  EXPECT_GT(acts[0]["hidden_max"].get<double>(), 0.0);
  EXPECT_EQ(acts[2]["hidden_max"].get<double>(),
            std::max(acts[0]["hidden_max"].get<double>(), acts[1]["hidden_max"].get<double>()));
  EXPECT_NE(r.output.find("max attn logit"), std::string::npos) << r.output;

  r = run_difftron(ev + "--task=quant --max_tokens=128 --bits=8,2");
  ASSERT_EQ(r.status, 0) << r.output;
  auto quant = lines(r.output, "quant");
  ASSERT_EQ(quant.size(), 3u) << r.output;
  EXPECT_EQ(quant[0]["bits"], "float");
  EXPECT_EQ(quant[1]["bits"], "8");
  EXPECT_LT(std::fabs(quant[1]["delta"].get<double>()), std::fabs(quant[2]["delta"].get<double>()));
  r = run_difftron(ev + "--task=quant --bits=8,1");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--bits: '1' is not a bit width"), std::string::npos) << r.output;

  r = run_difftron("needles --needle_out=" + d + "/n.jsonl --needle_lengths=200,240 --needle_depths=0,1 "
                   "--needle_count=3 --needle_queries=2 --needle_samples=2 --needle_digits=4");
  ASSERT_EQ(r.status, 0) << r.output;
  std::ifstream f(d + "/n.jsonl");
  int samples = 0;
  for (std::string line; std::getline(f, line); ++samples) {
    const auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["prompts"].size(), 2u);
    ASSERT_EQ(j["spans"].size(), 2u);
    for (size_t q = 0; q < 2; ++q) {  // the byte span of the queried needle's sentence
      const int64_t b0 = j["spans"][q][0], b1 = j["spans"][q][1];
      EXPECT_EQ(j["prompts"][q].get<std::string>().substr(size_t(b0), size_t(b1 - b0)),
                "The magic number of " + j["cities"][q].get<std::string>() + " is " + j["answers"][q].get<std::string>() + ".");
    }
    EXPECT_LE(j["prompt_tokens"].get<int64_t>(), j["context_tokens"].get<int64_t>());
  }
  EXPECT_EQ(samples, 8);
  r = run_difftron("eval --device=cpu --checkpoint=" + d + "/ck --task=needles --batch=3 --needles_file=" + d + "/n.jsonl");
  ASSERT_EQ(r.status, 0) << r.output;
  auto needles = lines(r.output, "needles");
  ASSERT_EQ(needles.size(), 5u) << r.output;  // 4 groups and "all"
  EXPECT_EQ(needles[0]["total"], 4);
  EXPECT_EQ(needles[0]["context_tokens"], 200);
  EXPECT_EQ(needles[4]["total"], 16);
  EXPECT_GE(needles[4]["accuracy"].get<double>(), 0.0);

  // attention noise on the same file: two layers and "all"; the rows of the differential maps
  // sum to 1 - lambda; --max_tokens keeps whole prompts in file order
  const std::string noise_cmd = "eval --device=cpu --checkpoint=" + d + "/ck --task=noise --needles_file=";
  r = run_difftron(noise_cmd + d + "/n.jsonl");
  ASSERT_EQ(r.status, 0) << r.output;
  auto noise = lines(r.output, "noise");
  ASSERT_EQ(noise.size(), 3u) << r.output;
  EXPECT_EQ(noise[2]["layer"], "all");
  EXPECT_EQ(noise[2]["prompts"], 16);
  for (const auto& j : noise) {
    EXPECT_NEAR(j["answer"].get<double>() + j["noise"].get<double>(), j["row_sum"].get<double>(), 1e-9) << j.dump();
    EXPECT_GT(j["answer"].get<double>(), 0.0);
    EXPECT_GE(j["noise_abs"].get<double>(), std::fabs(j["noise"].get<double>()));
    EXPECT_NEAR(j["ratio"].get<double>(), j["answer"].get<double>() / j["noise_abs"].get<double>(), 1e-9);
  }
  EXPECT_LT(noise[0]["row_sum"].get<double>(), 1.0);  // the checkpoint is differential (V1)
  EXPECT_NE(r.output.find("answer/|noise|"), std::string::npos) << r.output;
  r = run_difftron(noise_cmd + d + "/n.jsonl --max_tokens=450");
  ASSERT_EQ(r.status, 0) << r.output;
  {
    const auto limited = lines(r.output, "noise").at(2);  // prompts of 120 to 200 tokens
    EXPECT_LE(limited["tokens"].get<int64_t>(), 450);
    EXPECT_GT(limited["tokens"].get<int64_t>(), 450 - 200);
    EXPECT_GE(limited["prompts"].get<int64_t>(), 2);
    EXPECT_LE(limited["prompts"].get<int64_t>(), 3);
  }
  // a file of an older `difftron needles` (no spans) gives the same numbers; one with neither
  // spans nor cities, or a span that is not the needle, is refused naming the file
  {
    std::ifstream in(d + "/n.jsonl");
    std::ofstream old_file(d + "/old.jsonl"), bare(d + "/bare.jsonl"), wrong(d + "/wrong.jsonl");
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line);
      j.erase("spans");
      old_file << j.dump() << "\n";
      j.erase("cities");
      bare << j.dump() << "\n";
      j = nlohmann::json::parse(line);
      j["spans"][0][0] = j["spans"][0][0].get<int64_t>() + 1;
      wrong << j.dump() << "\n";
    }
  }
  r = run_difftron(noise_cmd + d + "/old.jsonl");
  ASSERT_EQ(r.status, 0) << r.output;
  auto old_noise = lines(r.output, "noise");
  ASSERT_EQ(old_noise.size(), 3u) << r.output;
  EXPECT_EQ(old_noise[2]["answer"], noise[2]["answer"]);
  EXPECT_EQ(old_noise[2]["noise_abs"], noise[2]["noise_abs"]);
  r = run_difftron(noise_cmd + d + "/bare.jsonl");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find(d + "/bare.jsonl line 1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("write it again"), std::string::npos) << r.output;
  r = run_difftron(noise_cmd + d + "/wrong.jsonl");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find(d + "/wrong.jsonl line 1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("is not the needle"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace difftron
