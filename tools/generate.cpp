// `difftron generate`: sample text from a checkpoint (the tokenizer recorded at training time
// decodes it), or token ids when the model was trained on a synthetic task.
#include <fstream>
#include <iostream>
#include <sstream>

#include <gflags/gflags.h>
#include <glog/logging.h>

#include "core/generate.h"
#include "io/checkpoint.h"
#include "io/tokenizer.h"
#include "launch/command.h"

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

int generate_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  const std::string dir = resolve_checkpoint_dir(FLAGS_checkpoint);
  ModelConfig cfg = read_checkpoint_config(dir);
  std::unique_ptr<Ops> ops = (FLAGS_device == "cuda" || (FLAGS_device == "auto" && cuda_available()))
                                 ? make_cuda_ops(0)
                                 : make_cpu_ops();
  ModelPrecision prec = ops->device() == Device::CUDA ? ModelPrecision::cuda_mixed()
                                                      : ModelPrecision::uniform(DType::F32);
  Model model(cfg, *ops, prec, 1, cfg.max_seq_len);
  model.keep_attention_state(false);  // forward only: no backward to keep state for
  CheckpointMeta meta = load_checkpoint(dir, model, nullptr);
  const std::string spec = meta.extra.value("tokenizer", std::string());
  std::unique_ptr<Tokenizer> tok = spec.empty() ? nullptr : load_tokenizer(spec);

  std::vector<int32_t> prompt;
  if (!FLAGS_prompt_ids.empty()) {
    std::stringstream ss(FLAGS_prompt_ids);
    for (std::string item; std::getline(ss, item, ',');) {
      try {
        prompt.push_back(std::stoi(item));
      } catch (const std::exception&) {
        throw_error("--prompt_ids: '", item, "' is not an integer");
      }
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
