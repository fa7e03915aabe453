// The planning model (core/plan.h) against what the code really does: the bytes a
// Model allocates (counted by an Ops wrapper) and the flat-buffer and shard sizes, for
// TP 1/2/4, both attention kinds, tied and untied heads; and the TP collectives one
// training micro-batch issues (counted by a recording communicator) against the plan's
// calls and buffer sizes. Also the ring-volume arithmetic on a hand-computed example.
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include <gtest/gtest.h>

#include "core/model.h"
#include "kernels/ops.h"
#include "parallel/comm.h"
#include "core/plan.h"

namespace difftron {
namespace {

// Forwards to the CPU backend and adds up the bytes of every tensor it allocates.
class CountingOps final : public Ops {
 public:
  CountingOps() : cpu_(make_cpu_ops()) {}
  int64_t bytes = 0;
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "counting cpu"; }
  Tensor empty(const Shape& s, DType t) override {
    bytes += shape_numel(s) * int64_t(dtype_size(t));
    return cpu_->empty(s, t);
  }
  void fill_zero(Tensor& t) override { cpu_->fill_zero(t); }
  void copy(const Tensor& a, Tensor& b) override { cpu_->copy(a, b); }
  void upload(Tensor& d, const float* s) override { cpu_->upload(d, s); }
  void upload(Tensor& d, const double* s) override { cpu_->upload(d, s); }
  void upload(Tensor& d, const int32_t* s) override { cpu_->upload(d, s); }
  void download(const Tensor& s, float* d) override { cpu_->download(s, d); }
  void download(const Tensor& s, double* d) override { cpu_->download(s, d); }
  void matmul(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& y, float al, float be) override {
    cpu_->matmul(a, ta, b, tb, y, al, be);
  }
  void axpy(float a, const Tensor& x, Tensor& y) override { cpu_->axpy(a, x, y); }
  void scale(Tensor& x, float a) override { cpu_->scale(x, a); }
  double sum_squares(const Tensor& x) override { return cpu_->sum_squares(x); }
  void embedding_forward(const Tensor& t, const Tensor& w, Tensor& o) override { cpu_->embedding_forward(t, w, o); }
  void embedding_backward(const Tensor& t, const Tensor& d, Tensor& g) override { cpu_->embedding_backward(t, d, g); }
  void rmsnorm_forward(const Tensor& x, const Tensor& w, double e, float s, Tensor& y, Tensor& r) override {
    cpu_->rmsnorm_forward(x, w, e, s, y, r);
  }
  void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& r, float s, const Tensor& dy, Tensor& dx,
                        Tensor& dw) override {
    cpu_->rmsnorm_backward(x, w, r, s, dy, dx, dw);
  }
  void rope(Tensor& x, double th, bool inv) override { cpu_->rope(x, th, inv); }
  void diff_lambda_forward(const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d, double li,
                           Tensor& l) override {
    cpu_->diff_lambda_forward(a, b, c, d, li, l);
  }
  void diff_lambda_backward(const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d, const Tensor& dl,
                            Tensor& da, Tensor& db, Tensor& dc, Tensor& dd) override {
    cpu_->diff_lambda_backward(a, b, c, d, dl, da, db, dc, dd);
  }
  void diff_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& l, Tensor& o,
                              Tensor& lse, Tensor& saved) override {
    cpu_->diff_attention_forward(q, k, v, l, o, lse, saved);
  }
  void diff_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& l, const Tensor& o,
                               const Tensor& lse, const Tensor& saved, const Tensor& d, Tensor& dq, Tensor& dk,
                               Tensor& dv, Tensor& dl) override {
    cpu_->diff_attention_backward(q, k, v, l, o, lse, saved, d, dq, dk, dv, dl);
  }
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& o, Tensor& lse) override {
    cpu_->attention_forward(q, k, v, o, lse);
  }
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                          const Tensor& d, Tensor& dq, Tensor& dk, Tensor& dv) override {
    cpu_->attention_backward(q, k, v, o, lse, d, dq, dk, dv);
  }
  void swiglu_forward(const Tensor& g, const Tensor& u, Tensor& o) override { cpu_->swiglu_forward(g, u, o); }
  void swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& d, Tensor& dg, Tensor& du) override {
    cpu_->swiglu_backward(g, u, d, dg, du);
  }
  void cross_entropy_forward(const Tensor& l, const Tensor& t, Tensor& lo, Tensor& lse) override {
    cpu_->cross_entropy_forward(l, t, lo, lse);
  }
  void cross_entropy_backward(const Tensor& l, const Tensor& t, const Tensor& lse, float d, Tensor& dl) override {
    cpu_->cross_entropy_backward(l, t, lse, d, dl);
  }
  void adamw_step(Tensor& p, const Tensor& g, Tensor& m, Tensor& v, const AdamWParams& hp) override {
    cpu_->adamw_step(p, g, m, v, hp);
  }

 private:
  std::unique_ptr<Ops> cpu_;
};

// Pretends to be rank `rank` of `size`: sums are left as they are (the numbers do not
// matter here), gathers repeat this rank's data; every call is recorded.
class RecordingComm final : public Communicator {
 public:
  RecordingComm(int rank, int size, std::string name) : rank_(rank), size_(size), name_(std::move(name)) {}
  std::map<std::string, std::vector<int64_t>> calls;  // op -> bytes of each call
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::CPU; }
  void all_reduce(Tensor& t) override { calls["all_reduce"].push_back(int64_t(t.nbytes())); }
  void reduce_scatter(const Tensor& in, Tensor&) override { calls["reduce_scatter"].push_back(int64_t(in.nbytes())); }
  void all_gather(const Tensor& in, Tensor& out) override {
    calls["all_gather"].push_back(int64_t(out.nbytes()));
    for (int r = 0; r < size_; ++r)
      std::memcpy(static_cast<char*>(out.raw()) + r * in.nbytes(), in.raw(), in.nbytes());
  }
  void broadcast(Tensor&, int) override {}
  void barrier() override {}

 private:
  int rank_, size_;
  std::string name_;
};

ModelConfig config(AttentionKind kind, bool tie) {
  ModelConfig c;
  c.vocab_size = 64;
  c.d_model = 32;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 4;
  c.head_dim = 4;
  c.ffn_dim = 96;
  c.max_seq_len = 16;
  c.attention = kind;
  c.tie_embeddings = tie;
  c.resolve_and_validate();
  return c;
}

TEST(Plan, MemoryAndLayoutMatchTheModelsAllocations) {
  for (auto kind : {AttentionKind::Differential, AttentionKind::Standard, AttentionKind::DifferentialV2}) {
    for (bool tie : {false, true}) {
      for (int tp : {1, 2, 4}) {
        for (int dp : {1, 3})
        for (Recompute rc : {Recompute::None, Recompute::Selective, Recompute::Full}) {
          SCOPED_TRACE(std::string(attention_kind_name(kind)) + (tie ? " tied" : " untied") + " tp " +
                       std::to_string(tp) + " dp " + std::to_string(dp) + " recompute " + recompute_name(rc));
          const int64_t B = 2, S = 12;
          CountingOps ops;
          RecordingComm tpc(tp - 1, tp, "tp"), tph(tp - 1, tp, "tp");
          ModelParallel mp;
          if (tp > 1) {
            mp.tp = &tpc;
            mp.tp_host = &tph;
          }
          mp.flat_multiple = 64 * dp;
          Model m(config(kind, tie), ops, ModelPrecision::uniform(DType::F32), B, S, mp, rc);
          PlanInput in;
          in.recompute = rc;
          in.cfg = config(kind, tie);
          in.tp = tp;
          in.dp = dp;
          in.seq = S;
          in.micro_batch = B;
          in.param_bytes = in.act_bytes = in.grad_bytes = in.stat_bytes = 4;
          Plan p = make_plan(in);
          int64_t local = 0;
          for (auto& prm : m.params()) local += prm.value.numel();
          EXPECT_EQ(p.params_per_rank, local);
          EXPECT_EQ(p.flat_elements, m.flat_grads().numel());
          EXPECT_EQ(p.shard_elements * dp, m.flat_grads().numel());
          EXPECT_EQ(p.params_total, in.cfg.num_parameters());
          EXPECT_EQ(int64_t(p.weight_bytes + p.grad_bytes + p.activation_bytes), ops.bytes);
        }
      }
    }
  }
}

TEST(Plan, TensorParallelCollectivesMatchOneMicroBatch) {
  for (auto kind : {AttentionKind::Differential, AttentionKind::Standard, AttentionKind::DifferentialV2}) {
    const int tp = 2;
    const int64_t B = 2, S = 12, N = B * S;
    CountingOps ops;
    RecordingComm tpc(1, tp, "tp"), tph(1, tp, "tp");
    ModelParallel mp;
    mp.tp = &tpc;
    mp.tp_host = &tph;
    ModelConfig cfg = config(kind, false);
    Model m(cfg, ops, ModelPrecision::uniform(DType::F32), B, S, mp);
    m.init_weights(1);
    std::vector<int32_t> tok(N), tgt(N);
    for (int64_t i = 0; i < N; ++i) {
      tok[i] = int32_t((i * 7) % cfg.vocab_size);
      tgt[i] = int32_t((i * 5 + 3) % cfg.vocab_size);
    }
    m.forward_backward(tok.data(), tgt.data(), B, S, 1.0f);

    PlanInput in;
    in.cfg = cfg;
    in.tp = tp;
    in.seq = S;
    in.micro_batch = B;
    in.param_bytes = in.act_bytes = in.grad_bytes = in.stat_bytes = 4;
    Plan p = make_plan(in);
    std::map<std::string, CommLine> by_what;
    int64_t planned_all_reduces = 0;
    double planned_all_reduce_bytes = 0;
    for (auto& l : p.lines) {
      if (l.what.find("all-reduce") != std::string::npos) {
        planned_all_reduces += l.calls;
        planned_all_reduce_bytes += l.calls * l.buffer_bytes;
      }
    }
    const auto& ar = tpc.calls["all_reduce"];
    double seen = 0;
    for (auto b : ar) seen += double(b);
    EXPECT_EQ(int64_t(ar.size()), planned_all_reduces) << attention_kind_name(kind);
    EXPECT_EQ(seen, planned_all_reduce_bytes) << attention_kind_name(kind);
    // activations: 2L + 1 each way, [N, d] f32
    int64_t act = 0;
    for (auto b : ar) act += b == N * cfg.d_model * 4;
    EXPECT_EQ(act, 2 * (2 * cfg.n_layers + 1));
    // cross-entropy statistics: gathered on the host, never the logits
    const auto& ag = tph.calls["all_gather"];
    double gathered = 0;
    for (auto b : ag) gathered += double(b);
    double planned_gather = 0;
    for (auto& l : p.lines)
      if (l.what.find("cross-entropy") != std::string::npos) planned_gather += l.calls * l.buffer_bytes;
    EXPECT_EQ(gathered, planned_gather);
    EXPECT_EQ(gathered, double(tp) * 2 * 8 * N);
    EXPECT_TRUE(tpc.calls["all_gather"].empty()) << "logits must not be gathered";
  }
}

TEST(Plan, RingVolumesOnAHandComputedExample) {
  // 2 ranks of DP, no TP: reduce-scatter sends half the f32 gradient buffer, all-gather
  // half the bf16 weight buffer; one 64 x 2 = 128-aligned flat buffer.
  PlanInput in;
  in.cfg = config(AttentionKind::Standard, true);
  in.dp = 2;
  in.seq = 16;
  Plan p = make_plan(in);
  ASSERT_EQ(p.lines.size(), 2u);
  EXPECT_EQ(p.flat_elements % 128, 0);
  EXPECT_DOUBLE_EQ(p.dp_bytes_per_rank, 0.5 * p.flat_elements * 4 + 0.5 * p.flat_elements * 2);
  EXPECT_EQ(p.tp_bytes_per_rank, 0.0);
  // f32 master + two moments on half of the flat buffer (bf16 weights)
  EXPECT_DOUBLE_EQ(p.optimizer_bytes, 12.0 * p.flat_elements / 2);
  in.tp = 3;  // 4 heads do not split over 3 ranks
  EXPECT_THROW(make_plan(in), Error);
}

TEST(Plan, CountsTheFusedAttentionWorkspace) {
  // Hopper's fused backward: f32 dQ [N, q_dim / tp] + D [N, 2 heads / tp], N = batch x seq rows
  PlanInput in;
  in.cfg = config(AttentionKind::Differential, true);
  in.seq = 16;
  in.micro_batch = 3;
  in.tp = 2;
  EXPECT_EQ(make_plan(in).attention_workspace_bytes, 0.0);
  in.attention_fused_dq = true;
  const Plan p = make_plan(in);
  const double q_local = 4.0 * 2 * 4 / 2, heads_local = 4.0 / 2;  // q_dim = h * 2 * dh
  EXPECT_DOUBLE_EQ(p.attention_workspace_bytes, 3.0 * 16 * (q_local + 2 * heads_local) * 4);
  EXPECT_NE(format_plan(p, 100, 100, 900, 0.4).find("attention backward workspace"),
            std::string::npos);
}

}  // namespace
}  // namespace difftron
