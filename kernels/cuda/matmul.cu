// GEMM on the GPU through cuBLASLt: y[M,N] = alpha op(a) op(b) + beta c (c = y, or another
// tensor of y's layout: cuBLASLt's C input, for the residual adds), row-major, with
// fp32 accumulation. bf16 a/b give bf16 or f32 y (beta = 1 accumulates weight gradients
// into f32); f32 a/b run plain fp32 (no TF32), for tests. Row-major y = op(a) op(b) is
// computed as the column-major y^T = op(b)^T op(a)^T; descriptors and the heuristic's
// algorithm are cached per (shape, transposes, dtypes, alignments) in the context.
#include <algorithm>
#include <memory>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    default: throw_error("cuda matmul: internal: unsupported dtype ", dtype_name(t));
  }
}

int alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int al = 1;
  while (al < 256 && (a % (2 * al)) == 0) al *= 2;
  return al;
}

std::unique_ptr<MatmulPlan> make_plan(CudaContext& ctx, const MatmulKey& k) {
  auto plan = std::make_unique<MatmulPlan>();
  const auto tab = cudaDataType_t(k.type_ab), ty = cudaDataType_t(k.type_y);
  DT_CUBLAS(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = k.tb ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLAS's A is our b
  const cublasOperation_t op_b = k.ta ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLAS's B is our a
  DT_CUBLAS(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  DT_CUBLAS(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  // Column-major views of the row-major buffers: (rows, cols, leading dimension).
  if (k.tb)
    DT_CUBLAS(cublasLtMatrixLayoutCreate(&plan->a, tab, k.k, k.n, k.k));  // b [N, K]
  else
    DT_CUBLAS(cublasLtMatrixLayoutCreate(&plan->a, tab, k.n, k.k, k.n));  // b [K, N]
  if (k.ta)
    DT_CUBLAS(cublasLtMatrixLayoutCreate(&plan->b, tab, k.m, k.k, k.m));  // a [K, M]
  else
    DT_CUBLAS(cublasLtMatrixLayoutCreate(&plan->b, tab, k.k, k.m, k.k));  // a [M, K]
  DT_CUBLAS(cublasLtMatrixLayoutCreate(&plan->y, ty, k.n, k.m, k.n));     // y [M, N]

  cublasLtMatmulPreference_t pref = nullptr;
  DT_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
  std::unique_ptr<void, void (*)(void*)> pref_guard(
      pref, [](void* p) { cublasLtMatmulPreferenceDestroy(static_cast<cublasLtMatmulPreference_t>(p)); });
  const size_t ws = ctx.workspace_bytes();
  const uint32_t al_a = k.align_b, al_b = k.align_a, al_y = k.align_y;
  DT_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  DT_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)));
  DT_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)));
  DT_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_y, sizeof(al_y)));
  DT_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_y, sizeof(al_y)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  DT_CUBLAS(cublasLtMatmulAlgoGetHeuristic(ctx.lt(), plan->op, plan->a, plan->b, plan->y, plan->y,
                                           pref, 1, &result, &found));
  if (found < 1)
    throw_error("cuda matmul: cuBLASLt has no algorithm for M=", k.m, " N=", k.n, " K=", k.k,
                " trans_a=", k.ta, " trans_b=", k.tb, " (a/b type ", k.type_ab, ", y type ",
                k.type_y, ")");
  plan->algo = result.algo;
  return plan;
}

}  // namespace

void matmul(CudaContext& ctx, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
            Tensor& y, int64_t M, int64_t N, int64_t K, float alpha, float beta, const Tensor* c) {
  if (M == 0 || N == 0) return;
  const void* c_raw = c ? c->raw() : y.raw();
  if (K == 0) {  // y = beta c
    if (beta == 0.0f) {
      DT_CUDA(cudaMemsetAsync(y.raw(), 0, y.nbytes(), ctx.stream()));
    } else {
      if (c) copy(ctx, *c, y);
      scale(ctx, y, beta);
    }
    return;
  }
  // C and D share one layout descriptor; the plan's alignment is the lesser of the two
  MatmulKey key{M, N, K, trans_a, trans_b, int(cuda_type(a.dtype())), int(cuda_type(y.dtype())),
                alignment(a.raw()), alignment(b.raw()), std::min(alignment(y.raw()), alignment(c_raw))};
  MatmulPlan* plan = ctx.find_plan(key);
  if (!plan) plan = ctx.add_plan(key, make_plan(ctx, key));
  DT_CUBLAS(cublasLtMatmul(ctx.lt(), plan->op, &alpha, b.raw(), plan->a, a.raw(), plan->b, &beta,
                           c_raw, plan->y, y.raw(), plan->y, &plan->algo, ctx.workspace(),
                           ctx.workspace_bytes(), ctx.stream()));
}

}  // namespace difftron::cuda
