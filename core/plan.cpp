// make_plan: the parameter layout, memory and per-step traffic of one rank, mirroring the
// allocations of core/model.cpp (Model constructor, allocate_flat), core/zero.cpp and
// the collectives the model and ZeRO issue. format_plan: the table `difftron plan` prints.
#include "core/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "base/error.h"
#include "core/model.h"
#include "core/zero.h"

namespace difftron {

namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct LocalParam {
  int64_t numel;
  bool replicated;
  bool zero_rows;  // followed by padding rows and (TP) a zero row (embedding, LM head)
};

}  // namespace

Plan make_plan(const PlanInput& in) {
  Plan p;
  p.in = in;
  const ModelConfig& c = in.cfg;
  const int64_t T = in.tp, D = in.dp;
  if (T < 1 || D < 1) throw_error("plan: tp (", T, ") and dp (", D, ") must be at least 1");
  std::vector<std::string> bad;
  for (auto [name, v] : {std::pair<const char*, int64_t>{"n_heads", c.n_heads}, {"n_kv_heads", c.n_kv_heads},
                         {"ffn_dim", c.ffn_dim}})
    if (v % T != 0) bad.push_back(std::string(name) + " (" + std::to_string(v) + ")");
  if (!bad.empty()) {
    std::string m = "plan: not a multiple of tp (" + std::to_string(T) + "):";
    for (auto& b : bad) m += " " + b;
    throw Error(m);
  }
  const bool diff = c.attention == AttentionKind::Differential;
  const bool v2 = c.attention == AttentionKind::DifferentialV2;  // docs/MODEL.md section 5
  const int64_t d = c.d_model, dh = c.head_dim, L = c.n_layers;
  const int64_t h = c.n_heads / T, q = c.q_dim() / T, kv = c.kv_dim() / T, F = c.ffn_dim / T;
  const int64_t qp = c.q_proj_dim() / T;  // x Wq^T: q, or 2q for diff_v2 (4h query heads)
  if (c.vocab_size < T) throw_error("plan: vocab_size (", c.vocab_size, ") is smaller than tp (", T, ")");
  // the padded vocabulary's slice, of which TP rank 0 holds the most real rows
  const int64_t V = Model::padded_vocab(c.vocab_size, int(T)) / T, Vh = T > 1 ? V + 1 : V;
  const int64_t V_real = std::min(V, c.vocab_size);

  // ---- parameters, in the model's order
  std::vector<LocalParam> params;
  params.push_back({V_real * d, false, true});
  for (int64_t l = 0; l < L; ++l) {
    params.push_back({d, true, false});
    for (int64_t n : {qp * d, kv * d, kv * d}) params.push_back({n, false, false});
    if (v2) params.push_back({2 * h * d, false, false});  // lambda_proj
    params.push_back({d * q, false, false});
    if (diff) {
      for (int i = 0; i < 4; ++i) params.push_back({dh, true, false});
      params.push_back({2 * dh, true, false});
    }
    params.push_back({d, true, false});
    for (int i = 0; i < 3; ++i) params.push_back({F * d, false, false});
  }
  params.push_back({d, true, false});
  if (!c.tie_embeddings) params.push_back({V_real * d, false, true});
  int64_t off = 0;
  for (auto& lp : params) {
    p.params_per_rank += lp.numel;
    off += lp.numel + (lp.zero_rows ? (Vh - V_real) * d : 0);
    off = round_up(off, 64);
  }
  const int64_t multiple = 64 * D;  // ModelParallel::flat_multiple from model_parallel()
  p.flat_elements = std::max(multiple, round_up(off, multiple));
  p.shard_elements = p.flat_elements / D;
  p.params_total = c.num_parameters();

  // ---- memory per rank
  const bool separate_master = in.param_bytes != 4 && in.param_bytes != 8;
  p.weight_bytes = double(p.flat_elements) * in.param_bytes;
  p.grad_bytes = double(p.flat_elements) * in.grad_bytes;
  p.optimizer_bytes = double(p.shard_elements) * (8 + (separate_master ? 4 : 0));
  const int64_t N = in.micro_batch * in.seq;
  const int64_t chunk = Model::head_chunk_rows(N, Vh);
  // per layer: x_in ln1 x_mid ln2 | q (att sub) | k v | gate up act; stats rstd1 rstd2 lse (rstd_sub lambda);
  // diff_v2: q and att 2q wide, sub q, the lambda logits 2h; lse of 4h heads
  const double attn_act = v2 ? 5.0 * q + 2.0 * h : (diff ? 3.0 : 2.0) * q;
  const double layer_act = double(N) * (4 * d + attn_act + 2 * kv + 3 * F);
  const double layer_stat = double(N) * (2 + (v2 ? 4 : 2) * h) + (diff ? double(N) * h + 1 : 0);
  const double layer_saved = diff && in.attention_saved_o2 ? double(N) * q * 2 : 0;  // bf16 O2n
  // Recomputation (core/model.h) keeps less per layer and adds one shared set:
  //   selective: ln1/ln2 (one buffer), sub and act are shared;
  //   full: a layer keeps x_in (and lambda); one layer's whole set is shared (layer 0's x_in).
  double acts = 0, stats = 0, saved = 0;
  const double elementwise_per_layer = double(N) * (2 * d + (diff || v2 ? q : 0) + F);
  const double elementwise_shared = double(N) * (d + (diff || v2 ? q : 0) + F);
  switch (in.recompute) {
    case Recompute::None:
      acts = L * layer_act, stats = L * layer_stat, saved = L * layer_saved;
      break;
    case Recompute::Selective:
      acts = L * (layer_act - elementwise_per_layer) + elementwise_shared;
      stats = L * layer_stat, saved = L * layer_saved;
      break;
    case Recompute::Full:
      acts = layer_act + double(L - 1) * N * d;
      stats = layer_stat + (diff ? double(L - 1) : 0), saved = layer_saved;
      break;
  }
  // shared: x_final lnf dres dln | dsub datt dq (diff_v2: q 2q 2q, + the lambda logits' 2h) | dk dv |
  // dact dgate dup | logits (+ ones, dummy)
  const bool masked = Vh > V_real;  // ones and the column mask
  const double shared_attn = v2 ? 5.0 * q + 2.0 * h : 3.0 * q;
  const double shared_act = double(N) * (4 * d + shared_attn + 2 * kv + 3 * F) + double(chunk) * Vh +
                            (masked ? double(chunk) + Vh : 0);
  const double shared_stat = double(N) + 1 + 2.0 * chunk + (T > 1 ? double(chunk) : 0);
  p.activation_bytes = (acts + shared_act) * in.act_bytes + (stats + shared_stat) * in.stat_bytes + saved +
                       2.0 * N * 4;  // tokens, targets (i32)
  if (in.attention_fused_dq) p.attention_workspace_bytes = double(N) * (q + 2 * h) * 4;

  // ---- traffic per step
  const int64_t a = in.grad_accum;
  const double ar = 2.0 * double(T - 1) / double(T), ring_tp = double(T - 1) / double(T);
  const double ring_dp = double(D - 1) / double(D);
  auto add = [&](const char* group, const std::string& what, int64_t calls, double buffer, double factor) {
    p.lines.push_back({group, what, calls, buffer, double(calls) * buffer * factor});
  };
  if (T > 1) {
    const double act = double(N) * d * in.act_bytes;
    add("tp", "all-reduce of activations [N, d], forward: embedding, o_proj, down_proj", a * (2 * L + 1), act, ar);
    add("tp", "all-reduce of activation gradients [N, d], backward: q/k/v, gate/up, LM head", a * (2 * L + 1), act, ar);
    const int64_t chunks = (N + chunk - 1) / chunk;
    // per chunk: every rank's (lse, owner term) per row, f64, gathered on the host
    add("tp", "all-gather of cross-entropy statistics (host, f64)", a * chunks, double(T) * 2 * 8 * N / double(chunks),
        ring_tp);
    if (diff)  // lambda_q1, k1, q2, k2 (each 64-aligned) and subln: one span per layer
      add("tp", "all-reduce of TP-partial gradients (lambda, subln), last micro-batch", L,
          double(4 * round_up(dh, 64) + 2 * dh) * in.grad_bytes, ar);
  }
  if (D > 1) {
    const int64_t g = 64 * D, B = std::max(g, ZeroOptions{}.bucket_numel / g * g);
    const int64_t buckets = (p.flat_elements + B - 1) / B;
    add("dp", "reduce-scatter of gradient buckets (ZeRO-1), during the last backward", buckets,
        double(p.flat_elements) * in.grad_bytes / double(buckets), ring_dp);
    add("dp", "all-gather of updated weights (ZeRO-1)", buckets, double(p.flat_elements) * in.param_bytes / double(buckets),
        ring_dp);
  }
  for (auto& l : p.lines) (l.group == "tp" ? p.tp_bytes_per_rank : p.dp_bytes_per_rank) += l.bytes_per_rank;
  p.tokens_per_step = N * a * D;
  p.flops_per_rank = c.flops_per_token(in.seq) * double(N * a) / double(T);
  return p;
}

PlanInput plan_input_for_run(const ModelConfig& cfg, bool cuda, int tp, int dp, int64_t seq, int64_t micro_batch,
                             int64_t grad_accum, bool keep_attention_state, Recompute recompute) {
  PlanInput in;
  in.cfg = cfg;
  in.tp = tp;
  in.dp = dp;
  in.seq = seq;
  in.micro_batch = micro_batch;
  in.grad_accum = grad_accum;
  in.recompute = recompute;
  if (!cuda) in.param_bytes = in.act_bytes = in.grad_bytes = in.stat_bytes = 4;
  // The fused kernels (head_dim 64 or 128) keep O2n per layer when asked, and their backward
  // sums dQ in an f32 workspace.
  // (diff_v2's attention has GQA, which they do not run: it takes the cuBLAS path.)
  const bool fused = cuda && (cfg.head_dim == 64 || cfg.head_dim == 128) &&
                     cfg.attention != AttentionKind::DifferentialV2;
  in.attention_saved_o2 = fused && keep_attention_state;
  in.attention_fused_dq = fused;
  return in;
}

namespace {
std::string bytes_str(double b) {
  const char* unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", b, unit[u]);
  return buf;
}
std::string ms_str(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  return buf;
}
}  // namespace

std::string format_plan(const Plan& p, double tp_gbps, double dp_gbps, double peak_tflops, double mfu) {
  std::ostringstream os;
  const PlanInput& in = p.in;
  os << in.cfg.summary() << "\n";
  os << "grid: tp " << in.tp << " x dp " << in.dp << " = " << in.tp * in.dp << " ranks; per rank "
     << in.micro_batch << " sequences x " << in.seq << " tokens x " << in.grad_accum << " micro-batches; "
     << p.tokens_per_step << " tokens per step (global)\n";
  os << "element bytes: weights " << in.param_bytes << ", activations " << in.act_bytes << ", gradients "
     << in.grad_bytes << ", statistics " << in.stat_bytes << "\n\n";
  os << "parameters: " << p.params_total << " in the model, " << p.params_per_rank << " per TP rank ("
     << p.flat_elements << " in its flat buffers, " << p.shard_elements << " in its ZeRO shard)\n\n";
  os << "memory per rank\n";
  char line[256];
  auto row = [&](const char* what, double b) {
    std::snprintf(line, sizeof line, "  %-62s %12s\n", what, bytes_str(b).c_str());
    os << line;
  };
  row("weights (flat buffer)", p.weight_bytes);
  row("gradients (flat buffer)", p.grad_bytes);
  row("optimizer: f32 master + moments of the shard", p.optimizer_bytes);
  row((std::string("activations kept for backward + scratch (recompute ") + recompute_name(in.recompute) + ")").c_str(),
      p.activation_bytes);
  if (p.attention_workspace_bytes > 0) row("attention backward workspace (f32 dQ, D)", p.attention_workspace_bytes);
  row("peak device memory (backend's small workspaces excluded)", p.peak_bytes());
  os << "\ncommunication per rank per optimizer step (ring algorithms)\n";
  std::snprintf(line, sizeof line, "  %-4s %-80s %7s %12s %12s %10s\n", "grp", "collective", "calls", "each",
                "sent/rank", "time");
  os << line;
  for (auto& l : p.lines) {
    const double bw = (l.group == "tp" ? tp_gbps : dp_gbps) * 1e9;
    std::snprintf(line, sizeof line, "  %-4s %-80s %7lld %12s %12s %10s\n", l.group.c_str(), l.what.c_str(),
                  (long long)l.calls, bytes_str(l.buffer_bytes).c_str(), bytes_str(l.bytes_per_rank).c_str(),
                  ms_str(l.bytes_per_rank / bw).c_str());
    os << line;
  }
  if (p.lines.empty()) os << "  (one rank: no communication)\n";
  const double t_tp = p.tp_bytes_per_rank / (tp_gbps * 1e9), t_dp = p.dp_bytes_per_rank / (dp_gbps * 1e9);
  const double t_compute = p.flops_per_rank / (peak_tflops * 1e12 * mfu);
  os << "\n  TP total " << bytes_str(p.tp_bytes_per_rank) << " at " << tp_gbps << " GB/s: " << ms_str(t_tp)
     << " (on the critical path: not overlapped)\n";
  os << "  DP total " << bytes_str(p.dp_bytes_per_rank) << " at " << dp_gbps << " GB/s: " << ms_str(t_dp)
     << " (the reduce-scatters overlap the last backward)\n";
  os << "  compute " << p.flops_per_rank / 1e12 << " TFLOP per rank (docs/MODEL.md section 4 count) at " << peak_tflops
     << " TFLOP/s x MFU " << mfu << ": " << ms_str(t_compute) << "\n";
  return os.str();
}

}  // namespace difftron
