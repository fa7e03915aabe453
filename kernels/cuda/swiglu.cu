// SwiGLU gate on the GPU: out = silu(gate) * up and its backward, element-wise in f32
// (reference: kernels/cpu/swiglu.cpp). gate, up, out, dout, dgate, dup share one dtype.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
struct SwigluForwardOp {
  const T* gate;
  const T* up;
  T* out;
  template <int V>
  __device__ void apply(int64_t i) const {
    float g[V], u[V], o[V];
    load_floats<V>(gate + i, g);
    load_floats<V>(up + i, u);
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = g[j] * sigmoid(g[j]) * u[j];
    store_floats<V>(out + i, o);
  }
};

// d silu(x)/dx = s (1 + x (1 - s)), s = sigmoid(x)
template <typename T>
struct SwigluBackwardOp {
  const T* gate;
  const T* up;
  const T* dout;
  T* dgate;
  T* dup;
  template <int V>
  __device__ void apply(int64_t i) const {
    float g[V], u[V], d[V], dg[V], du[V];
    load_floats<V>(gate + i, g);
    load_floats<V>(up + i, u);
    load_floats<V>(dout + i, d);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float s = sigmoid(g[j]);
      du[j] = d[j] * g[j] * s;
      dg[j] = d[j] * u[j] * s * (1.0f + g[j] * (1.0f - s));
    }
    store_floats<V>(dgate + i, dg);
    store_floats<V>(dup + i, du);
  }
};

}  // namespace

void swiglu_forward(CudaContext& ctx, const Tensor& gate, const Tensor& up, Tensor& out) {
  const bool vec = aligned16(gate.raw()) && aligned16(up.raw()) && aligned16(out.raw());
  dispatch_float(gate.dtype(), [&](auto t) {
    using T = typename decltype(t)::type;
    launch_elementwise(ctx, gate.numel(), vec,
                       SwigluForwardOp<T>{gate.data<T>(), up.data<T>(), out.data<T>()});
  });
}

void swiglu_backward(CudaContext& ctx, const Tensor& gate, const Tensor& up, const Tensor& dout,
                     Tensor& dgate, Tensor& dup) {
  const bool vec = aligned16(gate.raw()) && aligned16(up.raw()) && aligned16(dout.raw()) &&
                   aligned16(dgate.raw()) && aligned16(dup.raw());
  dispatch_float(gate.dtype(), [&](auto t) {
    using T = typename decltype(t)::type;
    launch_elementwise(ctx, gate.numel(), vec,
                       SwigluBackwardOp<T>{gate.data<T>(), up.data<T>(), dout.data<T>(),
                                           dgate.data<T>(), dup.data<T>()});
  });
}

}  // namespace difftron::cuda
