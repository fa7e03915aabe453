// Config validation (each problem named with its value), derived sizes, FLOP count and the
// learning-rate schedule against values computed by hand.
#include <cmath>
#include <string>

#include <gtest/gtest.h>

#include "core/config.h"
#include "base/error.h"

namespace difftron {
namespace {

std::string error_of(ModelConfig c) {
  try {
    c.resolve_and_validate();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

TEST(ModelConfig, DefaultsResolveHeadDimAndFfn) {
  ModelConfig c;
  c.d_model = 2048;
  c.n_heads = 8;
  c.n_kv_heads = 8;
  c.resolve_and_validate();
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.ffn_dim, 5504);  // 8/3 * 2048 = 5461.3 -> multiple of 128 (the paper's 1.4B)
}

TEST(ModelConfig, HeadsNotDividingD) {
  ModelConfig c;
  c.d_model = 100;
  c.n_heads = 3;
  EXPECT_TRUE(contains(error_of(c), "d_model (100) must be divisible by 2 * n_heads (6)")) << error_of(c);
}

TEST(ModelConfig, KvHeadsNotDividingHeads) {
  ModelConfig c;
  c.d_model = 96;
  c.n_heads = 6;
  c.n_kv_heads = 4;
  EXPECT_TRUE(contains(error_of(c), "n_heads (6) must be a multiple of n_kv_heads (4)")) << error_of(c);
}

TEST(ModelConfig, OddHeadDim) {
  ModelConfig c;
  c.d_model = 64;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.head_dim = 7;
  EXPECT_TRUE(contains(error_of(c), "head_dim (7) must be even")) << error_of(c);
}

TEST(ModelConfig, ReportsEveryProblemAtOnce) {
  ModelConfig c;
  c.vocab_size = 0;
  c.n_layers = -1;
  c.head_dim = 8;
  c.norm_eps = 0;
  std::string e = error_of(c);
  EXPECT_TRUE(contains(e, "vocab_size (0) must be positive")) << e;
  EXPECT_TRUE(contains(e, "n_layers (-1) must be positive")) << e;
  EXPECT_TRUE(contains(e, "norm_eps (0")) << e;
}

TEST(ModelConfig, ValidConfigPasses) {
  ModelConfig c;
  EXPECT_EQ(error_of(c), "");
}

TEST(ModelConfig, FlopsPerTokenFollowsDesign) {
  ModelConfig c;
  c.vocab_size = 1000;
  c.d_model = 64;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.resolve_and_validate();
  const double non_embed = double(c.num_parameters() - 1000 * 64);
  EXPECT_DOUBLE_EQ(c.flops_per_token(128), 6 * non_embed + 3.0 * 2 * 128 * (2 * 64 + 4 * 64) / 2);
  c.attention = AttentionKind::Standard;
  const double non_embed_std = double(c.num_parameters() - 1000 * 64);
  EXPECT_DOUBLE_EQ(c.flops_per_token(128), 6 * non_embed_std + 3.0 * 2 * 128 * (2 * 64 + 2 * 64) / 2);
}

TEST(ModelConfig, ParseAttentionKind) {
  EXPECT_EQ(parse_attention_kind("diff"), AttentionKind::Differential);
  EXPECT_EQ(parse_attention_kind("standard"), AttentionKind::Standard);
  try {
    parse_attention_kind("linear");
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "unknown kind 'linear'")) << e.what();
  }
}

TEST(OptimizerConfig, RejectsBadValuesNamingThem) {
  OptimizerConfig o;
  o.lr = -1;
  o.beta2 = 1.0;
  o.total_steps = 0;
  try {
    o.validate();
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(contains(e.what(), "lr (-1) must be > 0")) << e.what();
    EXPECT_TRUE(contains(e.what(), "beta2 (1) must be in [0, 1)")) << e.what();
    EXPECT_TRUE(contains(e.what(), "total_steps (0) must be > 0")) << e.what();
  }
}

TEST(OptimizerConfig, WarmupThenCosine) {
  OptimizerConfig o;
  o.lr = 1.0;
  o.min_lr_ratio = 0.1;
  o.warmup_steps = 10;
  o.total_steps = 110;
  o.schedule = LrSchedule::Cosine;
  EXPECT_DOUBLE_EQ(o.lr_at(0), 0.1);    // (0+1)/10
  EXPECT_DOUBLE_EQ(o.lr_at(9), 1.0);
  EXPECT_DOUBLE_EQ(o.lr_at(10), 1.0);   // decay starts at its peak
  EXPECT_NEAR(o.lr_at(60), 0.1 + 0.9 * 0.5, 1e-12);  // halfway: cos(pi/2) = 0
  EXPECT_NEAR(o.lr_at(110), 0.1, 1e-12);
  EXPECT_NEAR(o.lr_at(500), 0.1, 1e-12);
}

TEST(OptimizerConfig, LinearDecay) {
  OptimizerConfig o;
  o.lr = 2.0;
  o.min_lr_ratio = 0.0;
  o.warmup_steps = 0;
  o.total_steps = 100;
  o.schedule = LrSchedule::Linear;
  EXPECT_DOUBLE_EQ(o.lr_at(0), 2.0);
  EXPECT_DOUBLE_EQ(o.lr_at(25), 1.5);
  EXPECT_DOUBLE_EQ(o.lr_at(100), 0.0);
}

}  // namespace
}  // namespace difftron
