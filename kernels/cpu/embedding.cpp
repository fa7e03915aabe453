// Token embedding lookup and its backward (a scatter-add in token order).
#include <cstring>

#include "base/error.h"
#include "kernels/cpu/reference.h"

namespace difftron::cpu {

static void check_token(int32_t t, int64_t i, int64_t vocab) {
  if (t < 0 || t >= vocab)
    throw_error("token id ", t, " at position ", i, " is outside the vocabulary [0, ", vocab, ")");
}

template <typename T>
void embedding_forward(const int32_t* tokens, const T* table, T* out, int64_t n, int64_t d,
                       int64_t vocab) {
  for (int64_t i = 0; i < n; ++i) {
    check_token(tokens[i], i, vocab);
    std::memcpy(out + i * d, table + int64_t(tokens[i]) * d, d * sizeof(T));
  }
}

template <typename T>
void embedding_backward(const int32_t* tokens, const T* dout, T* dtable, int64_t n, int64_t d,
                        int64_t vocab) {
  for (int64_t i = 0; i < n; ++i) {
    check_token(tokens[i], i, vocab);
    T* row = dtable + int64_t(tokens[i]) * d;
    for (int64_t c = 0; c < d; ++c) row[c] += dout[i * d + c];
  }
}

#define INSTANTIATE(T)                                                                        \
  template void embedding_forward<T>(const int32_t*, const T*, T*, int64_t, int64_t, int64_t); \
  template void embedding_backward<T>(const int32_t*, const T*, T*, int64_t, int64_t, int64_t);
INSTANTIATE(float)
INSTANTIATE(double)

}  // namespace difftron::cpu
