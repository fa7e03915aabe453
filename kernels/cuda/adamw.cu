// AdamW on the GPU (reference: kernels/cpu/adamw.cpp, PyTorch's update order): f32 master
// weights and moments, gradients f32 or bf16; the bf16 working copy is refreshed by
// Ops::copy afterwards. One fused element-wise pass: 16 bytes read + 12 written per f32 grad.
#include <cmath>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

template <typename G>
struct AdamWOp {
  float* param;
  const G* grad;
  float* m;
  float* v;
  float lr, beta1, beta2, eps, decay, grad_scale, inv_bc1, inv_bc2;
  template <int V>
  __device__ void apply(int64_t i) const {
    float p[V], g[V], mm[V], vv[V];
    load_floats<V>(param + i, p);
    load_floats<V>(grad + i, g);
    load_floats<V>(m + i, mm);
    load_floats<V>(v + i, vv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float gj = g[j] * grad_scale;
      mm[j] = beta1 * mm[j] + (1.0f - beta1) * gj;
      vv[j] = beta2 * vv[j] + (1.0f - beta2) * gj * gj;
      float mh = mm[j] * inv_bc1, vh = vv[j] * inv_bc2;
      p[j] = p[j] * decay - lr * mh / (sqrtf(vh) + eps);
    }
    store_floats<V>(param + i, p);
    store_floats<V>(m + i, mm);
    store_floats<V>(v + i, vv);
  }
};

}  // namespace

void adamw_step(CudaContext& ctx, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                const AdamWParams& hp) {
  const double bc1 = 1.0 - std::pow(double(hp.beta1), double(hp.step));
  const double bc2 = 1.0 - std::pow(double(hp.beta2), double(hp.step));
  const bool vec = aligned16(param.raw()) && aligned16(grad.raw()) && aligned16(m.raw()) &&
                   aligned16(v.raw());
  dispatch_float(grad.dtype(), [&](auto t) {
    using G = typename decltype(t)::type;
    AdamWOp<G> op{param.data<float>(), grad.data<G>(), m.data<float>(), v.data<float>(),
                  hp.lr, hp.beta1, hp.beta2, hp.eps,
                  float(1.0 - double(hp.lr) * double(hp.weight_decay)), hp.grad_scale,
                  float(1.0 / bc1), float(1.0 / bc2)};
    launch_elementwise(ctx, param.numel(), vec, op);
  });
}

}  // namespace difftron::cuda
