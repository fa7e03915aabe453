// SwiGLU gate: out = silu(gate) * up, silu(x) = x * sigmoid(x).
#include <cmath>

#include "kernels/cpu/reference.h"

namespace difftron::cpu {

template <typename T>
void swiglu_forward(const T* gate, const T* up, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T s = T(1) / (T(1) + std::exp(-gate[i]));
    out[i] = gate[i] * s * up[i];
  }
}

// d silu(x)/dx = s (1 + x (1 - s)), s = sigmoid(x)
template <typename T>
void swiglu_backward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T g = gate[i], s = T(1) / (T(1) + std::exp(-g));
    dup[i] = dout[i] * g * s;
    dgate[i] = dout[i] * up[i] * s * (T(1) + g * (T(1) - s));
  }
}

#define INSTANTIATE(T)                                                   \
  template void swiglu_forward<T>(const T*, const T*, T*, int64_t);       \
  template void swiglu_backward<T>(const T*, const T*, const T*, T*, T*, int64_t);
INSTANTIATE(float)
INSTANTIATE(double)

}  // namespace difftron::cpu
