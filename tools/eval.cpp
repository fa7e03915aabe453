// `difftron eval`: what a checkpoint or a Hugging Face folder does on a task (docs/EVAL.md).
//   --task=loss (the default): mean loss, perplexity, bits per token and bits per byte on a
//     token dataset (difftron prepare), read in order from its first sample: the same tokens for
//     every model, so checkpoints and exports compare directly. Bytes are those of the text the
//     targets decode to with the dataset's tokenizer.
//   --task=activations: per layer, the largest attention logit, the largest |hidden state| and
//     the hidden states' kurtosis over a sample of the dataset.
//   --task=quant: the loss of that sample with every linear layer's input fake-quantised to each
//     of --bits (and with --quant_logits the attention logits too), next to the float loss.
//   --task=needles: multi-needle retrieval accuracy on a task file of `difftron needles`, by
//     greedy generation of each queried number.
//   --task=noise: on the same task file, per layer, the attention the prompt's last token gives
//     to the queried needle's sentence (the answer span) and to the rest of the prompt (noise).
// Prints a table and one JSON line per result on stdout.
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <vector>

#include <gflags/gflags.h>
#include <glog/logging.h>
#include <nlohmann/json.hpp>

#include "core/decode.h"
#include "core/eval_tasks.h"
#include "io/dataset.h"
#include "io/tokenizer.h"
#include "launch/command.h"
#include "tools/inference.h"

DEFINE_string(task, "loss", "eval: loss | activations | quant | needles | noise (docs/EVAL.md)");
DEFINE_int64(max_tokens, 0,
             "eval: evaluate at most about this many tokens, whole sequences (0: the whole dataset for --task=loss, "
             "8 sequences for activations and quant); --task=noise: the needle prompts, in file order, up to this "
             "many tokens (at least one prompt; 0: all)");
DEFINE_string(bits, "8,6,4", "eval --task=quant: the activation bit widths to simulate, comma-separated");
DEFINE_bool(quant_logits, false, "eval --task=quant: also fake-quantise the attention logits (each query row) to the same bits");
DEFINE_string(needles_file, "", "eval --task=needles|noise: the task file written by `difftron needles`");
DECLARE_string(data);   // launch/train.cpp
DECLARE_int64(seq);     // launch/train.cpp
DECLARE_int64(batch);   // launch/train.cpp

namespace difftron {
namespace {

bool flag_given(const char* name) {
  gflags::CommandLineFlagInfo info;
  return gflags::GetCommandLineFlagInfo(name, &info) && !info.is_default;
}

// Logs how far a long task has come, with an estimate of the time left, at most every 10 s.
class Progress {
 public:
  Progress(std::string what, int64_t total) : what_(std::move(what)), total_(total) {}
  void done(int64_t n) {
    const auto now = Clock::now();
    if (n >= total_ || now - last_ < std::chrono::seconds(10)) return;
    last_ = now;
    const double spent = std::chrono::duration<double>(now - start_).count();
    LOG(INFO) << what_ << ": " << n << "/" << total_ << " after " << int64_t(spent) << " s, about "
              << int64_t(spent / double(n) * double(total_ - n)) << " s left";
  }

 private:
  using Clock = std::chrono::steady_clock;
  std::string what_;
  int64_t total_;
  Clock::time_point start_ = Clock::now(), last_ = Clock::now();
};

std::vector<int> parse_bits(const std::string& list) {
  std::vector<int> bits;
  std::stringstream ss(list);
  for (std::string item; std::getline(ss, item, ',');) {
    const std::optional<long long> b = parse_whole<long long>(item);
    if (!b || *b < 2 || *b > 16)
      throw_error("--bits: '", item, "' is not a bit width in [2, 16] (give e.g. --bits=8,6,4)");
    bits.push_back(int(*b));
  }
  if (bits.empty()) throw_error("--bits is empty (give e.g. --bits=8,6,4)");
  return bits;
}

// The dataset's sequences in order, and the loss of a model over them.
struct DatasetSample {
  std::unique_ptr<BatchSource> data;
  std::unique_ptr<Tokenizer> tok;  // null: none recorded (no bits per byte)
  int64_t S = 0, B = 0, n_seq = 0;

  struct Loss {
    double nats = 0;
    int64_t tokens = 0, bytes = 0;
    double mean() const { return tokens > 0 ? nats / double(tokens) : 0.0; }
  };
  // Every sequence of the sample through model.forward_loss (the dataset is read again from
  // its first sample each time).
  Loss loss(Model& model) {
    std::vector<int32_t> tokens(B * S), targets(B * S);
    Loss out;
    data->restore_position(start_);
    Progress progress("sequences", n_seq);
    for (int64_t done = 0; done < n_seq; progress.done(done)) {
      const int64_t nb = std::min(B, n_seq - done);
      data->next_batch(nb, S, tokens.data(), targets.data());
      int64_t valid = 0;
      std::vector<int32_t> text_ids;
      for (int64_t i = 0; i < nb * S; ++i)
        if (targets[i] >= 0) {
          ++valid;
          text_ids.push_back(targets[i]);
        }
      out.nats += model.forward_loss(tokens.data(), targets.data(), nb, S) * double(valid);
      out.tokens += valid;
      if (tok) out.bytes += int64_t(tok->decode(text_ids).size());
      done += nb;
    }
    return out;
  }
  std::string start_;
};

// Opens --data for a model: sequences of --seq (default: the model's context), the first
// --max_tokens of them (default_sequences when not given; 0: all).
DatasetSample open_sample(const ModelConfig& cfg, int64_t S, int64_t default_sequences) {
  DatasetSample d;
  const int64_t data_vocab = dataset_vocab_size(FLAGS_data);
  if (data_vocab > cfg.vocab_size)
    throw_error("--data=", FLAGS_data, " has a vocabulary of ", data_vocab, " tokens, more than the model's ", cfg.vocab_size);
  const std::string spec = dataset_tokenizer_spec(FLAGS_data);
  d.tok = spec.empty() || spec == "none" ? nullptr : load_tokenizer(spec);
  DatasetOptions o;
  o.path = FLAGS_data;
  o.vocab_size = cfg.vocab_size;
  o.shuffle = false;
  d.data = open_token_dataset(o);
  d.start_ = d.data->position();
  const int64_t dataset_tokens = nlohmann::json::parse(d.start_).value("dataset_tokens", int64_t(0));
  const int64_t samples = (dataset_tokens - 1) / S;  // sample p: tokens [p S, p S + S + 1)
  if (samples <= 0)
    throw_error("--data=", FLAGS_data, " holds ", dataset_tokens, " tokens: not one sequence of --seq=", S, " + 1");
  d.S = S;
  d.B = FLAGS_batch;
  const int64_t limit = FLAGS_max_tokens > 0 ? (FLAGS_max_tokens + S - 1) / S : default_sequences;
  d.n_seq = limit > 0 ? std::min(samples, limit) : samples;
  LOG(INFO) << "evaluating on " << d.n_seq << " sequences of " << S << " tokens of " << d.data->describe();
  return d;
}

void print_line(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void print_line(const char* fmt, ...) {
  char line[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(line, sizeof line, fmt, args);
  va_end(args);
  std::cout << line << "\n";
}

int loss_task(const LoadedModel& lm, DatasetSample& d) {
  if (!d.tok) LOG(WARNING) << FLAGS_data << " records no tokenizer: no bits per byte";
  const DatasetSample::Loss r = d.loss(*lm.model);
  const double loss = r.mean(), bits = r.nats / std::log(2.0);
  nlohmann::json j;
  j["source"] = lm.source;
  j["data"] = FLAGS_data;
  j["seq"] = d.S;
  j["sequences"] = d.n_seq;
  j["tokens"] = r.tokens;
  j["loss"] = loss;
  j["perplexity"] = std::exp(loss);
  j["bits_per_token"] = r.tokens > 0 ? bits / double(r.tokens) : 0.0;
  if (d.tok) {
    j["bytes"] = r.bytes;
    j["bits_per_byte"] = r.bytes > 0 ? bits / double(r.bytes) : 0.0;
  } else {
    j["bytes"] = nullptr;
    j["bits_per_byte"] = nullptr;
  }
  char line[512];
  std::snprintf(line, sizeof line, "eval %s: %lld tokens (%lld x %lld), loss %.6f, perplexity %.4f, %.5f bits/token",
                lm.source.c_str(), (long long)r.tokens, (long long)d.n_seq, (long long)d.S, loss, std::exp(loss),
                r.tokens > 0 ? bits / double(r.tokens) : 0.0);
  std::cout << line;
  if (d.tok) {
    std::snprintf(line, sizeof line, ", %.5f bits/byte (%lld bytes)", r.bytes > 0 ? bits / double(r.bytes) : 0.0,
                  (long long)r.bytes);
    std::cout << line;
  }
  std::cout << "\n" << j.dump() << std::endl;
  return 0;
}

int activations_task(const LoadedModel& lm, DatasetSample& d) {
  Model& model = *lm.model;
  ActivationStatsProbe probe(model.ops(), model.config().n_layers);
  model.set_probe(&probe);
  const DatasetSample::Loss r = d.loss(model);
  model.set_probe(nullptr);
  const std::vector<LayerActivationStats> stats = probe.stats();
  print_line("activations of %s: %lld tokens (%lld x %lld), attention %s", lm.source.c_str(), (long long)r.tokens,
             (long long)d.n_seq, (long long)d.S, attention_kind_name(model.config().attention));
  print_line("%5s  %16s  %12s  %15s", "layer", "max attn logit", "max |hidden|", "hidden kurtosis");
  nlohmann::json all_layers = nlohmann::json::array();
  for (size_t l = 0; l < stats.size(); ++l) {
    const LayerActivationStats& s = stats[l];
    print_line("%5zu  %16.4f  %12.4f  %15.4f", l, s.max_attn_logit, s.hidden_max, s.hidden_kurtosis);
    nlohmann::json j;
    j["task"] = "activations";
    j["source"] = lm.source;
    j["layer"] = l;
    j["max_attn_logit"] = s.max_attn_logit;
    j["hidden_max"] = s.hidden_max;
    j["hidden_kurtosis"] = s.hidden_kurtosis;
    j["tokens"] = s.tokens;
    std::cout << j.dump() << "\n";
    all_layers.push_back(j);
  }
  double top_logit = -INFINITY, top_hidden = 0, kurt = 0;
  for (const auto& s : stats) {
    top_logit = std::max(top_logit, s.max_attn_logit);
    top_hidden = std::max(top_hidden, s.hidden_max);
    kurt += s.hidden_kurtosis / double(stats.size());
  }
  print_line("%5s  %16.4f  %12.4f  %15.4f", "all", top_logit, top_hidden, kurt);
  nlohmann::json j;
  j["task"] = "activations";
  j["source"] = lm.source;
  j["layer"] = "all";
  j["max_attn_logit"] = top_logit;
  j["hidden_max"] = top_hidden;
  j["hidden_kurtosis"] = kurt;  // mean over layers
  j["tokens"] = r.tokens;
  j["data"] = FLAGS_data;
  j["seq"] = d.S;
  j["sequences"] = d.n_seq;
  std::cout << j.dump() << std::endl;
  return 0;
}

int quant_task(const LoadedModel& lm, DatasetSample& d) {
  Model& model = *lm.model;
  const std::vector<int> bits = parse_bits(FLAGS_bits);
  const double base = d.loss(model).mean();
  print_line("quantised loss of %s: %lld x %lld tokens, per-token absmax fake quantisation of every linear layer's "
             "input%s",
             lm.source.c_str(), (long long)d.n_seq, (long long)d.S, FLAGS_quant_logits ? " and the attention logits" : "");
  print_line("%6s  %10s  %10s", "bits", "loss", "delta");
  print_line("%6s  %10.6f  %10.6f", "float", base, 0.0);
  auto emit = [&](const std::string& b, double loss) {
    nlohmann::json j;
    j["task"] = "quant";
    j["source"] = lm.source;
    j["bits"] = b;
    j["quant_logits"] = FLAGS_quant_logits;
    j["loss"] = loss;
    j["float_loss"] = base;
    j["delta"] = loss - base;
    j["seq"] = d.S;
    j["sequences"] = d.n_seq;
    std::cout << j.dump() << "\n";
  };
  emit("float", base);
  for (int b : bits) {
    QuantizeProbe probe(model.ops(), b, FLAGS_quant_logits ? b : 0);
    model.set_probe(&probe);
    const double loss = d.loss(model).mean();
    model.set_probe(nullptr);
    print_line("%6d  %10.6f  %10.6f", b, loss, loss - base);
    emit(std::to_string(b), loss);
  }
  std::cout << std::flush;
  return 0;
}

// The queries of a `difftron needles` task file, in file order.
struct NeedleQuery {
  std::string prompt, answer, city, group;
  int64_t line = 0;
  bool has_span = false;  // files written before the spans were added have none
  std::pair<int64_t, int64_t> span;
};
struct NeedleFile {
  std::vector<NeedleQuery> queries;
  std::vector<std::string> group_order;
  std::map<std::string, nlohmann::json> group_info;
};

NeedleFile read_needles_file() {
  if (FLAGS_needles_file.empty()) throw_error("--needles_file: give the task file of `difftron needles`");
  std::ifstream f(FLAGS_needles_file);
  if (!f) throw_error("--needles_file=", FLAGS_needles_file, ": cannot open");
  NeedleFile nf;
  int64_t line_no = 0;
  for (std::string line; std::getline(f, line);) {
    ++line_no;
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      throw_error("--needles_file=", FLAGS_needles_file, " line ", line_no, ": not JSON (", e.what(), ")");
    }
    if (!j.contains("prompts") || !j.contains("answers") || j["prompts"].size() != j["answers"].size())
      throw_error("--needles_file=", FLAGS_needles_file, " line ", line_no, ": needs prompts and answers of equal length");
    const size_t n = j["prompts"].size();
    const bool has_cities = j.contains("cities") && j["cities"].size() == n;
    const bool has_spans = j.contains("spans") && j["spans"].size() == n;
    char key[128];
    std::snprintf(key, sizeof key, "ctx %lld depth %.2f N %lld R %lld", (long long)j.value("context_tokens", 0),
                  j.value("depth", 0.0), (long long)j.value("needles", 0), (long long)j.value("queries", 0));
    if (!nf.group_info.count(key)) {
      nf.group_order.push_back(key);
      nf.group_info[key] = {{"context_tokens", j.value("context_tokens", 0)}, {"depth", j.value("depth", 0.0)},
                            {"needles", j.value("needles", 0)}, {"queries", j.value("queries", 0)}};
    }
    try {
      for (size_t i = 0; i < n; ++i) {
        NeedleQuery q;
        q.prompt = j["prompts"][i].get<std::string>();
        q.answer = j["answers"][i].get<std::string>();
        q.city = has_cities ? j["cities"][i].get<std::string>() : "";
        q.group = key;
        q.line = line_no;
        if (has_spans) {
          q.has_span = true;
          q.span = {j["spans"][i].at(0).get<int64_t>(), j["spans"][i].at(1).get<int64_t>()};
        }
        nf.queries.push_back(std::move(q));
      }
    } catch (const nlohmann::json::exception& e) {
      throw_error("--needles_file=", FLAGS_needles_file, " line ", line_no, ": ", e.what());
    }
  }
  if (nf.queries.empty()) throw_error("--needles_file=", FLAGS_needles_file, " holds no task");
  return nf;
}

int needles_task(const LoadedModel& lm) {
  if (!lm.tokenizer) throw_error(lm.source, " records no tokenizer: the needle task is text");
  const NeedleFile nf = read_needles_file();
  struct Query {
    std::vector<int32_t> prompt;
    std::string answer, group;
  };
  std::vector<Query> queries;
  const std::vector<std::string>& group_order = nf.group_order;
  std::map<std::string, nlohmann::json> group_info = nf.group_info;
  int64_t longest = 0, answer_chars = 0;
  const ModelConfig& cfg = lm.model->config();
  for (const NeedleQuery& nq : nf.queries) {
    Query q{lm.tokenizer->encode(nq.prompt), nq.answer, nq.group};
    longest = std::max<int64_t>(longest, int64_t(q.prompt.size()));
    answer_chars = std::max<int64_t>(answer_chars, int64_t(q.answer.size()));
    queries.push_back(std::move(q));
  }
  GenerateOptions o;
  o.max_new_tokens = answer_chars + 2;  // a token holds at least one character
  o.sampling.temperature = 0;           // greedy
  o.detokenize = [&](const std::vector<int32_t>& ids) { return lm.tokenizer->decode(ids); };
  if (longest + o.max_new_tokens > cfg.max_seq_len)
    throw_error("--needles_file=", FLAGS_needles_file, ": a prompt has ", longest, " tokens; with ", o.max_new_tokens,
                " to generate that passes the model's context (max_seq_len ", cfg.max_seq_len, ")");
  const int64_t batch = std::max<int64_t>(1, FLAGS_batch);
  Decoder decoder(*lm.model, batch, longest + o.max_new_tokens);
  std::map<std::string, std::pair<int64_t, int64_t>> score;  // group -> (correct, total)
  int64_t correct = 0;
  for (size_t first = 0; first < queries.size(); first += size_t(batch)) {
    const size_t n = std::min(queries.size() - first, size_t(batch));
    std::vector<std::vector<int32_t>> prompts;
    for (size_t i = 0; i < n; ++i) prompts.push_back(queries[first + i].prompt);
    const GenerateResult r = generate(decoder, prompts, o);
    for (size_t i = 0; i < n; ++i) {
      const Query& q = queries[first + i];
      const bool ok = needle_answer_correct(r.sequences[i].text, q.answer);
      VLOG(1) << q.group << ": expected " << q.answer << ", generated '" << r.sequences[i].text << "'";
      score[q.group].first += ok;
      score[q.group].second += 1;
      correct += ok;
    }
  }
  print_line("needle retrieval of %s (%s): greedy answers, %zu queries", lm.source.c_str(), FLAGS_needles_file.c_str(),
             queries.size());
  print_line("%-40s  %8s  %8s", "group", "correct", "accuracy");
  for (const std::string& g : group_order) {
    const auto [c, t] = score[g];
    print_line("%-40s  %4lld/%-3lld  %8.3f", g.c_str(), (long long)c, (long long)t, double(c) / double(t));
    nlohmann::json j = group_info[g];
    j["task"] = "needles";
    j["source"] = lm.source;
    j["correct"] = c;
    j["total"] = t;
    j["accuracy"] = double(c) / double(t);
    std::cout << j.dump() << "\n";
  }
  print_line("%-40s  %4lld/%-3zu  %8.3f", "all", (long long)correct, queries.size(),
             double(correct) / double(queries.size()));
  nlohmann::json j;
  j["task"] = "needles";
  j["source"] = lm.source;
  j["group"] = "all";
  j["correct"] = correct;
  j["total"] = queries.size();
  j["accuracy"] = double(correct) / double(queries.size());
  std::cout << j.dump() << std::endl;
  return 0;
}

// The answer span of a needle query in tokens: the file's byte span (checked against the
// needle's text) or, in files written before spans were recorded, the sentence found in the
// prompt by its city and number.
std::pair<int64_t, int64_t> needle_span_tokens(const Tokenizer& tok, const NeedleQuery& q, const std::vector<int32_t>& ids) {
  const std::string where = "--needles_file=" + FLAGS_needles_file + " line " + std::to_string(q.line);
  std::pair<int64_t, int64_t> bytes;
  try {
    if (q.has_span) {
      bytes = q.span;
      const std::string want = needle_span_text(q.city, q.answer);
      if (q.city.empty() || bytes.first < 0 || bytes.second > int64_t(q.prompt.size()) ||
          q.prompt.compare(size_t(bytes.first), size_t(bytes.second - bytes.first), want) != 0 ||
          bytes.second - bytes.first != int64_t(want.size()))
        throw_error("the span [", bytes.first, ", ", bytes.second, ") is not the needle '", want, "' in its prompt");
    } else {
      if (q.city.empty())
        throw_error("no spans and no cities: a file of an older `difftron needles`; write it again with this one");
      bytes = find_needle_span(q.prompt, q.city, q.answer);
    }
    const auto decode_one = [&tok](int32_t id) { return tok.decode({id}); };
    return tokens_covering(token_byte_offsets(decode_one, ids, q.prompt), bytes.first, bytes.second);
  } catch (const Error& e) {
    throw_error(where, ": ", e.what());
  }
  return {};
}

int noise_task(const LoadedModel& lm) {
  if (!lm.tokenizer) throw_error(lm.source, " records no tokenizer: the needle task is text");
  const NeedleFile nf = read_needles_file();
  Model& model = *lm.model;
  const ModelConfig& cfg = model.config();
  struct Query {
    std::vector<int32_t> ids;
    std::pair<int64_t, int64_t> span;
  };
  std::vector<Query> queries;
  int64_t tokens = 0;
  for (const NeedleQuery& nq : nf.queries) {
    Query q;
    q.ids = lm.tokenizer->encode(nq.prompt);
    if (FLAGS_max_tokens > 0 && !queries.empty() && tokens + int64_t(q.ids.size()) > FLAGS_max_tokens) break;
    if (int64_t(q.ids.size()) > model.max_seq())
      throw_error("--needles_file=", FLAGS_needles_file, " line ", nq.line, ": a prompt of ", q.ids.size(),
                  " tokens is longer than the model's context (max_seq_len ", cfg.max_seq_len, ")");
    q.span = needle_span_tokens(*lm.tokenizer, nq, q.ids);
    tokens += int64_t(q.ids.size());
    queries.push_back(std::move(q));
  }
  LOG(INFO) << "attention noise: " << queries.size() << " of " << nf.queries.size() << " prompts, " << tokens
            << " tokens, one forward pass each";
  AttentionNoiseProbe probe(model);
  model.set_probe(&probe);
  Progress progress("prompts", int64_t(queries.size()));
  for (size_t i = 0; i < queries.size(); ++i) {
    const Query& q = queries[i];
    const int64_t S = int64_t(q.ids.size());
    probe.set_query(S - 1, q.span.first, q.span.second);
    model.last_logits(q.ids.data(), S);
    progress.done(int64_t(i) + 1);
  }
  model.set_probe(nullptr);
  const std::vector<LayerNoiseStats> stats = probe.stats();
  const int64_t heads = stats.empty() || queries.empty() ? 0 : stats[0].rows / int64_t(queries.size());
  print_line("attention noise of %s (%s): %zu prompts (%lld tokens), attention %s, %lld output heads; the prompt's last "
             "token's effective attention row: answer = the queried needle's sentence, noise = the rest of the prompt",
             lm.source.c_str(), FLAGS_needles_file.c_str(), queries.size(), (long long)tokens,
             attention_kind_name(cfg.attention), (long long)heads);
  print_line("%5s  %10s  %10s  %10s  %10s  %14s", "layer", "answer", "noise", "|noise|", "row sum", "answer/|noise|");
  auto emit = [&](const nlohmann::json& layer, const LayerNoiseStats& s) {
    nlohmann::json j;
    j["task"] = "noise";
    j["source"] = lm.source;
    j["attention"] = attention_kind_name(cfg.attention);
    j["layer"] = layer;
    j["answer"] = s.answer;
    j["noise"] = s.noise;
    j["noise_abs"] = s.noise_abs;
    j["row_sum"] = s.row_sum;
    j["ratio"] = s.ratio();
    j["prompts"] = queries.size();
    j["heads"] = heads;
    if (!layer.is_number()) {
      j["needles_file"] = FLAGS_needles_file;
      j["tokens"] = tokens;
    }
    std::cout << j.dump() << "\n";
  };
  LayerNoiseStats all;
  for (size_t l = 0; l < stats.size(); ++l) {
    const LayerNoiseStats& s = stats[l];
    print_line("%5zu  %10.6f  %10.6f  %10.6f  %10.6f  %14.4f", l, s.answer, s.noise, s.noise_abs, s.row_sum, s.ratio());
    emit(l, s);
    const double n = double(stats.size());
    all.answer += s.answer / n;
    all.noise += s.noise / n;
    all.noise_abs += s.noise_abs / n;
    all.row_sum += s.row_sum / n;
    all.rows += s.rows;
  }
  print_line("%5s  %10.6f  %10.6f  %10.6f  %10.6f  %14.4f", "all", all.answer, all.noise, all.noise_abs, all.row_sum,
             all.ratio());
  emit("all", all);
  std::cout << std::flush;
  return 0;
}

int eval_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  const std::string task = FLAGS_task;
  if (task != "loss" && task != "activations" && task != "quant" && task != "needles" && task != "noise")
    throw_error("--task (", task, ") must be loss, activations, quant, needles or noise");
  if (FLAGS_max_tokens < 0) throw_error("--max_tokens (", FLAGS_max_tokens, ") must be >= 0 (0: the whole dataset)");
  if (FLAGS_batch <= 0) throw_error("--batch (", FLAGS_batch, ") must be positive");
  std::unique_ptr<Ops> ops = make_ops_for_device();
  if (task == "needles") {  // the decoder reads the weights only
    LoadedModel lm = load_model_for_inference(*ops, 1, 1);
    return needles_task(lm);
  }
  if (task == "noise") {  // one prompt per forward pass, up to the model's context
    LoadedModel lm = load_model_for_inference(*ops, 1, int64_t(1) << 40);
    return noise_task(lm);
  }
  if (!flag_given("data") || FLAGS_data.rfind("synthetic:", 0) == 0)
    throw_error("--data: give a token dataset directory (difftron prepare); eval needs real text to count bytes");
  if (task == "quant") parse_bits(FLAGS_bits);  // refused before the model loads
  const int64_t want_seq = flag_given("seq") ? FLAGS_seq : 0;  // 0: the model's max_seq_len
  if (want_seq < 0) throw_error("--seq (", want_seq, ") must be positive");
  LoadedModel lm = load_model_for_inference(*ops, FLAGS_batch, want_seq > 0 ? want_seq : int64_t(1) << 40);
  const ModelConfig& cfg = lm.model->config();
  const int64_t S = want_seq > 0 ? want_seq : cfg.max_seq_len;
  if (S > cfg.max_seq_len) throw_error("--seq (", S, ") is longer than the model's context (max_seq_len ", cfg.max_seq_len, ")");
  DatasetSample d = open_sample(cfg, S, task == "loss" ? 0 : 8);
  LOG(INFO) << "task " << task << " of " << lm.source;
  if (task == "activations") return activations_task(lm, d);
  if (task == "quant") return quant_task(lm, d);
  return loss_task(lm, d);
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("eval",
                 "loss, perplexity and bits per byte of a checkpoint or Hugging Face folder on a dataset; activation "
                 "statistics, quantised loss, needle retrieval (--task)",
                 difftron::eval_main);
