// Forward and hand-written backward of the Differential (V1, V2) / baseline Transformer.
// Shapes: N = B*S rows; d = d_model; per TP rank: h_ diff heads, hkv_ K/V groups,
// q_dim_ = 2*h_*dh, kv_dim_ = 2*hkv_*dh, F_ SwiGLU width, V_ vocabulary rows (all equal to
// the config's values at TP 1). diff_v2 (docs/MODEL.md section 5): 4h_ query heads of dh
// (qp_dim_ = 2 q_dim_ wide) in pairs over 2hkv_ K/V heads, 2h_ output heads of dh. Under TP the residual stream [N, d] is the same on every
// rank: row-parallel outputs (o_proj, down_proj, the embedding) and the gradients flowing
// out of column-parallel inputs (q/k/v, gate/up, the LM head) are summed over TP.
#include "core/model.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "parallel/comm.h"
#include "parallel/grid.h"

namespace difftron {

Recompute parse_recompute(const std::string& name) {
  if (name == "none") return Recompute::None;
  if (name == "selective") return Recompute::Selective;
  if (name == "full") return Recompute::Full;
  throw_error("recompute: unknown mode '", name, "' (expected none, selective or full)");
}

const char* recompute_name(Recompute r) {
  switch (r) {
    case Recompute::None: return "none";
    case Recompute::Selective: return "selective";
    case Recompute::Full: return "full";
  }
  return "?";
}

const char* linear_input_name(LinearInput site) {
  switch (site) {
    case LinearInput::AttnNorm: return "ln1";
    case LinearInput::AttnOutput: return "attn_out";
    case LinearInput::MlpNorm: return "ln2";
    case LinearInput::MlpAct: return "swiglu";
  }
  return "?";
}

Model::Model(const ModelConfig& config, Ops& ops, ModelPrecision precision, int64_t max_batch,
             int64_t max_seq, ModelParallel parallel, Recompute recompute)
    : cfg_(config), ops_(ops), prec_(precision), max_b_(max_batch), max_s_(max_seq), par_(parallel),
      recompute_(recompute) {
  cfg_.resolve_and_validate();
  if (max_batch <= 0) throw_error("batch size (", max_batch, ") must be positive");
  if (max_seq <= 0 || max_seq > cfg_.max_seq_len)
    throw_error("sequence length (", max_seq, ") must be in [1, max_seq_len=", cfg_.max_seq_len, "]");
  if (par_.tp) {
    tp_size_ = par_.tp->size();
    tp_rank_ = par_.tp->rank();
    if (par_.tp->device() != ops_.device())
      throw_error("the TP communicator works on ", device_name(par_.tp->device()),
                  " memory but the model lives in ", device_name(ops_.device()), " memory");
    if (tp_size_ > 1 && (!par_.tp_host || par_.tp_host->size() != tp_size_ || par_.tp_host->device() != Device::CPU))
      throw_error("tensor parallelism needs a host-memory communicator of the TP group (ModelParallel::tp_host)");
  }
  const int T = tp_size_;
  {
    std::vector<std::string> bad;
    auto need = [&](const char* what, int64_t v) {
      if (v % T != 0)
        bad.push_back(std::string(what) + " (" + std::to_string(v) + ") must be a multiple of the tensor-parallel size (" +
                      std::to_string(T) + ")");
    };
    need("n_heads", cfg_.n_heads);
    need("n_kv_heads", cfg_.n_kv_heads);
    need("ffn_dim", cfg_.ffn_dim);
    if (cfg_.vocab_size < T)
      bad.push_back("vocab_size (" + std::to_string(cfg_.vocab_size) + ") must be at least the tensor-parallel size (" +
                    std::to_string(T) + ")");
    if (!bad.empty()) {
      std::string msg = "model config does not split over tensor parallelism:";
      for (auto& b : bad) msg += "\n  " + b;
      throw Error(msg);
    }
  }
  h_ = cfg_.n_heads / T;
  hkv_ = cfg_.n_kv_heads / T;
  F_ = cfg_.ffn_dim / T;
  V_ = padded_vocab(cfg_.vocab_size, T) / T;
  vocab_begin_ = tp_rank_ * V_;
  vocab_rows_ = std::min(V_, cfg_.vocab_size - vocab_begin_);  // >= 1 (padded_vocab)
  Vh_ = T > 1 ? V_ + 1 : V_;
  q_dim_ = cfg_.q_dim() / T;
  qp_dim_ = cfg_.q_proj_dim() / T;
  kv_dim_ = cfg_.kv_dim() / T;
  const int64_t d = cfg_.d_model, F = cfg_.ffn_dim, V = cfg_.vocab_size, dh = cfg_.head_dim;
  const int64_t qd = cfg_.q_dim(), kvd = cfg_.kv_dim();
  const bool diff = cfg_.attention == AttentionKind::Differential;
  const bool v2 = cfg_.attention == AttentionKind::DifferentialV2;

  // Column-parallel weights split their rows (dim 0), row-parallel ones their columns.
  params_.reserve(3 + 14 * cfg_.n_layers);
  embed_ = add_param("model.embed_tokens.weight", {V, d}, true, true, 0, false, vocab_rows_);
  layers_.resize(cfg_.n_layers);
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    Layer& L = layers_[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    L.attn_norm = add_param(p + "input_layernorm.weight", {d}, false);
    L.wq = add_param(p + "self_attn.q_proj.weight", {cfg_.q_proj_dim(), d}, true, false, 0);
    L.wk = add_param(p + "self_attn.k_proj.weight", {kvd, d}, true, false, 0);
    L.wv = add_param(p + "self_attn.v_proj.weight", {kvd, d}, true, false, 0);
    // diff_v2: one lambda logit per token and output head; a rank holds its pairs' rows
    L.wlambda = v2 ? add_param(p + "self_attn.lambda_proj.weight", {2 * cfg_.n_heads, d}, true, false, 0) : -1;
    L.wo = add_param(p + "self_attn.o_proj.weight", {d, qd}, true, false, 1);
    L.lq1 = L.lk1 = L.lq2 = L.lk2 = L.subln = -1;
    if (diff) {  // whole on every rank; each rank's gradient covers only its heads
      L.lq1 = add_param(p + "self_attn.lambda_q1", {dh}, false, false, -1, true);
      L.lk1 = add_param(p + "self_attn.lambda_k1", {dh}, false, false, -1, true);
      L.lq2 = add_param(p + "self_attn.lambda_q2", {dh}, false, false, -1, true);
      L.lk2 = add_param(p + "self_attn.lambda_k2", {dh}, false, false, -1, true);
      L.subln = add_param(p + "self_attn.subln.weight", {2 * dh}, false, false, -1, true);
    }
    L.mlp_norm = add_param(p + "post_attention_layernorm.weight", {d}, false);
    L.w_gate = add_param(p + "mlp.gate_proj.weight", {F, d}, true, false, 0);
    L.w_up = add_param(p + "mlp.up_proj.weight", {F, d}, true, false, 0);
    L.w_down = add_param(p + "mlp.down_proj.weight", {d, F}, true, false, 1);
  }
  final_norm_ = add_param("model.norm.weight", {d}, false);
  if (!cfg_.tie_embeddings) lm_head_ = add_param("lm_head.weight", {V, d}, true, true, 0, false, vocab_rows_);
  allocate_flat(par_.flat_multiple);

  // Activations for the largest batch: each layer its own, or views of one shared set
  // where the backward recomputes them.
  const int64_t B = max_b_, S = max_s_, N = B * S;
  auto act = [&](Shape s) { return ops_.empty(s, prec_.act); };
  auto stat = [&](Shape s) { return ops_.empty(s, prec_.stat); };
  if (recompute_ == Recompute::Full) {
    const LayerActivations shared = allocate_activations(nullptr);
    for (auto& L : layers_) {  // each layer keeps its input (and its lambda, one number)
      static_cast<LayerActivations&>(L) = shared;
      if (&L == &layers_[0]) continue;
      L.x_in = act({N, d});
      if (L.lambda.defined()) L.lambda = stat({1});
    }
  } else if (recompute_ == Recompute::Selective) {
    LayerActivations shared;  // ln1 is dead before ln2 is written, and back in the backward
    shared.ln1 = shared.ln2 = act({N, d});
    if (diff || v2) shared.sub = act({N, q_dim_});
    shared.act = act({N, F_});
    for (auto& L : layers_) static_cast<LayerActivations&>(L) = allocate_activations(&shared);
  } else {
    for (auto& L : layers_) static_cast<LayerActivations&>(L) = allocate_activations(nullptr);
  }
  tokens_ = ops_.empty({N}, DType::I32);
  targets_ = ops_.empty({N}, DType::I32);
  x_final_ = act({N, d});
  lnf_ = act({N, d});
  rstdf_ = stat({N});
  dres_ = act({N, d});
  dln_ = act({N, d});
  dsub_ = act({N, q_dim_});
  datt_ = act(layers_.empty() ? Shape{1} : layers_[0].att.shape());
  dq_ = act(layers_.empty() ? Shape{1} : layers_[0].q.shape());
  dk_ = act(layers_.empty() ? Shape{1} : layers_[0].k.shape());
  dv_ = act(layers_.empty() ? Shape{1} : layers_[0].v.shape());
  dlambda_ = stat({1});
  if (v2) dlam_logits_ = act({N, 2 * h_});
  dact_ = act({N, F_});
  dgate_ = act({N, F_});
  dup_ = act({N, F_});
  // The LM head works on row chunks so that [N, V] logits are never held at once.
  head_chunk_ = head_chunk_rows(N, Vh_);
  logits_ = act({head_chunk_, Vh_});
  losses_ = stat({head_chunk_});
  lse_head_ = stat({head_chunk_});
  if (T > 1) lse_global_ = stat({head_chunk_});
  if (Vh_ > vocab_rows_) {  // padding or the dummy column: pushed to -1e30 by ones_ x col_mask_
    ones_ = act({head_chunk_, 1});
    col_mask_ = act({1, Vh_});
    std::vector<float> one(head_chunk_, 1.0f), col(Vh_, 0.0f);
    for (int64_t j = vocab_rows_; j < Vh_; ++j) col[j] = -1e30f;
    ops_.upload(ones_, one.data());
    ops_.upload(col_mask_, col.data());
  }
  keep_attention_state(true);  // the default: the backend's saved attention state (if any)
}

Model::LayerActivations Model::allocate_activations(const LayerActivations* elementwise) {
  const int64_t B = max_b_, S = max_s_, N = B * S, d = cfg_.d_model, dh = cfg_.head_dim;
  auto act = [&](Shape s) { return ops_.empty(s, prec_.act); };
  auto stat = [&](Shape s) { return ops_.empty(s, prec_.stat); };
  LayerActivations L;
  L.x_in = act({N, d});
  L.ln1 = elementwise ? elementwise->ln1 : act({N, d});
  L.rstd1 = stat({N});
  if (cfg_.attention == AttentionKind::Differential) {
    L.q = act({B, S, h_, 2, dh});
    L.k = act({B, S, hkv_, 2, dh});
    L.v = act({B, S, hkv_, 2 * dh});
    L.att = act({B, S, h_, 2 * dh});
    L.lse = stat({B, h_, 2, S});
    L.lambda = stat({1});
    L.sub = elementwise ? elementwise->sub : act({N, q_dim_});
    L.rstd_sub = stat({N * h_});
  } else if (cfg_.attention == AttentionKind::DifferentialV2) {
    L.q = act({B, S, 4 * h_, dh});
    L.k = act({B, S, 2 * hkv_, dh});
    L.v = act({B, S, 2 * hkv_, dh});
    L.att = act({B, S, 4 * h_, dh});
    L.lse = stat({B, 4 * h_, S});
    L.lam_logits = act({N, 2 * h_});
    L.sub = elementwise ? elementwise->sub : act({N, q_dim_});
  } else {
    L.q = act({B, S, 2 * h_, dh});
    L.k = act({B, S, 2 * hkv_, dh});
    L.v = act({B, S, 2 * hkv_, dh});
    L.att = act({B, S, 2 * h_, dh});
    L.lse = stat({B, 2 * h_, S});
  }
  L.x_mid = act({N, d});
  L.ln2 = elementwise ? elementwise->ln2 : act({N, d});
  L.rstd2 = stat({N});
  L.gate = act({N, F_});
  L.up = act({N, F_});
  L.act = elementwise ? elementwise->act : act({N, F_});
  return L;
}

void Model::keep_attention_state(bool on) {
  if (recompute_ == Recompute::Full) {  // one layer's state at a time, shared
    if (layers_.empty()) return;
    const int64_t n = on && cfg_.attention == AttentionKind::Differential
                          ? ops_.diff_attention_saved_numel(layers_[0].q)
                          : 0;
    if (n > 0 && layers_[0].attn_saved.defined() && layers_[0].attn_saved.numel() == n) return;
    const Tensor saved = n > 0 ? ops_.empty({n}, DType::BF16) : Tensor();
    for (auto& L : layers_) L.attn_saved = saved;
    return;
  }
  for (auto& L : layers_) {
    const int64_t n = on && L.q.defined() && cfg_.attention == AttentionKind::Differential
                          ? ops_.diff_attention_saved_numel(L.q)
                          : 0;
    if (n > 0 && L.attn_saved.defined() && L.attn_saved.numel() == n) continue;  // kept already
    L.attn_saved = n > 0 ? ops_.empty({n}, DType::BF16) : Tensor();
  }
}

Tensor Model::attn_saved(const Layer& L, const Tensor& q) {
  const int64_t n = ops_.diff_attention_saved_numel(q);
  return n > 0 && L.attn_saved.defined() ? L.attn_saved.view({n}) : Tensor();
}

int64_t Model::head_chunk_rows(int64_t rows, int64_t vocab_cols) {
  // 2^26 logits a chunk (128 MiB in bf16): large enough that the LM-head GEMM runs near peak.
  return std::max<int64_t>(1, std::min<int64_t>(rows, (int64_t(1) << 26) / vocab_cols));
}

int Model::add_param(const std::string& name, Shape full, bool is_matrix, bool is_embedding,
                     int shard_dim, bool tp_partial_grad, int64_t vocab_rows) {
  Param p;
  p.name = name;
  p.full_shape = full;
  p.shard_dim = shard_dim;
  p.is_matrix = is_matrix;
  p.is_embedding = is_embedding;
  p.tp_partial_grad = tp_partial_grad && tp_size_ > 1;
  Shape local = full;
  if (vocab_rows >= 0) {  // a vocabulary slice of the padded vocabulary: its real rows
    local[0] = vocab_rows;
    p.shard_begin = vocab_begin_;
  } else if (shard_dim >= 0) {
    local[shard_dim] = full[shard_dim] / tp_size_;
    p.shard_begin = tp_rank_ * local[shard_dim];
  }
  p.value = Tensor(local, prec_.param, ops_.device(), nullptr, [](void*) {});  // storage: allocate_flat
  params_.push_back(std::move(p));
  return int(params_.size()) - 1;
}

void Model::allocate_flat(int64_t multiple) {
  constexpr int64_t kAlign = 64;  // elements: keeps every parameter 128-byte aligned in bf16
  if (multiple <= 0) throw_error("ModelParallel::flat_multiple (", multiple, ") must be positive");
  int64_t off = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].flat_offset = off;
    off += params_[i].value.numel();
    // The embedding and LM head slices are followed by their padding rows, then (TP) a zero
    // row: tokens of other ranks' slices are looked up there, and the head's dummy logit
    // column comes from it. All stay zero.
    if (int(i) == embed_ || int(i) == lm_head_) off += (Vh_ - vocab_rows_) * cfg_.d_model;
    off = (off + kAlign - 1) / kAlign * kAlign;
  }
  const int64_t m = std::lcm(kAlign, multiple);
  const int64_t total = std::max<int64_t>(m, (off + m - 1) / m * m);
  flat_values_ = ops_.empty({total}, prec_.param);
  flat_grads_ = ops_.empty({total}, prec_.grad);
  ops_.fill_zero(flat_values_);
  ops_.fill_zero(flat_grads_);
  for (auto& p : params_) {
    const Shape shape = p.value.shape();
    p.value = flat_values_.flat_slice(p.flat_offset, shape_numel(shape)).view(shape);
    p.grad = flat_grads_.flat_slice(p.flat_offset, shape_numel(shape)).view(shape);
  }
}

Tensor Model::vocab_rows(int idx, bool grad) {
  const Tensor& flat = grad ? flat_grads_ : flat_values_;
  return flat.flat_slice(params_[idx].flat_offset, Vh_ * cfg_.d_model).view({Vh_, cfg_.d_model});
}

int64_t Model::padded_vocab(int64_t vocab, int tp) {
  // Each rank's slice a multiple of 64 rows (GEMM tiles, 128-byte rows of logits), unless
  // that would leave the last rank without a real row (tiny vocabularies): then 32, 16, 8, 1.
  for (int64_t m : {64, 32, 16, 8, 1}) {
    const int64_t vp = (vocab + m * tp - 1) / (m * tp) * (m * tp);
    if (vp / tp * (tp - 1) < vocab) return vp;
  }
  return vocab;  // vocab < tp: refused by the constructor
}

void Model::tp_all_reduce(Tensor& t) {
  if (tp_size_ > 1) par_.tp->all_reduce(t);
}

void Model::grads_ready(int first) {
  if (!grad_sync_ || first >= ready_from_) return;
  // TP-partial gradients: consecutive runs of them summed with one all-reduce each.
  for (int i = first; i < ready_from_;) {
    if (!params_[i].tp_partial_grad) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < ready_from_ && params_[j + 1].tp_partial_grad) ++j;
    const int64_t begin = params_[i].flat_offset, end = params_[j].flat_offset + params_[j].grad.numel();
    Tensor run = flat_grads_.flat_slice(begin, end - begin);
    par_.tp->all_reduce(run);
    i = j + 1;
  }
  ready_from_ = first;
  if (grads_ready_) grads_ready_(params_[first].flat_offset);
}

Param& Model::param(const std::string& name) {
  for (auto& p : params_)
    if (p.name == name) return p;
  throw_error("model has no parameter named '", name, "'");
}

Tensor Model::head_weight() { return vocab_rows(lm_head_ >= 0 ? lm_head_ : embed_, false); }

Tensor Model::head_grad() { return vocab_rows(lm_head_ >= 0 ? lm_head_ : embed_, true); }

ModelParallel model_parallel(ParallelContext& ctx) {
  ModelParallel mp;
  mp.tp = &ctx.tp();
  mp.tp_host = &ctx.tp_host();
  mp.flat_multiple = 64 * int64_t(ctx.dp_size());
  return mp;
}

void Model::init_weights(uint64_t seed) {
  // Normal tensors are generated where they live, by the backend's counter-based generator
  // (Ops::init_normal): tensor t = its index in params() (the same on every TP rank), each
  // element keyed by its index in the full tensor, so a TP rank generates exactly its slice
  // of the one-process tensor and no per-element work runs on the host.
  const double out_std = cfg_.init_std / std::sqrt(2.0 * double(cfg_.n_layers));
  for (size_t t = 0; t < params_.size(); ++t) {
    Param& p = params_[t];
    const std::string& n = p.name;
    auto ends_with = [&](const char* suf) {
      std::string s(suf);
      return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0;
    };
    if (ends_with("layernorm.weight") || ends_with("norm.weight") || ends_with("subln.weight")) {
      std::vector<float> ones(p.value.numel(), 1.0f);  // [d] or [2 dh]: small
      ops_.upload(p.value, ones.data());
      continue;
    }
    double std = cfg_.init_std;
    if (n.find(".lambda_") != std::string::npos && !ends_with("lambda_proj.weight"))  // V1's vectors
      std = cfg_.lambda_std;
    else if (ends_with("o_proj.weight") || ends_with("down_proj.weight"))
      std = out_std;
    DT_CHECK(p.full_shape.size() <= 2, "init_weights: parameter ", n, " is not 1-D or 2-D");
    // this rank's block of the full [rows, cols] matrix (a 1-D tensor is [n, 1]): rows
    // [b, b + len) (shard_dim 0) or columns [b, b + len) (shard_dim 1)
    const int64_t full_cols = p.full_shape.size() > 1 ? p.full_shape[1] : 1;
    const int64_t row0 = p.shard_dim == 0 ? p.shard_begin : 0;
    const int64_t col0 = p.shard_dim == 1 ? p.shard_begin : 0;
    ops_.init_normal(p.value, seed, uint64_t(t), std, full_cols, row0, col0);
  }
}

void Model::zero_grads() { ops_.fill_zero(flat_grads_); }

double Model::lambda_value(int64_t l) {
  const Layer& L = layers_.at(l);
  DT_CHECK(cfg_.attention == AttentionKind::Differential, "lambda of a baseline model");
  Tensor lam = ops_.empty({1}, prec_.stat);
  ops_.diff_lambda_forward(P(L.lq1), P(L.lk1), P(L.lq2), P(L.lk2), ModelConfig::lambda_init(l), lam);
  double v;
  ops_.download(lam, &v);
  return v;
}

void Model::check_batch(const int32_t* tokens, int64_t B, int64_t S) const {
  if (B <= 0 || B > max_b_) throw_error("batch size ", B, " is outside [1, ", max_b_, "] for this model instance");
  if (S <= 0 || S > max_s_) throw_error("sequence length ", S, " is outside [1, ", max_s_, "] for this model instance");
  for (int64_t i = 0; i < B * S; ++i)
    if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size)
      throw_error("token id ", tokens[i], " at index ", i, " is outside the model's vocabulary [0, ",
                  cfg_.vocab_size, ")");
}

void Model::layer_forward(int64_t l, int64_t B, int64_t S, bool recompute) {
  Layer& L = layers_[l];
  const int64_t N = B * S, d = cfg_.d_model, F = F_, dh = cfg_.head_dim;
  const int64_t h = h_, hkv = hkv_;
  const bool diff = cfg_.attention == AttentionKind::Differential;
  const bool v2 = cfg_.attention == AttentionKind::DifferentialV2;
  Tensor x_in = L.x_in.view({N, d}), ln1 = L.ln1.view({N, d}), x_mid = L.x_mid.view({N, d});
  Tensor rstd1 = L.rstd1.view({N});
  ForwardProbe* probe = recompute ? nullptr : probe_;  // the backward's second pass is not observed
  ops_.rmsnorm_forward(x_in, P(L.attn_norm), cfg_.norm_eps, 1.0f, ln1, rstd1);
  if (probe) probe->linear_input(l, LinearInput::AttnNorm, ln1);

  const int64_t qh = qp_dim_ / dh;  // query heads of dh: 2h (V1, baseline) or 4h (V2)
  Tensor q = diff ? L.q.view({B, S, h, 2, dh}) : L.q.view({B, S, qh, dh});
  Tensor k = diff ? L.k.view({B, S, hkv, 2, dh}) : L.k.view({B, S, 2 * hkv, dh});
  Tensor v = diff ? L.v.view({B, S, hkv, 2 * dh}) : L.v.view({B, S, 2 * hkv, dh});
  Tensor q2 = q.view({N, qp_dim_}), k2 = k.view({N, kv_dim_}), v2d = v.view({N, kv_dim_});
  ops_.matmul(ln1, false, P(L.wq), true, q2);   // [N, qp_dim_]
  ops_.matmul(ln1, false, P(L.wk), true, k2);   // [N, kv_dim_]
  ops_.matmul(ln1, false, P(L.wv), true, v2d);  // [N, kv_dim_]
  Tensor q_heads = q.view({B, S, qh, dh}), k_heads = k.view({B, S, 2 * hkv, dh});
  ops_.rope(q_heads, cfg_.rope_theta, false);
  ops_.rope(k_heads, cfg_.rope_theta, false);

  Tensor sub_in;  // what o_proj multiplies: [N, q_dim_]
  if (diff) {
    const double li = ModelConfig::lambda_init(l);
    ops_.diff_lambda_forward(P(L.lq1), P(L.lk1), P(L.lq2), P(L.lk2), li, L.lambda);
    Tensor att = L.att.view({B, S, h, 2 * dh}), lse = L.lse.view({B, h, 2, S});
    Tensor saved = attn_saved(L, q);
    if (!(probe && probe->attention(l, q, k, v, L.lambda, att)))
      ops_.diff_attention_forward(q, k, v, L.lambda, att, lse, saved);
    Tensor att_rows = att.view({N * h, 2 * dh}), sub_rows = L.sub.view({N * h, 2 * dh});
    Tensor rstd_sub = L.rstd_sub.view({N * h});
    ops_.rmsnorm_forward(att_rows, P(L.subln), cfg_.norm_eps, float(1.0 - li), sub_rows, rstd_sub);
    sub_in = L.sub.view({N, q_dim_});
  } else if (v2) {
    // standard attention of the 4h query heads (GQA over the 2hkv K/V heads), then pair i's
    // two outputs subtracted with lambda = sigmoid(z), z = ln1 W_lambda^T per token and pair
    Tensor att = L.att.view({B, S, qh, dh}), lse = L.lse.view({B, qh, S});
    if (!(probe && probe->attention(l, q, k, v, Tensor(), att))) ops_.attention_forward(q, k, v, att, lse);
    Tensor z = L.lam_logits.view({N, 2 * h});
    ops_.matmul(ln1, false, P(L.wlambda), true, z);  // [N, 2h]
    Tensor combined = L.sub.view({B, S, 2 * h, dh});
    ops_.diff_v2_combine_forward(att, z, combined);
    sub_in = L.sub.view({N, q_dim_});
  } else {
    Tensor att = L.att.view({B, S, 2 * h, dh}), lse = L.lse.view({B, 2 * h, S});
    if (!(probe && probe->attention(l, q, k, v, Tensor(), att))) ops_.attention_forward(q, k, v, att, lse);
    sub_in = L.att.view({N, q_dim_});
  }
  // x_mid = x_in + O Wo^T; under TP rank 0 adds x_in to its partial product, then the
  // partial products are summed.
  if (probe) probe->linear_input(l, LinearInput::AttnOutput, sub_in);
  if (tp_rank_ == 0)
    ops_.matmul_add(sub_in, false, P(L.wo), true, x_in, x_mid);
  else
    ops_.matmul(sub_in, false, P(L.wo), true, x_mid);
  tp_all_reduce(x_mid);

  Tensor ln2 = L.ln2.view({N, d}), rstd2 = L.rstd2.view({N});
  ops_.rmsnorm_forward(x_mid, P(L.mlp_norm), cfg_.norm_eps, 1.0f, ln2, rstd2);
  if (probe) probe->linear_input(l, LinearInput::MlpNorm, ln2);
  Tensor gate = L.gate.view({N, F}), up = L.up.view({N, F}), a = L.act.view({N, F});
  ops_.matmul(ln2, false, P(L.w_gate), true, gate);
  ops_.matmul(ln2, false, P(L.w_up), true, up);
  ops_.swiglu_forward(gate, up, a);
  if (probe) probe->linear_input(l, LinearInput::MlpAct, a);
  if (recompute) return;  // the output is the next layer's input, kept
  Tensor x_out = (l + 1 < cfg_.n_layers ? layers_[l + 1].x_in : x_final_).view({N, d});
  if (tp_rank_ == 0)  // x_out = x_mid + act Wd^T
    ops_.matmul_add(a, false, P(L.w_down), true, x_mid, x_out);
  else
    ops_.matmul(a, false, P(L.w_down), true, x_out);
  tp_all_reduce(x_out);
}

void Model::forward_body(int64_t B, int64_t S) {
  const int64_t N = B * S, d = cfg_.d_model;
  Tensor x0 = (layers_.empty() ? x_final_ : layers_[0].x_in).view({N, d});
  Tensor tok = tokens_.view({N});
  if (tp_size_ == 1) {
    ops_.embedding_forward(tok, P(embed_), x0);
  } else {  // vocabulary-parallel: each token's row comes from one rank, zeros from the others
    ops_.embedding_forward(tok, vocab_rows(embed_, false), x0);
    tp_all_reduce(x0);
  }
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    layer_forward(l, B, S);
    if (probe_) probe_->layer_output(l, (l + 1 < cfg_.n_layers ? layers_[l + 1].x_in : x_final_).view({N, d}));
  }
  Tensor xf = x_final_.view({N, d}), lnf = lnf_.view({N, d}), rstdf = rstdf_.view({N});
  ops_.rmsnorm_forward(xf, P(final_norm_), cfg_.norm_eps, 1.0f, lnf, rstdf);
}

double Model::head_loss(int64_t N, int64_t n_valid, bool backward, float grad_scale) {
  const int64_t d = cfg_.d_model;
  const Tensor W = head_weight();  // [Vh_, d]
  Tensor dW = head_grad();
  double total = 0;
  std::vector<double> host(head_chunk_);
  const float dloss = n_valid > 0 ? grad_scale / float(n_valid) : 0.0f;
  for (int64_t r0 = 0; r0 < N; r0 += head_chunk_) {
    const int64_t rows = std::min(head_chunk_, N - r0);
    Tensor h = lnf_.view({N, d}).slice_rows(r0, r0 + rows);
    Tensor logits = logits_.view({rows, Vh_}), losses = losses_.view({rows}), lse = lse_head_.view({rows});
    Tensor tg = targets_.view({N}).flat_slice(r0, rows);
    ops_.matmul(h, false, W, true, logits);  // [rows, Vh_]
    if (col_mask_.defined())  // padding and dummy columns: 0 + 1 x (-1e30); the real ones gain exact zeros
      ops_.matmul(ones_.view({rows, 1}), false, col_mask_, false, logits, 1.0f, 1.0f);
    ops_.cross_entropy_forward(logits, tg, losses, lse);
    if (tp_size_ == 1) {
      ops_.download(losses, host.data());
      for (int64_t i = 0; i < rows; ++i) total += host[i];
    } else {
      total += parallel_ce_chunk(r0, rows);
    }
    if (backward) {
      const Tensor& lse_all = tp_size_ == 1 ? lse : lse_global_.view({rows});
      ops_.cross_entropy_backward(logits, tg, lse_all, dloss, logits);  // logits := dlogits
      Tensor dh = dln_.view({N, d}).slice_rows(r0, r0 + rows);
      ops_.matmul(logits, false, W, false, dh);                         // dh = dlogits W
      ops_.matmul(logits, true, h, false, dW, 1.0f, 1.0f);              // dW += dlogits^T h
    }
  }
  if (backward && Vh_ > vocab_rows_) {  // the padding and dummy columns' gradients: discarded
    Tensor masked_rows = dW.slice_rows(vocab_rows_, Vh_);
    ops_.fill_zero(masked_rows);
  }
  if (backward && tp_size_ > 1) {
    Tensor dln = dln_.view({N, d});
    tp_all_reduce(dln);  // each rank's dh covers its vocabulary slice only
  }
  return n_valid > 0 ? total / double(n_valid) : 0.0;
}

// Rank t's cross-entropy op saw only its vocabulary slice (the dummy column adds exp(-1e30)
// = 0): it gives lse_t per row and, on the rank owning the target, loss_t = lse_t -
// logit[target]. Over TP:
//   lse = log sum_t exp(lse_t),   loss = lse + sum_t (owner ? loss_t - lse_t : 0).
// Only 2 numbers per row travel (host memory); the logits stay where they are.
double Model::parallel_ce_chunk(int64_t r0, int64_t rows) {
  const int T = tp_size_;
  std::vector<double> mine(2 * rows), all(2 * rows * T), lse(rows), loss(rows);
  ops_.download(lse_head_.view({rows}), mine.data());
  ops_.download(losses_.view({rows}), loss.data());
  for (int64_t i = 0; i < rows; ++i) {
    const int32_t t = targets_host_[r0 + i];
    const bool owner = t >= vocab_begin_ && t < vocab_begin_ + V_;
    mine[rows + i] = owner ? loss[i] - mine[i] : 0.0;
  }
  all_gather_host(*par_.tp_host, mine.data(), all.data(), 2 * rows);
  double total = 0;
  for (int64_t i = 0; i < rows; ++i) {
    double mx = -INFINITY;
    for (int t = 0; t < T; ++t) mx = std::max(mx, all[t * 2 * rows + i]);
    double sum = 0, own = 0;
    for (int t = 0; t < T; ++t) {
      sum += std::exp(all[t * 2 * rows + i] - mx);
      own += all[t * 2 * rows + rows + i];
    }
    lse[i] = mx + std::log(sum);
    if (targets_host_[r0 + i] >= 0) total += lse[i] + own;
  }
  Tensor lg = lse_global_.view({rows});
  ops_.upload(lg, lse.data());
  return total;
}

void Model::layer_backward(int64_t l, int64_t B, int64_t S) {
  Layer& L = layers_[l];
  const int64_t N = B * S, d = cfg_.d_model, F = F_, dh = cfg_.head_dim;
  const int64_t h = h_, hkv = hkv_;
  const bool diff = cfg_.attention == AttentionKind::Differential;
  const bool v2 = cfg_.attention == AttentionKind::DifferentialV2;
  const int64_t qh = qp_dim_ / dh;  // query heads of dh (not V1)
  Tensor dres = dres_.view({N, d}), dln = dln_.view({N, d});
  if (recompute_ == Recompute::Full) layer_forward(l, B, S, true);
  const bool selective = recompute_ == Recompute::Selective;  // what it dropped is written again

  // ---- MLP: x_out = x_mid + swiglu(ln2 Wg^T, ln2 Wu^T) Wd^T
  Tensor gate = L.gate.view({N, F}), up = L.up.view({N, F}), a = L.act.view({N, F});
  Tensor dact = dact_.view({N, F}), dgate = dgate_.view({N, F}), dup = dup_.view({N, F});
  Tensor ln2 = L.ln2.view({N, d});
  if (selective) {
    ops_.swiglu_forward(gate, up, a);
    Tensor rstd2 = L.rstd2.view({N});
    ops_.rmsnorm_forward(L.x_mid.view({N, d}), P(L.mlp_norm), cfg_.norm_eps, 1.0f, ln2, rstd2);
  }
  ops_.matmul(dres, false, P(L.w_down), false, dact);                 // [N, F]
  ops_.matmul(dres, true, a, false, G(L.w_down), 1.0f, 1.0f);          // [d, F]
  ops_.swiglu_backward(gate, up, dact, dgate, dup);
  ops_.matmul(dgate, false, P(L.w_gate), false, dln);                 // [N, d]
  ops_.matmul(dup, false, P(L.w_up), false, dln, 1.0f, 1.0f);
  ops_.matmul(dgate, true, ln2, false, G(L.w_gate), 1.0f, 1.0f);
  ops_.matmul(dup, true, ln2, false, G(L.w_up), 1.0f, 1.0f);
  tp_all_reduce(dln);  // each rank's dln covers its slice of the SwiGLU width
  ops_.rmsnorm_backward(L.x_mid.view({N, d}), P(L.mlp_norm), L.rstd2.view({N}), 1.0f, dln, dres,
                        G(L.mlp_norm));

  // ---- attention: x_mid = x_in + O Wo^T
  Tensor q = diff ? L.q.view({B, S, h, 2, dh}) : L.q.view({B, S, qh, dh});
  Tensor k = diff ? L.k.view({B, S, hkv, 2, dh}) : L.k.view({B, S, 2 * hkv, dh});
  Tensor v = diff ? L.v.view({B, S, hkv, 2 * dh}) : L.v.view({B, S, 2 * hkv, dh});
  Tensor dq = dq_.view(q.shape()), dk = dk_.view(k.shape()), dv = dv_.view(v.shape());
  Tensor dsub = dsub_.view({N, q_dim_});
  Tensor o_in = diff || v2 ? L.sub.view({N, q_dim_}) : L.att.view({N, q_dim_});
  if (selective && v2) {
    Tensor combined = L.sub.view({B, S, 2 * h, dh});
    ops_.diff_v2_combine_forward(L.att.view({B, S, qh, dh}), L.lam_logits.view({N, 2 * h}), combined);
  }
  if (selective && diff) {
    Tensor att_rows = L.att.view({N * h, 2 * dh}), sub_rows = L.sub.view({N * h, 2 * dh});
    Tensor rstd_sub = L.rstd_sub.view({N * h});
    ops_.rmsnorm_forward(att_rows, P(L.subln), cfg_.norm_eps, float(1.0 - ModelConfig::lambda_init(l)), sub_rows,
                         rstd_sub);
  }
  ops_.matmul(dres, false, P(L.wo), false, dsub);                     // [N, q_dim_]
  ops_.matmul(dres, true, o_in, false, G(L.wo), 1.0f, 1.0f);           // [d, q_dim_]
  if (diff) {
    const double li = ModelConfig::lambda_init(l);
    Tensor att = L.att.view({B, S, h, 2 * dh}), datt = datt_.view({B, S, h, 2 * dh});
    Tensor datt_rows = datt.view({N * h, 2 * dh});
    ops_.fill_zero(datt_rows);
    ops_.rmsnorm_backward(att.view({N * h, 2 * dh}), P(L.subln), L.rstd_sub.view({N * h}),
                          float(1.0 - li), dsub.view({N * h, 2 * dh}), datt_rows, G(L.subln));
    ops_.diff_attention_backward(q, k, v, L.lambda, att, L.lse.view({B, h, 2, S}), attn_saved(L, q), datt,
                                 dq, dk, dv, dlambda_);
    ops_.diff_lambda_backward(P(L.lq1), P(L.lk1), P(L.lq2), P(L.lk2), dlambda_, G(L.lq1), G(L.lk1),
                              G(L.lq2), G(L.lk2));
  } else if (v2) {
    Tensor att = L.att.view({B, S, qh, dh}), datt = datt_.view({B, S, qh, dh});
    Tensor dz = dlam_logits_.view({N, 2 * h});
    ops_.diff_v2_combine_backward(att, L.lam_logits.view({N, 2 * h}), dsub.view({B, S, 2 * h, dh}), datt, dz);
    ops_.attention_backward(q, k, v, att, L.lse.view({B, qh, S}), datt, dq, dk, dv);
  } else {
    Tensor att = L.att.view({B, S, 2 * h, dh});
    ops_.attention_backward(q, k, v, att, L.lse.view({B, 2 * h, S}), dsub.view(att.shape()), dq, dk, dv);
  }
  Tensor dq_heads = dq.view({B, S, qp_dim_ / dh, dh}), dk_heads = dk.view({B, S, 2 * hkv, dh});
  ops_.rope(dq_heads, cfg_.rope_theta, true);
  ops_.rope(dk_heads, cfg_.rope_theta, true);
  Tensor dq2 = dq.view({N, qp_dim_}), dk2 = dk.view({N, kv_dim_}), dv2 = dv.view({N, kv_dim_});
  Tensor ln1 = L.ln1.view({N, d});
  if (selective) {
    Tensor rstd1 = L.rstd1.view({N});
    ops_.rmsnorm_forward(L.x_in.view({N, d}), P(L.attn_norm), cfg_.norm_eps, 1.0f, ln1, rstd1);
  }
  ops_.matmul(dq2, false, P(L.wq), false, dln);
  ops_.matmul(dk2, false, P(L.wk), false, dln, 1.0f, 1.0f);
  ops_.matmul(dv2, false, P(L.wv), false, dln, 1.0f, 1.0f);
  ops_.matmul(dq2, true, ln1, false, G(L.wq), 1.0f, 1.0f);
  ops_.matmul(dk2, true, ln1, false, G(L.wk), 1.0f, 1.0f);
  ops_.matmul(dv2, true, ln1, false, G(L.wv), 1.0f, 1.0f);
  if (v2) {  // z = ln1 W_lambda^T
    Tensor dz = dlam_logits_.view({N, 2 * h});
    ops_.matmul(dz, false, P(L.wlambda), false, dln, 1.0f, 1.0f);
    ops_.matmul(dz, true, ln1, false, G(L.wlambda), 1.0f, 1.0f);
  }
  tp_all_reduce(dln);  // each rank's dln covers its heads only
  ops_.rmsnorm_backward(L.x_in.view({N, d}), P(L.attn_norm), L.rstd1.view({N}), 1.0f, dln, dres,
                        G(L.attn_norm));
  grads_ready(L.attn_norm);
}

void Model::upload_batch(const int32_t* tokens, const int32_t* targets, int64_t N) {
  Tensor tok = tokens_.view({N}), tg = targets_.view({N});
  targets_host_.assign(targets, targets + N);
  if (tp_size_ == 1) {
    ops_.upload(tok, tokens);
    ops_.upload(tg, targets);
    return;
  }
  std::vector<int32_t> lt(N), lg(N);
  for (int64_t i = 0; i < N; ++i) {
    const bool tok_here = tokens[i] >= vocab_begin_ && tokens[i] < vocab_begin_ + V_;
    lt[i] = int32_t(tok_here ? tokens[i] - vocab_begin_ : V_);  // V_: the zero row
    const bool tgt_here = targets[i] >= vocab_begin_ && targets[i] < vocab_begin_ + V_;
    lg[i] = int32_t(tgt_here ? targets[i] - vocab_begin_ : targets[i] < 0 ? -1 : V_);  // V_: dummy
  }
  ops_.upload(tok, lt.data());
  ops_.upload(tg, lg.data());
}

double Model::forward_backward(const int32_t* tokens, const int32_t* targets, int64_t B, int64_t S,
                               float grad_scale) {
  check_batch(tokens, B, S);
  const int64_t N = B * S, d = cfg_.d_model;
  int64_t n_valid = 0;
  for (int64_t i = 0; i < N; ++i) n_valid += targets[i] >= 0;
  upload_batch(tokens, targets, N);
  Tensor tok = tokens_.view({N});
  ready_from_ = int(params_.size());
  forward_body(B, S);
  double loss = head_loss(N, n_valid, true, grad_scale);  // leaves dL/d(lnf) in dln_
  Tensor dres = dres_.view({N, d});
  ops_.fill_zero(dres);
  ops_.rmsnorm_backward(x_final_.view({N, d}), P(final_norm_), rstdf_.view({N}), 1.0f,
                        dln_.view({N, d}), dres, G(final_norm_));
  grads_ready(final_norm_);  // the final norm and an untied LM head are complete
  for (int64_t l = cfg_.n_layers - 1; l >= 0; --l) layer_backward(l, B, S);
  if (tp_size_ == 1) {
    ops_.embedding_backward(tok, dres, G(embed_));
  } else {  // other ranks' tokens land in the zero row's gradient, which is cleared again
    Tensor g = vocab_rows(embed_, true);
    ops_.embedding_backward(tok, dres, g);
    Tensor zero_row = g.slice_rows(V_, V_ + 1);
    ops_.fill_zero(zero_row);
  }
  grads_ready(0);
  return loss;
}

double Model::forward_loss(const int32_t* tokens, const int32_t* targets, int64_t B, int64_t S) {
  check_batch(tokens, B, S);
  const int64_t N = B * S;
  int64_t n_valid = 0;
  for (int64_t i = 0; i < N; ++i) n_valid += targets[i] >= 0;
  upload_batch(tokens, targets, N);
  forward_body(B, S);
  return head_loss(N, n_valid, false, 0.0f);
}

std::vector<float> Model::last_logits(const int32_t* tokens, int64_t S) {
  check_batch(tokens, 1, S);
  const int64_t d = cfg_.d_model;
  std::vector<int32_t> no_targets(S, -1);
  upload_batch(tokens, no_targets.data(), S);
  forward_body(1, S);
  Tensor last = lnf_.view({S, d}).slice_rows(S - 1, S);
  Tensor logits = logits_.view({1, Vh_});
  ops_.matmul(last, false, head_weight(), true, logits);
  std::vector<float> out(Vh_);
  ops_.download(logits, out.data());
  out.resize(V_);  // drop the dummy column
  if (tp_size_ > 1) {  // the vocabulary slices are in rank order
    std::vector<double> mine(out.begin(), out.end()), all(V_ * tp_size_);
    all_gather_host(*par_.tp_host, mine.data(), all.data(), V_);
    out.assign(all.begin(), all.end());
  }
  out.resize(cfg_.vocab_size);  // drop the padding
  return out;
}

}  // namespace difftron
