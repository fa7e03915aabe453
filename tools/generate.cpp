// `difftron generate`: sample text from a checkpoint (the tokenizer recorded at training time
// decodes it), or token ids when the model was trained on a synthetic task.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include <gflags/gflags.h>
#include <glog/logging.h>

#include "core/generate.h"
#include "io/checkpoint.h"
#include "io/tokenizer.h"
#include "launch/command.h"
#include "launch/host_memory.h"
#include "core/plan.h"

DEFINE_string(checkpoint, "", "a checkpoint directory, or a --ckpt_dir root (its latest checkpoint)");
DEFINE_string(prompt, "The", "prompt text (encoded with the checkpoint's tokenizer)");
DEFINE_string(prompt_ids, "", "prompt as comma-separated token ids (instead of --prompt)");
DEFINE_int64(max_new_tokens, 200, "tokens to generate");
DECLARE_double(temperature);
DECLARE_int64(top_k);
DECLARE_uint64(seed);
DECLARE_string(device);

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

namespace {

int generate_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (FLAGS_max_new_tokens < 0 || FLAGS_max_new_tokens > kMaxNewTokens)
    throw_error("--max_new_tokens (", FLAGS_max_new_tokens, ") must be in [0, ", kMaxNewTokens, "]");
  if (!std::isfinite(FLAGS_temperature))
    throw_error("--temperature (", FLAGS_temperature, ") must be a finite number (<= 0: greedy)");
  const std::string dir = resolve_checkpoint_dir(FLAGS_checkpoint);
  ModelConfig cfg = read_checkpoint_config(dir);
  std::unique_ptr<Ops> ops = (FLAGS_device == "cuda" || (FLAGS_device == "auto" && cuda_available()))
                                 ? make_cuda_ops(0)
                                 : make_cpu_ops();
  ModelPrecision prec = ops->device() == Device::CUDA ? ModelPrecision::cuda_mixed()
                                                      : ModelPrecision::uniform(DType::F32);
  check_model_fits_host(cfg, ops->device() == Device::CPU, cfg.max_seq_len, dir);
  Model model(cfg, *ops, prec, 1, cfg.max_seq_len);
  model.keep_attention_state(false);  // forward only: no backward to keep state for
  CheckpointMeta meta = load_checkpoint(dir, model, nullptr);
  const std::string spec = meta.extra.value("tokenizer", std::string());
  // train records "bytes" or the tokenizer.json text; anything else load_tokenizer would open
  // as a path, which a crafted meta.json could point anywhere.
  const size_t first = spec.find_first_not_of(" \t\r\n");
  if (!spec.empty() && spec != "bytes" && (first == std::string::npos || spec[first] != '{'))
    throw_error(dir, "/meta.json: its tokenizer is neither \"bytes\" nor tokenizer.json text ('",
                spec.substr(0, 200), "'); refusing to open it as a file");
  std::unique_ptr<Tokenizer> tok = spec.empty() ? nullptr : load_tokenizer(spec);

  std::vector<int32_t> prompt;
  if (!FLAGS_prompt_ids.empty()) {
    std::stringstream ss(FLAGS_prompt_ids);
    for (std::string item; std::getline(ss, item, ',');) {
      size_t used = 0;
      long long id = -1;
      try {
        id = std::stoll(item, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      // An id outside the vocabulary would index past the embedding table.
      if (used != item.size() || id < 0 || id >= cfg.vocab_size)
        throw_error("--prompt_ids: '", item, "' is not a token id in [0, ", cfg.vocab_size, ") (the model's vocabulary)");
      prompt.push_back(int32_t(id));
    }
  } else if (tok) {
    prompt = tok->encode(FLAGS_prompt);
  } else {
    throw_error("this checkpoint has no tokenizer (synthetic data): give --prompt_ids=1,2,3");
  }
  SampleOptions so;
  so.max_new_tokens = FLAGS_max_new_tokens;
  so.temperature = FLAGS_temperature;
  so.top_k = FLAGS_top_k;
  so.seed = FLAGS_seed;
  if (tok) so.stop_token = tok->eos_id();
  LOG(INFO) << "sampling from " << dir << " (step " << meta.step << ")";
  std::vector<int32_t> ids = sample(model, prompt, so);
  if (tok) {
    std::cout << tok->decode(ids) << "\n";
  } else {
    for (int32_t id : ids) std::cout << id << " ";
    std::cout << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("generate", "sample from a trained checkpoint", difftron::generate_main);
