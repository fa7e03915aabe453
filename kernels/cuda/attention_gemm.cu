// Standard causal attention (the baseline Transformer) for bf16 through cuBLAS GEMMs over
// materialised score matrices, one batch element and a chunk of K/V groups at a time:
//   forward   Sc = scale Q K^T (f32), P = causal softmax(Sc) (bf16) + lse, O = P V
//   backward  P = exp(Sc - lse), dP = dO V^T, dV += P^T dO, dS = scale P o (dP - D),
//             D = rowsum(dO o O), dQ = dS K, dK += dS^T Q
// Tensor-core GEMMs instead of the SIMT loops of attention_simple.cu (which stays the path
// for f32 tensors). The causal upper triangle is computed and discarded (2x the needed GEMM
// FLOPs). On Hopper the flash kernels take the shapes they support (std_flash_*, diff_flash.h);
// this is the path for the rest (odd GQA groups above 1, other head dims, GPUs without sm_90a).
// Deterministic: cuBLAS with atomics disallowed, GQA sums over the heads of a group by beta = 1
// accumulation in a fixed order into f32 buffers. Layouts: kernels/ops.h (q [B,S,H,dh], k/v [B,S,H_kv,dh],
// lse [B,H,S]).
#include <algorithm>
#include <cmath>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace difftron::cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kScoreBudget = size_t(1) << 30;  // bytes of Sc (f32) + P (bf16) per chunk

// Row t of score matrix n: Sc row-major [n][t][u], row stride S. Causal: u <= t.
__global__ void softmax_forward_kernel(const float* sc, bf16* p, float* lse, int S,
                                       int64_t lse_stride) {
  __shared__ float red[33];
  const int t = blockIdx.x, n = blockIdx.y;
  const float* row = sc + (int64_t(n) * S + t) * S;
  bf16* prow = p + (int64_t(n) * S + t) * S;
  float mx = -INFINITY;
  for (int u = threadIdx.x; u <= t; u += blockDim.x) mx = fmaxf(mx, row[u]);
  mx = warp_max(mx);  // then across the block's warps
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
  __syncthreads();
  if (threadIdx.x < 32) {
    float y = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : -INFINITY;
    y = warp_max(y);
    if (threadIdx.x == 0) red[32] = y;
  }
  __syncthreads();
  mx = red[32];
  float sum = 0;
  for (int u = threadIdx.x; u <= t; u += blockDim.x) sum += __expf(row[u] - mx);
  sum = block_sum(sum, red);
  const float l = mx + __logf(sum), inv = 1.0f / sum;
  for (int u = threadIdx.x; u < S; u += blockDim.x)
    prow[u] = __float2bfloat16_rn(u <= t ? __expf(row[u] - mx) * inv : 0.0f);
  if (threadIdx.x == 0) lse[n * lse_stride + t] = l;
}

// P = exp(Sc - lse) on the causal part, 0 above it.
__global__ void softmax_recompute_kernel(const float* sc, const float* lse, bf16* p, int S,
                                         int64_t lse_stride) {
  const int t = blockIdx.x, n = blockIdx.y;
  const float* row = sc + (int64_t(n) * S + t) * S;
  bf16* prow = p + (int64_t(n) * S + t) * S;
  const float l = lse[n * lse_stride + t];
  for (int u = threadIdx.x; u < S; u += blockDim.x)
    prow[u] = __float2bfloat16_rn(u <= t ? __expf(row[u] - l) : 0.0f);
}

// dS = scale * P o (dP - D) on the causal part (written over P), 0 above it.
__global__ void softmax_backward_kernel(const float* dp, const float* d, bf16* p, int S,
                                        int64_t d_stride, float scale) {
  const int t = blockIdx.x, n = blockIdx.y;
  const float* row = dp + (int64_t(n) * S + t) * S;
  bf16* prow = p + (int64_t(n) * S + t) * S;
  const float dt = d[n * d_stride + t];
  for (int u = threadIdx.x; u < S; u += blockDim.x)
    prow[u] = __float2bfloat16_rn(u <= t ? scale * __bfloat162float(prow[u]) * (row[u] - dt) : 0.0f);
}

// D[b, i, t] = <dO[b, t, i, :], O[b, t, i, :]>, one warp per row.
__global__ void rowdot_kernel(const bf16* dout, const bf16* out, float* d, int64_t rows, int S,
                              int H, int dh) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;  // (b * S + t) * H + i
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  float s = 0;
  for (int c = lane; c < dh; c += 32)
    s += __bfloat162float(dout[r * dh + c]) * __bfloat162float(out[r * dh + c]);
  s = warp_sum(s);
  if (lane == 0) {
    const int64_t i = r % H, bt = r / H, t = bt % S, b = bt / S;
    d[(b * H + i) * S + t] = s;
  }
}

struct Dims {
  int64_t B, S, H, Hkv, dh, group;
};

Dims dims_of(const Tensor& q, const Tensor& k) {
  return {q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3), q.dim(2) / k.dim(2)};
}

// Row-major C[S_rows][S_cols] (ld ldc) = alpha op(X) op(Y) + beta C for `batch` matrices,
// in cuBLAS's column-major terms (see the file header for each use).
void gemm(CudaContext& ctx, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
          float alpha, const void* a, int lda, int64_t sa, const void* b, int ldb, int64_t sb,
          float beta, void* c, cudaDataType_t ct, int ldc, int64_t sc, int batch) {
  DT_CUBLAS(cublasGemmStridedBatchedEx(ctx.blas(), ta, tb, m, n, k, &alpha, a, CUDA_R_16BF, lda, sa,
                                       b, CUDA_R_16BF, ldb, sb, &beta, c, ct, ldc, sc, batch,
                                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Sc[n][t][u] = scale <X[t], Y[u]>: X rows of head n at x (ld ldx, batch stride sx), Y rows
// at y (ld ldy, stride sy); column-major C(u, t) = Y^T-as-(dh x S)^T X.
void scores(CudaContext& ctx, const Dims& d, float scale, const bf16* x, int64_t ldx, int64_t sx,
            const bf16* y, int64_t ldy, int64_t sy, float* sc, int nb) {
  gemm(ctx, CUBLAS_OP_T, CUBLAS_OP_N, int(d.S), int(d.S), int(d.dh), scale, y, int(ldy), sy, x, int(ldx), sx,
       0.0f, sc, CUDA_R_32F, int(d.S), d.S * d.S, nb);
}

int chunk_groups(const Dims& d) {
  const size_t per = size_t(d.S) * size_t(d.S) * (sizeof(float) + sizeof(bf16));
  return int(std::clamp<int64_t>(int64_t(kScoreBudget / per), 1, d.Hkv));
}

}  // namespace

bool attention_gemm_supported(const Tensor& q, const Tensor& k) {
  return q.dtype() == DType::BF16 && k.dtype() == DType::BF16 && q.dim(1) <= (int64_t(1) << 20) &&
         q.dim(3) % 8 == 0;
}

void attention_gemm_forward(CudaContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                            Tensor& out, Tensor& lse) {
  const Dims d = dims_of(q, k);
  const int nb_max = chunk_groups(d);
  ScratchCarver carve(ctx.scratch(ScratchCarver::round(nb_max * d.S * d.S * sizeof(float)) +
                                  ScratchCarver::round(nb_max * d.S * d.S * sizeof(bf16))));
  float* sc = carve.take<float>(nb_max * d.S * d.S);
  bf16* p = carve.take<bf16>(nb_max * d.S * d.S);
  const float scale = 1.0f / std::sqrt(float(d.dh));
  const bf16 *Q = q.data<bf16>(), *K = k.data<bf16>(), *V = v.data<bf16>();
  bf16* O = out.data<bf16>();
  float* L = lse.data<float>();
  const int64_t ldq = d.H * d.dh, ldk = d.Hkv * d.dh;
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t j = 0; j < d.group; ++j)
      for (int64_t g0 = 0; g0 < d.Hkv; g0 += nb_max) {
        const int nb = int(std::min<int64_t>(nb_max, d.Hkv - g0));
        const int64_t head0 = g0 * d.group + j;  // heads head0 + n * group, n < nb
        const bf16* qb = Q + (b * d.S * d.H + head0) * d.dh;
        const bf16* kb = K + (b * d.S * d.Hkv + g0) * d.dh;
        const bf16* vb = V + (b * d.S * d.Hkv + g0) * d.dh;
        scores(ctx, d, scale, qb, ldq, d.group * d.dh, kb, ldk, d.dh, sc, nb);
        float* lb = L + (b * d.H + head0) * d.S;
        softmax_forward_kernel<<<dim3(unsigned(d.S), unsigned(nb)), kThreads, 0, ctx.stream()>>>(
            sc, p, lb, int(d.S), d.group * d.S);
        DT_CUDA_LAUNCHED();
        // O[t][c] = sum_u P[t][u] V[u][c]: column-major O(c, t) = V(c, u) P(u, t)
        gemm(ctx, CUBLAS_OP_N, CUBLAS_OP_N, int(d.dh), int(d.S), int(d.S), 1.0f, vb, int(ldk), d.dh, p, int(d.S),
             d.S * d.S, 0.0f, O + (b * d.S * d.H + head0) * d.dh, CUDA_R_16BF, int(ldq), d.group * d.dh, nb);
      }
}

void attention_gemm_backward(CudaContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& out, const Tensor& lse, const Tensor& dout, Tensor& dq,
                             Tensor& dk, Tensor& dv) {
  const Dims d = dims_of(q, k);
  const int nb_max = chunk_groups(d);
  const int64_t kv_numel = d.B * d.S * d.Hkv * d.dh;
  ScratchCarver carve(ctx.scratch(ScratchCarver::round(nb_max * d.S * d.S * sizeof(float)) +
                                  ScratchCarver::round(nb_max * d.S * d.S * sizeof(bf16)) +
                                  ScratchCarver::round(d.B * d.H * d.S * sizeof(float)) +
                                  2 * ScratchCarver::round(kv_numel * sizeof(float))));
  float* sc = carve.take<float>(nb_max * d.S * d.S);
  bf16* p = carve.take<bf16>(nb_max * d.S * d.S);
  float* D = carve.take<float>(d.B * d.H * d.S);
  float* dk32 = carve.take<float>(kv_numel);
  float* dv32 = carve.take<float>(kv_numel);
  const float scale = 1.0f / std::sqrt(float(d.dh));
  const bf16 *Q = q.data<bf16>(), *K = k.data<bf16>(), *V = v.data<bf16>(), *dO = dout.data<bf16>();
  bf16* dQ = dq.data<bf16>();
  const float* L = lse.data<float>();
  const int64_t ldq = d.H * d.dh, ldk = d.Hkv * d.dh;
  {
    const int64_t rows = d.B * d.S * d.H;
    rowdot_kernel<<<unsigned((rows * 32 + kThreads - 1) / kThreads), kThreads, 0, ctx.stream()>>>(
        dO, out.data<bf16>(), D, rows, int(d.S), int(d.H), int(d.dh));
    DT_CUDA_LAUNCHED();
  }
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t j = 0; j < d.group; ++j)
      for (int64_t g0 = 0; g0 < d.Hkv; g0 += nb_max) {
        const int nb = int(std::min<int64_t>(nb_max, d.Hkv - g0));
        const int64_t head0 = g0 * d.group + j;
        const int64_t qoff = (b * d.S * d.H + head0) * d.dh, koff = (b * d.S * d.Hkv + g0) * d.dh;
        const float beta = j == 0 ? 0.0f : 1.0f;  // the heads of a group sum into dK, dV in order
        const dim3 grid(unsigned(d.S), unsigned(nb));
        scores(ctx, d, scale, Q + qoff, ldq, d.group * d.dh, K + koff, ldk, d.dh, sc, nb);
        softmax_recompute_kernel<<<grid, kThreads, 0, ctx.stream()>>>(sc, L + (b * d.H + head0) * d.S, p,
                                                                       int(d.S), d.group * d.S);
        DT_CUDA_LAUNCHED();
        // dV[u][c] += sum_t P[t][u] dO[t][c]: column-major dV(c, u) = dO(c, t) P^T(t, u)
        gemm(ctx, CUBLAS_OP_N, CUBLAS_OP_T, int(d.dh), int(d.S), int(d.S), 1.0f, dO + qoff, int(ldq),
             d.group * d.dh, p, int(d.S), d.S * d.S, beta, dv32 + koff, CUDA_R_32F, int(ldk), d.dh, nb);
        // dP[t][u] = <dO[t], V[u]> (into Sc)
        scores(ctx, d, 1.0f, dO + qoff, ldq, d.group * d.dh, V + koff, ldk, d.dh, sc, nb);
        softmax_backward_kernel<<<grid, kThreads, 0, ctx.stream()>>>(sc, D + (b * d.H + head0) * d.S, p,
                                                                      int(d.S), d.group * d.S, scale);
        DT_CUDA_LAUNCHED();
        // dQ[t][c] = sum_u dS[t][u] K[u][c]
        gemm(ctx, CUBLAS_OP_N, CUBLAS_OP_N, int(d.dh), int(d.S), int(d.S), 1.0f, K + koff, int(ldk), d.dh, p,
             int(d.S), d.S * d.S, 0.0f, dQ + qoff, CUDA_R_16BF, int(ldq), d.group * d.dh, nb);
        // dK[u][c] += sum_t dS[t][u] Q[t][c]
        gemm(ctx, CUBLAS_OP_N, CUBLAS_OP_T, int(d.dh), int(d.S), int(d.S), 1.0f, Q + qoff, int(ldq),
             d.group * d.dh, p, int(d.S), d.S * d.S, beta, dk32 + koff, CUDA_R_32F, int(ldk), d.dh, nb);
      }
  Tensor dk32_t(dk.shape(), DType::F32, Device::CUDA, dk32, [](void*) {});
  Tensor dv32_t(dv.shape(), DType::F32, Device::CUDA, dv32, [](void*) {});
  copy(ctx, dk32_t, dk);
  copy(ctx, dv32_t, dv);
}

}  // namespace difftron::cuda
