// ProfilingOps: a backend that runs another backend's ops and, while active, measures each one,
// for `train --profile_ops=K` (where a training step's time goes; docs/PERFORMANCE.md).
//
// Each op while active: the inner backend is synchronised before and after it and the host
// clock read, so an op's time is its own (its launch included; nothing overlaps it). Per key
// (the op's name; matmul also by its shape, so the projections, the MLP and the LM head are
// apart) it sums calls, seconds, the bytes of the tensors the op reads and writes (each tensor
// once: a lower bound of its memory traffic, the figure to hold against copy bandwidth) and, for
// matmul, 2 M N K FLOPs. Inactive, it only forwards (no synchronisation, no cost but a virtual
// call). The synchronisations make a profiled step slower than a real one: compare the total
// with an unprofiled step's time; what is left over is host work between ops.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/ops.h"

namespace difftron {

struct OpProfileRow {
  std::string op;
  int64_t calls = 0;
  double seconds = 0, bytes = 0, flops = 0;
};

class ProfilingOps final : public Ops {
 public:
  explicit ProfilingOps(std::unique_ptr<Ops> inner);
  Ops& inner() { return *inner_; }
  void set_active(bool on) { active_ = on; }
  bool active() const { return active_; }
  void reset() { stats_.clear(); }
  // Every key measured since the last reset, most time first.
  std::vector<OpProfileRow> rows() const;

  Device device() const override { return inner_->device(); }
  std::string name() const override { return inner_->name() + " (profiled)"; }

  Tensor empty(const Shape& shape, DType dtype) override { return inner_->empty(shape, dtype); }
  void fill_zero(Tensor& t) override;
  void copy(const Tensor& src, Tensor& dst) override;
  void upload(Tensor& dst, const float* src) override;
  void upload(Tensor& dst, const double* src) override;
  void upload(Tensor& dst, const int32_t* src) override;
  void download(const Tensor& src, float* dst) override;
  void download(const Tensor& src, double* dst) override;
  void synchronize() override { inner_->synchronize(); }
  void download_bytes(const Tensor& src, void* dst) override;
  void upload_bytes(Tensor& dst, const void* src) override;
  void* alloc_pinned(size_t bytes) override { return inner_->alloc_pinned(bytes); }
  void free_pinned(void* p) override { inner_->free_pinned(p); }
  MemoryStats memory_stats() override { return inner_->memory_stats(); }
  void reset_peak_memory() override { inner_->reset_peak_memory(); }

  void init_normal(Tensor& out, uint64_t seed, uint64_t tensor_id, double std, int64_t full_cols, int64_t row0,
                   int64_t col0) override;
  void matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& y, float alpha = 1.0f,
              float beta = 0.0f) override;
  void matmul_add(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c,
                  Tensor& y) override;
  void axpy(float alpha, const Tensor& x, Tensor& y) override;
  void scale(Tensor& x, float alpha) override;
  double sum_squares(const Tensor& x) override;
  std::vector<double> sum_squares_each(const std::vector<Tensor>& xs) override;
  void embedding_forward(const Tensor& tokens, const Tensor& table, Tensor& out) override;
  void embedding_backward(const Tensor& tokens, const Tensor& dout, Tensor& dtable) override;
  void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, float scale, Tensor& y, Tensor& rstd) override;
  void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, float scale, const Tensor& dy,
                        Tensor& dx, Tensor& dw) override;
  void rope(Tensor& x, double theta, bool inverse) override;
  void diff_lambda_forward(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2, const Tensor& lk2,
                           double lambda_init, Tensor& lambda) override;
  void diff_lambda_backward(const Tensor& lq1, const Tensor& lk1, const Tensor& lq2, const Tensor& lk2,
                            const Tensor& dlambda, Tensor& dlq1, Tensor& dlk1, Tensor& dlq2, Tensor& dlk2) override;
  int64_t diff_attention_saved_numel(const Tensor& q) const override { return inner_->diff_attention_saved_numel(q); }
  void diff_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lambda, Tensor& out,
                              Tensor& lse, Tensor& saved) override;
  void diff_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lambda,
                               const Tensor& out, const Tensor& lse, const Tensor& saved, const Tensor& dout,
                               Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dlambda) override;
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse) override;
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv) override;
  void diff_v2_combine_forward(const Tensor& att, const Tensor& z, Tensor& out) override;
  void diff_v2_combine_backward(const Tensor& att, const Tensor& z, const Tensor& dout, Tensor& datt,
                                Tensor& dz) override;
  void cached_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& start, const Tensor& lambda,
                        double rope_theta, Tensor& k_cache, Tensor& v_cache, Tensor& out) override;
  void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) override;
  void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate, Tensor& dup) override;
  void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& losses, Tensor& lse) override;
  void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, float dloss,
                              Tensor& dlogits) override;
  void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& hp) override;
  void adamw_step_each(const std::vector<AdamWTensors>& items) override;

 private:
  // Runs f; while active, times it as `key` with these bytes and FLOPs (a literal: nothing is
  // built for an inactive call; matmul builds its shape key only when active).
  template <class F>
  void timed(const char* key, double bytes, double flops, F&& f);

  std::unique_ptr<Ops> inner_;
  bool active_ = false;
  std::map<std::string, OpProfileRow> stats_;
};

// The table `train --profile_ops` prints: per key, calls and milliseconds per step, share of the
// measured total, GB/s (bytes / time) and TFLOP/s (matmul), most time first; then the total of
// the ops and the wall time of the profiled steps.
std::string format_op_profile(const std::vector<OpProfileRow>& rows, int64_t steps, double wall_seconds);

}  // namespace difftron
