// The CUDA backend: implements kernels/ops.h on device memory. Each method checks its
// arguments (device, dtype, shape; errors name the op and the offending tensor) and hands
// the work to the launcher in kernels/cuda/<op>.cu, which enqueues it on the context's one
// stream. Supported dtypes: f32 and bf16 for values (f64 is CPU-only), i32 for token ids;
// statistics (rstd, lse, lambda, losses) are f32. Mixed precision as the model uses it
// (ModelPrecision::cuda_mixed) is listed per op in cuda_kernels.h.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "base/bf16.h"
#include "base/error.h"
#include "kernels/cuda/cuda_context.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/diff_flash.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/ops.h"

namespace difftron {
namespace cpu {
// kernels/cpu/init_normal.cpp: the argument checks of Ops::init_normal, shared by the backends.
void init_normal_check(const char* backend, const Tensor& out, double std, int64_t full_cols,
                       int64_t row0, int64_t col0, int64_t* rows, int64_t* cols);
}  // namespace cpu

namespace {


// ---- argument checks ---------------------------------------------------------------------
[[noreturn]] void fail(const char* op, const std::string& what) { throw_error("cuda ", op, ": ", what); }

void on_gpu(const Tensor& t, const char* op, const char* name) {
  if (!t.defined()) fail(op, std::string(name) + " is an undefined tensor");
  if (t.device() != Device::CUDA)
    fail(op, std::string(name) + " is " + t.str() + " (expected a tensor on cuda)");
}

bool is_float(DType d) { return d == DType::F32 || d == DType::BF16; }

void float_on_gpu(const Tensor& t, const char* op, const char* name) {
  on_gpu(t, op, name);
  if (!is_float(t.dtype()))
    fail(op, std::string(name) + " is " + t.str() + " (expected f32 or bf16)");
}

void dtype_is(const Tensor& t, DType d, const char* op, const char* name) {
  on_gpu(t, op, name);
  if (t.dtype() != d)
    fail(op, std::string(name) + " is " + t.str() + " (expected " + dtype_name(d) + ")");
}

void numel_is(const Tensor& t, int64_t n, const char* op, const char* name) {
  if (t.numel() != n)
    fail(op, std::string(name) + " " + t.str() + " should hold " + std::to_string(n) + " elements");
}

void same_dtype(const Tensor& a, const Tensor& b, const char* op, const char* an, const char* bn) {
  if (a.dtype() != b.dtype())
    fail(op, std::string(an) + " is " + a.str() + " but " + bn + " is " + b.str() +
                 " (expected the same dtype)");
}

// The arguments of one AdamW update (adamw_step, each item of adamw_step_each).
void check_adamw(const char* op, const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                 const AdamWParams& hp) {
  dtype_is(param, DType::F32, op, "param (the f32 master weights)");
  float_on_gpu(grad, op, "grad");
  dtype_is(m, DType::F32, op, "m");
  dtype_is(v, DType::F32, op, "v");
  numel_is(grad, param.numel(), op, "grad");
  numel_is(m, param.numel(), op, "m");
  numel_is(v, param.numel(), op, "v");
  if (hp.step < 1) fail(op, "step (" + std::to_string(hp.step) + ") must be >= 1");
}

class CudaOps final : public Ops {
 public:
  CudaOps(int device, const CudaOptions& options)
      : ctx_(device), flash_{options.deterministic, options.hopper_kernels} {}
  ~CudaOps() override = default;

  Device device() const override { return Device::CUDA; }
  std::string name() const override {
    return "cuda:" + std::to_string(ctx_.device()) + " (" + ctx_.props().name + ")";
  }
  cuda::CudaContext& context() { return ctx_; }

  // ---- memory ----------------------------------------------------------------------
  Tensor empty(const Shape& shape, DType dtype) override {
    if (dtype == DType::F64)
      fail("empty", "f64 tensors are not supported on the GPU (shape " + shape_str(shape) +
                        "); use f32 or bf16");
    const size_t bytes = std::max<size_t>(shape_numel(shape) * dtype_size(dtype), 256);
    const std::string what = std::string("a tensor ") + dtype_name(dtype) + shape_str(shape);
    void* p = ctx_.alloc(bytes, what.c_str());
    std::shared_ptr<cuda::MemoryCounter> counter = ctx_.memory();
    return Tensor(shape, dtype, Device::CUDA, p, [counter, bytes](void* q) {
      cudaFree(q);
      counter->sub(int64_t(bytes));
    });
  }

  MemoryStats memory_stats() override {
    MemoryStats m;
    m.allocated = ctx_.memory()->allocated.load();
    m.peak = ctx_.memory()->peak.load();
    ctx_.activate();
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
      m.device_used = int64_t(total_b - free_b);
      m.device_total = int64_t(total_b);
    }
    return m;
  }
  void reset_peak_memory() override { ctx_.memory()->peak.store(ctx_.memory()->allocated.load()); }

  void fill_zero(Tensor& t) override {
    on_gpu(t, "fill_zero", "t");
    ctx_.activate();
    DT_CUDA(cudaMemsetAsync(t.raw(), 0, t.nbytes(), ctx_.stream()));
  }

  void copy(const Tensor& src, Tensor& dst) override {
    on_gpu(src, "copy", "src");
    on_gpu(dst, "copy", "dst");
    numel_is(dst, src.numel(), "copy", "dst");
    if (src.dtype() != dst.dtype()) {
      float_on_gpu(src, "copy", "src");
      float_on_gpu(dst, "copy", "dst");
    }
    ctx_.activate();
    cuda::copy(ctx_, src, dst);
  }

  template <typename H>
  void upload_impl(Tensor& dst, const H* src) {
    on_gpu(dst, "upload", "dst");
    ctx_.activate();
    const int64_t n = dst.numel();
    std::vector<char> staging(dst.nbytes());
    if (dst.dtype() == DType::I32) {
      int32_t* s = reinterpret_cast<int32_t*>(staging.data());
      for (int64_t i = 0; i < n; ++i) s[i] = int32_t(src[i]);
    } else if (dst.dtype() == DType::F32) {
      float* s = reinterpret_cast<float*>(staging.data());
      for (int64_t i = 0; i < n; ++i) s[i] = float(src[i]);
    } else if (dst.dtype() == DType::BF16) {
      uint16_t* s = reinterpret_cast<uint16_t*>(staging.data());
      for (int64_t i = 0; i < n; ++i) s[i] = float_to_bf16(float(src[i]));
    } else {
      fail("upload", "unsupported destination " + dst.str());
    }
    DT_CUDA(cudaMemcpyAsync(dst.raw(), staging.data(), staging.size(), cudaMemcpyHostToDevice,
                            ctx_.stream()));
    DT_CUDA(cudaStreamSynchronize(ctx_.stream()));
  }
  void upload(Tensor& dst, const float* src) override { upload_impl(dst, src); }
  void upload(Tensor& dst, const double* src) override { upload_impl(dst, src); }
  void upload(Tensor& dst, const int32_t* src) override {
    dtype_is(dst, DType::I32, "upload", "dst (for int32 data)");
    upload_impl(dst, src);
  }

  template <typename H>
  void download_impl(const Tensor& src, H* dst) {
    on_gpu(src, "download", "src");
    ctx_.activate();
    const int64_t n = src.numel();
    std::vector<char> staging(src.nbytes());
    DT_CUDA(cudaMemcpyAsync(staging.data(), src.raw(), staging.size(), cudaMemcpyDeviceToHost,
                            ctx_.stream()));
    DT_CUDA(cudaStreamSynchronize(ctx_.stream()));
    if (src.dtype() == DType::I32) {
      const int32_t* s = reinterpret_cast<const int32_t*>(staging.data());
      for (int64_t i = 0; i < n; ++i) dst[i] = H(s[i]);
    } else if (src.dtype() == DType::F32) {
      const float* s = reinterpret_cast<const float*>(staging.data());
      for (int64_t i = 0; i < n; ++i) dst[i] = H(s[i]);
    } else if (src.dtype() == DType::BF16) {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(staging.data());
      for (int64_t i = 0; i < n; ++i) dst[i] = H(bf16_to_float(s[i]));
    } else {
      fail("download", "unsupported source " + src.str());
    }
  }
  void download(const Tensor& src, float* dst) override { download_impl(src, dst); }
  void download(const Tensor& src, double* dst) override { download_impl(src, dst); }
  // One copy of the bytes, no staging: at full PCIe speed when the host side is pinned.
  void download_bytes(const Tensor& src, void* dst) override {
    on_gpu(src, "download_bytes", "src");
    ctx_.activate();
    DT_CUDA(cudaMemcpyAsync(dst, src.raw(), src.nbytes(), cudaMemcpyDeviceToHost, ctx_.stream()));
    DT_CUDA(cudaStreamSynchronize(ctx_.stream()));
  }
  void upload_bytes(Tensor& dst, const void* src) override {
    on_gpu(dst, "upload_bytes", "dst");
    ctx_.activate();
    DT_CUDA(cudaMemcpyAsync(dst.raw(), src, dst.nbytes(), cudaMemcpyHostToDevice, ctx_.stream()));
    DT_CUDA(cudaStreamSynchronize(ctx_.stream()));
  }
  void* alloc_pinned(size_t bytes) override {
    ctx_.activate();
    void* p = nullptr;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocDefault) == cudaSuccess) return p;
    cudaGetLastError();  // not sticky: clear it, the caller falls back to pageable memory
    return nullptr;
  }
  void free_pinned(void* p) override {
    if (p) cudaFreeHost(p);
  }

  void init_normal(Tensor& out, uint64_t seed, uint64_t tensor_id, double std, int64_t full_cols,
                   int64_t row0, int64_t col0) override {
    float_on_gpu(out, "init_normal", "out");
    int64_t rows = 0, cols = 0;
    cpu::init_normal_check("cuda", out, std, full_cols, row0, col0, &rows, &cols);
    ctx_.activate();
    cuda::init_normal(ctx_, out, rows, cols, seed, tensor_id, std, full_cols, row0, col0);
  }

  void synchronize() override {
    ctx_.activate();
    DT_CUDA(cudaStreamSynchronize(ctx_.stream()));
  }

  // ---- dense -------------------------------------------------------------------------
  void matmul(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& y, float alpha,
              float beta) override {
    matmul_checked("matmul", a, ta, b, tb, y, alpha, beta, nullptr);
  }

  void matmul_add(const Tensor& a, bool ta, const Tensor& b, bool tb, const Tensor& c,
                  Tensor& y) override {
    const char* op = "matmul_add";
    float_on_gpu(c, op, "c");
    if (c.dtype() != y.dtype() || c.rows() != y.rows() || c.cols() != y.cols())
      fail(op, "c " + c.str() + " should have y's shape and dtype, " + y.str());
    if (c.raw() == y.raw()) return matmul_checked(op, a, ta, b, tb, y, 1.0f, 1.0f, nullptr);
    const auto* cb = static_cast<const char*>(c.raw());
    const auto* yb = static_cast<const char*>(y.raw());
    if (cb < yb + y.nbytes() && yb < cb + c.nbytes()) fail(op, "c and y overlap");
    matmul_checked(op, a, ta, b, tb, y, 1.0f, 1.0f, &c);
  }

  // y = alpha op(a) op(b) + beta (c or y), the arguments checked (errors name `op`)
  void matmul_checked(const char* op, const Tensor& a, bool ta, const Tensor& b, bool tb,
                      Tensor& y, float alpha, float beta, const Tensor* c) {
    float_on_gpu(a, op, "a");
    float_on_gpu(b, op, "b");
    float_on_gpu(y, op, "y");
    same_dtype(a, b, op, "a", "b");
    if (y.dtype() != a.dtype() && !(a.dtype() == DType::BF16 && y.dtype() == DType::F32))
      fail(op, "y is " + y.str() + " for inputs " + a.str() +
                   " (expected y of the inputs' dtype, or f32 for bf16 inputs)");
    const int64_t M = ta ? a.cols() : a.rows(), K = ta ? a.rows() : a.cols();
    const int64_t Kb = tb ? b.cols() : b.rows(), N = tb ? b.rows() : b.cols();
    if (K != Kb)
      fail(op, "inner dims differ: op(a) of " + a.str() + " has " + std::to_string(K) +
                   " columns, op(b) of " + b.str() + " has " + std::to_string(Kb) + " rows");
    if (y.rows() != M || y.cols() != N)
      fail(op, "y " + y.str() + " should be [" + std::to_string(M) + ", " + std::to_string(N) + "]");
    ctx_.activate();
    cuda::matmul(ctx_, a, ta, b, tb, y, M, N, K, alpha, beta, c);
  }

  void axpy(float alpha, const Tensor& x, Tensor& y) override {
    float_on_gpu(x, "axpy", "x");
    float_on_gpu(y, "axpy", "y");
    numel_is(y, x.numel(), "axpy", "y");
    ctx_.activate();
    cuda::axpy(ctx_, alpha, x, y);
  }

  void scale(Tensor& x, float alpha) override {
    float_on_gpu(x, "scale", "x");
    ctx_.activate();
    cuda::scale(ctx_, x, alpha);
  }

  double sum_squares(const Tensor& x) override {
    float_on_gpu(x, "sum_squares", "x");
    ctx_.activate();
    return cuda::sum_squares(ctx_, x);
  }
  std::vector<double> sum_squares_each(const std::vector<Tensor>& xs) override {
    for (const Tensor& x : xs) float_on_gpu(x, "sum_squares_each", "a tensor");
    ctx_.activate();
    return cuda::sum_squares_each(ctx_, xs);
  }

  // ---- embedding ---------------------------------------------------------------------
  void embedding_forward(const Tensor& tokens, const Tensor& table, Tensor& out) override {
    const char* op = "embedding_forward";
    dtype_is(tokens, DType::I32, op, "tokens");
    float_on_gpu(table, op, "table");
    float_on_gpu(out, op, "out");
    same_dtype(table, out, op, "table", "out");
    numel_is(out, tokens.numel() * table.cols(), op, "out");
    ctx_.activate();
    cuda::embedding_forward(ctx_, tokens, table, out);
  }

  void embedding_backward(const Tensor& tokens, const Tensor& dout, Tensor& dtable) override {
    const char* op = "embedding_backward";
    dtype_is(tokens, DType::I32, op, "tokens");
    float_on_gpu(dout, op, "dout");
    float_on_gpu(dtable, op, "dtable");
    numel_is(dout, tokens.numel() * dtable.cols(), op, "dout");
    ctx_.activate();
    cuda::embedding_backward(ctx_, tokens, dout, dtable);
  }

  // ---- RMSNorm -----------------------------------------------------------------------
  void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, float scale, Tensor& y,
                       Tensor& rstd) override {
    const char* op = "rmsnorm_forward";
    float_on_gpu(x, op, "x");
    float_on_gpu(w, op, "w");
    float_on_gpu(y, op, "y");
    same_dtype(x, y, op, "x", "y");
    numel_is(y, x.numel(), op, "y");
    numel_is(w, x.cols(), op, "w");
    dtype_is(rstd, DType::F32, op, "rstd");
    numel_is(rstd, x.rows(), op, "rstd");
    ctx_.activate();
    cuda::rmsnorm_forward(ctx_, x, w, eps, scale, y, rstd);
  }

  void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, float scale,
                        const Tensor& dy, Tensor& dx, Tensor& dw) override {
    const char* op = "rmsnorm_backward";
    float_on_gpu(x, op, "x");
    float_on_gpu(w, op, "w");
    float_on_gpu(dy, op, "dy");
    float_on_gpu(dx, op, "dx");
    float_on_gpu(dw, op, "dw");
    same_dtype(x, dy, op, "x", "dy");
    same_dtype(x, dx, op, "x", "dx");
    numel_is(dy, x.numel(), op, "dy");
    numel_is(dx, x.numel(), op, "dx");
    numel_is(w, x.cols(), op, "w");
    numel_is(dw, x.cols(), op, "dw");
    dtype_is(rstd, DType::F32, op, "rstd");
    numel_is(rstd, x.rows(), op, "rstd");
    ctx_.activate();
    cuda::rmsnorm_backward(ctx_, x, w, rstd, scale, dy, dx, dw);
  }

  // ---- RoPE --------------------------------------------------------------------------
  void rope(Tensor& x, double theta, bool inverse) override {
    float_on_gpu(x, "rope", "x");
    if (x.ndim() != 4) fail("rope", "x must be [B, S, H, dh], got " + x.str());
    if (x.dim(3) % 2 != 0) fail("rope", "head dim of x " + x.str() + " must be even");
    if (!(theta > 0)) fail("rope", "theta (" + std::to_string(theta) + ") must be > 0");
    ctx_.activate();
    cuda::rope(ctx_, x, theta, inverse);
  }

  // ---- differential attention ------------------------------------------------------------
  void check_lambda_vectors(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2,
                            const Tensor& lk2, const char* op) {
    float_on_gpu(lq1, op, "lq1");
    float_on_gpu(lk1, op, "lk1");
    float_on_gpu(lq2, op, "lq2");
    float_on_gpu(lk2, op, "lk2");
    same_dtype(lq1, lk1, op, "lq1", "lk1");
    same_dtype(lq1, lq2, op, "lq1", "lq2");
    same_dtype(lq1, lk2, op, "lq1", "lk2");
    numel_is(lk1, lq1.numel(), op, "lk1");
    numel_is(lq2, lq1.numel(), op, "lq2");
    numel_is(lk2, lq1.numel(), op, "lk2");
  }

  void diff_lambda_forward(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2,
                           const Tensor& lk2, double lambda_init, Tensor& lambda) override {
    const char* op = "diff_lambda_forward";
    check_lambda_vectors(lq1, lk1, lq2, lk2, op);
    dtype_is(lambda, DType::F32, op, "lambda");
    numel_is(lambda, 1, op, "lambda");
    ctx_.activate();
    cuda::diff_lambda_forward(ctx_, lq1, lk1, lq2, lk2, lambda_init, lambda);
  }

  void diff_lambda_backward(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2,
                            const Tensor& lk2, const Tensor& dlambda, Tensor& dlq1, Tensor& dlk1,
                            Tensor& dlq2, Tensor& dlk2) override {
    const char* op = "diff_lambda_backward";
    check_lambda_vectors(lq1, lk1, lq2, lk2, op);
    dtype_is(dlambda, DType::F32, op, "dlambda");
    numel_is(dlambda, 1, op, "dlambda");
    float_on_gpu(dlq1, op, "dlq1");
    float_on_gpu(dlk1, op, "dlk1");
    float_on_gpu(dlq2, op, "dlq2");
    float_on_gpu(dlk2, op, "dlk2");
    same_dtype(dlq1, dlk1, op, "dlq1", "dlk1");
    same_dtype(dlq1, dlq2, op, "dlq1", "dlq2");
    same_dtype(dlq1, dlk2, op, "dlq1", "dlk2");
    for (const Tensor* g : {&dlq1, &dlk1, &dlq2, &dlk2}) numel_is(*g, lq1.numel(), op, "gradient");
    ctx_.activate();
    cuda::diff_lambda_backward(ctx_, lq1, lk1, lq2, lk2, dlambda, dlq1, dlk1, dlq2, dlk2);
  }

  // Checks q [B,S,h,2,dh], k [B,S,h_kv,2,dh], v [B,S,h_kv,2dh] and the lambda; returns nothing.
  void check_diff_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& lambda, const char* op) {
    float_on_gpu(q, op, "q");
    float_on_gpu(k, op, "k");
    float_on_gpu(v, op, "v");
    same_dtype(q, k, op, "q", "k");
    same_dtype(q, v, op, "q", "v");
    if (q.ndim() != 5 || q.dim(3) != 2) fail(op, "q must be [B, S, h, 2, dh], got " + q.str());
    if (k.ndim() != 5 || k.dim(3) != 2) fail(op, "k must be [B, S, h_kv, 2, dh], got " + k.str());
    if (k.dim(0) != q.dim(0) || k.dim(1) != q.dim(1) || k.dim(4) != q.dim(4))
      fail(op, "k " + k.str() + " does not match q " + q.str());
    if (q.dim(2) % k.dim(2) != 0)
      fail(op, "heads of q " + q.str() + " must be a multiple of the groups of k " + k.str());
    numel_is(v, k.numel(), op, "v (expected [B, S, h_kv, 2*dh])");
    dtype_is(lambda, DType::F32, op, "lambda");
    numel_is(lambda, 1, op, "lambda");
  }

  // The fused kernels keep O2n = A2 V (the layout of out) for the backward.
  int64_t diff_attention_saved_numel(const Tensor& q) const override {
    if (q.dtype() != DType::BF16 || q.ndim() != 5) return 0;
    const cuda::DiffFlashDims fd{q.dim(0), q.dim(1), q.dim(2), q.dim(2), q.dim(4)};
    return cuda::diff_flash_supported(fd) ? q.numel() : 0;  // [B,S,h,2,dh] = [B,S,h,2dh]
  }
  // O2n storage inside `saved`, or null when the caller gave too little.
  __nv_bfloat16* o2_of(const Tensor& saved, const Tensor& q) const {
    const int64_t n = diff_attention_saved_numel(q);
    if (n == 0 || !saved.defined() || saved.numel() < n) return nullptr;
    dtype_is(saved, DType::BF16, "diff_attention", "saved");
    return saved.data<__nv_bfloat16>();
  }

  void diff_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                              const Tensor& lambda, Tensor& out, Tensor& lse, Tensor& saved) override {
    const char* op = "diff_attention_forward";
    check_diff_attention(q, k, v, lambda, op);
    check_attention_outputs(q, out, lse, q.dim(0) * q.dim(2) * 2 * q.dim(1), op);
    ctx_.activate();
    // the fused flash kernels (diff_flash.h) for bf16 at dh 64 / 128, else the simple path
    const cuda::DiffFlashDims fd{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(4)};
    if (q.dtype() == DType::BF16 && cuda::diff_flash_supported(fd)) {
      cuda::diff_flash_forward(fd, q.data<__nv_bfloat16>(), k.data<__nv_bfloat16>(),
                               v.data<__nv_bfloat16>(), lambda.data<float>(),
                               out.data<__nv_bfloat16>(), lse.data<float>(), ctx_.stream(), o2_of(saved, q),
                               flash_);
      return;
    }
    cuda::diff_attention_simple_forward(ctx_, q, k, v, lambda, out, lse);
  }

  void diff_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& lambda, const Tensor& out, const Tensor& lse,
                               const Tensor& saved, const Tensor& dout, Tensor& dq, Tensor& dk,
                               Tensor& dv, Tensor& dlambda) override {
    const char* op = "diff_attention_backward";
    check_diff_attention(q, k, v, lambda, op);
    check_attention_grads(q, k, v, out, lse, dout, dq, dk, dv, q.dim(0) * q.dim(2) * 2 * q.dim(1), op);
    dtype_is(dlambda, DType::F32, op, "dlambda");
    numel_is(dlambda, 1, op, "dlambda");
    ctx_.activate();
    const cuda::DiffFlashDims fd{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(4)};
    if (q.dtype() == DType::BF16 && cuda::diff_flash_supported(fd)) {
      const size_t ws = cuda::diff_flash_backward_workspace_bytes(fd, flash_);
      cuda::diff_flash_backward(fd, q.data<__nv_bfloat16>(), k.data<__nv_bfloat16>(),
                                v.data<__nv_bfloat16>(), lambda.data<float>(),
                                out.data<__nv_bfloat16>(), lse.data<float>(),
                                dout.data<__nv_bfloat16>(), dq.data<__nv_bfloat16>(),
                                dk.data<__nv_bfloat16>(), dv.data<__nv_bfloat16>(),
                                dlambda.data<float>(), ctx_.scratch(ws), ws, ctx_.stream(), o2_of(saved, q),
                                flash_);
      return;
    }
    cuda::diff_attention_simple_backward(ctx_, q, k, v, lambda, lse, dout, dq, dk, dv, dlambda);
  }

  // ---- standard attention ---------------------------------------------------------------
  void check_standard_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                const char* op) {
    float_on_gpu(q, op, "q");
    float_on_gpu(k, op, "k");
    float_on_gpu(v, op, "v");
    same_dtype(q, k, op, "q", "k");
    same_dtype(q, v, op, "q", "v");
    if (q.ndim() != 4) fail(op, "q must be [B, S, H, dh], got " + q.str());
    if (k.ndim() != 4) fail(op, "k must be [B, S, H_kv, dh], got " + k.str());
    if (k.dim(0) != q.dim(0) || k.dim(1) != q.dim(1) || k.dim(3) != q.dim(3))
      fail(op, "k " + k.str() + " does not match q " + q.str());
    if (q.dim(2) % k.dim(2) != 0)
      fail(op, "heads of q " + q.str() + " must be a multiple of the heads of k " + k.str());
    numel_is(v, k.numel(), op, "v (expected the shape of k)");
  }

  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                         Tensor& lse) override {
    const char* op = "attention_forward";
    check_standard_attention(q, k, v, op);
    check_attention_outputs(q, out, lse, q.dim(0) * q.dim(2) * q.dim(1), op);
    ctx_.activate();
    // Hopper: the fused flash kernels (heads in pairs, GQA groups 1 or even, diff_flash.h); else
    // cuBLAS GEMMs
    const cuda::DiffFlashDims sd{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3)};
    if (q.dtype() == DType::BF16 && cuda::std_flash_supported(sd, false, flash_)) {
      cuda::std_flash_forward(sd, q.data<__nv_bfloat16>(), k.data<__nv_bfloat16>(),
                              v.data<__nv_bfloat16>(), out.data<__nv_bfloat16>(), lse.data<float>(),
                              ctx_.stream(), flash_);
      return;
    }
    if (cuda::attention_gemm_supported(q, k)) return cuda::attention_gemm_forward(ctx_, q, k, v, out, lse);
    cuda::attention_simple_forward(ctx_, q, k, v, out, lse);
  }

  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                          const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk,
                          Tensor& dv) override {
    const char* op = "attention_backward";
    check_standard_attention(q, k, v, op);
    check_attention_grads(q, k, v, out, lse, dout, dq, dk, dv, q.dim(0) * q.dim(2) * q.dim(1), op);
    ctx_.activate();
    const cuda::DiffFlashDims sd{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3)};
    if (q.dtype() == DType::BF16 && cuda::std_flash_supported(sd, true, flash_)) {
      const size_t ws = cuda::std_flash_backward_workspace_bytes(sd, flash_);
      cuda::std_flash_backward(sd, q.data<__nv_bfloat16>(), k.data<__nv_bfloat16>(),
                               v.data<__nv_bfloat16>(), out.data<__nv_bfloat16>(), lse.data<float>(),
                               dout.data<__nv_bfloat16>(), dq.data<__nv_bfloat16>(),
                               dk.data<__nv_bfloat16>(), dv.data<__nv_bfloat16>(), ctx_.scratch(ws),
                               ws, ctx_.stream(), flash_);
      return;
    }
    if (cuda::attention_gemm_supported(q, k))
      return cuda::attention_gemm_backward(ctx_, q, k, v, out, lse, dout, dq, dk, dv);
    cuda::attention_simple_backward(ctx_, q, k, v, lse, dout, dq, dk, dv);
  }

  // ---- attention against a K/V cache (generation) ------------------------------------------
  void cached_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& start,
                        const Tensor& lambda, double rope_theta, Tensor& k_cache, Tensor& v_cache,
                        Tensor& out) override {
    const char* op = "cached_attention";
    float_on_gpu(q, op, "q");
    auto like_q = [&](const Tensor& t, const char* name) {
      on_gpu(t, op, name);
      same_dtype(q, t, op, "q", name);
    };
    like_q(k, "k");
    like_q(v, "v");
    like_q(k_cache, "k_cache");
    like_q(v_cache, "v_cache");
    like_q(out, "out");
    dtype_is(start, DType::I32, op, "start");
    const bool diff = q.ndim() == 5;
    if (diff ? (q.dim(3) != 2 || k.ndim() != 5 || k.dim(3) != 2) : (q.ndim() != 4 || k.ndim() != 4))
      fail(op, "q " + q.str() + " and k " + k.str() + " must be [B,T,h,2,dh] and [B,T,h_kv,2,dh] "
               "(differential) or [B,T,H,dh] and [B,T,H_kv,dh] (standard)");
    const int64_t B = q.dim(0), T = q.dim(1), dh = q.dim(q.ndim() - 1);
    if (k.dim(0) != B || k.dim(1) != T || k.dim(k.ndim() - 1) != dh) fail(op, "k " + k.str() + " does not match q " + q.str());
    if (k.dim(2) <= 0 || q.dim(2) % k.dim(2) != 0)
      fail(op, "heads of q " + q.str() + " must be a multiple of the heads of k " + k.str());
    if (dh % 2 != 0 || dh > 256) fail(op, "head dim of q " + q.str() + " must be even and at most 256");
    numel_is(v, k.numel(), op, "v (as many elements as k)");
    numel_is(out, q.numel(), op, "out (as many elements as q)");
    if (k_cache.ndim() < 2 || k_cache.dim(0) != B || k_cache.numel() != k_cache.dim(1) * k.numel() / T)
      fail(op, "k_cache " + k_cache.str() + " should be [B, C, ...] with rows like k " + k.str());
    numel_is(v_cache, k_cache.numel(), op, "v_cache (the shape of k_cache)");
    numel_is(start, B, op, "start (one position per sequence)");
    if (diff) {
      dtype_is(lambda, DType::F32, op, "lambda");
      numel_is(lambda, 1, op, "lambda");
    }
    if (B * T > 65535 || k_cache.dim(1) > (int64_t(1) << 30))
      fail(op, "too many new tokens (" + std::to_string(B * T) + ") or cache rows for one call");
    ctx_.activate();
    cuda::cached_attention(ctx_, q, k, v, start, lambda, rope_theta, k_cache, v_cache, out);
  }

  // out: the query's dtype and numel (out width per head = v's width per group).
  void check_attention_outputs(const Tensor& q, const Tensor& out, const Tensor& lse,
                               int64_t lse_numel, const char* op) {
    float_on_gpu(out, op, "out");
    same_dtype(q, out, op, "q", "out");
    numel_is(out, q.numel(), op, "out");
    dtype_is(lse, DType::F32, op, "lse");
    numel_is(lse, lse_numel, op, "lse");
  }

  void check_attention_grads(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                             const Tensor& lse, const Tensor& dout, const Tensor& dq,
                             const Tensor& dk, const Tensor& dv, int64_t lse_numel,
                             const char* op) {
    dtype_is(lse, DType::F32, op, "lse");
    numel_is(lse, lse_numel, op, "lse");
    struct Arg { const Tensor* t; const Tensor* like; const char* name; };
    for (const Arg& a : {Arg{&out, &q, "out"}, Arg{&dout, &q, "dout"}, Arg{&dq, &q, "dq"},
                         Arg{&dk, &k, "dk"}, Arg{&dv, &v, "dv"}}) {
      float_on_gpu(*a.t, op, a.name);
      same_dtype(q, *a.t, op, "q", a.name);
      numel_is(*a.t, a.like->numel(), op, a.name);
    }
  }

  // ---- SwiGLU ------------------------------------------------------------------------
  // ---- Differential Transformer V2: the pairwise subtraction ---------------------------------
  // att [B,S,2H,dh] and z [B*S,H]: the shapes both directions check.
  static void check_diff_v2_combine(const Tensor& att, const Tensor& z, const char* op) {
    float_on_gpu(att, op, "att");
    float_on_gpu(z, op, "z");
    same_dtype(att, z, op, "att", "z");
    if (att.ndim() != 4 || att.dim(2) % 2 != 0)
      fail(op, "att " + att.str() + " must be [B, S, 2H, dh] (an even number of query heads: pairs)");
    numel_is(z, att.dim(0) * att.dim(1) * (att.dim(2) / 2), op, "z");
  }

  void diff_v2_combine_forward(const Tensor& att, const Tensor& z, Tensor& out) override {
    const char* op = "diff_v2_combine_forward";
    check_diff_v2_combine(att, z, op);
    float_on_gpu(out, op, "out");
    same_dtype(att, out, op, "att", "out");
    numel_is(out, att.numel() / 2, op, "out");
    ctx_.activate();
    cuda::diff_v2_combine_forward(ctx_, att, z, out);
  }

  void diff_v2_combine_backward(const Tensor& att, const Tensor& z, const Tensor& dout, Tensor& datt,
                                Tensor& dz) override {
    const char* op = "diff_v2_combine_backward";
    check_diff_v2_combine(att, z, op);
    for (auto [t, n, numel] : {std::tuple<const Tensor*, const char*, int64_t>{&dout, "dout", att.numel() / 2},
                               {&datt, "datt", att.numel()}, {&dz, "dz", z.numel()}}) {
      float_on_gpu(*t, op, n);
      same_dtype(att, *t, op, "att", n);
      numel_is(*t, numel, op, n);
    }
    ctx_.activate();
    cuda::diff_v2_combine_backward(ctx_, att, z, dout, datt, dz);
  }

  void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) override {
    const char* op = "swiglu_forward";
    float_on_gpu(gate, op, "gate");
    for (auto [t, n] : {std::pair<const Tensor*, const char*>{&up, "up"}, {&out, "out"}}) {
      float_on_gpu(*t, op, n);
      same_dtype(gate, *t, op, "gate", n);
      numel_is(*t, gate.numel(), op, n);
    }
    ctx_.activate();
    cuda::swiglu_forward(ctx_, gate, up, out);
  }

  void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                       Tensor& dup) override {
    const char* op = "swiglu_backward";
    float_on_gpu(gate, op, "gate");
    for (auto [t, n] : {std::pair<const Tensor*, const char*>{&up, "up"}, {&dout, "dout"},
                        {&dgate, "dgate"}, {&dup, "dup"}}) {
      float_on_gpu(*t, op, n);
      same_dtype(gate, *t, op, "gate", n);
      numel_is(*t, gate.numel(), op, n);
    }
    ctx_.activate();
    cuda::swiglu_backward(ctx_, gate, up, dout, dgate, dup);
  }

  // ---- softmax cross-entropy -----------------------------------------------------------
  void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& losses,
                             Tensor& lse) override {
    const char* op = "cross_entropy_forward";
    float_on_gpu(logits, op, "logits");
    dtype_is(targets, DType::I32, op, "targets");
    numel_is(targets, logits.rows(), op, "targets");
    dtype_is(losses, DType::F32, op, "losses");
    numel_is(losses, logits.rows(), op, "losses");
    dtype_is(lse, DType::F32, op, "lse");
    numel_is(lse, logits.rows(), op, "lse");
    ctx_.activate();
    cuda::cross_entropy_forward(ctx_, logits, targets, losses, lse);
  }

  void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                              float dloss, Tensor& dlogits) override {
    const char* op = "cross_entropy_backward";
    float_on_gpu(logits, op, "logits");
    dtype_is(targets, DType::I32, op, "targets");
    numel_is(targets, logits.rows(), op, "targets");
    dtype_is(lse, DType::F32, op, "lse");
    numel_is(lse, logits.rows(), op, "lse");
    float_on_gpu(dlogits, op, "dlogits");
    same_dtype(logits, dlogits, op, "logits", "dlogits");
    numel_is(dlogits, logits.numel(), op, "dlogits");
    ctx_.activate();
    cuda::cross_entropy_backward(ctx_, logits, targets, lse, dloss, dlogits);
  }

  // ---- optimizer -----------------------------------------------------------------------
  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                  const AdamWParams& hp) override {
    check_adamw("adamw_step", param, grad, m, v, hp);
    ctx_.activate();
    cuda::adamw_step(ctx_, param, grad, m, v, hp);
  }
  void adamw_step_each(const std::vector<AdamWTensors>& items) override {
    for (size_t i = 0; i < items.size(); ++i) {
      const AdamWTensors& t = items[i];
      char op[48];
      std::snprintf(op, sizeof op, "adamw_step_each item %zu", i);
      check_adamw(op, t.param, t.grad, t.m, t.v, t.hp);
      if (t.working.defined()) {
        float_on_gpu(t.working, op, "working");
        numel_is(t.working, t.param.numel(), op, "working");
      }
    }
    ctx_.activate();
    cuda::adamw_step_each(ctx_, items);
  }

 private:
  cuda::CudaContext ctx_;
  cuda::FlashOptions flash_;  // from CudaOptions: determinism and the kernel family
};

}  // namespace

namespace cuda {
CudaContext* context_of(Ops& ops) {
  auto* c = dynamic_cast<CudaOps*>(&ops);
  return c ? &c->context() : nullptr;
}
}  // namespace cuda

bool cuda_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

std::unique_ptr<Ops> make_cuda_ops(int device_index, const CudaOptions& options) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw_error("cuda: no GPU is visible (cudaGetDeviceCount: ",
                err == cudaSuccess ? "0 devices" : cudaGetErrorString(err), "); use the CPU backend");
  }
  return std::make_unique<CudaOps>(device_index, options);
}

}  // namespace difftron
