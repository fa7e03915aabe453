#include "kernels/profiling_ops.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>
#include <utility>

namespace difftron {
namespace {

double nb(const Tensor& t) { return t.defined() ? double(t.nbytes()) : 0.0; }

template <class... T>
double bytes_of(const T&... t) {
  return (nb(t) + ... + 0.0);
}

// a tensor seen as 2-D [rows, cols] (matmul's view)
int64_t cols_of(const Tensor& t) { return t.ndim() == 0 ? 1 : t.dim(t.ndim() - 1); }
int64_t rows_of(const Tensor& t) { return cols_of(t) == 0 ? 0 : t.numel() / cols_of(t); }

}  // namespace

ProfilingOps::ProfilingOps(std::unique_ptr<Ops> inner) : inner_(std::move(inner)) {
  DT_CHECK(inner_ != nullptr, "ProfilingOps needs a backend");
}

template <class F>
void ProfilingOps::timed(const char* key, double bytes, double flops, F&& f) {
  if (!active_) {
    f();
    return;
  }
  using clock = std::chrono::steady_clock;
  inner_->synchronize();
  const auto t0 = clock::now();
  f();
  inner_->synchronize();
  const double s = std::chrono::duration<double>(clock::now() - t0).count();
  OpProfileRow& r = stats_[key];
  r.op = key;
  ++r.calls;
  r.seconds += s;
  r.bytes += bytes;
  r.flops += flops;
}

std::vector<OpProfileRow> ProfilingOps::rows() const {
  std::vector<OpProfileRow> out;
  for (const auto& [k, r] : stats_) out.push_back(r);
  std::stable_sort(out.begin(), out.end(), [](const OpProfileRow& a, const OpProfileRow& b) { return a.seconds > b.seconds; });
  return out;
}

// ---- memory and transfers ---------------------------------------------------------------
void ProfilingOps::fill_zero(Tensor& t) { timed("fill_zero", nb(t), 0, [&] { inner_->fill_zero(t); }); }
void ProfilingOps::copy(const Tensor& src, Tensor& dst) {
  timed("copy", bytes_of(src, dst), 0, [&] { inner_->copy(src, dst); });
}
void ProfilingOps::upload(Tensor& dst, const float* src) { timed("upload", nb(dst), 0, [&] { inner_->upload(dst, src); }); }
void ProfilingOps::upload(Tensor& dst, const double* src) { timed("upload", nb(dst), 0, [&] { inner_->upload(dst, src); }); }
void ProfilingOps::upload(Tensor& dst, const int32_t* src) { timed("upload", nb(dst), 0, [&] { inner_->upload(dst, src); }); }
void ProfilingOps::download(const Tensor& src, float* dst) {
  timed("download", nb(src), 0, [&] { inner_->download(src, dst); });
}
void ProfilingOps::download(const Tensor& src, double* dst) {
  timed("download", nb(src), 0, [&] { inner_->download(src, dst); });
}
void ProfilingOps::download_bytes(const Tensor& src, void* dst) {
  timed("download", nb(src), 0, [&] { inner_->download_bytes(src, dst); });
}
void ProfilingOps::upload_bytes(Tensor& dst, const void* src) {
  timed("upload", nb(dst), 0, [&] { inner_->upload_bytes(dst, src); });
}

// ---- compute ------------------------------------------------------------------------------
void ProfilingOps::init_normal(Tensor& out, uint64_t seed, uint64_t tensor_id, double std, int64_t full_cols,
                               int64_t row0, int64_t col0) {
  timed("init_normal", nb(out), 0, [&] { inner_->init_normal(out, seed, tensor_id, std, full_cols, row0, col0); });
}

namespace {
// "matmul MxNxK[ tA][ tB]<suffix>" and 2 M N K
std::pair<std::string, double> matmul_key(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b,
                                          const char* suffix) {
  const int64_t M = trans_a ? cols_of(a) : rows_of(a), K = trans_a ? rows_of(a) : cols_of(a);
  const int64_t N = trans_b ? rows_of(b) : cols_of(b);
  return {"matmul " + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K) +
              (trans_a ? " tA" : "") + (trans_b ? " tB" : "") + suffix,
          2.0 * double(M) * double(N) * double(K)};
}
}  // namespace

void ProfilingOps::matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& y, float alpha,
                          float beta) {
  if (!active_) return inner_->matmul(a, trans_a, b, trans_b, y, alpha, beta);
  const auto [key, flops] = matmul_key(a, trans_a, b, trans_b, beta != 0.0f ? " +=" : "");
  timed(key.c_str(), bytes_of(a, b, y), flops, [&] { inner_->matmul(a, trans_a, b, trans_b, y, alpha, beta); });
}
void ProfilingOps::matmul_add(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c,
                              Tensor& y) {
  if (!active_) return inner_->matmul_add(a, trans_a, b, trans_b, c, y);
  const auto [key, flops] = matmul_key(a, trans_a, b, trans_b, " + c");
  timed(key.c_str(), bytes_of(a, b, c, y), flops, [&] { inner_->matmul_add(a, trans_a, b, trans_b, c, y); });
}
void ProfilingOps::axpy(float alpha, const Tensor& x, Tensor& y) {
  timed("axpy", bytes_of(x, y), 0, [&] { inner_->axpy(alpha, x, y); });
}
void ProfilingOps::scale(Tensor& x, float alpha) { timed("scale", nb(x), 0, [&] { inner_->scale(x, alpha); }); }
double ProfilingOps::sum_squares(const Tensor& x) {
  double r = 0;
  timed("sum_squares", nb(x), 0, [&] { r = inner_->sum_squares(x); });
  return r;
}
std::vector<double> ProfilingOps::sum_squares_each(const std::vector<Tensor>& xs) {
  std::vector<double> r;
  double bytes = 0;
  for (const Tensor& x : xs) bytes += nb(x);
  timed("sum_squares_each", bytes, 0, [&] { r = inner_->sum_squares_each(xs); });
  return r;
}
void ProfilingOps::embedding_forward(const Tensor& tokens, const Tensor& table, Tensor& out) {
  timed("embedding_forward", bytes_of(tokens, out) + nb(out), 0, [&] { inner_->embedding_forward(tokens, table, out); });
}
void ProfilingOps::embedding_backward(const Tensor& tokens, const Tensor& dout, Tensor& dtable) {
  // the rows touched, not the whole table
  const double rows =
      dout.defined() ? double(dout.numel()) * double(dtype_size(dtable.dtype())) : 0.0;
  timed("embedding_backward", bytes_of(tokens, dout) + 2 * rows, 0,
        [&] { inner_->embedding_backward(tokens, dout, dtable); });
}
void ProfilingOps::rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, float scale, Tensor& y,
                                   Tensor& rstd) {
  timed("rmsnorm_forward", bytes_of(x, w, y, rstd), 0, [&] { inner_->rmsnorm_forward(x, w, eps, scale, y, rstd); });
}
void ProfilingOps::rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, float scale,
                                    const Tensor& dy, Tensor& dx, Tensor& dw) {
  timed("rmsnorm_backward", bytes_of(x, w, rstd, dy, dx, dw), 0,
        [&] { inner_->rmsnorm_backward(x, w, rstd, scale, dy, dx, dw); });
}
void ProfilingOps::rope(Tensor& x, double theta, bool inverse) {
  timed("rope", 2 * nb(x), 0, [&] { inner_->rope(x, theta, inverse); });
}
void ProfilingOps::diff_lambda_forward(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2, const Tensor& lk2,
                                       double lambda_init, Tensor& lambda) {
  timed("diff_lambda_forward", bytes_of(lq1, lk1, lq2, lk2, lambda), 0,
        [&] { inner_->diff_lambda_forward(lq1, lk1, lq2, lk2, lambda_init, lambda); });
}
void ProfilingOps::diff_lambda_backward(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2, const Tensor& lk2,
                                        const Tensor& dlambda, Tensor& dlq1, Tensor& dlk1, Tensor& dlq2,
                                        Tensor& dlk2) {
  timed("diff_lambda_backward", bytes_of(lq1, lk1, lq2, lk2, dlambda, dlq1, dlk1, dlq2, dlk2), 0,
        [&] { inner_->diff_lambda_backward(lq1, lk1, lq2, lk2, dlambda, dlq1, dlk1, dlq2, dlk2); });
}
void ProfilingOps::diff_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lambda,
                                          Tensor& out, Tensor& lse, Tensor& saved) {
  timed("diff_attention_forward", bytes_of(q, k, v, out, lse), 0,
        [&] { inner_->diff_attention_forward(q, k, v, lambda, out, lse, saved); });
}
void ProfilingOps::diff_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lambda,
                                           const Tensor& out, const Tensor& lse, const Tensor& saved,
                                           const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dlambda) {
  timed("diff_attention_backward", bytes_of(q, k, v, out, lse, dout, dq, dk, dv), 0,
        [&] { inner_->diff_attention_backward(q, k, v, lambda, out, lse, saved, dout, dq, dk, dv, dlambda); });
}
void ProfilingOps::attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse) {
  timed("attention_forward", bytes_of(q, k, v, out, lse), 0, [&] { inner_->attention_forward(q, k, v, out, lse); });
}
void ProfilingOps::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                      const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) {
  timed("attention_backward", bytes_of(q, k, v, out, lse, dout, dq, dk, dv), 0,
        [&] { inner_->attention_backward(q, k, v, out, lse, dout, dq, dk, dv); });
}
void ProfilingOps::diff_v2_combine_forward(const Tensor& att, const Tensor& z, Tensor& out) {
  timed("diff_v2_combine_forward", bytes_of(att, z, out), 0, [&] { inner_->diff_v2_combine_forward(att, z, out); });
}
void ProfilingOps::diff_v2_combine_backward(const Tensor& att, const Tensor& z, const Tensor& dout, Tensor& datt,
                                            Tensor& dz) {
  timed("diff_v2_combine_backward", bytes_of(att, z, dout, datt, dz), 0,
        [&] { inner_->diff_v2_combine_backward(att, z, dout, datt, dz); });
}
void ProfilingOps::cached_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& start,
                                    const Tensor& lambda, double rope_theta, Tensor& k_cache, Tensor& v_cache,
                                    Tensor& out) {
  timed("cached_attention", bytes_of(q, k, v, out), 0,
        [&] { inner_->cached_attention(q, k, v, start, lambda, rope_theta, k_cache, v_cache, out); });
}
void ProfilingOps::swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  timed("swiglu_forward", bytes_of(gate, up, out), 0, [&] { inner_->swiglu_forward(gate, up, out); });
}
void ProfilingOps::swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                                   Tensor& dup) {
  timed("swiglu_backward", bytes_of(gate, up, dout, dgate, dup), 0,
        [&] { inner_->swiglu_backward(gate, up, dout, dgate, dup); });
}
void ProfilingOps::cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& losses, Tensor& lse) {
  timed("cross_entropy_forward", bytes_of(logits, targets, losses, lse), 0,
        [&] { inner_->cross_entropy_forward(logits, targets, losses, lse); });
}
void ProfilingOps::cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, float dloss,
                                          Tensor& dlogits) {
  // dlogits may alias logits: one read and one write of the matrix either way
  timed("cross_entropy_backward", 2 * nb(logits) + bytes_of(targets, lse), 0,
        [&] { inner_->cross_entropy_backward(logits, targets, lse, dloss, dlogits); });
}
void ProfilingOps::adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& hp) {
  // param, m, v read and written; grad read
  timed("adamw_step", 2 * bytes_of(param, m, v) + nb(grad), 0, [&] { inner_->adamw_step(param, grad, m, v, hp); });
}
void ProfilingOps::adamw_step_each(const std::vector<AdamWTensors>& items) {
  // per item as adamw_step, and the working copy written
  double bytes = 0;
  for (const AdamWTensors& t : items) bytes += 2 * bytes_of(t.param, t.m, t.v) + bytes_of(t.grad, t.working);
  timed("adamw_step_each", bytes, 0, [&] { inner_->adamw_step_each(items); });
}

std::string format_op_profile(const std::vector<OpProfileRow>& rows, int64_t steps, double wall_seconds) {
  std::ostringstream os;
  const double n = double(std::max<int64_t>(steps, 1));
  double total = 0;
  for (const auto& r : rows) total += r.seconds;
  char line[256];
  std::snprintf(line, sizeof line, "%-44s %9s %11s %7s %10s %9s\n", "op (matmul: M x N x K)", "calls/step", "ms/step",
                "share", "GB/s", "TFLOP/s");
  os << line;
  for (const auto& r : rows) {
    const double gbs = r.seconds > 0 ? r.bytes / r.seconds / 1e9 : 0;
    char tfs[32] = "-";
    if (r.seconds > 0 && r.flops > 0) std::snprintf(tfs, sizeof tfs, "%.1f", r.flops / r.seconds / 1e12);
    std::snprintf(line, sizeof line, "%-44s %9.1f %11.3f %6.1f%% %10.1f %9s\n", r.op.c_str(), double(r.calls) / n,
                  1e3 * r.seconds / n, total > 0 ? 100 * r.seconds / total : 0.0, gbs, tfs);
    os << line;
  }
  std::snprintf(line, sizeof line,
                "ops total %.3f ms/step; wall time of the profiled steps %.3f ms/step (the rest: host work between "
                "ops)\n",
                1e3 * total / n, 1e3 * wall_seconds / n);
  os << line;
  return os.str();
}

}  // namespace difftron
