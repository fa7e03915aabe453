// Forward and hand-written backward of the Differential / baseline Transformer.
// Shapes: N = B*S rows; d = d_model; q_dim = 2*h*dh; kv_dim = 2*h_kv*dh; F = ffn_dim.
#include "core/model.h"

#include <algorithm>
#include <cmath>

#include "core/rng.h"

namespace difftron {

Model::Model(const ModelConfig& config, Ops& ops, ModelPrecision precision, int64_t max_batch,
             int64_t max_seq)
    : cfg_(config), ops_(ops), prec_(precision), max_b_(max_batch), max_s_(max_seq) {
  cfg_.resolve_and_validate();
  if (max_batch <= 0) throw_error("batch size (", max_batch, ") must be positive");
  if (max_seq <= 0 || max_seq > cfg_.max_seq_len)
    throw_error("sequence length (", max_seq, ") must be in [1, max_seq_len=", cfg_.max_seq_len, "]");
  const int64_t d = cfg_.d_model, F = cfg_.ffn_dim, V = cfg_.vocab_size, dh = cfg_.head_dim;
  const int64_t qd = cfg_.q_dim(), kvd = cfg_.kv_dim();
  const bool diff = cfg_.attention == AttentionKind::Differential;

  params_.reserve(3 + 14 * cfg_.n_layers);
  embed_ = add_param("model.embed_tokens.weight", {V, d}, true, true);
  layers_.resize(cfg_.n_layers);
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    Layer& L = layers_[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    L.attn_norm = add_param(p + "input_layernorm.weight", {d}, false);
    L.wq = add_param(p + "self_attn.q_proj.weight", {qd, d}, true);
    L.wk = add_param(p + "self_attn.k_proj.weight", {kvd, d}, true);
    L.wv = add_param(p + "self_attn.v_proj.weight", {kvd, d}, true);
    L.wo = add_param(p + "self_attn.o_proj.weight", {d, qd}, true);
    L.lq1 = L.lk1 = L.lq2 = L.lk2 = L.subln = -1;
    if (diff) {
      L.lq1 = add_param(p + "self_attn.lambda_q1", {dh}, false);
      L.lk1 = add_param(p + "self_attn.lambda_k1", {dh}, false);
      L.lq2 = add_param(p + "self_attn.lambda_q2", {dh}, false);
      L.lk2 = add_param(p + "self_attn.lambda_k2", {dh}, false);
      L.subln = add_param(p + "self_attn.subln.weight", {2 * dh}, false);
    }
    L.mlp_norm = add_param(p + "post_attention_layernorm.weight", {d}, false);
    L.w_gate = add_param(p + "mlp.gate_proj.weight", {F, d}, true);
    L.w_up = add_param(p + "mlp.up_proj.weight", {F, d}, true);
    L.w_down = add_param(p + "mlp.down_proj.weight", {d, F}, true);
  }
  final_norm_ = add_param("model.norm.weight", {d}, false);
  if (!cfg_.tie_embeddings) lm_head_ = add_param("lm_head.weight", {V, d}, true, true);

  // Activations for the largest batch.
  const int64_t B = max_b_, S = max_s_, N = B * S;
  auto act = [&](Shape s) { return ops_.empty(s, prec_.act); };
  auto stat = [&](Shape s) { return ops_.empty(s, prec_.stat); };
  for (auto& L : layers_) {
    L.x_in = act({N, d});
    L.ln1 = act({N, d});
    L.rstd1 = stat({N});
    if (diff) {
      L.q = act({B, S, cfg_.n_heads, 2, dh});
      L.k = act({B, S, cfg_.n_kv_heads, 2, dh});
      L.v = act({B, S, cfg_.n_kv_heads, 2 * dh});
      L.att = act({B, S, cfg_.n_heads, 2 * dh});
      L.lse = stat({B, cfg_.n_heads, 2, S});
      L.lambda = stat({1});
      L.sub = act({N, qd});
      L.rstd_sub = stat({N * cfg_.n_heads});
    } else {
      L.q = act({B, S, 2 * cfg_.n_heads, dh});
      L.k = act({B, S, 2 * cfg_.n_kv_heads, dh});
      L.v = act({B, S, 2 * cfg_.n_kv_heads, dh});
      L.att = act({B, S, 2 * cfg_.n_heads, dh});
      L.lse = stat({B, 2 * cfg_.n_heads, S});
    }
    L.x_mid = act({N, d});
    L.ln2 = act({N, d});
    L.rstd2 = stat({N});
    L.gate = act({N, F});
    L.up = act({N, F});
    L.act = act({N, F});
  }
  tokens_ = ops_.empty({N}, DType::I32);
  targets_ = ops_.empty({N}, DType::I32);
  x_final_ = act({N, d});
  lnf_ = act({N, d});
  rstdf_ = stat({N});
  dres_ = act({N, d});
  dln_ = act({N, d});
  dsub_ = act({N, qd});
  datt_ = act(layers_.empty() ? Shape{1} : layers_[0].att.shape());
  dq_ = act(layers_.empty() ? Shape{1} : layers_[0].q.shape());
  dk_ = act(layers_.empty() ? Shape{1} : layers_[0].k.shape());
  dv_ = act(layers_.empty() ? Shape{1} : layers_[0].v.shape());
  dlambda_ = stat({1});
  dact_ = act({N, F});
  dgate_ = act({N, F});
  dup_ = act({N, F});
  // The LM head works on row chunks so that [N, V] logits are never held at once.
  head_chunk_ = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(1) << 22) / V));
  logits_ = act({head_chunk_, V});
  losses_ = stat({head_chunk_});
  lse_head_ = stat({head_chunk_});
}

int Model::add_param(const std::string& name, Shape shape, bool is_matrix, bool is_embedding) {
  Param p;
  p.name = name;
  p.value = ops_.empty(shape, prec_.param);
  p.grad = ops_.empty(shape, prec_.grad);
  ops_.fill_zero(p.grad);
  p.is_matrix = is_matrix;
  p.is_embedding = is_embedding;
  params_.push_back(std::move(p));
  return int(params_.size()) - 1;
}

Param& Model::param(const std::string& name) {
  for (auto& p : params_)
    if (p.name == name) return p;
  throw_error("model has no parameter named '", name, "'");
}

const Tensor& Model::head_weight() { return P(lm_head_ >= 0 ? lm_head_ : embed_); }
Tensor& Model::head_grad() { return G(lm_head_ >= 0 ? lm_head_ : embed_); }

void Model::init_weights(uint64_t seed) {
  Rng rng(seed);
  const double out_std = cfg_.init_std / std::sqrt(2.0 * double(cfg_.n_layers));
  for (auto& p : params_) {
    std::vector<float> host(p.value.numel());
    const std::string& n = p.name;
    auto ends_with = [&](const char* suf) {
      std::string s(suf);
      return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0;
    };
    if (ends_with("layernorm.weight") || ends_with("norm.weight") || ends_with("subln.weight")) {
      std::fill(host.begin(), host.end(), 1.0f);
    } else if (n.find(".lambda_") != std::string::npos) {
      for (auto& x : host) x = float(cfg_.lambda_std * rng.normal());
    } else {
      double std = (ends_with("o_proj.weight") || ends_with("down_proj.weight")) ? out_std : cfg_.init_std;
      for (auto& x : host) x = float(std * rng.normal());
    }
    ops_.upload(p.value, host.data());
  }
}

void Model::zero_grads() {
  for (auto& p : params_) ops_.fill_zero(p.grad);
}

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

void Model::layer_forward(int64_t l, int64_t B, int64_t S) {
  Layer& L = layers_[l];
  const int64_t N = B * S, d = cfg_.d_model, F = cfg_.ffn_dim, dh = cfg_.head_dim;
  const int64_t h = cfg_.n_heads, hkv = cfg_.n_kv_heads;
  const bool diff = cfg_.attention == AttentionKind::Differential;
  Tensor x_in = L.x_in.view({N, d}), ln1 = L.ln1.view({N, d}), x_mid = L.x_mid.view({N, d});
  Tensor rstd1 = L.rstd1.view({N});
  ops_.rmsnorm_forward(x_in, P(L.attn_norm), cfg_.norm_eps, 1.0f, ln1, rstd1);

  Tensor q = diff ? L.q.view({B, S, h, 2, dh}) : L.q.view({B, S, 2 * h, dh});
  Tensor k = diff ? L.k.view({B, S, hkv, 2, dh}) : L.k.view({B, S, 2 * hkv, dh});
  Tensor v = diff ? L.v.view({B, S, hkv, 2 * dh}) : L.v.view({B, S, 2 * hkv, dh});
  Tensor q2 = q.view({N, cfg_.q_dim()}), k2 = k.view({N, cfg_.kv_dim()}), v2 = v.view({N, cfg_.kv_dim()});
  ops_.matmul(ln1, false, P(L.wq), true, q2);  // [N, q_dim]
  ops_.matmul(ln1, false, P(L.wk), true, k2);  // [N, kv_dim]
  ops_.matmul(ln1, false, P(L.wv), true, v2);  // [N, kv_dim]
  Tensor q_heads = q.view({B, S, 2 * h, dh}), k_heads = k.view({B, S, 2 * hkv, dh});
  ops_.rope(q_heads, cfg_.rope_theta, false);
  ops_.rope(k_heads, cfg_.rope_theta, false);

  Tensor sub_in;  // what o_proj multiplies: [N, q_dim]
  if (diff) {
    const double li = ModelConfig::lambda_init(l);
    ops_.diff_lambda_forward(P(L.lq1), P(L.lk1), P(L.lq2), P(L.lk2), li, L.lambda);
    Tensor att = L.att.view({B, S, h, 2 * dh}), lse = L.lse.view({B, h, 2, S});
    ops_.diff_attention_forward(q, k, v, L.lambda, att, lse);
    Tensor att_rows = att.view({N * h, 2 * dh}), sub_rows = L.sub.view({N * h, 2 * dh});
    Tensor rstd_sub = L.rstd_sub.view({N * h});
    ops_.rmsnorm_forward(att_rows, P(L.subln), cfg_.norm_eps, float(1.0 - li), sub_rows, rstd_sub);
    sub_in = L.sub.view({N, cfg_.q_dim()});
  } else {
    Tensor att = L.att.view({B, S, 2 * h, dh}), lse = L.lse.view({B, 2 * h, S});
    ops_.attention_forward(q, k, v, att, lse);
    sub_in = L.att.view({N, cfg_.q_dim()});
  }
  ops_.copy(x_in, x_mid);
  ops_.matmul(sub_in, false, P(L.wo), true, x_mid, 1.0f, 1.0f);  // x_mid = x_in + O Wo^T

  Tensor ln2 = L.ln2.view({N, d}), rstd2 = L.rstd2.view({N});
  ops_.rmsnorm_forward(x_mid, P(L.mlp_norm), cfg_.norm_eps, 1.0f, ln2, rstd2);
  Tensor gate = L.gate.view({N, F}), up = L.up.view({N, F}), a = L.act.view({N, F});
  ops_.matmul(ln2, false, P(L.w_gate), true, gate);
  ops_.matmul(ln2, false, P(L.w_up), true, up);
  ops_.swiglu_forward(gate, up, a);
  Tensor x_out = (l + 1 < cfg_.n_layers ? layers_[l + 1].x_in : x_final_).view({N, d});
  ops_.copy(x_mid, x_out);
  ops_.matmul(a, false, P(L.w_down), true, x_out, 1.0f, 1.0f);  // x_out = x_mid + act Wd^T
}

void Model::forward_body(int64_t B, int64_t S) {
  const int64_t N = B * S, d = cfg_.d_model;
  Tensor x0 = (layers_.empty() ? x_final_ : layers_[0].x_in).view({N, d});
  Tensor tok = tokens_.view({N});
  ops_.embedding_forward(tok, P(embed_), x0);
  for (int64_t l = 0; l < cfg_.n_layers; ++l) layer_forward(l, B, S);
  Tensor xf = x_final_.view({N, d}), lnf = lnf_.view({N, d}), rstdf = rstdf_.view({N});
  ops_.rmsnorm_forward(xf, P(final_norm_), cfg_.norm_eps, 1.0f, lnf, rstdf);
}

double Model::head_loss(int64_t N, int64_t n_valid, bool backward, float grad_scale) {
  const int64_t V = cfg_.vocab_size, d = cfg_.d_model;
  const Tensor& W = head_weight();  // [V, d]
  double total = 0;
  std::vector<double> host(head_chunk_);
  const float dloss = n_valid > 0 ? grad_scale / float(n_valid) : 0.0f;
  for (int64_t r0 = 0; r0 < N; r0 += head_chunk_) {
    const int64_t rows = std::min(head_chunk_, N - r0);
    Tensor h = lnf_.view({N, d}).slice_rows(r0, r0 + rows);
    Tensor logits = logits_.view({rows, V}), losses = losses_.view({rows}), lse = lse_head_.view({rows});
    Tensor tg = targets_.view({N}).flat_slice(r0, rows);
    ops_.matmul(h, false, W, true, logits);  // [rows, V]
    ops_.cross_entropy_forward(logits, tg, losses, lse);
    ops_.download(losses, host.data());
    for (int64_t i = 0; i < rows; ++i) total += host[i];
    if (backward) {
      ops_.cross_entropy_backward(logits, tg, lse, dloss, logits);  // logits := dlogits
      Tensor dh = dln_.view({N, d}).slice_rows(r0, r0 + rows);
      ops_.matmul(logits, false, W, false, dh);                         // dh = dlogits W
      ops_.matmul(logits, true, h, false, head_grad(), 1.0f, 1.0f);      // dW += dlogits^T h
    }
  }
  return n_valid > 0 ? total / double(n_valid) : 0.0;
}

void Model::layer_backward(int64_t l, int64_t B, int64_t S) {
  Layer& L = layers_[l];
  const int64_t N = B * S, d = cfg_.d_model, F = cfg_.ffn_dim, dh = cfg_.head_dim;
  const int64_t h = cfg_.n_heads, hkv = cfg_.n_kv_heads;
  const bool diff = cfg_.attention == AttentionKind::Differential;
  Tensor dres = dres_.view({N, d}), dln = dln_.view({N, d});

  // ---- MLP: x_out = x_mid + swiglu(ln2 Wg^T, ln2 Wu^T) Wd^T
  Tensor gate = L.gate.view({N, F}), up = L.up.view({N, F}), a = L.act.view({N, F});
  Tensor dact = dact_.view({N, F}), dgate = dgate_.view({N, F}), dup = dup_.view({N, F});
  Tensor ln2 = L.ln2.view({N, d});
  ops_.matmul(dres, false, P(L.w_down), false, dact);                 // [N, F]
  ops_.matmul(dres, true, a, false, G(L.w_down), 1.0f, 1.0f);          // [d, F]
  ops_.swiglu_backward(gate, up, dact, dgate, dup);
  ops_.matmul(dgate, false, P(L.w_gate), false, dln);                 // [N, d]
  ops_.matmul(dup, false, P(L.w_up), false, dln, 1.0f, 1.0f);
  ops_.matmul(dgate, true, ln2, false, G(L.w_gate), 1.0f, 1.0f);
  ops_.matmul(dup, true, ln2, false, G(L.w_up), 1.0f, 1.0f);
  ops_.rmsnorm_backward(L.x_mid.view({N, d}), P(L.mlp_norm), L.rstd2.view({N}), 1.0f, dln, dres,
                        G(L.mlp_norm));

  // ---- attention: x_mid = x_in + O Wo^T
  Tensor q = diff ? L.q.view({B, S, h, 2, dh}) : L.q.view({B, S, 2 * h, dh});
  Tensor k = diff ? L.k.view({B, S, hkv, 2, dh}) : L.k.view({B, S, 2 * hkv, dh});
  Tensor v = diff ? L.v.view({B, S, hkv, 2 * dh}) : L.v.view({B, S, 2 * hkv, dh});
  Tensor dq = dq_.view(q.shape()), dk = dk_.view(k.shape()), dv = dv_.view(v.shape());
  Tensor dsub = dsub_.view({N, cfg_.q_dim()});
  Tensor o_in = diff ? L.sub.view({N, cfg_.q_dim()}) : L.att.view({N, cfg_.q_dim()});
  ops_.matmul(dres, false, P(L.wo), false, dsub);                     // [N, q_dim]
  ops_.matmul(dres, true, o_in, false, G(L.wo), 1.0f, 1.0f);           // [d, q_dim]
  if (diff) {
    const double li = ModelConfig::lambda_init(l);
    Tensor att = L.att.view({B, S, h, 2 * dh}), datt = datt_.view({B, S, h, 2 * dh});
    Tensor datt_rows = datt.view({N * h, 2 * dh});
    ops_.fill_zero(datt_rows);
    ops_.rmsnorm_backward(att.view({N * h, 2 * dh}), P(L.subln), L.rstd_sub.view({N * h}),
                          float(1.0 - li), dsub.view({N * h, 2 * dh}), datt_rows, G(L.subln));
    ops_.diff_attention_backward(q, k, v, L.lambda, att, L.lse.view({B, h, 2, S}), datt, dq, dk, dv,
                                 dlambda_);
    ops_.diff_lambda_backward(P(L.lq1), P(L.lk1), P(L.lq2), P(L.lk2), dlambda_, G(L.lq1), G(L.lk1),
                              G(L.lq2), G(L.lk2));
  } else {
    Tensor att = L.att.view({B, S, 2 * h, dh});
    ops_.attention_backward(q, k, v, att, L.lse.view({B, 2 * h, S}), dsub.view(att.shape()), dq, dk, dv);
  }
  Tensor dq_heads = dq.view({B, S, 2 * h, dh}), dk_heads = dk.view({B, S, 2 * hkv, dh});
  ops_.rope(dq_heads, cfg_.rope_theta, true);
  ops_.rope(dk_heads, cfg_.rope_theta, true);
  Tensor dq2 = dq.view({N, cfg_.q_dim()}), dk2 = dk.view({N, cfg_.kv_dim()}), dv2 = dv.view({N, cfg_.kv_dim()});
  Tensor ln1 = L.ln1.view({N, d});
  ops_.matmul(dq2, false, P(L.wq), false, dln);
  ops_.matmul(dk2, false, P(L.wk), false, dln, 1.0f, 1.0f);
  ops_.matmul(dv2, false, P(L.wv), false, dln, 1.0f, 1.0f);
  ops_.matmul(dq2, true, ln1, false, G(L.wq), 1.0f, 1.0f);
  ops_.matmul(dk2, true, ln1, false, G(L.wk), 1.0f, 1.0f);
  ops_.matmul(dv2, true, ln1, false, G(L.wv), 1.0f, 1.0f);
  ops_.rmsnorm_backward(L.x_in.view({N, d}), P(L.attn_norm), L.rstd1.view({N}), 1.0f, dln, dres,
                        G(L.attn_norm));
}

double Model::forward_backward(const int32_t* tokens, const int32_t* targets, int64_t B, int64_t S,
                               float grad_scale) {
  check_batch(tokens, B, S);
  const int64_t N = B * S, d = cfg_.d_model;
  int64_t n_valid = 0;
  for (int64_t i = 0; i < N; ++i) n_valid += targets[i] >= 0;
  Tensor tok = tokens_.view({N}), tg = targets_.view({N});
  ops_.upload(tok, tokens);
  ops_.upload(tg, targets);
  forward_body(B, S);
  double loss = head_loss(N, n_valid, true, grad_scale);  // leaves dL/d(lnf) in dln_
  Tensor dres = dres_.view({N, d});
  ops_.fill_zero(dres);
  ops_.rmsnorm_backward(x_final_.view({N, d}), P(final_norm_), rstdf_.view({N}), 1.0f,
                        dln_.view({N, d}), dres, G(final_norm_));
  for (int64_t l = cfg_.n_layers - 1; l >= 0; --l) layer_backward(l, B, S);
  ops_.embedding_backward(tok, dres, G(embed_));
  return loss;
}

double Model::forward_loss(const int32_t* tokens, const int32_t* targets, int64_t B, int64_t S) {
  check_batch(tokens, B, S);
  const int64_t N = B * S;
  int64_t n_valid = 0;
  for (int64_t i = 0; i < N; ++i) n_valid += targets[i] >= 0;
  Tensor tok = tokens_.view({N}), tg = targets_.view({N});
  ops_.upload(tok, tokens);
  ops_.upload(tg, targets);
  forward_body(B, S);
  return head_loss(N, n_valid, false, 0.0f);
}

std::vector<float> Model::last_logits(const int32_t* tokens, int64_t S) {
  check_batch(tokens, 1, S);
  const int64_t d = cfg_.d_model, V = cfg_.vocab_size;
  Tensor tok = tokens_.view({S});
  ops_.upload(tok, tokens);
  forward_body(1, S);
  Tensor last = lnf_.view({S, d}).slice_rows(S - 1, S);
  Tensor logits = logits_.view({1, V});
  ops_.matmul(last, false, head_weight(), true, logits);
  std::vector<float> out(V);
  ops_.download(logits, out.data());
  return out;
}

}  // namespace difftron
