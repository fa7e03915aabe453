// Generation with a K/V cache (docs/GENERATION.md). A Decoder reads a Model's parameters and
// keeps, per layer, the rotated keys and the values of up to max_batch sequences, so that each
// new token costs one pass over the weights and one attention row per layer
// (Ops::cached_attention) instead of the whole context again (Model::last_logits).
// Sampling (greedy, temperature, top-k, top-p), stop tokens and stop strings sit on top.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/rng.h"
#include "core/model.h"

namespace difftron {

class Decoder {
 public:
  // Caches for max_batch sequences of up to max_len tokens each (prompt and generated;
  // at most the model's max_seq_len, the RoPE positions it was trained for), in the model's
  // activation dtype. Up to max_rows token rows go through the layers at once (prompts are
  // processed in chunks of max_rows / sequences). The model must be one process (TP 1); it
  // must outlive the decoder, and its parameters are read, not copied.
  Decoder(Model& model, int64_t max_batch, int64_t max_len, int64_t max_rows = 512);

  int64_t max_batch() const { return max_b_; }
  int64_t max_len() const { return max_len_; }
  int64_t vocab_size() const { return V_; }
  // Tokens held in sequence b's cache.
  int64_t length(int64_t b) const { return len_.at(b); }
  // Empties every sequence.
  void reset();

  // Appends T tokens to each of the sequences [first, first + B): tokens [B, T] row-major.
  // Returns the logits [B, V] of the last appended token of each (host, f32). Throws when a
  // sequence would exceed max_len or a token is outside the vocabulary.
  std::vector<float> append(int64_t first, int64_t B, int64_t T, const int32_t* tokens);
  // One token for each of the sequences [0, B): append(0, B, 1, tokens).
  std::vector<float> step(int64_t B, const int32_t* tokens) { return append(0, B, 1, tokens); }

 private:
  struct LayerRefs {
    Tensor attn_norm, wq, wk, wv, wo, subln, mlp_norm, w_gate, w_up, w_down;
    Tensor wqkv, wgate_up;  // wq|wk|wv and w_gate|w_up as one matrix where they are adjacent
    Tensor lambda;          // [1] stat (differential)
    Tensor k_cache, v_cache;  // [max_batch, max_len, kv_dim]
  };
  // N = B * T rows of x_ through layer l.
  void layer(int64_t l, int64_t first, int64_t B, int64_t T);

  Model& model_;
  Ops& ops_;
  ModelConfig cfg_;
  int64_t max_b_, max_len_, max_rows_, V_;
  bool diff_;
  std::vector<int64_t> len_;
  std::vector<LayerRefs> layers_;
  Tensor embed_, final_norm_, head_;
  Tensor tokens_, start_;                  // i32 [max_rows], [max_batch]
  Tensor x_, ln_, rstd_, q_, k_, v_, att_, sub_, rstd_sub_, qkv_, gate_, up_, act_, gate_up_;
  Tensor last_, logits_;                   // [max_batch, d], [max_batch, V]
};

// How the next token is chosen from logits.
struct SamplingOptions {
  double temperature = 1.0;  // <= 0: greedy (argmax; the lowest id among equal maxima)
  int64_t top_k = 0;         // > 0: only the k most likely tokens
  double top_p = 1.0;        // < 1: only the smallest set of most likely tokens whose
                             // probability (after temperature and top-k) reaches top_p
};

// Draws one token from logits [V]; uses rng only when sampling (temperature > 0).
int32_t sample_token(const float* logits, int64_t V, const SamplingOptions& o, Rng& rng);

struct GenerateOptions {
  int64_t max_new_tokens = 200;
  SamplingOptions sampling;
  uint64_t seed = 1;         // sequence i samples with Rng(seed + i): a prompt's output does
                             // not depend on the others in the batch
  int32_t eos = -1;          // stop after emitting this id; -1: never
  // Stop when the generated text contains one of these; needs `detokenize`. The text is
  // cut before the stop string.
  std::vector<std::string> stop_strings;
  std::function<std::string(const std::vector<int32_t>&)> detokenize;
};

struct GeneratedSequence {
  std::vector<int32_t> tokens;  // the generated ids (eos or the tokens of a stop string included)
  std::string text;             // their text (detokenize given), cut before a stop string
  std::string finish;           // "eos", "stop", "length" (max_new_tokens) or "context" (max_len)
};

struct GenerateResult {
  std::vector<GeneratedSequence> sequences;
  int64_t prompt_tokens = 0, generated_tokens = 0;  // generated: up to each sequence's finish
  int64_t decode_steps = 0;                          // batched steps after the prompt
  double prefill_seconds = 0, decode_seconds = 0;
};

// Generates for every prompt at once (prompts.size() <= decoder.max_batch(); each prompt
// non-empty). Prompts of equal length are processed together; otherwise one by one. Then
// every step feeds one token per sequence (finished ones are carried along, their tokens
// ignored) until all have finished. Resets the decoder first.
GenerateResult generate(Decoder& decoder, const std::vector<std::vector<int32_t>>& prompts,
                        const GenerateOptions& o);

}  // namespace difftron
