// The CPU reference of every op, on raw pointers, templated on the float type (float
// for training on the CPU, double for the finite-difference gradient checks). These
// define the semantics the CUDA kernels are tested against; kernels/ops.h documents the
// layouts. One file per op family: kernels/cpu/<op>.cpp.
#pragma once
#include <cstdint>

namespace difftron::cpu {

// embedding.cpp -- tokens out of [0, V) raise difftron::Error naming the token and row.
template <typename T>
void embedding_forward(const int32_t* tokens, const T* table, T* out, int64_t n, int64_t d,
                       int64_t vocab);
template <typename T>
void embedding_backward(const int32_t* tokens, const T* dout, T* dtable, int64_t n, int64_t d,
                        int64_t vocab);

// rmsnorm.cpp
template <typename T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* rstd, int64_t rows, int64_t cols,
                     double eps, T scale);
template <typename T>
void rmsnorm_backward(const T* x, const T* w, const T* rstd, const T* dy, T* dx, T* dw,
                      int64_t rows, int64_t cols, T scale);

// rope.cpp
template <typename T>
void rope(T* x, int64_t B, int64_t S, int64_t H, int64_t dh, double theta, bool inverse);

// diff_attention.cpp
template <typename T>
T diff_lambda_forward(const T* lq1, const T* lk1, const T* lq2, const T* lk2, int64_t dh,
                      double lambda_init);
template <typename T>
void diff_lambda_backward(const T* lq1, const T* lk1, const T* lq2, const T* lk2, int64_t dh,
                          T dlambda, T* dlq1, T* dlk1, T* dlq2, T* dlk2);
template <typename T>
void diff_attention_forward(const T* q, const T* k, const T* v, T lambda, T* out, T* lse,
                            int64_t B, int64_t S, int64_t h, int64_t h_kv, int64_t dh);
template <typename T>
void diff_attention_backward(const T* q, const T* k, const T* v, T lambda, const T* lse,
                             const T* dout, T* dq, T* dk, T* dv, T* dlambda, int64_t B, int64_t S,
                             int64_t h, int64_t h_kv, int64_t dh);

// attention.cpp (standard causal softmax attention with GQA)
template <typename T>
void attention_forward(const T* q, const T* k, const T* v, T* out, T* lse, int64_t B, int64_t S,
                       int64_t H, int64_t H_kv, int64_t dh);
template <typename T>
void attention_backward(const T* q, const T* k, const T* v, const T* out, const T* lse,
                        const T* dout, T* dq, T* dk, T* dv, int64_t B, int64_t S, int64_t H,
                        int64_t H_kv, int64_t dh);

// swiglu.cpp
template <typename T>
void swiglu_forward(const T* gate, const T* up, T* out, int64_t n);
template <typename T>
void swiglu_backward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n);

// cross_entropy.cpp
template <typename T>
void cross_entropy_forward(const T* logits, const int32_t* targets, T* losses, T* lse,
                           int64_t n, int64_t vocab);
template <typename T>
void cross_entropy_backward(const T* logits, const int32_t* targets, const T* lse, T dloss,
                            T* dlogits, int64_t n, int64_t vocab);

// matmul.cpp: y[M,N] = alpha * op(a)[M,K] @ op(b)[K,N] + beta * y (OpenBLAS)
template <typename T>
void matmul(const T* a, bool trans_a, const T* b, bool trans_b, T* y, int64_t M, int64_t N,
            int64_t K, T alpha, T beta);

// adamw.cpp
template <typename P, typename G>
void adamw_step(P* param, const G* grad, float* m, float* v, int64_t n, float lr, float beta1,
                float beta2, float eps, float weight_decay, int64_t step, float grad_scale);

}  // namespace difftron::cpu
