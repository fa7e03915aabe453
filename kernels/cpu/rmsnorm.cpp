// RMSNorm over the last dim with an output scale (the sub-layer norm's 1 - lambda_init),
// and its backward with the residual add fused (dx accumulates).
#include <cmath>

#include "kernels/cpu/reference.h"

namespace difftron::cpu {

template <typename T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* rstd, int64_t rows, int64_t cols,
                     double eps, T scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    double ss = 0;
    for (int64_t c = 0; c < cols; ++c) ss += double(xr[c]) * double(xr[c]);
    T rs = T(1.0 / std::sqrt(ss / double(cols) + eps));
    rstd[r] = rs;
    for (int64_t c = 0; c < cols; ++c) y[r * cols + c] = xr[c] * rs * w[c] * scale;
  }
}

// y_c = x_c * r * w_c * s, r = (mean(x^2) + eps)^(-1/2), dr/dx_c = -r^3 x_c / cols:
// dx_c = s * r * (dy_c w_c - x_c * r^2 * mean_k(dy_k w_k x_k)); dw_c = sum_rows dy_c x_c r s.
template <typename T>
void rmsnorm_backward(const T* x, const T* w, const T* rstd, const T* dy, T* dx, T* dw,
                      int64_t rows, int64_t cols, T scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    T rs = rstd[r];
    double dot = 0;
    for (int64_t c = 0; c < cols; ++c) dot += double(dyr[c]) * double(w[c]) * double(xr[c]);
    T m = T(dot / double(cols));
    for (int64_t c = 0; c < cols; ++c) {
      dx[r * cols + c] += scale * rs * (dyr[c] * w[c] - xr[c] * rs * rs * m);
      dw[c] += dyr[c] * xr[c] * rs * scale;
    }
  }
}

#define INSTANTIATE(T)                                                                     \
  template void rmsnorm_forward<T>(const T*, const T*, T*, T*, int64_t, int64_t, double, T); \
  template void rmsnorm_backward<T>(const T*, const T*, const T*, const T*, T*, T*, int64_t,  \
                                    int64_t, T);
INSTANTIATE(float)
INSTANTIATE(double)

}  // namespace difftron::cpu
