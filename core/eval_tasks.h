// Evaluation tasks behind `difftron eval --task=...` (docs/EVAL.md): activation statistics
// (largest attention logits, hidden-state maxima and kurtosis per layer), loss under simulated
// low-bit quantisation of activations, and the multi-needle retrieval task (sequence
// generator and answer scoring). The first two observe a Model's forward pass through a
// ForwardProbe (core/model.h); they download the tensors they read to the host, so they work on
// every backend and are meant for a sample of a few sequences. The attention-noise probe
// measures, on the needle task, how much of the query position's (effective) attention row goes
// to the answer's sentence and how much to the rest of the prompt.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/model.h"

namespace difftron {

// ---- host threads --------------------------------------------------------------------------

// The threads the probes' host work runs on: set_host_threads(n), n >= 1; 0 (the default):
// std::thread::hardware_concurrency() capped at 32. Results do not depend on it: the work is cut
// into independent pieces, each computed in the single-threaded order, and reduced in a fixed
// order.
int host_threads();
void set_host_threads(int n);
// Calls fn(i) once for every i in [0, n), on up to host_threads() threads (dynamically
// scheduled); fn must write only what piece i owns. The first exception is rethrown here.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

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
  // softmax of those scores, in f64 (p [t + 1])
  void probabilities(int64_t b, int64_t a, int64_t t, double* p) const;
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

// ---- attention noise on the needle task ----------------------------------------------------

// Per layer: what the effective attention rows of the query position give to the answer span
// and to the rest of the context, as means over (sequence, output head). Effective row of an
// output head: baseline, its softmax row; V1, A1 - lambda A2 of a differential head (before the
// sub-layer norm); V2, A[2i] - sigmoid(z_i) A[2i+1] with z_i of the query token.
struct LayerNoiseStats {
  double answer = 0;     // sum of the row over the answer span (signed)
  double noise = 0;      // sum over every other position 0..t (signed)
  double noise_abs = 0;  // sum of |row| over those positions
  double row_sum = 0;    // answer + noise: 1 (baseline), 1 - lambda (V1), 1 - sigmoid(z) (V2)
  int64_t rows = 0;      // (sequence, output head) rows averaged
  // mean answer / mean noise_abs (0 when there is no noise)
  double ratio() const { return noise_abs > 0 ? answer / noise_abs : 0.0; }
};

// Accumulates LayerNoiseStats over forward passes of one sequence (B = 1) each, while set as the
// model's probe: before each pass set_query names the query position and the answer's tokens.
// The maps are computed on the host in f64 from q and k as the model holds them (and V1's lambda
// as the model passes it; V2's z = ln1 W_lambda^T of the query token, in f64 from ln1 and the
// lambda_proj weights); the model's own attention runs unchanged.
class AttentionNoiseProbe : public ForwardProbe {
 public:
  explicit AttentionNoiseProbe(Model& model);
  // The next pass: query position t, answer span tokens [span_begin, span_end) (within 0..t).
  void set_query(int64_t t, int64_t span_begin, int64_t span_end);
  void linear_input(int64_t layer, LinearInput site, Tensor& x) override;
  bool attention(int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lambda,
                 Tensor& out) override;
  // Per layer, means over the rows seen.
  std::vector<LayerNoiseStats> stats() const;
  // The effective rows [t + 1] of each output head of the last pass's layer `layer`.
  const std::vector<std::vector<double>>& last_rows(int64_t layer) const { return last_rows_.at(layer); }

 private:
  Model& model_;
  AttentionKind kind_;
  int64_t t_ = -1, span_begin_ = 0, span_end_ = 0;
  std::vector<LayerNoiseStats> sums_;
  std::vector<std::vector<float>> w_lambda_;  // V2: [2h, d] per layer
  std::vector<double> ln1_row_;               // V2: ln1 of the query token, this layer
  std::vector<std::vector<std::vector<double>>> last_rows_;
};

// Byte offsets of tokens: offsets[i] is the length of the text before token i (ids.size() + 1
// values), from each token's own decoding (`decode_one`: a tokenizer's decode of one id; io/
// sits above core, so the caller passes it); throws when the pieces do not make up `text`.
std::vector<int64_t> token_byte_offsets(const std::function<std::string(int32_t)>& decode_one,
                                        const std::vector<int32_t>& ids, const std::string& text);
// The tokens [first, last) whose bytes overlap the byte range [begin, end) (begin < end).
std::pair<int64_t, int64_t> tokens_covering(const std::vector<int64_t>& offsets, int64_t begin, int64_t end);
// The needle sentence as the answer span counts it: "The magic number of CITY is NUMBER."
// (Needle::sentence without its trailing space).
std::string needle_span_text(const std::string& city, const std::string& number);
// Its byte range [begin, end) in a prompt; throws unless it occurs exactly once.
std::pair<int64_t, int64_t> find_needle_span(const std::string& prompt, const std::string& city, const std::string& number);

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
  // in prompts' order: the byte range [begin, end) of the queried needle's needle_span_text in
  // the context (and so in its prompt)
  std::vector<std::pair<int64_t, int64_t>> spans;
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
