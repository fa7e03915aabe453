// Softmax cross-entropy over the vocabulary, per row; rows with target < 0 are ignored.
#include <algorithm>
#include <cmath>

#include "base/error.h"
#include "kernels/cpu/reference.h"

namespace difftron::cpu {

template <typename T>
void cross_entropy_forward(const T* logits, const int32_t* targets, T* losses, T* lse,
                           int64_t n, int64_t vocab) {
  for (int64_t r = 0; r < n; ++r) {
    const T* x = logits + r * vocab;
    double mx = -INFINITY;
    for (int64_t c = 0; c < vocab; ++c) mx = std::max(mx, double(x[c]));
    double sum = 0;
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(double(x[c]) - mx);
    double l = mx + std::log(sum);
    lse[r] = T(l);
    int32_t t = targets[r];
    if (t >= vocab) throw_error("target id ", t, " at row ", r, " is outside the vocabulary [0, ", vocab, ")");
    losses[r] = t < 0 ? T(0) : T(l - double(x[t]));
  }
}

template <typename T>
void cross_entropy_backward(const T* logits, const int32_t* targets, const T* lse, T dloss,
                            T* dlogits, int64_t n, int64_t vocab) {
  for (int64_t r = 0; r < n; ++r) {
    int32_t t = targets[r];
    T* d = dlogits + r * vocab;
    const T* x = logits + r * vocab;
    if (t < 0) {
      std::fill(d, d + vocab, T(0));
      continue;
    }
    for (int64_t c = 0; c < vocab; ++c) d[c] = T(std::exp(double(x[c]) - double(lse[r]))) * dloss;
    d[t] -= dloss;
  }
}

#define INSTANTIATE(T)                                                                      \
  template void cross_entropy_forward<T>(const T*, const int32_t*, T*, T*, int64_t, int64_t); \
  template void cross_entropy_backward<T>(const T*, const int32_t*, const T*, T, T*, int64_t,  \
                                          int64_t);
INSTANTIATE(float)
INSTANTIATE(double)

}  // namespace difftron::cpu
