// Config validation, derived sizes, FLOP counts and the learning-rate schedule.
#include "core/config.h"

#include <cmath>
#include <sstream>

#include <nlohmann/json.hpp>

#include "base/error.h"

namespace difftron {

const char* attention_kind_name(AttentionKind k) {
  switch (k) {
    case AttentionKind::Differential: return "diff";
    case AttentionKind::Standard: return "standard";
    case AttentionKind::DifferentialV2: return "diff_v2";
  }
  return "?";
}

AttentionKind parse_attention_kind(const std::string& s) {
  if (s == "diff" || s == "differential") return AttentionKind::Differential;
  if (s == "standard" || s == "baseline") return AttentionKind::Standard;
  if (s == "diff_v2" || s == "differential_v2") return AttentionKind::DifferentialV2;
  throw_error("attention: unknown kind '", s, "' (expected 'diff', 'standard' or 'diff_v2')");
}

void ModelConfig::resolve_and_validate() {
  if (head_dim == 0 && n_heads > 0) {
    if (d_model % (2 * n_heads) != 0)
      throw_error("invalid model config: d_model (", d_model, ") must be divisible by 2 * n_heads (",
                  2 * n_heads, ") when head_dim is not given");
    head_dim = d_model / (2 * n_heads);
  }
  if (ffn_dim == 0) ffn_dim = ((8 * d_model / 3) + 127) / 128 * 128;
  auto p = problems();
  if (!p.empty()) {
    std::ostringstream os;
    os << "invalid model config:";
    for (auto& m : p) os << "\n  - " << m;
    throw Error(os.str());
  }
}

std::vector<std::string> ModelConfig::problems() const {
  std::vector<std::string> p;
  auto positive = [&](const char* name, int64_t v) {
    if (v <= 0) p.push_back(std::string(name) + " (" + std::to_string(v) + ") must be positive");
  };
  positive("vocab_size", vocab_size);
  positive("d_model", d_model);
  positive("n_layers", n_layers);
  positive("n_heads", n_heads);
  positive("n_kv_heads", n_kv_heads);
  positive("head_dim", head_dim);
  positive("ffn_dim", ffn_dim);
  positive("max_seq_len", max_seq_len);
  if (n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads != 0) {
    std::string m = "n_heads (" + std::to_string(n_heads) + ") must be a multiple of n_kv_heads (" +
                    std::to_string(n_kv_heads) + ")";
    // diff_v2's pairing rule: its 4h query heads share 2h_kv K/V heads in groups of 2h / h_kv
    // consecutive heads, and the two heads of a pair (2i, 2i + 1) must read the same K/V head;
    // that holds exactly when the groups are whole pairs, i.e. when h_kv divides h.
    if (attention == AttentionKind::DifferentialV2)
      m += ": diff_v2 subtracts query heads 2i and 2i + 1, which must lie in one K/V group, and its " +
           std::to_string(4 * n_heads) + " query heads over " + std::to_string(2 * n_kv_heads) +
           " K/V heads do not form whole pairs per group";
    p.push_back(m);
  }
  if (head_dim > 0 && head_dim % 2 != 0)
    p.push_back("head_dim (" + std::to_string(head_dim) + ") must be even (RoPE rotates pairs)");
  if (!(rope_theta > 0)) p.push_back("rope_theta (" + std::to_string(rope_theta) + ") must be > 0");
  if (!(norm_eps > 0)) p.push_back("norm_eps (" + std::to_string(norm_eps) + ") must be > 0");
  if (!(init_std > 0)) p.push_back("init_std (" + std::to_string(init_std) + ") must be > 0");
  if (!(lambda_std >= 0)) p.push_back("lambda_std (" + std::to_string(lambda_std) + ") must be >= 0");
  if (vocab_size > (int64_t(1) << 31) - 1)
    p.push_back("vocab_size (" + std::to_string(vocab_size) + ") must fit in int32");
  // Upper limits far beyond any model one can train, low enough that no size computed from
  // them (parameter counts, activation bytes) overflows int64.
  auto at_most = [&](const char* name, int64_t v, int64_t limit) {
    if (v > limit) p.push_back(std::string(name) + " (" + std::to_string(v) + ") must be at most " + std::to_string(limit));
  };
  at_most("d_model", d_model, int64_t(1) << 20);
  at_most("n_layers", n_layers, 10000);
  at_most("n_heads", n_heads, int64_t(1) << 16);
  at_most("n_kv_heads", n_kv_heads, int64_t(1) << 16);
  at_most("head_dim", head_dim, int64_t(1) << 16);
  at_most("ffn_dim", ffn_dim, int64_t(1) << 22);
  at_most("max_seq_len", max_seq_len, int64_t(1) << 24);
  return p;
}

double ModelConfig::lambda_init(int64_t layer) { return 0.8 - 0.6 * std::exp(-0.3 * double(layer)); }

int64_t ModelConfig::num_parameters() const {
  int64_t per_layer = 2 * d_model                               // two RMSNorm weights
                      + d_model * q_dim() + 2 * d_model * kv_dim()  // Wq, Wk, Wv
                      + q_dim() * d_model                           // Wo
                      + 3 * d_model * ffn_dim;                      // W1, W3, W2
  if (attention == AttentionKind::Differential) per_layer += 4 * head_dim + 2 * head_dim;
  // diff_v2: Wq twice as wide (4h query heads) and W_lambda [2h, d]
  if (attention == AttentionKind::DifferentialV2) per_layer += d_model * q_dim() + 2 * n_heads * d_model;
  int64_t total = n_layers * per_layer + d_model + vocab_size * d_model;
  if (!tie_embeddings) total += vocab_size * d_model;
  return total;
}

double ModelConfig::flops_per_token(int64_t seq) const {
  double dense = 6.0 * double(num_parameters() - num_embedding_parameters());
  // Per token and layer, forward: QK^T 2*q_dim*seq; PV 2*q_dim*seq (baseline) or
  // 4*q_dim*seq (two maps over a 2dh-wide V); diff_v2 twice the baseline's (4h query heads
  // of dh: QK^T and PV 4*q_dim*seq each). x3 for forward+backward, /2 for causal.
  // q_dim() = 2*h*dh, which is d_model in the usual layout.
  double attn_width = attention == AttentionKind::Differential     ? 6.0 * q_dim()
                      : attention == AttentionKind::DifferentialV2 ? 8.0 * q_dim()
                                                                   : 4.0 * q_dim();
  return dense + 3.0 * double(n_layers) * double(seq) * attn_width / 2.0;
}

std::string ModelConfig::summary() const {
  std::ostringstream os;
  os << attention_kind_name(attention) << " transformer: d=" << d_model << " L=" << n_layers
     << " h=" << n_heads << " h_kv=" << n_kv_heads << " dh=" << head_dim << " ffn=" << ffn_dim
     << " vocab=" << vocab_size << " seq=" << max_seq_len << " params=" << num_parameters();
  return os.str();
}

void to_json(nlohmann::json& j, const ModelConfig& c) {
  j = nlohmann::json{{"vocab_size", c.vocab_size}, {"d_model", c.d_model},
                     {"n_layers", c.n_layers},     {"n_heads", c.n_heads},
                     {"n_kv_heads", c.n_kv_heads}, {"head_dim", c.head_dim},
                     {"ffn_dim", c.ffn_dim},       {"max_seq_len", c.max_seq_len},
                     {"rope_theta", c.rope_theta}, {"norm_eps", c.norm_eps},
                     {"init_std", c.init_std},     {"lambda_std", c.lambda_std},
                     {"tie_embeddings", c.tie_embeddings},
                     {"attention", attention_kind_name(c.attention)}};
}

void from_json(const nlohmann::json& j, ModelConfig& c) {
  ModelConfig d;
  c.vocab_size = j.value("vocab_size", d.vocab_size);
  c.d_model = j.value("d_model", d.d_model);
  c.n_layers = j.value("n_layers", d.n_layers);
  c.n_heads = j.value("n_heads", d.n_heads);
  c.n_kv_heads = j.value("n_kv_heads", d.n_kv_heads);
  c.head_dim = j.value("head_dim", d.head_dim);
  c.ffn_dim = j.value("ffn_dim", d.ffn_dim);
  c.max_seq_len = j.value("max_seq_len", d.max_seq_len);
  c.rope_theta = j.value("rope_theta", d.rope_theta);
  c.norm_eps = j.value("norm_eps", d.norm_eps);
  c.init_std = j.value("init_std", d.init_std);
  c.lambda_std = j.value("lambda_std", d.lambda_std);
  c.tie_embeddings = j.value("tie_embeddings", d.tie_embeddings);
  c.attention = parse_attention_kind(j.value("attention", std::string("diff")));
}

LrSchedule parse_lr_schedule(const std::string& s) {
  if (s == "cosine") return LrSchedule::Cosine;
  if (s == "linear") return LrSchedule::Linear;
  if (s == "constant") return LrSchedule::Constant;
  throw_error("lr_schedule: unknown schedule '", s, "' (expected cosine, linear or constant)");
}

std::vector<std::string> OptimizerConfig::problems() const {
  std::vector<std::string> p;
  auto num = [](double v) { std::ostringstream os; os << v; return os.str(); };
  if (!(lr > 0)) p.push_back("lr (" + num(lr) + ") must be > 0");
  if (!(min_lr_ratio >= 0 && min_lr_ratio <= 1))
    p.push_back("min_lr_ratio (" + num(min_lr_ratio) + ") must be in [0, 1]");
  if (warmup_steps < 0) p.push_back("warmup_steps (" + std::to_string(warmup_steps) + ") must be >= 0");
  if (total_steps <= 0) p.push_back("total_steps (" + std::to_string(total_steps) + ") must be > 0");
  if (!(beta1 >= 0 && beta1 < 1)) p.push_back("beta1 (" + num(beta1) + ") must be in [0, 1)");
  if (!(beta2 >= 0 && beta2 < 1)) p.push_back("beta2 (" + num(beta2) + ") must be in [0, 1)");
  if (!(eps > 0)) p.push_back("eps (" + num(eps) + ") must be > 0");
  if (!(weight_decay >= 0)) p.push_back("weight_decay (" + num(weight_decay) + ") must be >= 0");
  return p;
}

void OptimizerConfig::validate() const {
  auto p = problems();
  if (p.empty()) return;
  std::ostringstream os;
  os << "invalid optimizer config:";
  for (auto& m : p) os << "\n  - " << m;
  throw Error(os.str());
}

double OptimizerConfig::lr_at(int64_t step) const {
  if (warmup_steps > 0 && step < warmup_steps) return lr * double(step + 1) / double(warmup_steps);
  if (schedule == LrSchedule::Constant) return lr;
  double min_lr = lr * min_lr_ratio;
  int64_t decay_steps = total_steps - warmup_steps;
  if (decay_steps <= 0 || step >= total_steps) return min_lr;
  double t = double(step - warmup_steps) / double(decay_steps);
  double f = schedule == LrSchedule::Cosine ? 0.5 * (1.0 + std::cos(M_PI * t)) : 1.0 - t;
  return min_lr + (lr - min_lr) * f;
}

}  // namespace difftron
