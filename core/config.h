// Model and optimizer configuration, validated up front. Validation collects every
// problem and reports them together, each naming the field and its value.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace difftron {

// Differential: V1 (Ye et al., ICLR 2025); Standard: the baseline; DifferentialV2: the
// authors' second version (docs/MODEL.md section 5).
enum class AttentionKind { Differential, Standard, DifferentialV2 };
const char* attention_kind_name(AttentionKind k);  // "diff" | "standard" | "diff_v2"
AttentionKind parse_attention_kind(const std::string& s);  // "diff" | "standard" | "diff_v2"

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t d_model = 128;
  int64_t n_layers = 2;
  int64_t n_heads = 2;       // h: differential heads (the baseline has 2h ordinary heads;
                             // diff_v2 2h output heads, each a pair of query heads)
  int64_t n_kv_heads = 2;    // h_kv: key/value groups, divides h (the baseline and diff_v2
                             // have 2h_kv K/V heads of dh)
  int64_t head_dim = 0;      // dh: per-map head width; 0 = d_model / (2 h)
  int64_t ffn_dim = 0;       // SwiGLU width; 0 = 8/3 d rounded up to a multiple of 128
  int64_t max_seq_len = 256;
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  double init_std = 0.02;
  double lambda_std = 0.1;   // std of lq1, lk1, lq2, lk2 at init
  bool tie_embeddings = false;
  AttentionKind attention = AttentionKind::Differential;

  // Fills head_dim / ffn_dim when 0, then checks; throws difftron::Error listing every problem.
  void resolve_and_validate();
  // Problems as messages, empty when valid (head_dim/ffn_dim must be resolved first).
  std::vector<std::string> problems() const;

  // Paper: lambda_init = 0.8 - 0.6 * exp(-0.3 * l), l the 0-based layer index.
  static double lambda_init(int64_t layer);

  int64_t q_dim() const { return 2 * n_heads * head_dim; }     // width of x Wq
  int64_t kv_dim() const { return 2 * n_kv_heads * head_dim; } // width of x Wk and of x Wv
  // Width of x Wq: q_dim(), or 2 q_dim() for diff_v2 (4h query heads of dh, in pairs).
  int64_t q_proj_dim() const { return attention == AttentionKind::DifferentialV2 ? 2 * q_dim() : q_dim(); }
  int64_t num_parameters() const;
  int64_t num_embedding_parameters() const { return vocab_size * d_model; }
  // Training FLOPs per token (docs/MODEL.md section 4) at sequence length `seq`.
  double flops_per_token(int64_t seq) const;
  std::string summary() const;
};

void to_json(nlohmann::json& j, const ModelConfig& c);
void from_json(const nlohmann::json& j, ModelConfig& c);

enum class LrSchedule { Cosine, Linear, Constant };
LrSchedule parse_lr_schedule(const std::string& s);

struct OptimizerConfig {
  double lr = 1e-3;
  double min_lr_ratio = 0.1;  // final lr = lr * min_lr_ratio
  int64_t warmup_steps = 0;
  int64_t total_steps = 1000;
  LrSchedule schedule = LrSchedule::Cosine;
  double beta1 = 0.9;
  double beta2 = 0.98;
  double eps = 1e-8;
  double weight_decay = 0.05;
  bool decay_embeddings = false;  // embeddings / LM head get weight decay
  bool decay_norms = false;       // RMSNorm weights, sub-layer norm weights, lambda vectors
  double grad_clip = 1.0;         // global-norm clip; <= 0 disables

  std::vector<std::string> problems() const;
  void validate() const;  // throws difftron::Error listing every problem
  // Learning rate at 0-based step `step`: linear warm-up over warmup_steps, then decay
  // to lr * min_lr_ratio at total_steps (cosine or linear), constant afterwards.
  double lr_at(int64_t step) const;
};

}  // namespace difftron
