// Generation with a K/V cache: see decode.h. The layer below is the forward pass of
// core/model.cpp (Model::layer_forward) for rows of new tokens, with the attention replaced
// by Ops::cached_attention, which also rotates and stores their keys and values.
// Differential Transformer V2 (docs/MODEL.md section 5) is standard cached attention of its 4h
// query heads, then Ops::diff_v2_combine_forward with the new tokens' lambda logits.
#include "core/decode.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "base/error.h"

namespace difftron {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Decoder::Decoder(Model& model, int64_t max_batch, int64_t max_len, int64_t max_rows)
    : model_(model), ops_(model.ops()), cfg_(model.config()), max_b_(max_batch), max_len_(max_len),
      max_rows_(std::max(max_rows, max_batch)), V_(model.config().vocab_size),
      diff_(model.config().attention == AttentionKind::Differential) {
  if (model.tp_size() != 1)
    throw_error("Decoder: the model is split over ", model.tp_size(), " tensor-parallel ranks; generation runs "
                "on one process (TP 1)");
  if (max_batch <= 0) throw_error("Decoder: max_batch (", max_batch, ") must be positive");
  if (max_len <= 0 || max_len > cfg_.max_seq_len)
    throw_error("Decoder: max_len (", max_len, ") must be in [1, max_seq_len=", cfg_.max_seq_len, "]");
  len_.assign(max_b_, 0);
  const ModelPrecision& prec = model.precision();
  const bool v2 = cfg_.attention == AttentionKind::DifferentialV2;
  const int64_t d = cfg_.d_model, qd = cfg_.q_dim(), kvd = cfg_.kv_dim(), F = cfg_.ffn_dim, R = max_rows_;
  const int64_t qp = cfg_.q_proj_dim(), nz = v2 ? 2 * cfg_.n_heads : 0;  // x Wq^T; lambda logits
  auto P = [&](const std::string& name) { return model.param(name).value; };
  // names[0..] as one matrix [sum of rows, d] when they follow each other in the flat buffer
  auto adjacent = [&](const std::vector<std::string>& names) -> Tensor {
    int64_t rows = 0, end = model.param(names[0]).flat_offset;
    for (const std::string& n : names) {
      const Param& p = model.param(n);
      if (p.flat_offset != end) return Tensor();
      rows += p.value.dim(0);
      end += p.value.numel();
    }
    const int64_t begin = model.param(names[0]).flat_offset;
    return model.flat_values().flat_slice(begin, end - begin).view({rows, d});
  };
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerRefs L;
    L.attn_norm = P(p + "input_layernorm.weight");
    L.wq = P(p + "self_attn.q_proj.weight");
    L.wk = P(p + "self_attn.k_proj.weight");
    L.wv = P(p + "self_attn.v_proj.weight");
    L.wo = P(p + "self_attn.o_proj.weight");
    L.mlp_norm = P(p + "post_attention_layernorm.weight");
    L.w_gate = P(p + "mlp.gate_proj.weight");
    L.w_up = P(p + "mlp.up_proj.weight");
    L.w_down = P(p + "mlp.down_proj.weight");
    std::vector<std::string> qkv = {p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                    p + "self_attn.v_proj.weight"};
    if (v2) {  // the lambda projection follows v_proj (core/model.cpp): one GEMM gives q|k|v|z
      L.lambda = P(p + "self_attn.lambda_proj.weight");  // diff_v2: W_lambda [2h, d], not a value
      qkv.push_back(p + "self_attn.lambda_proj.weight");
    }
    L.wqkv = adjacent(qkv);
    L.wgate_up = adjacent({p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"});
    if (diff_) {
      L.subln = P(p + "self_attn.subln.weight");
      L.lambda = ops_.empty({1}, prec.stat);  // the weights do not change while decoding
      ops_.diff_lambda_forward(P(p + "self_attn.lambda_q1"), P(p + "self_attn.lambda_k1"),
                               P(p + "self_attn.lambda_q2"), P(p + "self_attn.lambda_k2"),
                               ModelConfig::lambda_init(l), L.lambda);
    }
    L.k_cache = ops_.empty({max_b_, max_len_, kvd}, prec.act);
    L.v_cache = ops_.empty({max_b_, max_len_, kvd}, prec.act);
    layers_.push_back(std::move(L));
  }
  embed_ = P("model.embed_tokens.weight");
  final_norm_ = P("model.norm.weight");
  head_ = cfg_.tie_embeddings ? embed_ : P("lm_head.weight");  // [V, d]: the real rows

  auto act = [&](Shape s) { return ops_.empty(s, prec.act); };
  tokens_ = ops_.empty({R}, DType::I32);
  start_ = ops_.empty({max_b_}, DType::I32);
  x_ = act({R, d});
  ln_ = act({R, d});
  rstd_ = ops_.empty({R}, prec.stat);
  q_ = act({R, qp});
  k_ = act({R, kvd});
  v_ = act({R, kvd});
  att_ = act({R, qp});
  if (diff_) {
    sub_ = act({R, qd});
    rstd_sub_ = ops_.empty({R * cfg_.n_heads}, prec.stat);
  }
  if (v2) sub_ = act({R * (qd + nz)});  // the subtracted pairs [R, qd], then the lambda logits [R, 2h]
  qkv_ = act({qp + 2 * kvd + nz});
  gate_ = act({R, F});
  up_ = act({R, F});
  act_ = act({R, F});
  gate_up_ = act({2 * F});
  last_ = act({max_b_, d});
  logits_ = act({max_b_, V_});
}

void Decoder::reset() { std::fill(len_.begin(), len_.end(), 0); }

void Decoder::layer(int64_t l, int64_t first, int64_t B, int64_t T) {
  LayerRefs& L = layers_[l];
  const int64_t N = B * T, d = cfg_.d_model, qd = cfg_.q_dim(), kvd = cfg_.kv_dim(), F = cfg_.ffn_dim;
  const int64_t h = cfg_.n_heads, hkv = cfg_.n_kv_heads, dh = cfg_.head_dim, C = max_len_;
  const bool v2 = cfg_.attention == AttentionKind::DifferentialV2;
  const int64_t qp = cfg_.q_proj_dim(), nz = v2 ? 2 * h : 0;  // diff_v2: 4h query heads, 2h lambda logits
  Tensor x = x_.flat_slice(0, N * d).view({N, d}), ln = ln_.flat_slice(0, N * d).view({N, d});
  Tensor rstd = rstd_.flat_slice(0, N);
  ops_.rmsnorm_forward(x, L.attn_norm, cfg_.norm_eps, 1.0f, ln, rstd);

  // One token: q, k, v from one GEMM (one pass over the weights, one launch) where they
  // are adjacent; the output row [q | k | v] splits into contiguous pieces.
  Tensor q, k, v, z;  // z: diff_v2's lambda logits [N, 2h]
  if (N == 1 && L.wqkv.defined()) {
    Tensor qkv = qkv_.view({1, qp + 2 * kvd + nz});
    ops_.matmul(ln, false, L.wqkv, true, qkv);
    q = qkv_.flat_slice(0, qp);
    k = qkv_.flat_slice(qp, kvd);
    v = qkv_.flat_slice(qp + kvd, kvd);
    if (v2) z = qkv_.flat_slice(qp + 2 * kvd, nz);
  } else {
    q = q_.flat_slice(0, N * qp).view({N, qp});
    k = k_.flat_slice(0, N * kvd).view({N, kvd});
    v = v_.flat_slice(0, N * kvd).view({N, kvd});
    ops_.matmul(ln, false, L.wq, true, q);
    ops_.matmul(ln, false, L.wk, true, k);
    ops_.matmul(ln, false, L.wv, true, v);
    if (v2) {
      z = sub_.flat_slice(max_rows_ * qd, N * nz).view({N, nz});
      ops_.matmul(ln, false, L.lambda, true, z);  // L.lambda: W_lambda
    }
  }
  Tensor kc = L.k_cache.flat_slice(first * C * kvd, B * C * kvd);
  Tensor vc = L.v_cache.flat_slice(first * C * kvd, B * C * kvd);
  Tensor start = start_.flat_slice(0, B);
  Tensor att = att_.flat_slice(0, N * qp);
  if (v2) {
    Tensor q4 = q.view({B, T, 4 * h, dh}), k4 = k.view({B, T, 2 * hkv, dh}), v4 = v.view({B, T, 2 * hkv, dh});
    Tensor kc4 = kc.view({B, C, 2 * hkv, dh}), vc4 = vc.view({B, C, 2 * hkv, dh});
    Tensor att4 = att.view({B, T, 4 * h, dh});
    ops_.cached_attention(q4, k4, v4, start, Tensor(), cfg_.rope_theta, kc4, vc4, att4);
    Tensor combined = sub_.flat_slice(0, N * qd).view({B, T, 2 * h, dh});
    ops_.diff_v2_combine_forward(att4, z, combined);
    ops_.matmul(combined.view({N, qd}), false, L.wo, true, x, 1.0f, 1.0f);  // x += O Wo^T
  } else if (diff_) {
    Tensor q5 = q.view({B, T, h, 2, dh}), k5 = k.view({B, T, hkv, 2, dh}), v4 = v.view({B, T, hkv, 2 * dh});
    Tensor kc5 = kc.view({B, C, hkv, 2, dh}), vc4 = vc.view({B, C, hkv, 2 * dh});
    Tensor att4 = att.view({B, T, h, 2 * dh});
    ops_.cached_attention(q5, k5, v4, start, L.lambda, cfg_.rope_theta, kc5, vc4, att4);
    const double li = ModelConfig::lambda_init(l);
    Tensor att_rows = att.view({N * h, 2 * dh}), sub_rows = sub_.flat_slice(0, N * qd).view({N * h, 2 * dh});
    Tensor rstd_sub = rstd_sub_.flat_slice(0, N * h);
    ops_.rmsnorm_forward(att_rows, L.subln, cfg_.norm_eps, float(1.0 - li), sub_rows, rstd_sub);
    ops_.matmul(sub_rows.view({N, qd}), false, L.wo, true, x, 1.0f, 1.0f);  // x += O Wo^T
  } else {
    Tensor q4 = q.view({B, T, 2 * h, dh}), k4 = k.view({B, T, 2 * hkv, dh}), v4 = v.view({B, T, 2 * hkv, dh});
    Tensor kc4 = kc.view({B, C, 2 * hkv, dh}), vc4 = vc.view({B, C, 2 * hkv, dh});
    Tensor att4 = att.view({B, T, 2 * h, dh});
    ops_.cached_attention(q4, k4, v4, start, Tensor(), cfg_.rope_theta, kc4, vc4, att4);
    ops_.matmul(att.view({N, qd}), false, L.wo, true, x, 1.0f, 1.0f);
  }

  ops_.rmsnorm_forward(x, L.mlp_norm, cfg_.norm_eps, 1.0f, ln, rstd);
  Tensor gate, up;
  if (N == 1 && L.wgate_up.defined()) {
    Tensor gu = gate_up_.view({1, 2 * F});
    ops_.matmul(ln, false, L.wgate_up, true, gu);
    gate = gate_up_.flat_slice(0, F).view({1, F});
    up = gate_up_.flat_slice(F, F).view({1, F});
  } else {
    gate = gate_.flat_slice(0, N * F).view({N, F});
    up = up_.flat_slice(0, N * F).view({N, F});
    ops_.matmul(ln, false, L.w_gate, true, gate);
    ops_.matmul(ln, false, L.w_up, true, up);
  }
  Tensor a = act_.flat_slice(0, N * F).view({N, F});
  ops_.swiglu_forward(gate, up, a);
  ops_.matmul(a, false, L.w_down, true, x, 1.0f, 1.0f);  // x += act Wd^T
}

std::vector<float> Decoder::append(int64_t first, int64_t B, int64_t T, const int32_t* tokens) {
  if (first < 0 || B <= 0 || first + B > max_b_)
    throw_error("Decoder::append: sequences [", first, ", ", first + B, ") are outside [0, ", max_b_, ")");
  if (T <= 0) throw_error("Decoder::append: no tokens to append (T = ", T, ")");
  for (int64_t b = 0; b < B; ++b)
    if (len_[first + b] + T > max_len_)
      throw_error("Decoder::append: sequence ", first + b, " holds ", len_[first + b], " tokens; ", T,
                  " more exceed its capacity of ", max_len_);
  for (int64_t i = 0; i < B * T; ++i)
    if (tokens[i] < 0 || tokens[i] >= V_)
      throw_error("Decoder::append: token id ", tokens[i], " is outside the model's vocabulary [0, ", V_, ")");
  const int64_t d = cfg_.d_model;
  const int64_t chunk = std::max<int64_t>(1, max_rows_ / B);  // new tokens per sequence per pass
  std::vector<int32_t> rows, pos(B);
  int64_t Tc = 0;
  for (int64_t t0 = 0; t0 < T; t0 += Tc) {
    Tc = std::min(chunk, T - t0);
    const int64_t N = B * Tc;
    rows.resize(N);
    for (int64_t b = 0; b < B; ++b) {
      std::copy(tokens + b * T + t0, tokens + b * T + t0 + Tc, rows.begin() + b * Tc);
      pos[b] = int32_t(len_[first + b]);
    }
    Tensor tok = tokens_.flat_slice(0, N), start = start_.flat_slice(0, B);
    ops_.upload(tok, rows.data());
    ops_.upload(start, pos.data());
    Tensor x = x_.flat_slice(0, N * d).view({N, d});
    ops_.embedding_forward(tok, embed_, x);
    for (int64_t l = 0; l < cfg_.n_layers; ++l) layer(l, first, B, Tc);
    for (int64_t b = 0; b < B; ++b) len_[first + b] += Tc;
  }
  // the last new token of each sequence: rows b * Tc + Tc - 1 of x_
  Tensor last = last_.flat_slice(0, B * d).view({B, d});
  if (Tc == 1) {
    ops_.copy(x_.flat_slice(0, B * d), last);
  } else {
    for (int64_t b = 0; b < B; ++b) {
      Tensor dst = last_.flat_slice(b * d, d);
      ops_.copy(x_.flat_slice((b * Tc + Tc - 1) * d, d), dst);
    }
  }
  Tensor lnf = ln_.flat_slice(0, B * d).view({B, d}), rstd = rstd_.flat_slice(0, B);
  ops_.rmsnorm_forward(last, final_norm_, cfg_.norm_eps, 1.0f, lnf, rstd);
  Tensor logits = logits_.flat_slice(0, B * V_).view({B, V_});
  ops_.matmul(lnf, false, head_, true, logits);
  std::vector<float> out(B * V_);
  ops_.download(logits, out.data());
  return out;
}

int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& o, Rng& rng) {
  if (V <= 0) throw_error("sample_token: empty vocabulary");
  if (o.temperature <= 0) return int32_t(std::max_element(logits, logits + V) - logits);
  // candidates, most likely first (ties: the lower id first)
  std::vector<int32_t> idx(V);
  std::iota(idx.begin(), idx.end(), 0);
  auto more_likely = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  const int64_t k = o.top_k > 0 ? std::min<int64_t>(o.top_k, V) : V;
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), more_likely);
  std::vector<double> p(k);
  const double mx = logits[idx[0]];
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += p[i] = std::exp((double(logits[idx[i]]) - mx) / o.temperature);
  int64_t keep = k;
  if (o.top_p < 1.0) {  // the smallest prefix whose probability reaches top_p
    double cum = 0;
    keep = 0;
    while (keep < k && (keep == 0 || cum < o.top_p * sum)) cum += p[keep++];
    sum = cum;
  }
  double r = rng.uniform() * sum;
  int64_t i = 0;
  while (i + 1 < keep && (r -= p[i]) > 0) ++i;
  return idx[i];
}

GenerateResult generate(Decoder& decoder, const std::vector<std::vector<int32_t>>& prompts,
                        const GenerateOptions& o) {
  const int64_t n = int64_t(prompts.size()), V = decoder.vocab_size();
  if (n == 0) throw_error("generate: no prompts");
  if (n > decoder.max_batch())
    throw_error("generate: ", n, " prompts, more than the decoder's batch of ", decoder.max_batch());
  if (!o.stop_strings.empty() && !o.detokenize)
    throw_error("generate: stop strings need a tokenizer to turn tokens into text");
  for (int64_t i = 0; i < n; ++i) {
    if (prompts[i].empty()) throw_error("generate: prompt ", i, " is empty (give at least one token)");
    if (int64_t(prompts[i].size()) > decoder.max_len())
      throw_error("generate: prompt ", i, " has ", prompts[i].size(), " tokens, more than the context of ",
                  decoder.max_len());
  }
  decoder.reset();
  GenerateResult r;
  r.sequences.resize(n);
  std::vector<Rng> rngs;
  for (int64_t i = 0; i < n; ++i) rngs.emplace_back(o.seed + uint64_t(i));

  auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits(n * V);
  const bool same_length = std::all_of(prompts.begin(), prompts.end(),
                                       [&](const std::vector<int32_t>& p) { return p.size() == prompts[0].size(); });
  if (same_length) {
    const int64_t T = int64_t(prompts[0].size());
    std::vector<int32_t> flat;
    for (const auto& p : prompts) flat.insert(flat.end(), p.begin(), p.end());
    logits = decoder.append(0, n, T, flat.data());
  } else {
    for (int64_t i = 0; i < n; ++i) {
      std::vector<float> row = decoder.append(i, 1, int64_t(prompts[i].size()), prompts[i].data());
      std::copy(row.begin(), row.end(), logits.begin() + i * V);
    }
  }
  for (const auto& p : prompts) r.prompt_tokens += int64_t(p.size());
  r.prefill_seconds = seconds_since(t0);

  std::vector<bool> done(n, o.max_new_tokens <= 0);
  for (int64_t i = 0; i < n; ++i)
    if (done[i]) r.sequences[i].finish = "length";
  std::vector<int32_t> next(n, 0);
  while (true) {
    for (int64_t i = 0; i < n; ++i) {
      if (done[i]) continue;
      GeneratedSequence& s = r.sequences[i];
      const int32_t tok = sample_token(logits.data() + i * V, V, o.sampling, rngs[i]);
      s.tokens.push_back(tok);
      next[i] = tok;
      if (!o.stop_strings.empty()) {
        s.text = o.detokenize(s.tokens);
        size_t cut = std::string::npos;
        for (const std::string& stop : o.stop_strings)
          if (!stop.empty()) cut = std::min(cut, s.text.find(stop));
        if (cut != std::string::npos) {
          s.text.resize(cut);
          s.finish = "stop";
        }
      }
      if (s.finish.empty() && tok == o.eos) s.finish = "eos";
      if (s.finish.empty() && int64_t(s.tokens.size()) >= o.max_new_tokens) s.finish = "length";
      done[i] = !s.finish.empty();
    }
    if (std::all_of(done.begin(), done.end(), [](bool b) { return b; })) break;
    // the batch advances together: it ends when its longest sequence fills the context
    bool full = false;
    for (int64_t i = 0; i < n; ++i) full |= decoder.length(i) >= decoder.max_len();
    if (full) {
      for (int64_t i = 0; i < n; ++i)
        if (!done[i]) r.sequences[i].finish = "context";
      break;
    }
    auto t1 = std::chrono::steady_clock::now();
    logits = decoder.step(n, next.data());
    r.decode_seconds += seconds_since(t1);
    ++r.decode_steps;
  }
  for (auto& s : r.sequences) {
    r.generated_tokens += int64_t(s.tokens.size());
    if (o.detokenize && s.finish != "stop") s.text = o.detokenize(s.tokens);
  }
  return r;
}

}  // namespace difftron
