// Launchers of the CUDA kernels, one group per file kernels/cuda/<op>.cu. They assume
// CudaOps (cuda_ops.cpp) has already checked devices, dtypes and shapes, and enqueue work
// on the context's stream. Semantics: kernels/ops.h and kernels/cpu/<op>.cpp.
#pragma once
#include <cstdint>
#include <vector>

#include "base/tensor.h"
#include "kernels/cuda/cuda_context.h"
#include "kernels/ops.h"

namespace difftron::cuda {

// copy.cu: dst = src converted (f32 <-> bf16); same dtype is a plain device copy.
void copy(CudaContext& ctx, const Tensor& src, Tensor& dst);

// init_normal.cu: out (f32 or bf16) seen as [rows, cols] is the block at (row0, col0) of a
// full matrix of full_cols columns; the counter-based normals of kernels/ops.h.
void init_normal(CudaContext& ctx, Tensor& out, int64_t rows, int64_t cols, uint64_t seed,
                 uint64_t tensor_id, double std, int64_t full_cols, int64_t row0, int64_t col0);

// reduce.cu
double sum_squares(CudaContext& ctx, const Tensor& x);  // synchronises
// sum_squares of each tensor (the same bits), one synchronisation for all
std::vector<double> sum_squares_each(CudaContext& ctx, const std::vector<Tensor>& xs);
void axpy(CudaContext& ctx, float alpha, const Tensor& x, Tensor& y);
void scale(CudaContext& ctx, Tensor& x, float alpha);

// matmul.cu (cuBLASLt): y[M,N] = alpha op(a) op(b) + beta c, c = y unless given (c: y's
// shape and dtype)
void matmul(CudaContext& ctx, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
            Tensor& y, int64_t M, int64_t N, int64_t K, float alpha, float beta,
            const Tensor* c = nullptr);

// embedding.cu (both throw difftron::Error on token ids outside [0, V))
void embedding_forward(CudaContext& ctx, const Tensor& tokens, const Tensor& table, Tensor& out);
void embedding_backward(CudaContext& ctx, const Tensor& tokens, const Tensor& dout,
                        Tensor& dtable);

// rmsnorm.cu
void rmsnorm_forward(CudaContext& ctx, const Tensor& x, const Tensor& w, double eps, float scale,
                     Tensor& y, Tensor& rstd);
void rmsnorm_backward(CudaContext& ctx, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      float scale, const Tensor& dy, Tensor& dx, Tensor& dw);

// rope.cu
void rope(CudaContext& ctx, Tensor& x, double theta, bool inverse);
void build_rope_table(CudaContext& ctx, void* table, int64_t S, int64_t dh, double theta);

// diff_lambda.cu
void diff_lambda_forward(CudaContext& ctx, const Tensor& lq1, const Tensor& lk1, const Tensor& lq2,
                         const Tensor& lk2, double lambda_init, Tensor& lambda);
void diff_lambda_backward(CudaContext& ctx, const Tensor& lq1, const Tensor& lk1,
                          const Tensor& lq2, const Tensor& lk2, const Tensor& dlambda,
                          Tensor& dlq1, Tensor& dlk1, Tensor& dlq2, Tensor& dlk2);

// diff_attention_simple.cu: the simple (SIMT, fp32 online softmax) differential attention.
// q [B,S,h,2,dh], k [B,S,h_kv,2,dh], v [B,S,h_kv,2dh], out [B,S,h,2dh], lse [B,h,2,S] f32,
// lambda [1] f32; dh <= 128.
void diff_attention_simple_forward(CudaContext& ctx, const Tensor& q, const Tensor& k,
                                   const Tensor& v, const Tensor& lambda, Tensor& out,
                                   Tensor& lse);
void diff_attention_simple_backward(CudaContext& ctx, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Tensor& lambda, const Tensor& lse,
                                    const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                                    Tensor& dlambda);

// attention_gemm.cu: standard causal attention for bf16 through cuBLAS GEMMs over
// materialised score matrices (tensor cores; the baseline's default on the GPU).
bool attention_gemm_supported(const Tensor& q, const Tensor& k);
void attention_gemm_forward(CudaContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                            Tensor& out, Tensor& lse);
void attention_gemm_backward(CudaContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& out, const Tensor& lse, const Tensor& dout, Tensor& dq,
                             Tensor& dk, Tensor& dv);

// attention_simple.cu: standard causal attention with GQA, q [B,S,H,dh], k/v [B,S,H_kv,dh],
// lse [B,H,S] f32; dh <= 256.
void attention_simple_forward(CudaContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                              Tensor& out, Tensor& lse);
void attention_simple_backward(CudaContext& ctx, const Tensor& q, const Tensor& k,
                               const Tensor& v, const Tensor& lse, const Tensor& dout, Tensor& dq,
                               Tensor& dk, Tensor& dv);

// cached_attention.cu: new tokens against a K/V cache (Ops::cached_attention); q, k, v, caches
// and out f32 or bf16 (one dtype), start i32 [B], lambda f32 [1] (differential); dh even, <= 256.
void cached_attention(CudaContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& start,
                      const Tensor& lambda, double rope_theta, Tensor& k_cache, Tensor& v_cache, Tensor& out);

// diff_v2_combine.cu: Differential Transformer V2's pairwise subtraction (Ops::diff_v2_combine_*);
// att [B,S,2H,dh], z [B*S,H], out/dout [B,S,H,dh], all one dtype (f32 or bf16).
void diff_v2_combine_forward(CudaContext& ctx, const Tensor& att, const Tensor& z, Tensor& out);
void diff_v2_combine_backward(CudaContext& ctx, const Tensor& att, const Tensor& z, const Tensor& dout,
                              Tensor& datt, Tensor& dz);

// swiglu.cu
void swiglu_forward(CudaContext& ctx, const Tensor& gate, const Tensor& up, Tensor& out);
void swiglu_backward(CudaContext& ctx, const Tensor& gate, const Tensor& up, const Tensor& dout,
                     Tensor& dgate, Tensor& dup);

// cross_entropy.cu (forward throws difftron::Error on targets >= V)
void cross_entropy_forward(CudaContext& ctx, const Tensor& logits, const Tensor& targets,
                           Tensor& losses, Tensor& lse);
void cross_entropy_backward(CudaContext& ctx, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, float dloss, Tensor& dlogits);

// adamw.cu: f32 param and moments, grad f32 or bf16.
void adamw_step(CudaContext& ctx, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                const AdamWParams& hp);
// Every item in one launch (Ops::adamw_step_each), working copies f32 or bf16.
void adamw_step_each(CudaContext& ctx, const std::vector<AdamWTensors>& items);

}  // namespace difftron::cuda
