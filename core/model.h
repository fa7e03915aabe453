// The Differential Transformer (docs/MODEL.md; V1 and V2) and the baseline Transformer, with a
// hand-written backward, written once against the op interface (kernels/ops.h) so the
// same code runs on the CPU reference and on the GPU. Parameters carry Hugging Face Llama
// names; the Q/K/V column order is difftron's interleaved layout (kernels/ops.h).
// Tensor parallelism (Megatron style, docs/PARALLEL.md): a TP rank holds whole
// differential heads, a slice of the SwiGLU width and a slice of the vocabulary; the
// sums across ranks go through the Communicator interface (parallel/comm.h).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/config.h"
#include "base/tensor.h"
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
  Tensor value;      // views of the model's flat buffers (Model::flat_values / flat_grads)
  Tensor grad;
  bool is_matrix = false;  // projection / embedding matrices (candidates for weight decay)
  bool is_embedding = false;
  // Tensor parallelism: this rank holds [shard_begin, shard_begin + value.dim(shard_dim))
  // of dimension shard_dim of the full tensor `full_shape`; shard_dim = -1: the whole
  // tensor, the same on every TP rank.
  Shape full_shape;
  int shard_dim = -1;
  int64_t shard_begin = 0;
  // The gradient each TP rank computes is its part of a sum over TP (lambda vectors and
  // the sub-layer norm weight see only the rank's heads); summed when gradients sync.
  bool tp_partial_grad = false;
  int64_t flat_offset = 0;  // element offset in the flat buffers
};

// Activation recomputation: what the forward keeps for the backward, and what the backward
// computes again (docs/MODEL.md, "Recomputation").
//   None:      every layer keeps all its activations.
//   Selective: a layer keeps the GEMMs' and the attention's outputs; the cheap element-wise
//              ones (the two RMSNorm outputs, the sub-layer norm output, the SwiGLU product)
//              are recomputed in the backward: no GEMM runs twice.
//   Full:      a layer keeps only its input; the backward runs the layer's forward again
//              (all but the last GEMM) into one shared set of buffers.
enum class Recompute { None, Selective, Full };
// "none" | "selective" | "full"; throws naming the value otherwise.
Recompute parse_recompute(const std::string& name);
const char* recompute_name(Recompute r);

class Communicator;

// How this model instance is split across ranks (built from a ParallelContext, see
// parallel/grid.h). The default is one process.
struct ModelParallel {
  Communicator* tp = nullptr;       // the TP group on the model's memory; null = TP 1
  Communicator* tp_host = nullptr;  // the same group on host memory (loss statistics)
  // The flat parameter / gradient buffers' size is padded to a multiple of this (ZeRO
  // shards them over DP: 64 x DP keeps every shard 64-element aligned).
  int64_t flat_multiple = 64;
};

// Observes a forward pass for evaluation (core/eval_tasks.h: activation statistics, simulated
// quantisation). Model::set_probe; with none set the forward pass does no extra work. Called
// from forward passes only (forward_loss, last_logits; forward_backward's first pass too, but a
// probe that alters tensors there makes the gradients those of another model). Tensors are the
// model's own (its device and dtype), this rank's slices under TP.
enum class LinearInput {
  AttnNorm,    // ln1 [N, d]: the input of q_proj, k_proj, v_proj (and V2's lambda_proj)
  AttnOutput,  // [N, q_dim]: the input of o_proj (V1: after the sub-layer norm; V2: after the
               // pairwise subtraction; baseline: the attention output)
  MlpNorm,     // ln2 [N, d]: the input of gate_proj and up_proj
  MlpAct,      // silu(gate) * up [N, F]: the input of down_proj
};
const char* linear_input_name(LinearInput site);

struct ForwardProbe {
  virtual ~ForwardProbe() = default;
  // Before the linear layers of `layer` at `site` read x; x may be modified in place.
  virtual void linear_input(int64_t layer, LinearInput site, Tensor& x) {}
  // Before layer `layer`'s attention: q and k after RoPE, v, in the layouts of kernels/ops.h
  // (V1: q [B,S,h,2,dh], k [B,S,h_kv,2,dh], v [B,S,h_kv,2dh], lambda [1]; baseline and V2:
  // q [B,S,H,dh], k and v [B,S,H_kv,dh], lambda undefined). Returns true when it has written
  // `out` itself ([B,S,h,2dh] or [B,S,H,dh], as the attention op would): the model then skips
  // its attention op (and leaves lse unwritten: no backward may follow).
  virtual bool attention(int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lambda,
                         Tensor& out) {
    return false;
  }
  // x [N, d]: the residual stream after layer `layer` (its output, the next layer's input).
  virtual void layer_output(int64_t layer, const Tensor& x) {}
};

class ParallelContext;
// How a Model on a TP x DP grid is split: the grid's TP communicators, and flat buffers padded
// so that ZeRO's DP shards stay 64-element aligned.
ModelParallel model_parallel(ParallelContext& ctx);

class Model {
 public:
  // Allocates parameters, gradients and activations for up to max_batch x max_seq tokens.
  // With `parallel.tp` of size T the config must have h, h_kv and ffn_dim divisible by T
  // (checked, with the values in the message). The vocabulary is padded (padded_vocab):
  // parameters hold the real rows only; the padding rows live in the flat buffers after
  // them, stay zero, and their logits are kept out of the loss and of last_logits.
  Model(const ModelConfig& config, Ops& ops, ModelPrecision precision, int64_t max_batch,
        int64_t max_seq, ModelParallel parallel = {}, Recompute recompute = Recompute::None);

  const ModelConfig& config() const { return cfg_; }
  Ops& ops() { return ops_; }
  const ModelPrecision& precision() const { return prec_; }
  int64_t max_batch() const { return max_b_; }
  int64_t max_seq() const { return max_s_; }
  Recompute recompute() const { return recompute_; }
  std::vector<Param>& params() { return params_; }
  Param& param(const std::string& name);
  // Every parameter's value / gradient lives in these 1-D buffers (in params() order, each
  // at Param::flat_offset, 64-element aligned; the padding stays zero).
  const Tensor& flat_values() const { return flat_values_; }
  const Tensor& flat_grads() const { return flat_grads_; }
  int tp_size() const { return tp_size_; }
  int tp_rank() const { return tp_rank_; }

  // Deterministic initialisation from `seed` (same values on every backend): matrices
  // N(0, init_std^2), output projections (o_proj, down_proj) N(0, (init_std/sqrt(2L))^2),
  // lambda vectors N(0, lambda_std^2), norm weights 1. Under TP each rank takes its slice
  // of the full tensors, so every TP size starts from the same weights.
  void init_weights(uint64_t seed);
  void zero_grads();

  // One training micro-batch: forward, loss gradient, backward. tokens/targets are host
  // arrays [B, S]; targets < 0 are ignored. Parameter gradients ACCUMULATE (+=) the
  // gradient of grad_scale * mean-loss. Returns the mean loss over non-ignored targets.
  // Every TP rank passes the same tokens.
  double forward_backward(const int32_t* tokens, const int32_t* targets, int64_t B, int64_t S,
                          float grad_scale = 1.0f);
  // Forward only: mean loss over non-ignored targets.
  double forward_loss(const int32_t* tokens, const int32_t* targets, int64_t B, int64_t S);
  // Forward only: logits [V] of the last position of a single sequence of S tokens.
  std::vector<float> last_logits(const int32_t* tokens, int64_t S);

  // Gradient synchronisation, for data parallelism and gradient accumulation. When on
  // (the default), forward_backward treats its micro-batch as the step's last: it sums the
  // TP-partial gradients over TP, and as backward completes the gradients of params()[k..]
  // (k decreasing) it calls the hook with params()[k].flat_offset, so that a data-parallel
  // reduction can start while the rest of backward runs. Turn it off for earlier
  // micro-batches of a step.
  void set_grad_sync(bool on) { grad_sync_ = on; }
  bool grad_sync() const { return grad_sync_; }
  void set_grads_ready_hook(std::function<void(int64_t flat_offset)> hook) { grads_ready_ = std::move(hook); }

  // Lets the backend keep its saved attention state between forward and backward (the fused
  // CUDA kernels keep O2n in bf16: about 15% off the attention backward, one more [N, q_dim]
  // bf16 activation per layer; the CPU keeps nothing). On by default (the constructor turns it
  // on); off saves that memory, and the backward then recomputes what it needs. The gradients
  // agree to bf16 rounding either way (dlambda is summed from recomputed f32 values in both,
  // docs/PERFORMANCE.md). Forward-only users (generation) may turn it off.
  void keep_attention_state(bool on);

  // The vocabulary the embedding and the LM head are computed with: `vocab` rounded up so
  // that each of `tp` ranks holds an equal slice, a multiple of 64 rows where that leaves
  // every rank a real row. Checkpoints and exports keep the real rows only.
  static int64_t padded_vocab(int64_t vocab, int tp);

  // Rows of logits the LM head computes at once for `rows` tokens and a (local) vocabulary of
  // `vocab_cols` columns (the plan tool sizes memory with it).
  static int64_t head_chunk_rows(int64_t rows, int64_t vocab_cols);

  // The probe forward passes report to (null: none). Not owned; it must outlive its use.
  void set_probe(ForwardProbe* probe) { probe_ = probe; }

  // Lambda of layer l from its current parameters (differential attention V1 only; V2's
  // lambda depends on the token).
  double lambda_value(int64_t layer);

 private:
  struct LayerParams {  // indices into params_
    int attn_norm, wq, wk, wv, wo, lq1, lk1, lq2, lk2, subln, mlp_norm, w_gate, w_up, w_down;
    int wlambda;  // diff_v2's lambda projection (-1 otherwise)
  };
  struct LayerActivations {  // what the forward leaves for the backward
    Tensor attn_saved;  // the backend's saved attention state (Ops::diff_attention_saved_numel)
    Tensor x_in, ln1, rstd1, q, k, v, lambda, att, lse, sub, rstd_sub, x_mid, ln2, rstd2, gate, up, act;
    Tensor lam_logits;  // diff_v2: z = ln1 W_lambda^T [N, 2h] (sub holds the subtracted pairs)
  };
  // Under recomputation some activations of every layer are views of one shared buffer
  // (Recompute: which ones), written again by the backward before it reads them.
  struct Layer : LayerParams, LayerActivations {};

  Tensor& P(int idx) { return params_[idx].value; }
  Tensor& G(int idx) { return params_[idx].grad; }
  // Declares a parameter of full shape `full`, of which this rank holds the slice along
  // `shard_dim` (-1: whole); storage comes later from allocate_flat().
  // vocab_rows >= 0: a vocabulary matrix; this rank holds that many real rows of its slice.
  int add_param(const std::string& name, Shape full, bool is_matrix, bool is_embedding = false,
                int shard_dim = -1, bool tp_partial_grad = false, int64_t vocab_rows = -1);
  void allocate_flat(int64_t multiple);
  // Sums `t` over the TP group (no-op for TP 1).
  void tp_all_reduce(Tensor& t);
  // Gradients of params()[first..] are final (grad sync on): TP-partial sums, then the hook.
  void grads_ready(int first_param);
  // Uploads tokens and targets; under TP as ids local to this rank's vocabulary slice
  // (tokens elsewhere -> the zero row V_, targets elsewhere -> -1).
  void upload_batch(const int32_t* tokens, const int32_t* targets, int64_t N);
  // The embedding or LM head with its padding rows (and, under TP, the zero row that follows
  // them in the flat buffers): [Vh_, d] views of the value (grad = false) or gradient of
  // params()[idx].
  Tensor vocab_rows(int idx, bool grad);
  // Parallel cross-entropy of one row chunk (TP > 1): returns the summed loss of its valid
  // rows; leaves the global log-sum-exp in lse_global_ for the backward.
  double parallel_ce_chunk(int64_t r0, int64_t rows);
  void check_batch(const int32_t* tokens, int64_t B, int64_t S) const;
  // Runs embedding + all layers + final norm for B x S tokens already in tokens_.
  void forward_body(int64_t B, int64_t S);
  // recompute: the backward's second pass under Recompute::Full (everything the layer's
  // backward reads; the layer's output, already in the next layer's input, is not written).
  void layer_forward(int64_t l, int64_t B, int64_t S, bool recompute = false);

  void layer_backward(int64_t l, int64_t B, int64_t S);
  // The activations of one layer for max_batch x max_seq tokens; with `elementwise`, its
  // ln1, ln2, sub and act are those views (Recompute::Selective).
  LayerActivations allocate_activations(const LayerActivations* elementwise);
  // This layer's saved attention state for a B x S batch (undefined when the backend keeps none).
  Tensor attn_saved(const Layer& L, const Tensor& q);
  // Loss (and, when grad_scale != 0, dL/d(final norm output) and the head's weight
  // gradient), chunk by chunk over rows so full logits are never stored.
  double head_loss(int64_t N, int64_t n_valid, bool backward, float grad_scale);
  // [Vh_, d]: the LM head (or the tied embedding), with its zero row under TP.
  Tensor head_weight();
  Tensor head_grad();

  ModelConfig cfg_;
  Ops& ops_;
  ModelPrecision prec_;
  int64_t max_b_, max_s_;
  ModelParallel par_;
  Recompute recompute_;
  int tp_size_ = 1, tp_rank_ = 0;
  // This rank's share: diff heads, K/V groups, SwiGLU width, padded vocabulary rows
  // [vocab_begin_, +V_), of which the first vocab_rows_ are real.
  int64_t h_ = 0, hkv_ = 0, F_ = 0, V_ = 0, vocab_begin_ = 0, vocab_rows_ = 0;
  int64_t q_dim_ = 0, kv_dim_ = 0;  // local widths of o_proj's input and of x Wk^T
  int64_t qp_dim_ = 0;              // local width of x Wq^T (q_dim_, or 2 q_dim_ for diff_v2)
  bool grad_sync_ = true;
  ForwardProbe* probe_ = nullptr;
  std::function<void(int64_t)> grads_ready_;
  int ready_from_ = 0;  // params()[ready_from_..] have been handed over in this backward
  std::vector<Param> params_;
  Tensor flat_values_, flat_grads_;
  int embed_ = -1, final_norm_ = -1, lm_head_ = -1;
  std::vector<Layer> layers_;

  // shared activations and scratch
  Tensor tokens_, targets_;        // i32 [N] (TP > 1: ids local to this rank's vocabulary slice)
  std::vector<int32_t> targets_host_;  // the batch's global targets
  // TP > 1: the head's logits have Vh_ = V_ + 1 columns; the last, a dummy, is the target of
  // rows whose target lies in another rank's slice, so that the cross-entropy ops need no
  // notion of slices. It and the padding columns are pushed to -1e30 (ones_ x col_mask_
  // added after the GEMM): no probability, no gradient.
  int64_t Vh_ = 0;
  Tensor lse_global_;              // [chunk] log-sum-exp over the whole vocabulary
  Tensor ones_, col_mask_;         // [chunk, 1], [1, Vh_]
  Tensor x_final_, lnf_, rstdf_;   // [N, d], [N]
  Tensor dres_, dln_;              // [N, d]
  Tensor dsub_, datt_, dq_, dk_, dv_, dlambda_;
  Tensor dlam_logits_;             // diff_v2: [N, 2h]
  Tensor dact_, dgate_, dup_;
  Tensor logits_, losses_, lse_head_;  // [chunk, Vh_], [chunk]
  int64_t head_chunk_ = 0;
};

}  // namespace difftron
