// Shared by the Hugging Face interop tests (tests/test_hf_*.cpp): the fixtures' .npy logits and
// tokens, the logits of every position, and the bound on how far a difftron forward pass may be
// from transformers' on the same weights.
#pragma once
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/model.h"
#include "tests/tolerances.h"

namespace difftron::testing {

// Minimal .npy reader for a little-endian float64 C-order array.
inline std::vector<double> read_npy_f64(const std::string& path, std::vector<int64_t>* shape) {
  std::ifstream f(path, std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_EQ(all.substr(1, 5), "NUMPY") << path;
  uint16_t hlen;
  std::memcpy(&hlen, all.data() + 8, 2);
  std::string header = all.substr(10, hlen);
  EXPECT_NE(header.find("'descr': '<f8'"), std::string::npos) << header;
  EXPECT_NE(header.find("'fortran_order': False"), std::string::npos) << header;
  auto lp = header.find("'shape': (");
  std::string dims = header.substr(lp + 10, header.find(')', lp) - lp - 10);
  shape->clear();
  for (size_t pos = 0; pos < dims.size();) {
    size_t comma = dims.find(',', pos);
    std::string d = dims.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (d.find_first_of("0123456789") != std::string::npos) shape->push_back(std::stoll(d));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  size_t n = (all.size() - 10 - hlen) / 8;
  std::vector<double> v(n);
  std::memcpy(v.data(), all.data() + 10 + hlen, n * 8);
  return v;
}

inline std::vector<int32_t> read_tokens_json(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f).get<std::vector<int32_t>>();
}

// Logits at every position, [S, V], from the causal model one prefix at a time.
inline std::vector<double> all_logits(Model& m, const std::vector<int32_t>& tok) {
  std::vector<double> out;
  for (size_t t = 1; t <= tok.size(); ++t) {
    auto l = m.last_logits(tok.data(), t);
    out.insert(out.end(), l.begin(), l.end());
  }
  return out;
}

// How far (rel L2) difftron's logits may be from transformers' float64 logits of the same
// weights. Two sources of rounding, both worst cases from the arithmetic:
//  - difftron's own: in f32, the forward pass's chain of reductions summed in another order
//    than the reference's (tolerances.h); in f64 the same bound with u = 2^-53.
//  - transformers' RoPE tables, computed in float32 even for a float64 model: the angle
//    s * inv_freq (s < S) is off by up to about (S + 1) u32 in absolute terms, which moves
//    every rotated q and k by that relative amount, and each layer's attention once more.
inline double hf_logits_bound(const ModelConfig& c, int64_t S, bool f32) {
  const double ours = reordered_sums_bound(longest_reduction(c, S, S), forward_chain(c));
  const double rope = 2.0 * double(S + 1) * kF32UnitRoundoff * double(c.n_layers) * 2;
  return (f32 ? ours : ours * 0x1p-29) + rope;
}

}  // namespace difftron::testing
