// The differential-attention lambda on the GPU (reference: kernels/cpu/diff_attention.cpp):
// lambda = exp(<lq1,lk1>) - exp(<lq2,lk2>) + lambda_init and its backward. dh-vectors in f32
// or bf16, lambda / dlambda [1] f32, gradients f32 or bf16 (accumulated). One block; the dot
// products are summed in a fixed order in double.
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

constexpr int kThreads = 128;

template <typename P>
__device__ void lambda_dots(const P* lq1, const P* lk1, const P* lq2, const P* lk2, int64_t dh,
                            double& e1, double& e2) {
  __shared__ double red[33];
  double d1 = 0, d2 = 0;
  for (int64_t c = threadIdx.x; c < dh; c += blockDim.x) {
    d1 += double(to_float(lq1[c])) * double(to_float(lk1[c]));
    d2 += double(to_float(lq2[c])) * double(to_float(lk2[c]));
  }
  d1 = block_sum(d1, red);
  d2 = block_sum(d2, red);
  e1 = exp(d1);
  e2 = exp(d2);
}

template <typename P>
__global__ void diff_lambda_forward_kernel(const P* lq1, const P* lk1, const P* lq2, const P* lk2,
                                           int64_t dh, double lambda_init, float* lambda) {
  double e1, e2;
  lambda_dots(lq1, lk1, lq2, lk2, dh, e1, e2);
  if (threadIdx.x == 0) lambda[0] = float(e1 - e2 + lambda_init);
}

template <typename P, typename G>
__global__ void diff_lambda_backward_kernel(const P* lq1, const P* lk1, const P* lq2,
                                            const P* lk2, int64_t dh, const float* dlambda,
                                            G* dlq1, G* dlk1, G* dlq2, G* dlk2) {
  double e1, e2;
  lambda_dots(lq1, lk1, lq2, lk2, dh, e1, e2);
  const float a = float(double(dlambda[0]) * e1), b = float(double(dlambda[0]) * e2);
  for (int64_t c = threadIdx.x; c < dh; c += blockDim.x) {
    dlq1[c] = from_float<G>(to_float(dlq1[c]) + a * to_float(lk1[c]));
    dlk1[c] = from_float<G>(to_float(dlk1[c]) + a * to_float(lq1[c]));
    dlq2[c] = from_float<G>(to_float(dlq2[c]) - b * to_float(lk2[c]));
    dlk2[c] = from_float<G>(to_float(dlk2[c]) - b * to_float(lq2[c]));
  }
}

}  // namespace

void diff_lambda_forward(CudaContext& ctx, const Tensor& lq1, const Tensor& lk1, const Tensor& lq2,
                         const Tensor& lk2, double lambda_init, Tensor& lambda) {
  dispatch_float(lq1.dtype(), [&](auto pt) {
    using P = typename decltype(pt)::type;
    diff_lambda_forward_kernel<P><<<1, kThreads, 0, ctx.stream()>>>(
        lq1.data<P>(), lk1.data<P>(), lq2.data<P>(), lk2.data<P>(), lq1.numel(), lambda_init,
        lambda.data<float>());
    DT_CUDA_LAUNCHED();
  });
}

void diff_lambda_backward(CudaContext& ctx, const Tensor& lq1, const Tensor& lk1,
                          const Tensor& lq2, const Tensor& lk2, const Tensor& dlambda,
                          Tensor& dlq1, Tensor& dlk1, Tensor& dlq2, Tensor& dlk2) {
  dispatch_float(lq1.dtype(), [&](auto pt) {
    using P = typename decltype(pt)::type;
    dispatch_float(dlq1.dtype(), [&](auto gt) {
      using G = typename decltype(gt)::type;
      diff_lambda_backward_kernel<P, G><<<1, kThreads, 0, ctx.stream()>>>(
          lq1.data<P>(), lk1.data<P>(), lq2.data<P>(), lk2.data<P>(), lq1.numel(),
          dlambda.data<float>(), dlq1.data<G>(), dlk1.data<G>(), dlq2.data<G>(), dlk2.data<G>());
      DT_CUDA_LAUNCHED();
    });
  });
}

}  // namespace difftron::cuda
