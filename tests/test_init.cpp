// Ops::init_normal (the counter-based N(0, std^2) generator of kernels/ops.h) on the CPU
// reference, and Model::init_weights built on it: values against an independent evaluation
// of the formula written in ops.h (f64 exact, f32 / bf16 the exact rounding of the double),
// blocks at row / column offsets equal to the same block of the full tensor bit for bit,
// the moments of 1e6 samples, uncorrelated streams for other tensor ids and seeds, argument
// errors naming the op and the value, and the model's per-tensor stds and norm weights.
// (The CUDA kernel against this reference: tests/test_cuda_ops.cpp, init_normal cases.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "core/config.h"
#include "base/error.h"
#include "core/model.h"
#include "kernels/ops.h"

namespace difftron {
namespace {

// ---- the contract of kernels/ops.h, written out again here -------------------------------
uint64_t splitmix_finaliser(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double expected_value(uint64_t seed, uint64_t tensor_id, uint64_t g, double std) {
  const uint64_t key = splitmix_finaliser(splitmix_finaliser(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) ^
                                          (tensor_id * 0xD1B54A32D192ED03ull + 0x8CB92BA72F3D8DD7ull));
  auto h = [&](uint64_t i) { return splitmix_finaliser(key + (i + 1) * 0x9E3779B97F4A7C15ull); };
  const double u1 = double((h(2 * g) >> 11) + 1) * std::ldexp(1.0, -53);
  const double u2 = double(h(2 * g + 1) >> 11) * std::ldexp(1.0, -53);
  return double(std) * (std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

// f32 -> bf16 bits, round to nearest even (finite values).
uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t lsb = (u >> 16) & 1u;
  return uint16_t((u + 0x7fffu + lsb) >> 16);
}

// The CPU tensor's elements as doubles (bf16 read from its bits).
std::vector<double> values(const Tensor& t) {
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (t.dtype() == DType::F64) {
      v[i] = t.data<double>()[i];
    } else if (t.dtype() == DType::F32) {
      v[i] = t.data<float>()[i];
    } else {
      const uint32_t u = uint32_t(t.data<uint16_t>()[i]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      v[i] = f;
    }
  }
  return v;
}

// Bit patterns, for exact comparisons (NaN-safe, -0 distinct).
std::vector<uint64_t> bits(const Tensor& t) {
  std::vector<uint64_t> b(t.numel());
  const size_t sz = dtype_size(t.dtype());
  for (int64_t i = 0; i < t.numel(); ++i) std::memcpy(&b[i], static_cast<const char*>(t.raw()) + i * sz, sz);
  return b;
}

TEST(InitNormal, ValuesFollowTheFormulaInEveryDtype) {
  auto ops = make_cpu_ops();
  const uint64_t seed = 1234567, tid = 17;
  const double std = 0.02;
  const int64_t full_cols = 37, row0 = 5, col0 = 11;
  for (DType dt : {DType::F64, DType::F32, DType::BF16}) {
    Tensor t = ops->empty({9, 13}, dt);
    ops->init_normal(t, seed, tid, std, full_cols, row0, col0);
    const auto v = values(t);
    const auto b = bits(t);
    for (int64_t r = 0; r < 9; ++r)
      for (int64_t c = 0; c < 13; ++c) {
        const uint64_t g = uint64_t((row0 + r) * full_cols + col0 + c);
        const double want = expected_value(seed, tid, g, std);
        const int64_t i = r * 13 + c;
        if (dt == DType::F64) {
          ASSERT_EQ(v[i], want) << "f64 element (" << r << ", " << c << ")";
        } else if (dt == DType::F32) {
          ASSERT_EQ(float(v[i]), float(want)) << "f32 element (" << r << ", " << c << ")";
        } else {
          ASSERT_EQ(b[i], bf16_bits(float(want))) << "bf16 element (" << r << ", " << c << ")";
        }
      }
  }
  // a 1-D tensor is [n, 1]: element k is g = row0 + k
  Tensor v1 = ops->empty({6}, DType::F64);
  ops->init_normal(v1, 3, 4, 0.1, 1, 7, 0);
  for (int64_t k = 0; k < 6; ++k) EXPECT_EQ(v1.data<double>()[k], expected_value(3, 4, uint64_t(7 + k), 0.1));
  // extreme counters: g near 2^62 stays finite
  Tensor far = ops->empty({2, 4}, DType::F64);
  const int64_t big_cols = int64_t(1) << 40, big_row = (int64_t(1) << 22) - 2;
  ops->init_normal(far, 9, 9, 1.0, big_cols, big_row, big_cols - 4);
  for (int64_t i = 0; i < 8; ++i) {
    const uint64_t g = uint64_t(big_row + i / 4) * uint64_t(big_cols) + uint64_t(big_cols - 4 + i % 4);
    EXPECT_EQ(far.data<double>()[i], expected_value(9, 9, g, 1.0));
  }
  // std = 0 gives zeros
  Tensor z = ops->empty({5}, DType::F32);
  ops->init_normal(z, 1, 1, 0.0, 1, 0, 0);
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(std::fabs(z.data<float>()[i]), 0.0f);
}

TEST(InitNormal, ASliceEqualsTheSameBlockOfTheFullTensor) {
  auto ops = make_cpu_ops();
  const int64_t R = 24, C = 40;
  for (DType dt : {DType::F64, DType::F32, DType::BF16}) {
    Tensor full = ops->empty({R, C}, dt);
    ops->init_normal(full, 42, 3, 0.02, C, 0, 0);
    const auto fb = bits(full);
    struct Block { int64_t r0, nr, c0, nc; };
    // TP-style row and column shards (4 ranks) and an arbitrary interior block
    std::vector<Block> blocks;
    for (int k = 0; k < 4; ++k) {
      blocks.push_back({k * R / 4, R / 4, 0, C});
      blocks.push_back({0, R, k * C / 4, C / 4});
    }
    blocks.push_back({7, 5, 13, 9});
    for (const Block& bl : blocks) {
      Tensor part = ops->empty({bl.nr, bl.nc}, dt);
      ops->init_normal(part, 42, 3, 0.02, C, bl.r0, bl.c0);
      const auto pb = bits(part);
      for (int64_t r = 0; r < bl.nr; ++r)
        for (int64_t c = 0; c < bl.nc; ++c)
          ASSERT_EQ(pb[r * bl.nc + c], fb[(bl.r0 + r) * C + bl.c0 + c])
              << dtype_name(dt) << " block at (" << bl.r0 << ", " << bl.c0 << "), element (" << r << ", " << c << ")";
    }
    // a 3-D out is [numel / last, last]; a flat slice of a 1-D tensor is its [n, 1] block
    Tensor three = ops->empty({2, 3, C}, dt);
    ops->init_normal(three, 42, 3, 0.02, C, 4, 0);
    const auto tb = bits(three);
    for (int64_t i = 0; i < 6 * C; ++i) ASSERT_EQ(tb[i], fb[4 * C + i]) << dtype_name(dt) << " 3-D, element " << i;
    Tensor flat = ops->empty({R * C}, dt), piece = ops->empty({100}, dt);
    ops->init_normal(flat, 42, 3, 0.02, 1, 0, 0);
    ops->init_normal(piece, 42, 3, 0.02, 1, 333, 0);
    const auto flb = bits(flat), pcb = bits(piece);
    for (int64_t i = 0; i < 100; ++i) ASSERT_EQ(pcb[i], flb[333 + i]) << dtype_name(dt) << " 1-D, element " << i;
    for (int64_t i = 0; i < R * C; ++i) ASSERT_EQ(flb[i], fb[i]) << dtype_name(dt) << ": [n, 1] vs [R, C], element " << i;
  }
}

TEST(InitNormal, MomentsOfAMillionSamples) {
  auto ops = make_cpu_ops();
  const int64_t n = 1000000;
  for (double std : {1.0, 0.02}) {
    Tensor t = ops->empty({1000, 1000}, DType::F64);
    ops->init_normal(t, 7, 0, std, 1000, 0, 0);
    const double* x = t.data<double>();
    double s = 0, s2 = 0;
    int64_t within1 = 0;
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_TRUE(std::isfinite(x[i])) << "element " << i;
      s += x[i];
      s2 += x[i] * x[i];
      within1 += std::fabs(x[i]) < std;
    }
    const double mean = s / n, sd = std::sqrt(s2 / n - mean * mean);
    EXPECT_LT(std::fabs(mean), 5 * std / std::sqrt(double(n))) << "std " << std;
    EXPECT_LT(std::fabs(sd - std), 5 * std / std::sqrt(2.0 * n)) << "std " << std;  // SE of s = sigma / sqrt(2n)
    const double p = 0.6826894921370859;  // P(|Z| < 1)
    EXPECT_LT(std::fabs(double(within1) / n - p), 5 * std::sqrt(p * (1 - p) / n)) << "std " << std;
  }
}

TEST(InitNormal, OtherTensorIdsAndSeedsGiveUncorrelatedStreams) {
  auto ops = make_cpu_ops();
  const int64_t n = 1000000;
  auto stream = [&](uint64_t seed, uint64_t tid) {
    Tensor t = ops->empty({n}, DType::F64);
    ops->init_normal(t, seed, tid, 1.0, 1, 0, 0);
    return std::vector<double>(t.data<double>(), t.data<double>() + n);
  };
  auto corr = [&](const std::vector<double>& a, const std::vector<double>& b, int64_t lag = 0) {
    double sa = 0, sb = 0, sab = 0, saa = 0, sbb = 0;
    const int64_t m = n - lag;
    for (int64_t i = 0; i < m; ++i) {
      sa += a[i];
      sb += b[i + lag];
      sab += a[i] * b[i + lag];
      saa += a[i] * a[i];
      sbb += b[i + lag] * b[i + lag];
    }
    const double cov = sab / m - (sa / m) * (sb / m);
    return cov / std::sqrt((saa / m - (sa / m) * (sa / m)) * (sbb / m - (sb / m) * (sb / m)));
  };
  const double bound = 5 / std::sqrt(double(n));
  const auto base = stream(1, 0);
  struct Other { uint64_t seed, tid; const char* what; };
  for (const Other& o : {Other{1, 1, "next tensor id"}, Other{2, 0, "next seed"}, Other{0, 1, "seed 0 tensor 1"},
                         Other{1, 2, "tensor id 2"}, Other{2, 1, "seed and tensor id both + 1"}}) {
    const double c = corr(base, stream(o.seed, o.tid));
    EXPECT_LT(std::fabs(c), bound) << o.what << ": corr " << c;
  }
  // (s, t) and (t, s) are different streams, and neighbouring elements of one are uncorrelated
  EXPECT_LT(std::fabs(corr(stream(3, 5), stream(5, 3))), bound);
  EXPECT_LT(std::fabs(corr(base, base, 1)), bound) << "lag 1";
  // stream t + 1 is not stream t shifted by an element either (counters 2g, 2g+1 per element)
  EXPECT_LT(std::fabs(corr(base, stream(1, 1), 1)), bound) << "tensor 1 lag 1";
}

TEST(InitNormal, BadArgumentsRaiseErrorsNamingTheOpAndValue) {
  auto ops = make_cpu_ops();
  auto expect_error = [](const std::function<void()>& f, const std::vector<std::string>& parts) {
    try {
      f();
      ADD_FAILURE() << "no error raised (expected one mentioning '" << parts.back() << "')";
    } catch (const Error& e) {
      const std::string msg = e.what();
      for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    }
  };
  Tensor t = ops->empty({4, 8}, DType::F32);
  expect_error([&] { ops->init_normal(t, 1, 0, 0.02, 0, 0, 0); }, {"cpu init_normal", "full_cols (0)"});
  expect_error([&] { ops->init_normal(t, 1, 0, 0.02, 8, -1, 0); }, {"cpu init_normal", "row0 (-1)"});
  expect_error([&] { ops->init_normal(t, 1, 0, 0.02, 10, 0, 3); }, {"cpu init_normal", "col0 (3)", "full_cols=10"});
  expect_error([&] { ops->init_normal(t, 1, 0, 0.02, 8, 0, -2); }, {"cpu init_normal", "col0 (-2)"});
  expect_error([&] { ops->init_normal(t, 1, 0, 0.02, 4, 0, 0); }, {"cpu init_normal", "full_cols=4"});
  expect_error([&] { ops->init_normal(t, 1, 0, -0.5, 8, 0, 0); }, {"cpu init_normal", "std (-0.5"});
  expect_error([&] { ops->init_normal(t, 1, 0, std::nan(""), 8, 0, 0); }, {"cpu init_normal", "std (", "nan"});
  expect_error([&] { ops->init_normal(t, 1, 0, 1.0, 8, int64_t(1) << 60, 0); }, {"cpu init_normal", "2^62"});
  Tensor ids = ops->empty({4}, DType::I32);
  expect_error([&] { ops->init_normal(ids, 1, 0, 1.0, 1, 0, 0); }, {"cpu init_normal", "i32[4]"});
  Tensor none;
  expect_error([&] { ops->init_normal(none, 1, 0, 1.0, 1, 0, 0); }, {"cpu init_normal", "undefined"});
}

// Model::init_weights: every normal tensor t is init_normal(seed, t) of its full shape with
// the stds the model documents, norm weights are 1.
TEST(InitNormal, ModelInitWeightsUsesIt) {
  auto ops = make_cpu_ops();
  ModelConfig cfg;
  cfg.vocab_size = 64;
  cfg.d_model = 64;
  cfg.n_layers = 3;
  cfg.n_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.max_seq_len = 16;
  Model m(cfg, *ops, ModelPrecision::uniform(DType::F64), 1, 8);
  m.init_weights(77);
  const ModelConfig& c = m.config();
  const double out_std = c.init_std / std::sqrt(2.0 * double(c.n_layers));
  int n_normal = 0, n_ones = 0;
  for (size_t t = 0; t < m.params().size(); ++t) {
    const Param& p = m.params()[t];
    const std::string& n = p.name;
    auto ends = [&](const std::string& s) { return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0; };
    const auto v = values(p.value);
    if (ends("norm.weight") || ends("layernorm.weight") || ends("subln.weight")) {
      for (double x : v) ASSERT_EQ(x, 1.0) << n;
      ++n_ones;
      continue;
    }
    const double std = n.find(".lambda_") != std::string::npos ? c.lambda_std
                       : (ends("o_proj.weight") || ends("down_proj.weight")) ? out_std
                                                                             : c.init_std;
    for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], expected_value(77, t, i, std)) << n << " element " << i;
    ++n_normal;
  }
  EXPECT_EQ(n_ones, 2 * 3 + 1 + 3);        // two per layer, the final norm, subln per layer
  EXPECT_EQ(n_normal, 1 + 3 * (7 + 4) + 1);  // embedding, 7 matrices + 4 lambdas per layer, head
}

}  // namespace
}  // namespace difftron
