// AdamW with decoupled weight decay (Loshchilov & Hutter), PyTorch's update order:
// p *= 1 - lr*wd; m, v updated; p -= lr * m_hat / (sqrt(v_hat) + eps).
#include <cmath>

#include "kernels/cpu/reference.h"

namespace difftron::cpu {

template <typename P, typename G>
void adamw_step(P* param, const G* grad, float* m, float* v, int64_t n, float lr, float beta1,
                float beta2, float eps, float weight_decay, int64_t step, float grad_scale) {
  const double bc1 = 1.0 - std::pow(double(beta1), double(step));
  const double bc2 = 1.0 - std::pow(double(beta2), double(step));
  for (int64_t i = 0; i < n; ++i) {
    float g = float(grad[i]) * grad_scale;
    m[i] = beta1 * m[i] + (1.0f - beta1) * g;
    v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
    double mh = m[i] / bc1, vh = v[i] / bc2;
    double p = double(param[i]) * (1.0 - double(lr) * weight_decay);
    param[i] = P(p - double(lr) * mh / (std::sqrt(vh) + eps));
  }
}

template void adamw_step<float, float>(float*, const float*, float*, float*, int64_t, float, float,
                                       float, float, float, int64_t, float);
template void adamw_step<double, double>(double*, const double*, float*, float*, int64_t, float,
                                         float, float, float, float, int64_t, float);

}  // namespace difftron::cpu
