// The evaluation tasks of core/eval_tasks.h and `difftron eval --task=...` on the CPU:
// fake quantisation and kurtosis against hand values; the activation statistics against the
// tensors the forward pass shows a recording probe (recomputed here by plain loops); the host
// attention (used when logits are quantised) against the model's own; quantised losses ordered
// by bits; the needle generator's sequences and the answer scorer; a CLI smoke run.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "base/rng.h"
#include "core/eval_tasks.h"
#include "core/model.h"
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
  fs::remove_all(dir);
}

}  // namespace
}  // namespace difftron
