// `difftron eval`: mean loss, perplexity, bits per token and bits per byte of a checkpoint or
// a Hugging Face folder on a token dataset (difftron prepare), read in order from its first
// sample: the same tokens for every model, so checkpoints and exports compare directly.
// Bytes are those of the text the targets decode to with the dataset's tokenizer. Prints a
// summary line and one JSON line on stdout.
#include <cmath>
#include <cstdio>
#include <iostream>
#include <vector>

#include <gflags/gflags.h>
#include <glog/logging.h>
#include <nlohmann/json.hpp>

#include "io/dataset.h"
#include "io/tokenizer.h"
#include "launch/command.h"
#include "tools/inference.h"

DEFINE_int64(max_tokens, 0, "eval: evaluate at most about this many tokens, whole sequences (0: the whole dataset)");
DECLARE_string(data);   // launch/train.cpp
DECLARE_int64(seq);     // launch/train.cpp
DECLARE_int64(batch);   // launch/train.cpp

namespace difftron {
namespace {

bool flag_given(const char* name) {
  gflags::CommandLineFlagInfo info;
  return gflags::GetCommandLineFlagInfo(name, &info) && !info.is_default;
}

int eval_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (!flag_given("data") || FLAGS_data.rfind("synthetic:", 0) == 0)
    throw_error("--data: give a token dataset directory (difftron prepare); eval needs real text to count bytes");
  if (FLAGS_max_tokens < 0) throw_error("--max_tokens (", FLAGS_max_tokens, ") must be >= 0 (0: the whole dataset)");
  if (FLAGS_batch <= 0) throw_error("--batch (", FLAGS_batch, ") must be positive");
  std::unique_ptr<Ops> ops = make_ops_for_device();
  const int64_t want_seq = flag_given("seq") ? FLAGS_seq : 0;  // 0: the model's max_seq_len
  if (want_seq < 0) throw_error("--seq (", want_seq, ") must be positive");
  LoadedModel lm = load_model_for_inference(*ops, FLAGS_batch, want_seq > 0 ? want_seq : int64_t(1) << 40);
  const ModelConfig& cfg = lm.model->config();
  const int64_t S = want_seq > 0 ? want_seq : cfg.max_seq_len, B = FLAGS_batch;
  if (S > cfg.max_seq_len) throw_error("--seq (", S, ") is longer than the model's context (max_seq_len ", cfg.max_seq_len, ")");

  const int64_t data_vocab = dataset_vocab_size(FLAGS_data);
  if (data_vocab > cfg.vocab_size)
    throw_error("--data=", FLAGS_data, " has a vocabulary of ", data_vocab, " tokens, more than the model's ", cfg.vocab_size);
  const std::string spec = dataset_tokenizer_spec(FLAGS_data);
  std::unique_ptr<Tokenizer> tok = spec.empty() || spec == "none" ? nullptr : load_tokenizer(spec);
  if (!tok) LOG(WARNING) << FLAGS_data << " records no tokenizer: no bits per byte";
  DatasetOptions o;
  o.path = FLAGS_data;
  o.vocab_size = cfg.vocab_size;
  o.shuffle = false;
  std::unique_ptr<BatchSource> data = open_token_dataset(o);
  const int64_t dataset_tokens = nlohmann::json::parse(data->position()).value("dataset_tokens", int64_t(0));
  const int64_t samples = (dataset_tokens - 1) / S;  // sample p: tokens [p S, p S + S + 1)
  if (samples <= 0)
    throw_error("--data=", FLAGS_data, " holds ", dataset_tokens, " tokens: not one sequence of --seq=", S, " + 1");
  const int64_t n_seq = FLAGS_max_tokens > 0 ? std::min(samples, (FLAGS_max_tokens + S - 1) / S) : samples;
  LOG(INFO) << "evaluating " << lm.source << " on " << n_seq << " sequences of " << S << " tokens of " << data->describe();

  std::vector<int32_t> tokens(B * S), targets(B * S);
  double nats = 0;
  int64_t n_tokens = 0, n_bytes = 0;
  for (int64_t done = 0; done < n_seq;) {
    const int64_t nb = std::min(B, n_seq - done);
    data->next_batch(nb, S, tokens.data(), targets.data());
    int64_t valid = 0;
    std::vector<int32_t> text_ids;
    for (int64_t i = 0; i < nb * S; ++i)
      if (targets[i] >= 0) {
        ++valid;
        text_ids.push_back(targets[i]);
      }
    nats += lm.model->forward_loss(tokens.data(), targets.data(), nb, S) * double(valid);
    n_tokens += valid;
    if (tok) n_bytes += int64_t(tok->decode(text_ids).size());
    done += nb;
  }
  const double loss = n_tokens > 0 ? nats / double(n_tokens) : 0.0;
  const double bits = nats / std::log(2.0);
  nlohmann::json j;
  j["source"] = lm.source;
  j["data"] = FLAGS_data;
  j["seq"] = S;
  j["sequences"] = n_seq;
  j["tokens"] = n_tokens;
  j["loss"] = loss;
  j["perplexity"] = std::exp(loss);
  j["bits_per_token"] = n_tokens > 0 ? bits / double(n_tokens) : 0.0;
  if (tok) {
    j["bytes"] = n_bytes;
    j["bits_per_byte"] = n_bytes > 0 ? bits / double(n_bytes) : 0.0;
  } else {
    j["bytes"] = nullptr;
    j["bits_per_byte"] = nullptr;
  }
  char line[512];
  std::snprintf(line, sizeof line, "eval %s: %lld tokens (%lld x %lld), loss %.6f, perplexity %.4f, %.5f bits/token",
                lm.source.c_str(), (long long)n_tokens, (long long)n_seq, (long long)S, loss, std::exp(loss),
                n_tokens > 0 ? bits / double(n_tokens) : 0.0);
  std::cout << line;
  if (tok) {
    std::snprintf(line, sizeof line, ", %.5f bits/byte (%lld bytes)", n_bytes > 0 ? bits / double(n_bytes) : 0.0,
                  (long long)n_bytes);
    std::cout << line;
  }
  std::cout << "\n" << j.dump() << std::endl;
  return 0;
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("eval", "loss, perplexity and bits per byte of a checkpoint or Hugging Face folder on a dataset",
                 difftron::eval_main);
