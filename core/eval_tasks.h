// Evaluation tasks behind `difftron eval --task=...` (docs/EVAL.md): activation statistics
// (largest attention logits, hidden-state maxima and kurtosis per layer), loss under simulated
// low-bit quantisation of activations, and the multi-needle retrieval task (sequence
// generator and answer scoring). The first two observe a Model's forward pass through a
// ForwardProbe (core/model.h); they download the tensors they read to the host, so they work on
// every backend and are meant for a sample of a few sequences.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/model.h"

namespace difftron {

// ---- numerics ----------------------------------------------------------------------------

// Symmetric absmax fake quantisation of each row of x [rows, cols] to `bits` (2..16) in place:
// with m = max |x| of the row and q = 2^(bits-1) - 1, x := round(x * q / m) * m / q (a row of
// zeros stays zero). Rounding is to nearest, halves away from zero.
void fake_quantize_rows(float* x, int64_t rows, int64_t cols, int bits);

// Pearson kurtosis E[(x - mean)^4] / E[(x - mean)^2]^2 of n values (3 for a normal
// distribution); 0 when all values are equal.
double kurtosis(const float* x, int64_t n);

// The causal attention scores q.k / sqrt(dh) of every query head, from q and k as the model
// holds them after RoPE (ForwardProbe::attention), on the host. Layouts (kernels/ops.h): q is
// [B,S,H,dh] or V1's [B,S,h,2,dh] (then H = 2h, query head 2i+j is map j of diff head i and uses
// K head 2g+j, g = i / (h/h_kv)); k [B,S,H_kv,dh] or [B,S,h_kv,2,dh]; otherwise query head a
// uses K head a / (H/H_kv).
struct HostAttention {
  int64_t B = 0, S = 0, H = 0, H_kv = 0, dh = 0;
  bool differential = false;  // V1's interleaved maps
  std::vector<float> q, k;    // as downloaded
  HostAttention(Ops& ops, const Tensor& q, const Tensor& k);
  int64_t kv_head(int64_t a) const;
  // scores [t + 1] of query position t of sequence b, head a, against keys 0..t
  void scores(int64_t b, int64_t a, int64_t t, float* out) const;
};

// ---- activation statistics ---------------------------------------------------------------

struct LayerActivationStats {
  double max_attn_logit = 0;    // largest q.k / sqrt(dh) over heads and causal pairs (-inf: none seen)
  double hidden_max = 0;        // max |x| of the layer's output (residual stream)
  double hidden_kurtosis = 0;   // kurtosis of each token's d values, averaged over tokens
  int64_t tokens = 0;           // tokens seen
};

// Accumulates LayerActivationStats over forward passes while set as the model's probe.
class ActivationStatsProbe : public ForwardProbe {
 public:
  ActivationStatsProbe(Ops& ops, int64_t n_layers);
  bool attention(int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lambda,
                 Tensor& out) override;
  void layer_output(int64_t layer, const Tensor& x) override;
  // Per layer; hidden_kurtosis is the mean over the tokens seen so far.
  std::vector<LayerActivationStats> stats() const;

 private:
  Ops& ops_;
  std::vector<LayerActivationStats> stats_;  // hidden_kurtosis holds the running sum
};

// ---- simulated quantisation ----------------------------------------------------------------

// Fake-quantises (fake_quantize_rows, per token) the inputs of every linear layer of every
// layer (LinearInput: ln1, the attention output, ln2, the SwiGLU output) to `act_bits`
// (0: left alone), and with `logit_bits` > 0 also the attention logits: each query row's causal
// scores q.k / sqrt(dh) before the softmax (the attention is then computed on the host). The
// embedding and the LM head's input are not quantised; weights stay as they are.
class QuantizeProbe : public ForwardProbe {
 public:
  QuantizeProbe(Ops& ops, int act_bits, int logit_bits);
  void linear_input(int64_t layer, LinearInput site, Tensor& x) override;
  bool attention(int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lambda,
                 Tensor& out) override;

 private:
  Ops& ops_;
  int act_bits_, logit_bits_;
};

// ---- multi-needle retrieval ----------------------------------------------------------------

struct NeedleOptions {
  int64_t context_tokens = 512;  // the prompt's length in tokens, question included (about: see below)
  double depth = 0.5;            // where the queried needles stand, as a fraction of the filler
  int64_t needles = 6;           // N needles in the context
  int64_t queries = 2;           // R of them are asked for (the first R, together at `depth`)
  int digits = 7;                // digits of each magic number
  uint64_t seed = 1;
};

struct Needle {
  std::string city, number;
  std::string sentence;  // "The magic number of CITY is NUMBER. "
  int64_t offset = 0;    // byte offset of the sentence in the context
  double depth = 0;      // filler sentences before it / all filler sentences
  bool queried = false;
};

struct NeedleSample {
  std::string context;                      // filler with the needles inserted
  std::vector<Needle> needles;              // in the order they appear in the context
  std::vector<std::string> prompts;         // one per queried needle: context + question
  std::vector<std::string> answers;         // the numbers, in prompts' order
  std::vector<std::string> queried_cities;  // in prompts' order
  NeedleOptions options;
};

// The question asked after the context, and the answer's text that follows it.
std::string needle_question(const std::string& city);

// One sample: filler sentences (drawn with the seed) until the prompt would pass
// context_tokens as `count_tokens` measures each piece (pieces are counted apart, so a BPE
// prompt may differ from the target by a few tokens); the R queried needles together at the
// sentence boundary nearest `depth`, the N - R others at random boundaries; cities and numbers
// distinct within a sample.
NeedleSample make_needle_sample(const NeedleOptions& o, const std::function<int64_t(const std::string&)>& count_tokens);

// Whether generated text answers `number`: after leading spaces it starts with the number, not
// followed by another digit.
bool needle_answer_correct(const std::string& generated, const std::string& number);

}  // namespace difftron
