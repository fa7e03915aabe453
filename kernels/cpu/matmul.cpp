// Row-major GEMM on the CPU through OpenBLAS (cblas): the CPU path's only dense kernel.
#include <cblas.h>

#include "kernels/cpu/reference.h"

namespace difftron::cpu {

template <>
void matmul<float>(const float* a, bool trans_a, const float* b, bool trans_b, float* y, int64_t M,
                   int64_t N, int64_t K, float alpha, float beta) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              M, N, K, alpha, a, trans_a ? M : K, b, trans_b ? K : N, beta, y, N);
}

template <>
void matmul<double>(const double* a, bool trans_a, const double* b, bool trans_b, double* y,
                    int64_t M, int64_t N, int64_t K, double alpha, double beta) {
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              M, N, K, alpha, a, trans_a ? M : K, b, trans_b ? K : N, beta, y, N);
}

}  // namespace difftron::cpu
