// copy: dst = src element-wise with dtype conversion (f32 <-> bf16, round to nearest even),
// the bf16 cast of the master weights after AdamW among others. Same dtype: a device copy.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

template <typename S, typename D>
struct CastOp {
  const S* src;
  D* dst;
  template <int V>
  __device__ void apply(int64_t i) const {
    float f[V];
    load_floats<V>(src + i, f);
    store_floats<V>(dst + i, f);
  }
};

}  // namespace

void copy(CudaContext& ctx, const Tensor& src, Tensor& dst) {
  if (src.numel() == 0) return;
  if (src.dtype() == dst.dtype()) {
    DT_CUDA(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice,
                            ctx.stream()));
    return;
  }
  const bool vec = aligned16(src.raw()) && aligned16(dst.raw());
  dispatch_float(src.dtype(), [&](auto s) {
    using S = typename decltype(s)::type;
    dispatch_float(dst.dtype(), [&](auto d) {
      using D = typename decltype(d)::type;
      launch_elementwise(ctx, src.numel(), vec, CastOp<S, D>{src.data<S>(), dst.data<D>()});
    });
  });
}

}  // namespace difftron::cuda
