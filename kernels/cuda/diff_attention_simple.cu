// Differential attention on the GPU, simple and correct (reference:
// kernels/cpu/diff_attention.cpp): out = (A1 - lambda A2) V per diff head with the SIMT
// kernels of attention_simple.cuh over two maps per head. The fused flash kernel
// (diff_flash_*) replaces it behind CudaOps::diff_attention_forward/backward.
// q [B,S,h,2,dh], k [B,S,h_kv,2,dh], v [B,S,h_kv,2dh], out [B,S,h,2dh], lse [B,h,2,S] f32.
#include "kernels/cuda/attention_simple.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {

static simple_attention::Layout diff_layout(const Tensor& q, const Tensor& k) {
  simple_attention::Layout L;
  L.B = q.dim(0);
  L.S = q.dim(1);
  L.H = q.dim(2);
  L.Hkv = k.dim(2);
  L.dh = int(q.dim(4));
  L.dv = 2 * L.dh;
  L.q_row = L.H * 2 * L.dh;
  L.k_row = L.Hkv * 2 * L.dh;
  L.v_row = L.Hkv * L.dv;
  L.o_row = L.H * L.dv;
  L.scale = float(1.0 / std::sqrt(double(L.dh)));
  return L;
}

void diff_attention_simple_forward(CudaContext& ctx, const Tensor& q, const Tensor& k,
                                   const Tensor& v, const Tensor& lambda, Tensor& out,
                                   Tensor& lse) {
  const auto L = diff_layout(q, k);
  dispatch_float(q.dtype(), [&](auto tt) {
    using T = typename decltype(tt)::type;
    simple_attention::launch_forward<T, 2>(ctx, L, q.data<T>(), k.data<T>(), v.data<T>(),
                                           lambda.data<float>(), out.data<T>(), lse.data<float>(),
                                           "diff_attention_forward");
  });
}

void diff_attention_simple_backward(CudaContext& ctx, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Tensor& lambda, const Tensor& lse,
                                    const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                                    Tensor& dlambda) {
  const auto L = diff_layout(q, k);
  float* D = static_cast<float*>(ctx.scratch(size_t(L.B * L.H * 2 * L.S) * sizeof(float)));
  dispatch_float(q.dtype(), [&](auto tt) {
    using T = typename decltype(tt)::type;
    simple_attention::launch_backward<T, 2>(ctx, L, q.data<T>(), k.data<T>(), v.data<T>(),
                                            lambda.data<float>(), lse.data<float>(),
                                            dout.data<T>(), dq.data<T>(), dk.data<T>(),
                                            dv.data<T>(), D, dlambda.data<float>(),
                                            "diff_attention_backward");
  });
}

}  // namespace difftron::cuda
