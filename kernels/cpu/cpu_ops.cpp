// The CPU backend: implements kernels/ops.h on host memory by dispatching each call to
// the reference in kernels/cpu/<op>.cpp for f32 or f64 tensors, after checking shapes.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "base/error.h"
#include "kernels/cpu/reference.h"
#include "kernels/ops.h"

namespace difftron {
namespace cpu {
// kernels/cpu/init_normal.cpp (declared here rather than in reference.h: it takes the tensor,
// whose dtype (f32, f64 or bf16) it dispatches on itself, and checks the arguments).
void init_normal(Tensor& out, uint64_t seed, uint64_t tensor_id, double std, int64_t full_cols,
                 int64_t row0, int64_t col0);
}  // namespace cpu

namespace {

void require(bool ok, const char* op, const std::string& what) {
  if (!ok) throw_error("cpu ", op, ": ", what);
}

void require_float(const Tensor& t, const char* op, const char* arg) {
  require(t.device() == Device::CPU, op, std::string(arg) + " is on " + device_name(t.device()));
  require(t.dtype() == DType::F32 || t.dtype() == DType::F64, op,
          std::string(arg) + " has dtype " + dtype_name(t.dtype()) + " (expected f32 or f64)");
}

void require_same(const Tensor& a, const Tensor& b, const char* op, const char* an, const char* bn) {
  require(a.dtype() == b.dtype(), op,
          std::string(an) + " is " + a.str() + " but " + bn + " is " + b.str());
}

void require_numel(const Tensor& t, int64_t n, const char* op, const char* arg) {
  require(t.numel() == n, op,
          std::string(arg) + " " + t.str() + " should hold " + std::to_string(n) + " elements");
}

// Calls f.template operator()<T>() with T = float or double per the tensor's dtype.
template <typename F>
void dispatch(const Tensor& t, F&& f) {
  if (t.dtype() == DType::F64)
    f(double{});
  else
    f(float{});
}

class CpuOps final : public Ops {
 public:
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "cpu"; }

  Tensor empty(const Shape& shape, DType dtype) override {
    size_t bytes = std::max<size_t>(shape_numel(shape) * dtype_size(dtype), 1);
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) throw_error("cpu: out of host memory allocating ", shape_str(shape), " ", dtype_name(dtype));
    return Tensor(shape, dtype, Device::CPU, p, [](void* q) { std::free(q); });
  }

  void fill_zero(Tensor& t) override { std::memset(t.raw(), 0, t.nbytes()); }

  void copy(const Tensor& src, Tensor& dst) override {
    require_numel(dst, src.numel(), "copy", "dst");
    if (src.dtype() == dst.dtype()) {
      std::memmove(dst.raw(), src.raw(), src.nbytes());
      return;
    }
    require_float(src, "copy", "src");
    require_float(dst, "copy", "dst");
    dispatch(src, [&](auto s) {
      using S = decltype(s);
      dispatch(dst, [&](auto d) {
        using D = decltype(d);
        const S* a = src.data<S>();
        D* b = dst.data<D>();
        for (int64_t i = 0; i < src.numel(); ++i) b[i] = D(a[i]);
      });
    });
  }

  template <typename H>
  void upload_impl(Tensor& dst, const H* src) {
    if (dst.dtype() == DType::I32) {
      for (int64_t i = 0; i < dst.numel(); ++i) dst.data<int32_t>()[i] = int32_t(src[i]);
      return;
    }
    require_float(dst, "upload", "dst");
    dispatch(dst, [&](auto d) {
      using D = decltype(d);
      for (int64_t i = 0; i < dst.numel(); ++i) dst.data<D>()[i] = D(src[i]);
    });
  }
  void upload(Tensor& dst, const float* src) override { upload_impl(dst, src); }
  void upload(Tensor& dst, const double* src) override { upload_impl(dst, src); }
  void upload(Tensor& dst, const int32_t* src) override {
    require(dst.dtype() == DType::I32, "upload", "int32 data into " + dst.str());
    std::memcpy(dst.raw(), src, dst.nbytes());
  }

  template <typename H>
  void download_impl(const Tensor& src, H* dst) {
    if (src.dtype() == DType::I32) {
      for (int64_t i = 0; i < src.numel(); ++i) dst[i] = H(src.data<int32_t>()[i]);
      return;
    }
    require_float(src, "download", "src");
    dispatch(src, [&](auto s) {
      using S = decltype(s);
      for (int64_t i = 0; i < src.numel(); ++i) dst[i] = H(src.data<S>()[i]);
    });
  }
  void download(const Tensor& src, float* dst) override { download_impl(src, dst); }
  void download(const Tensor& src, double* dst) override { download_impl(src, dst); }

  void init_normal(Tensor& out, uint64_t seed, uint64_t tensor_id, double std, int64_t full_cols,
                   int64_t row0, int64_t col0) override {
    cpu::init_normal(out, seed, tensor_id, std, full_cols, row0, col0);
  }

  void matmul(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& y, float alpha,
              float beta) override {
    require_float(a, "matmul", "a");
    require_same(a, b, "matmul", "a", "b");
    require_same(a, y, "matmul", "a", "y");
    int64_t M = ta ? a.cols() : a.rows(), K = ta ? a.rows() : a.cols();
    int64_t Kb = tb ? b.cols() : b.rows(), N = tb ? b.rows() : b.cols();
    require(K == Kb, "matmul", "inner dims differ: a " + a.str() + " b " + b.str());
    require(y.rows() == M && y.cols() == N, "matmul",
            "y " + y.str() + " should be [" + std::to_string(M) + ", " + std::to_string(N) + "]");
    dispatch(a, [&](auto t) {
      using T = decltype(t);
      cpu::matmul<T>(a.data<T>(), ta, b.data<T>(), tb, y.data<T>(), M, N, K, T(alpha), T(beta));
    });
  }

  void axpy(float alpha, const Tensor& x, Tensor& y) override {
    require_same(x, y, "axpy", "x", "y");
    require_numel(y, x.numel(), "axpy", "y");
    dispatch(x, [&](auto t) {
      using T = decltype(t);
      for (int64_t i = 0; i < x.numel(); ++i) y.data<T>()[i] += T(alpha) * x.data<T>()[i];
    });
  }

  void scale(Tensor& x, float alpha) override {
    dispatch(x, [&](auto t) {
      using T = decltype(t);
      for (int64_t i = 0; i < x.numel(); ++i) x.data<T>()[i] *= T(alpha);
    });
  }

  double sum_squares(const Tensor& x) override {
    double s = 0;
    dispatch(x, [&](auto t) {
      using T = decltype(t);
      for (int64_t i = 0; i < x.numel(); ++i) s += double(x.data<T>()[i]) * double(x.data<T>()[i]);
    });
    return s;
  }

  void embedding_forward(const Tensor& tokens, const Tensor& table, Tensor& out) override {
    require(tokens.dtype() == DType::I32, "embedding_forward", "tokens must be i32");
    require_same(table, out, "embedding_forward", "table", "out");
    require_numel(out, tokens.numel() * table.cols(), "embedding_forward", "out");
    dispatch(table, [&](auto t) {
      using T = decltype(t);
      cpu::embedding_forward<T>(tokens.data<int32_t>(), table.data<T>(), out.data<T>(),
                                tokens.numel(), table.cols(), table.rows());
    });
  }

  void embedding_backward(const Tensor& tokens, const Tensor& dout, Tensor& dtable) override {
    require_same(dout, dtable, "embedding_backward", "dout", "dtable");
    require_numel(dout, tokens.numel() * dtable.cols(), "embedding_backward", "dout");
    dispatch(dout, [&](auto t) {
      using T = decltype(t);
      cpu::embedding_backward<T>(tokens.data<int32_t>(), dout.data<T>(), dtable.data<T>(),
                                 tokens.numel(), dtable.cols(), dtable.rows());
    });
  }

  void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, float scale, Tensor& y,
                       Tensor& rstd) override {
    require_same(x, y, "rmsnorm_forward", "x", "y");
    require_numel(w, x.cols(), "rmsnorm_forward", "w");
    require_numel(rstd, x.rows(), "rmsnorm_forward", "rstd");
    dispatch(x, [&](auto t) {
      using T = decltype(t);
      cpu::rmsnorm_forward<T>(x.data<T>(), w.data<T>(), y.data<T>(), rstd.data<T>(), x.rows(),
                              x.cols(), eps, T(scale));
    });
  }

  void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, float scale,
                        const Tensor& dy, Tensor& dx, Tensor& dw) override {
    require_numel(dy, x.numel(), "rmsnorm_backward", "dy");
    require_numel(dx, x.numel(), "rmsnorm_backward", "dx");
    dispatch(x, [&](auto t) {
      using T = decltype(t);
      cpu::rmsnorm_backward<T>(x.data<T>(), w.data<T>(), rstd.data<T>(), dy.data<T>(), dx.data<T>(),
                               dw.data<T>(), x.rows(), x.cols(), T(scale));
    });
  }

  void rope(Tensor& x, double theta, bool inverse) override {
    require(x.ndim() == 4, "rope", "x must be [B, S, H, dh], got " + x.str());
    dispatch(x, [&](auto t) {
      using T = decltype(t);
      cpu::rope<T>(x.data<T>(), x.dim(0), x.dim(1), x.dim(2), x.dim(3), theta, inverse);
    });
  }

  void diff_lambda_forward(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2,
                           const Tensor& lk2, double lambda_init, Tensor& lambda) override {
    dispatch(lq1, [&](auto t) {
      using T = decltype(t);
      lambda.data<T>()[0] = cpu::diff_lambda_forward<T>(lq1.data<T>(), lk1.data<T>(), lq2.data<T>(),
                                                        lk2.data<T>(), lq1.numel(), lambda_init);
    });
  }

  void diff_lambda_backward(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2,
                            const Tensor& lk2, const Tensor& dlambda, Tensor& dlq1, Tensor& dlk1,
                            Tensor& dlq2, Tensor& dlk2) override {
    dispatch(lq1, [&](auto t) {
      using T = decltype(t);
      cpu::diff_lambda_backward<T>(lq1.data<T>(), lk1.data<T>(), lq2.data<T>(), lk2.data<T>(),
                                   lq1.numel(), dlambda.data<T>()[0], dlq1.data<T>(),
                                   dlk1.data<T>(), dlq2.data<T>(), dlk2.data<T>());
    });
  }

  struct DiffDims { int64_t B, S, h, h_kv, dh; };
  DiffDims diff_dims(const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
    require(q.ndim() == 5 && q.dim(3) == 2, op, "q must be [B, S, h, 2, dh], got " + q.str());
    require(k.ndim() == 5 && k.dim(3) == 2, op, "k must be [B, S, h_kv, 2, dh], got " + k.str());
    DiffDims d{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(4)};
    require(k.dim(0) == d.B && k.dim(1) == d.S && k.dim(4) == d.dh, op,
            "k " + k.str() + " does not match q " + q.str());
    require(d.h % d.h_kv == 0, op, "h must be a multiple of h_kv");
    require(v.numel() == d.B * d.S * d.h_kv * 2 * d.dh, op, "v " + v.str() + " should be [B, S, h_kv, 2*dh]");
    return d;
  }

  // The CPU reference keeps no saved state (`saved` is ignored).
  void diff_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                              const Tensor& lambda, Tensor& out, Tensor& lse, Tensor&) override {
    auto d = diff_dims(q, k, v, "diff_attention_forward");
    require_numel(out, d.B * d.S * d.h * 2 * d.dh, "diff_attention_forward", "out");
    require_numel(lse, d.B * d.h * 2 * d.S, "diff_attention_forward", "lse");
    dispatch(q, [&](auto t) {
      using T = decltype(t);
      cpu::diff_attention_forward<T>(q.data<T>(), k.data<T>(), v.data<T>(), lambda.data<T>()[0],
                                     out.data<T>(), lse.data<T>(), d.B, d.S, d.h, d.h_kv, d.dh);
    });
  }

  void diff_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& lambda, const Tensor& out, const Tensor& lse,
                               const Tensor&, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                               Tensor& dlambda) override {
    auto d = diff_dims(q, k, v, "diff_attention_backward");
    require_numel(dq, q.numel(), "diff_attention_backward", "dq");
    require_numel(dk, k.numel(), "diff_attention_backward", "dk");
    require_numel(dv, v.numel(), "diff_attention_backward", "dv");
    dispatch(q, [&](auto t) {
      using T = decltype(t);
      cpu::diff_attention_backward<T>(q.data<T>(), k.data<T>(), v.data<T>(), lambda.data<T>()[0],
                                      lse.data<T>(), dout.data<T>(), dq.data<T>(), dk.data<T>(),
                                      dv.data<T>(), dlambda.data<T>(), d.B, d.S, d.h, d.h_kv, d.dh);
    });
  }

  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                         Tensor& lse) override {
    require(q.ndim() == 4 && k.ndim() == 4, "attention_forward", "q, k must be [B, S, H, dh]");
    require(q.dim(2) % k.dim(2) == 0, "attention_forward", "H must be a multiple of H_kv");
    dispatch(q, [&](auto t) {
      using T = decltype(t);
      cpu::attention_forward<T>(q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(), lse.data<T>(),
                                q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3));
    });
  }

  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                          const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk,
                          Tensor& dv) override {
    require(q.ndim() == 4 && k.ndim() == 4, "attention_backward", "q, k must be [B, S, H, dh]");
    dispatch(q, [&](auto t) {
      using T = decltype(t);
      cpu::attention_backward<T>(q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(),
                                 lse.data<T>(), dout.data<T>(), dq.data<T>(), dk.data<T>(),
                                 dv.data<T>(), q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3));
    });
  }

  void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) override {
    require_numel(up, gate.numel(), "swiglu_forward", "up");
    require_numel(out, gate.numel(), "swiglu_forward", "out");
    dispatch(gate, [&](auto t) {
      using T = decltype(t);
      cpu::swiglu_forward<T>(gate.data<T>(), up.data<T>(), out.data<T>(), gate.numel());
    });
  }

  void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                       Tensor& dup) override {
    dispatch(gate, [&](auto t) {
      using T = decltype(t);
      cpu::swiglu_backward<T>(gate.data<T>(), up.data<T>(), dout.data<T>(), dgate.data<T>(),
                              dup.data<T>(), gate.numel());
    });
  }

  void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& losses,
                             Tensor& lse) override {
    require(targets.dtype() == DType::I32, "cross_entropy_forward", "targets must be i32");
    require_numel(targets, logits.rows(), "cross_entropy_forward", "targets");
    dispatch(logits, [&](auto t) {
      using T = decltype(t);
      cpu::cross_entropy_forward<T>(logits.data<T>(), targets.data<int32_t>(), losses.data<T>(),
                                    lse.data<T>(), logits.rows(), logits.cols());
    });
  }

  void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                              float dloss, Tensor& dlogits) override {
    dispatch(logits, [&](auto t) {
      using T = decltype(t);
      cpu::cross_entropy_backward<T>(logits.data<T>(), targets.data<int32_t>(), lse.data<T>(),
                                     T(dloss), dlogits.data<T>(), logits.rows(), logits.cols());
    });
  }

  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v,
                  const AdamWParams& hp) override {
    require_same(param, grad, "adamw_step", "param", "grad");
    require(m.dtype() == DType::F32 && v.dtype() == DType::F32, "adamw_step", "moments must be f32");
    require_numel(grad, param.numel(), "adamw_step", "grad");
    dispatch(param, [&](auto t) {
      using T = decltype(t);
      cpu::adamw_step<T, T>(param.data<T>(), grad.data<T>(), m.data<float>(), v.data<float>(),
                            param.numel(), hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay,
                            hp.step, hp.grad_scale);
    });
  }
};

}  // namespace

std::unique_ptr<Ops> make_cpu_ops() { return std::make_unique<CpuOps>(); }

#ifndef DIFFTRON_HAVE_CUDA
std::unique_ptr<Ops> make_cuda_ops(int, const CudaOptions&) {
  throw_error("this build of difftron has no CUDA backend (configure found no CUDA toolkit); "
              "use the CPU backend");
}
bool cuda_available() { return false; }
#endif

}  // namespace difftron
