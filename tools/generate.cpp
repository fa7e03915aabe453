// `difftron generate`: text (or token ids) from a checkpoint or a Hugging Face folder, with a
// K/V cache (core/decode.h, docs/GENERATION.md): batched prompts (--prompt repeated,
// --prompts_file, or --prompt_ids with ';' between prompts), greedy / temperature / top-k /
// top-p sampling, eos and stop strings, on the CPU or the GPU. Reports prompt and decode
// tokens per second (stderr; with --json, one JSON line on stdout).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

#include <gflags/gflags.h>
#include <glog/logging.h>
#include <nlohmann/json.hpp>

#include "core/decode.h"
#include "io/checkpoint.h"
#include "io/hf_diffllama.h"
#include "io/hf_export.h"
#include "io/tokenizer.h"
#include "launch/command.h"
#include "launch/host_memory.h"
#include "tools/inference.h"
#include "core/plan.h"

DEFINE_string(checkpoint, "", "a checkpoint directory, or a --ckpt_dir root (its latest checkpoint)");
DEFINE_string(prompt, "The", "prompt text (encoded with the model's tokenizer); generate: repeat the flag for a "
              "batch of prompts");
DEFINE_string(prompt_ids, "", "prompt as comma-separated token ids (instead of --prompt); generate: several "
              "prompts separated by ';'");
DEFINE_string(prompts_file, "", "generate: a file of prompts, one per line (empty lines skipped), generated as one batch");
DEFINE_int64(max_new_tokens, 200, "tokens to generate");
DEFINE_double(top_p, 1.0, "generate: sample from the smallest set of most likely tokens whose probability "
              "reaches top_p (1: all)");
DEFINE_string(stop, "", "generate: stop when the text contains this string (repeat the flag for several)");
DEFINE_bool(ignore_eos, false, "generate: do not stop at the tokenizer's eos (benchmarks: always max_new_tokens)");
DEFINE_int32(warmup_runs, 0, "generate: untimed runs of the same generation before the reported one (benchmarks)");
DEFINE_bool(json, false, "generate: also print the result as one JSON line on stdout");
DECLARE_double(temperature);
DECLARE_int64(top_k);
DECLARE_uint64(seed);
DECLARE_string(device);
DECLARE_string(from_hf);  // tools/convert.cpp

namespace difftron {

std::string resolve_checkpoint_dir(const std::string& path) {
  if (path.empty()) throw_error("--checkpoint is required");
  std::ifstream meta(path + "/meta.json");
  if (meta) return path;
  std::string latest = latest_checkpoint(path);
  if (latest.empty()) throw_error("--checkpoint: '", path, "' is neither a checkpoint nor a root holding one");
  return latest;
}

namespace {

constexpr int64_t kMaxNewTokens = 1000000;

}  // namespace

// The model's config comes from a file (a checkpoint's meta.json, a DiffLlama config.json):
// refuse, before allocating anything, one whose host memory need is more than 90% of what
// is available, rather than ending in bad_alloc or the OOM killer. Need: the parameters in
// f32 (read on the host whatever the device); on the CPU also their gradient buffer and the
// activations of one sequence of `seq` tokens (the model allocates both up front).
void check_model_fits_host(const ModelConfig& cfg, bool on_cpu, int64_t seq, const std::string& source) {
  PlanInput in;
  in.cfg = cfg;
  in.seq = seq;
  in.micro_batch = 1;
  in.param_bytes = in.act_bytes = in.grad_bytes = in.stat_bytes = 4;
  const Plan p = make_plan(in);
  const double params = double(p.params_total) * 4;
  const double work = on_cpu ? p.grad_bytes + p.activation_bytes : 0;
  const double avail = host_memory_available();
  if (avail > 0 && params + work > 0.9 * avail) {
    const double gib = 1024.0 * 1024.0 * 1024.0;
    char msg[512];
    std::snprintf(msg, sizeof msg,
                  "the model of %s needs about %.1f GiB of host memory (%lld parameters x 4 bytes = %.1f GiB, "
                  "plus %.1f GiB of working memory), more than 90%% of the %.1f GiB available (MemAvailable)",
                  source.c_str(), (params + work) / gib, (long long)p.params_total, params / gib, work / gib,
                  avail / gib);
    throw Error(msg);
  }
}

LoadedModel load_model_for_inference(Ops& ops, int64_t max_batch, int64_t max_seq) {
  LoadedModel m;
  ModelConfig cfg;
  const bool from_hf = !FLAGS_from_hf.empty();
  if (from_hf && !FLAGS_checkpoint.empty()) throw_error("give --checkpoint or --from_hf, not both");
  if (from_hf) {
    m.source = FLAGS_from_hf;
    cfg = read_hf_config(m.source);
  } else {
    m.source = resolve_checkpoint_dir(FLAGS_checkpoint);
    cfg = read_checkpoint_config(m.source);
  }
  const bool on_cpu = ops.device() == Device::CPU;
  check_model_fits_host(cfg, on_cpu, std::min(max_seq, cfg.max_seq_len), m.source);
  const ModelPrecision prec = on_cpu ? ModelPrecision::uniform(DType::F32) : ModelPrecision::cuda_mixed();
  m.model = std::make_unique<Model>(cfg, ops, prec, max_batch, std::min(max_seq, cfg.max_seq_len));
  m.model->keep_attention_state(false);  // forward only: no backward to keep state for
  std::string spec;
  if (from_hf) {
    import_hf_model(m.source, *m.model);
    std::string why;
    spec = tokenizer_spec_from_hf(m.source, &why);
    if (spec.empty()) LOG(WARNING) << m.source << ": no tokenizer difftron reads (" << why << ")";
  } else {
    CheckpointMeta meta = load_checkpoint(m.source, *m.model, nullptr);
    spec = meta.extra.value("tokenizer", std::string());
    // train records "bytes" or the tokenizer.json text; anything else load_tokenizer would open
    // as a path, which a crafted meta.json could point anywhere.
    const size_t first = spec.find_first_not_of(" \t\r\n");
    if (!spec.empty() && spec != "bytes" && (first == std::string::npos || spec[first] != '{'))
      throw_error(m.source, "/meta.json: its tokenizer is neither \"bytes\" nor tokenizer.json text ('",
                  spec.substr(0, 200), "'); refusing to open it as a file");
    LOG(INFO) << "loaded " << m.source << " (step " << meta.step << ")";
  }
  if (!spec.empty()) m.tokenizer = load_tokenizer(spec);
  return m;
}

std::unique_ptr<Ops> make_ops_for_device() {
  if (FLAGS_device != "cpu" && FLAGS_device != "cuda" && FLAGS_device != "auto")
    throw_error("--device (", FLAGS_device, ") must be cpu, cuda or auto");
  return (FLAGS_device == "cuda" || (FLAGS_device == "auto" && cuda_available())) ? make_cuda_ops(0) : make_cpu_ops();
}

namespace {

// Every value of a string flag given several times (gflags keeps only the last):
// --name=value and --name value, with one or two dashes.
std::vector<std::string> repeated_flag(int argc, char** argv, const std::string& name) {
  std::vector<std::string> values;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--") break;
    if (a.rfind("--", 0) == 0)
      a = a.substr(2);
    else if (a.rfind("-", 0) == 0)
      a = a.substr(1);
    else
      continue;
    if (a.rfind(name + "=", 0) == 0)
      values.push_back(a.substr(name.size() + 1));
    else if (a == name && i + 1 < argc)
      values.push_back(argv[++i]);
  }
  return values;
}

std::vector<int32_t> parse_ids(const std::string& list, int64_t vocab) {
  std::vector<int32_t> ids;
  std::stringstream ss(list);
  for (std::string item; std::getline(ss, item, ',');) {
    const std::optional<long long> id = parse_whole<long long>(item);
    // An id outside the vocabulary would index past the embedding table.
    if (!id || *id < 0 || *id >= vocab)
      throw_error("--prompt_ids: '", item, "' is not a token id in [0, ", vocab, ") (the model's vocabulary)");
    ids.push_back(int32_t(*id));
  }
  return ids;
}

int generate_main(int argc, char** argv) {
  const std::vector<std::string> prompt_flags = repeated_flag(argc, argv, "prompt");
  const std::vector<std::string> stop_flags = repeated_flag(argc, argv, "stop");
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (FLAGS_max_new_tokens < 0 || FLAGS_max_new_tokens > kMaxNewTokens)
    throw_error("--max_new_tokens (", FLAGS_max_new_tokens, ") must be in [0, ", kMaxNewTokens, "]");
  if (!std::isfinite(FLAGS_temperature))
    throw_error("--temperature (", FLAGS_temperature, ") must be a finite number (<= 0: greedy)");
  if (!(FLAGS_top_p > 0 && FLAGS_top_p <= 1)) throw_error("--top_p (", FLAGS_top_p, ") must be in (0, 1]");
  if (FLAGS_top_k < 0) throw_error("--top_k (", FLAGS_top_k, ") must be >= 0 (0: the whole vocabulary)");
  std::unique_ptr<Ops> ops = make_ops_for_device();
  // the decoder reads the weights only: the model's own activations for one token suffice
  LoadedModel lm = load_model_for_inference(*ops, 1, 1);
  const ModelConfig& cfg = lm.model->config();
  const Tokenizer* tok = lm.tokenizer.get();

  std::vector<std::vector<int32_t>> prompts;
  if (!FLAGS_prompt_ids.empty()) {
    std::stringstream ss(FLAGS_prompt_ids);
    for (std::string one; std::getline(ss, one, ';');)
      if (!one.empty()) prompts.push_back(parse_ids(one, cfg.vocab_size));
  } else if (!tok) {
    throw_error("this model has no tokenizer (synthetic data): give --prompt_ids=1,2,3");
  } else if (!FLAGS_prompts_file.empty()) {
    std::ifstream f(FLAGS_prompts_file);
    if (!f) throw_error("--prompts_file=", FLAGS_prompts_file, ": cannot open");
    for (std::string line; std::getline(f, line);)
      if (!line.empty()) prompts.push_back(tok->encode(line));
    if (prompts.empty()) throw_error("--prompts_file=", FLAGS_prompts_file, " holds no prompt (no non-empty line)");
  } else {
    for (const std::string& p : prompt_flags.empty() ? std::vector<std::string>{FLAGS_prompt} : prompt_flags)
      prompts.push_back(tok->encode(p));
  }
  if (prompts.empty()) throw_error("no prompt given");
  int64_t longest = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) throw_error("prompt ", i, " encodes to no tokens");
    longest = std::max<int64_t>(longest, int64_t(prompts[i].size()));
  }
  if (longest > cfg.max_seq_len)
    throw_error("a prompt has ", longest, " tokens, more than the model's context (max_seq_len ", cfg.max_seq_len, ")");
  const int64_t max_len = std::min<int64_t>(cfg.max_seq_len, longest + std::max<int64_t>(FLAGS_max_new_tokens, 1));
  Decoder decoder(*lm.model, int64_t(prompts.size()), max_len);

  GenerateOptions o;
  o.max_new_tokens = FLAGS_max_new_tokens;
  o.sampling.temperature = FLAGS_temperature;
  o.sampling.top_k = FLAGS_top_k;
  o.sampling.top_p = FLAGS_top_p;
  o.seed = FLAGS_seed;
  if (tok && !FLAGS_ignore_eos) o.eos = tok->eos_id();
  for (const std::string& s : stop_flags)
    if (!s.empty()) o.stop_strings.push_back(s);
  if (tok) o.detokenize = [tok](const std::vector<int32_t>& ids) { return tok->decode(ids); };
  if (!o.stop_strings.empty() && !tok) throw_error("--stop needs a model with a tokenizer (this one has none)");
  LOG(INFO) << "generating for " << prompts.size() << " prompt(s) on " << ops->name() << ", context " << max_len;
  if (FLAGS_warmup_runs < 0) throw_error("--warmup_runs (", FLAGS_warmup_runs, ") must be >= 0");
  for (int i = 0; i < FLAGS_warmup_runs; ++i) generate(decoder, prompts, o);
  const GenerateResult r = generate(decoder, prompts, o);

  for (size_t i = 0; i < prompts.size(); ++i) {
    const GeneratedSequence& s = r.sequences[i];
    if (prompts.size() > 1) std::cout << "=== " << i << " (" << s.finish << ", " << s.tokens.size() << " tokens)\n";
    if (tok) {
      std::cout << tok->decode(prompts[i]) << s.text << "\n";
    } else {
      for (int32_t id : prompts[i]) std::cout << id << " ";
      for (int32_t id : s.tokens) std::cout << id << " ";
      std::cout << "\n";
    }
  }
  const int64_t n = int64_t(prompts.size());
  // decode: the tokens that came out of decode steps (each sequence's first came from the prompt pass)
  const int64_t decoded = std::max<int64_t>(0, r.generated_tokens - n);
  const double prompt_tps = r.prefill_seconds > 0 ? r.prompt_tokens / r.prefill_seconds : 0;
  const double decode_tps = r.decode_seconds > 0 ? decoded / r.decode_seconds : 0;
  const double total_s = r.prefill_seconds + r.decode_seconds;
  char line[512];
  std::snprintf(line, sizeof line,
                "batch %lld: prompt %lld tokens in %.3f s (%.1f tokens/s); decode %lld tokens in %.3f s "
                "(%.1f tokens/s, %lld steps); total %lld new tokens in %.3f s (%.1f tokens/s)",
                (long long)n, (long long)r.prompt_tokens, r.prefill_seconds, prompt_tps, (long long)decoded,
                r.decode_seconds, decode_tps, (long long)r.decode_steps, (long long)r.generated_tokens, total_s,
                total_s > 0 ? r.generated_tokens / total_s : 0.0);
  std::cerr << line << std::endl;
  if (FLAGS_json) {
    nlohmann::json j;
    j["source"] = lm.source;
    j["device"] = ops->name();
    j["batch"] = n;
    j["prompt_tokens"] = r.prompt_tokens;
    j["generated_tokens"] = r.generated_tokens;
    j["decode_steps"] = r.decode_steps;
    j["prefill_seconds"] = r.prefill_seconds;
    j["decode_seconds"] = r.decode_seconds;
    j["prompt_tokens_per_s"] = prompt_tps;
    j["decode_tokens_per_s"] = decode_tps;
    j["total_tokens_per_s"] = total_s > 0 ? r.generated_tokens / total_s : 0.0;
    nlohmann::json seqs = nlohmann::json::array();
    for (const GeneratedSequence& s : r.sequences) {
      nlohmann::json e = {{"tokens", s.tokens}, {"finish", s.finish}};
      if (tok) e["text"] = s.text;
      seqs.push_back(e);
    }
    j["sequences"] = seqs;
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  }
  return 0;
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("generate", "sample from a checkpoint or Hugging Face folder (K/V cache, batched prompts)",
                 difftron::generate_main);
