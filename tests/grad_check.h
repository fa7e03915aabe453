// Test helpers: fresh random inputs and fp64 central finite differences.
#pragma once
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "base/rng.h"

namespace difftron::testing {

inline std::vector<double> randn(size_t n, uint64_t seed, double scale = 1.0) {
  Rng r(seed);
  std::vector<double> v(n);
  for (auto& x : v) x = scale * r.normal();
  return v;
}

// d loss / d x[i] for every i by central differences (x is perturbed in place and restored).
inline std::vector<double> numeric_grad(const std::function<double()>& loss, std::vector<double>& x,
                                        double eps = 1e-5) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    double old = x[i];
    x[i] = old + eps;
    double lp = loss();
    x[i] = old - eps;
    double lm = loss();
    x[i] = old;
    g[i] = (lp - lm) / (2 * eps);
  }
  return g;
}

// ||a - b|| / max(||b||, tiny)
inline double rel_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

inline void expect_grad(const std::string& what, const std::vector<double>& analytic,
                        const std::vector<double>& numeric, double tol = 1e-7) {
  ASSERT_EQ(analytic.size(), numeric.size()) << what;
  double norm = 0;
  for (double v : numeric) norm += v * v;
  EXPECT_GT(std::sqrt(norm), 1e-8) << what << ": numeric gradient is ~0; the check would be vacuous";
  EXPECT_LT(rel_l2(analytic, numeric), tol) << what;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace difftron::testing
