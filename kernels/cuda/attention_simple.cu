// Standard causal softmax attention with GQA on the GPU (the baseline Transformer), the
// simple SIMT kernels of attention_simple.cuh with one map per head (reference:
// kernels/cpu/attention.cpp). q [B,S,H,dh], k/v [B,S,H_kv,dh], out [B,S,H,dh], lse [B,H,S].
#include "kernels/cuda/attention_simple.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {

static simple_attention::Layout standard_layout(const Tensor& q, const Tensor& k) {
  simple_attention::Layout L;
  L.B = q.dim(0);
  L.S = q.dim(1);
  L.H = q.dim(2);
  L.Hkv = k.dim(2);
  L.dh = int(q.dim(3));
  L.dv = L.dh;
  L.q_row = L.H * L.dh;
  L.k_row = L.Hkv * L.dh;
  L.v_row = L.Hkv * L.dh;
  L.o_row = L.H * L.dh;
  L.scale = float(1.0 / std::sqrt(double(L.dh)));
  return L;
}

void attention_simple_forward(CudaContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                              Tensor& out, Tensor& lse) {
  const auto L = standard_layout(q, k);
  dispatch_float(q.dtype(), [&](auto tt) {
    using T = typename decltype(tt)::type;
    simple_attention::launch_forward<T, 1>(ctx, L, q.data<T>(), k.data<T>(), v.data<T>(), nullptr,
                                           out.data<T>(), lse.data<float>(), "attention_forward");
  });
}

void attention_simple_backward(CudaContext& ctx, const Tensor& q, const Tensor& k,
                               const Tensor& v, const Tensor& lse, const Tensor& dout, Tensor& dq,
                               Tensor& dk, Tensor& dv) {
  const auto L = standard_layout(q, k);
  float* D = static_cast<float*>(ctx.scratch(size_t(L.B * L.H * L.S) * sizeof(float)));
  dispatch_float(q.dtype(), [&](auto tt) {
    using T = typename decltype(tt)::type;
    simple_attention::launch_backward<T, 1>(ctx, L, q.data<T>(), k.data<T>(), v.data<T>(), nullptr,
                                            lse.data<float>(), dout.data<T>(), dq.data<T>(),
                                            dk.data<T>(), dv.data<T>(), D, nullptr,
                                            "attention_backward");
  });
}

}  // namespace difftron::cuda
