// Generation with the K/V cache (core/decode.h) on the CPU: the logits after each appended
// token equal Model::last_logits of the whole prefix (f64: to 1e-10; f32: to float rounding),
// for both attention variants, GQA and a tied head, token by token, with the prompt in one
// pass or in chunks; a batch of prompts of different lengths gives what each gives alone;
// sampling (greedy, top-k, top-p, seed); stop tokens and stop strings.
#include <cmath>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/decode.h"
#include "core/model.h"

namespace difftron {
namespace {

ModelConfig small_config(AttentionKind kind, int64_t h, int64_t h_kv, bool tie) {
  ModelConfig c;
  c.vocab_size = 37;
  c.d_model = 32;
  c.n_layers = 3;
  c.n_heads = h;
  c.n_kv_heads = h_kv;
  c.head_dim = 8;
  c.ffn_dim = 48;
  c.max_seq_len = 24;
  c.init_std = 0.2;  // large enough that attention is far from uniform
  c.lambda_std = 0.3;
  c.attention = kind;
  c.tie_embeddings = tie;
  return c;
}

std::vector<int32_t> some_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = int32_t(rng.below(uint64_t(vocab)));
  return t;
}

// max |a - b| / max |b|
double rel_max_diff(const float* a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
    den = std::max(den, std::fabs(double(b[i])));
  }
  return num / den;
}

struct DecodeCase {
  const char* name;
  AttentionKind kind;
  int64_t h, h_kv;
  bool tie;
  DType dtype;
};

class DecodeVsForward : public ::testing::TestWithParam<DecodeCase> {};

// Prompt of 5 tokens in one pass (and in chunks of 2 rows), then 15 more one by one: every
// logit row equals the full forward pass over the prefix.
TEST_P(DecodeVsForward, EveryPositionMatchesTheFullForward) {
  const DecodeCase& c = GetParam();
  auto ops = make_cpu_ops();
  ModelConfig cfg = small_config(c.kind, c.h, c.h_kv, c.tie);
  Model model(cfg, *ops, ModelPrecision::uniform(c.dtype), 1, cfg.max_seq_len);
  model.init_weights(11);
  const double tol = c.dtype == DType::F64 ? 1e-10 : 2e-5;
  const std::vector<int32_t> toks = some_tokens(20, cfg.vocab_size, 3);
  for (int64_t rows : {64, 2}) {  // prompt in one pass, or 2 rows at a time
    SCOPED_TRACE("max_rows " + std::to_string(rows));
    Decoder dec(model, 1, cfg.max_seq_len, rows);
    std::vector<float> got = dec.append(0, 1, 5, toks.data());
    double worst = rel_max_diff(got.data(), model.last_logits(toks.data(), 5));
    for (int64_t t = 5; t < int64_t(toks.size()); ++t) {
      got = dec.step(1, &toks[t]);
      EXPECT_EQ(dec.length(0), t + 1);
      worst = std::max(worst, rel_max_diff(got.data(), model.last_logits(toks.data(), t + 1)));
    }
    EXPECT_LT(worst, tol);
    // and the check can fail: another context gives other logits
    std::vector<int32_t> other = toks;
    other[2] = (other[2] + 1) % int32_t(cfg.vocab_size);
    EXPECT_GT(rel_max_diff(got.data(), model.last_logits(other.data(), int64_t(toks.size()))), 100 * tol);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Variants, DecodeVsForward,
    ::testing::Values(DecodeCase{"diff_f64", AttentionKind::Differential, 2, 2, false, DType::F64},
                      DecodeCase{"diff_gqa_f64", AttentionKind::Differential, 4, 2, false, DType::F64},
                      DecodeCase{"diff_gqa_tied_f32", AttentionKind::Differential, 4, 1, true, DType::F32},
                      DecodeCase{"standard_f64", AttentionKind::Standard, 2, 2, false, DType::F64},
                      DecodeCase{"standard_gqa_f32", AttentionKind::Standard, 4, 2, false, DType::F32}),
    [](const ::testing::TestParamInfo<DecodeCase>& i) { return std::string(i.param.name); });

// Three prompts of different lengths in one batch: the logits of every step and the greedy
// tokens are those of each prompt alone.
TEST(Decode, BatchEqualsEachAlone) {
  auto ops = make_cpu_ops();
  ModelConfig cfg = small_config(AttentionKind::Differential, 4, 2, false);
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F64), 1, 1);
  model.init_weights(5);
  const std::vector<std::vector<int32_t>> prompts = {some_tokens(3, cfg.vocab_size, 1),
                                                     some_tokens(7, cfg.vocab_size, 2),
                                                     some_tokens(1, cfg.vocab_size, 3)};
  GenerateOptions o;
  o.max_new_tokens = 9;
  o.sampling.temperature = 0;  // greedy
  Decoder batch(model, 3, cfg.max_seq_len);
  GenerateResult all = generate(batch, prompts, o);
  ASSERT_EQ(all.sequences.size(), 3u);
  EXPECT_EQ(all.prompt_tokens, 11);
  for (size_t i = 0; i < prompts.size(); ++i) {
    Decoder one(model, 1, cfg.max_seq_len);
    GenerateResult alone = generate(one, {prompts[i]}, o);
    EXPECT_EQ(all.sequences[i].tokens, alone.sequences[0].tokens) << "prompt " << i;
    EXPECT_EQ(all.sequences[i].tokens.size(), 9u);
    EXPECT_EQ(all.sequences[i].finish, "length");
  }
  // logits: sequence 1 in a batch of 3, fed by hand, against it alone
  Decoder one(model, 1, cfg.max_seq_len);
  batch.reset();
  for (int64_t i = 0; i < 3; ++i) batch.append(i, 1, int64_t(prompts[i].size()), prompts[i].data());
  one.append(0, 1, int64_t(prompts[1].size()), prompts[1].data());
  for (int32_t t = 0; t < 5; ++t) {
    const int32_t toks[3] = {t, int32_t(t + 3), int32_t(t + 7)};
    std::vector<float> b = batch.step(3, toks), a = one.step(1, &toks[1]);
    EXPECT_LT(rel_max_diff(b.data() + cfg.vocab_size, a), 1e-12);
  }
}

TEST(Decode, RefusesWhatDoesNotFit) {
  auto ops = make_cpu_ops();
  ModelConfig cfg = small_config(AttentionKind::Standard, 2, 2, false);
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1);
  model.init_weights(1);
  EXPECT_THROW(Decoder(model, 1, cfg.max_seq_len + 1), Error);
  Decoder dec(model, 2, 6);
  const std::vector<int32_t> t = some_tokens(7, cfg.vocab_size, 9);
  EXPECT_THROW(dec.append(0, 1, 7, t.data()), Error);  // more than max_len
  EXPECT_THROW(dec.append(1, 2, 1, t.data()), Error);  // sequences [1, 3) of 2
  const int32_t bad = int32_t(cfg.vocab_size);
  EXPECT_THROW(dec.append(0, 1, 1, &bad), Error);
  // generation stops at the context: 6 slots, a 4-token prompt -> 3 tokens (the last from
  // the logits of the sixth)
  GenerateOptions o;
  o.max_new_tokens = 50;
  o.sampling.temperature = 0;
  GenerateResult r = generate(dec, {std::vector<int32_t>(t.begin(), t.begin() + 4)}, o);
  EXPECT_EQ(r.sequences[0].finish, "context");
  EXPECT_EQ(r.sequences[0].tokens.size(), 3u);
}

TEST(Sampling, GreedyTopKTopP) {
  Rng rng(1);
  const std::vector<float> logits = {0.0f, 3.0f, 1.0f, 3.0f, -2.0f, 2.5f};
  SamplingOptions greedy;
  greedy.temperature = 0;
  EXPECT_EQ(sample_token(logits.data(), 6, greedy, rng), 1);  // the first of equal maxima
  SamplingOptions top1;
  top1.top_k = 1;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_token(logits.data(), 6, top1, rng), 1);
  // top-k 3: only {1, 3, 5}; all three show up
  SamplingOptions top3;
  top3.top_k = 3;
  std::vector<int> seen(6, 0);
  for (int i = 0; i < 3000; ++i) ++seen[sample_token(logits.data(), 6, top3, rng)];
  EXPECT_EQ(seen[0] + seen[2] + seen[4], 0);
  EXPECT_GT(seen[1], 0);
  EXPECT_GT(seen[3], 0);
  EXPECT_GT(seen[5], 0);
  // frequencies follow the softmax: p(5) / p(1) = exp(-0.5)
  EXPECT_NEAR(double(seen[5]) / seen[1], std::exp(-0.5), 0.1);
  // top-p: probabilities of 1, 3 (0.357 each), 5 (0.217), 2 (0.048), 0 (0.018), 4 (0.002)
  SamplingOptions p50;
  p50.top_p = 0.5;  // {1, 3} reach 0.71
  std::fill(seen.begin(), seen.end(), 0);
  for (int i = 0; i < 2000; ++i) ++seen[sample_token(logits.data(), 6, p50, rng)];
  EXPECT_EQ(seen[0] + seen[2] + seen[4] + seen[5], 0);
  EXPECT_GT(seen[1], 0);
  EXPECT_GT(seen[3], 0);
  SamplingOptions p70;
  p70.top_p = 0.8;  // {1, 3, 5} reach 0.93
  std::fill(seen.begin(), seen.end(), 0);
  for (int i = 0; i < 2000; ++i) ++seen[sample_token(logits.data(), 6, p70, rng)];
  EXPECT_EQ(seen[0] + seen[2] + seen[4], 0);
  EXPECT_GT(seen[5], 0);
}

TEST(Decode, SamplingIsDeterministicPerSeed) {
  auto ops = make_cpu_ops();
  ModelConfig cfg = small_config(AttentionKind::Differential, 2, 1, false);
  cfg.init_std = 0.05;  // flat distributions: samples differ between seeds
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1);
  model.init_weights(2);
  Decoder dec(model, 2, cfg.max_seq_len);
  const std::vector<int32_t> p = some_tokens(4, cfg.vocab_size, 4);
  GenerateOptions o;
  o.max_new_tokens = 16;
  o.sampling.temperature = 1.0;
  o.sampling.top_p = 0.95;
  o.seed = 42;
  const auto a = generate(dec, {p, p}, o), b = generate(dec, {p, p}, o);
  EXPECT_EQ(a.sequences[0].tokens, b.sequences[0].tokens);
  EXPECT_EQ(a.sequences[1].tokens, b.sequences[1].tokens);
  // sequence i uses seed + i: the same prompt twice gives two different samples
  EXPECT_NE(a.sequences[0].tokens, a.sequences[1].tokens);
  // the first sequence of a batch is the prompt alone with the same seed
  const auto alone = generate(dec, {p}, o);
  EXPECT_EQ(alone.sequences[0].tokens, a.sequences[0].tokens);
  o.seed = 43;
  EXPECT_NE(generate(dec, {p}, o).sequences[0].tokens, a.sequences[0].tokens);
  EXPECT_EQ(generate(dec, {p}, o).sequences[0].tokens, a.sequences[1].tokens);  // 43 = 42 + 1
}

TEST(Decode, StopsAtEosAndStopStrings) {
  auto ops = make_cpu_ops();
  ModelConfig cfg = small_config(AttentionKind::Differential, 2, 2, false);
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1);
  model.init_weights(8);
  Decoder dec(model, 1, cfg.max_seq_len);
  const std::vector<int32_t> p = some_tokens(3, cfg.vocab_size, 6);
  GenerateOptions o;
  o.max_new_tokens = 12;
  o.sampling.temperature = 0;
  const std::vector<int32_t> free_run = generate(dec, {p}, o).sequences[0].tokens;
  ASSERT_EQ(free_run.size(), 12u);
  // eos = the 5th generated token: stops right after it (the first occurrence)
  o.eos = free_run[4];
  const size_t first = std::find(free_run.begin(), free_run.end(), o.eos) - free_run.begin();
  GenerateResult r = generate(dec, {p}, o);
  EXPECT_EQ(r.sequences[0].finish, "eos");
  EXPECT_EQ(r.sequences[0].tokens, std::vector<int32_t>(free_run.begin(), free_run.begin() + first + 1));
  o.eos = -1;
  // a text per token ("<id>,"); stop at the text of tokens 6 and 7
  o.detokenize = [](const std::vector<int32_t>& ids) {
    std::string s;
    for (int32_t id : ids) s += std::to_string(id) + ",";
    return s;
  };
  const std::string stop = std::to_string(free_run[6]) + "," + std::to_string(free_run[7]) + ",";
  o.stop_strings = {"no such text", stop};
  r = generate(dec, {p}, o);
  EXPECT_EQ(r.sequences[0].finish, "stop");
  const std::string full = o.detokenize(free_run);
  const size_t at = full.find(stop);
  EXPECT_EQ(r.sequences[0].text, full.substr(0, at));
  EXPECT_LE(r.sequences[0].tokens.size(), 8u);
  EXPECT_EQ(r.sequences[0].text.find(stop), std::string::npos);
  // without a detokenizer, stop strings are refused
  o.detokenize = nullptr;
  EXPECT_THROW(generate(dec, {p}, o), Error);
}

}  // namespace
}  // namespace difftron
