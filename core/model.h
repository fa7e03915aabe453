// The Differential Transformer (DESIGN.md section 1) and the baseline Transformer, with a
// hand-written backward, written once against the op interface (kernels/ops.h) so the
// same code runs on the CPU reference and on the GPU. Parameters carry Hugging Face Llama
// names; the Q/K/V column order is difftron's interleaved layout (kernels/ops.h).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "kernels/ops.h"

namespace difftron {

// Which dtypes the model's tensors use. CPU: all f32 (training) or all f64 (gradient
// checks). The GPU's mixed precision is chosen by its backend.
struct ModelPrecision {
  DType param = DType::F32;  // working weights
  DType act = DType::F32;    // activations and their gradients
  DType grad = DType::F32;   // parameter gradients
  DType stat = DType::F32;   // rstd, lse, lambda, losses
  static ModelPrecision uniform(DType t) { return {t, t, t, t == DType::F64 ? DType::F64 : DType::F32}; }
  // GPU mixed precision: bf16 weights and activations, f32 gradients and statistics
  // (the optimizer keeps f32 master weights).
  static ModelPrecision cuda_mixed() { return {DType::BF16, DType::BF16, DType::F32, DType::F32}; }
};

struct Param {
  std::string name;  // e.g. "model.layers.0.self_attn.q_proj.weight"
  Tensor value;
  Tensor grad;
  bool is_matrix = false;  // projection / embedding matrices (candidates for weight decay)
  bool is_embedding = false;
};

class Model {
 public:
  // Allocates parameters, gradients and activations for up to max_batch x max_seq tokens.
  Model(const ModelConfig& config, Ops& ops, ModelPrecision precision, int64_t max_batch,
        int64_t max_seq);

  const ModelConfig& config() const { return cfg_; }
  Ops& ops() { return ops_; }
  const ModelPrecision& precision() const { return prec_; }
  int64_t max_batch() const { return max_b_; }
  int64_t max_seq() const { return max_s_; }
  std::vector<Param>& params() { return params_; }
  Param& param(const std::string& name);

  // Deterministic initialisation from `seed` (same values on every backend): matrices
  // N(0, init_std^2), output projections (o_proj, down_proj) N(0, (init_std/sqrt(2L))^2),
  // lambda vectors N(0, lambda_std^2), norm weights 1.
  void init_weights(uint64_t seed);
  void zero_grads();

  // One training micro-batch: forward, loss gradient, backward. tokens/targets are host
  // arrays [B, S]; targets < 0 are ignored. Parameter gradients ACCUMULATE (+=) the
  // gradient of grad_scale * mean-loss. Returns the mean loss over non-ignored targets.
  double forward_backward(const int32_t* tokens, const int32_t* targets, int64_t B, int64_t S,
                          float grad_scale = 1.0f);
  // Forward only: mean loss over non-ignored targets.
  double forward_loss(const int32_t* tokens, const int32_t* targets, int64_t B, int64_t S);
  // Forward only: logits [V] of the last position of a single sequence of S tokens.
  std::vector<float> last_logits(const int32_t* tokens, int64_t S);

  // Lambda of layer l from its current parameters (differential attention only).
  double lambda_value(int64_t layer);

 private:
  struct Layer {
    // parameters (indices into params_)
    int attn_norm, wq, wk, wv, wo, lq1, lk1, lq2, lk2, subln, mlp_norm, w_gate, w_up, w_down;
    // activations saved for backward
    Tensor x_in, ln1, rstd1, q, k, v, lambda, att, lse, sub, rstd_sub, x_mid, ln2, rstd2, gate,
        up, act;
  };

  Tensor& P(int idx) { return params_[idx].value; }
  Tensor& G(int idx) { return params_[idx].grad; }
  int add_param(const std::string& name, Shape shape, bool is_matrix, bool is_embedding = false);
  void check_batch(const int32_t* tokens, int64_t B, int64_t S) const;
  // Runs embedding + all layers + final norm for B x S tokens already in tokens_.
  void forward_body(int64_t B, int64_t S);
  void layer_forward(int64_t l, int64_t B, int64_t S);
  void layer_backward(int64_t l, int64_t B, int64_t S);
  // Loss (and, when grad_scale != 0, dL/d(final norm output) and the head's weight
  // gradient), chunk by chunk over rows so full logits are never stored.
  double head_loss(int64_t N, int64_t n_valid, bool backward, float grad_scale);
  const Tensor& head_weight();
  Tensor& head_grad();

  ModelConfig cfg_;
  Ops& ops_;
  ModelPrecision prec_;
  int64_t max_b_, max_s_;
  std::vector<Param> params_;
  int embed_ = -1, final_norm_ = -1, lm_head_ = -1;
  std::vector<Layer> layers_;

  // shared activations and scratch
  Tensor tokens_, targets_;        // i32 [N]
  Tensor x_final_, lnf_, rstdf_;   // [N, d], [N]
  Tensor dres_, dln_;              // [N, d]
  Tensor dsub_, datt_, dq_, dk_, dv_, dlambda_;
  Tensor dact_, dgate_, dup_;
  Tensor logits_, losses_, lse_head_;  // [chunk, V], [chunk]
  int64_t head_chunk_ = 0;
};

}  // namespace difftron
