// `difftron convert`: checkpoint -> Hugging Face DiffLlama directory (--to_hf), or a
// DiffLlama directory -> a difftron checkpoint (--from_hf), e.g. to fine-tune it.
#include <gflags/gflags.h>
#include <glog/logging.h>

#include "io/checkpoint.h"
#include "io/hf_diffllama.h"
#include "launch/command.h"

DECLARE_string(checkpoint);
DEFINE_string(to_hf, "", "write the --checkpoint's weights as a Hugging Face DiffLlama directory here");
DEFINE_string(from_hf, "", "read this Hugging Face DiffLlama directory ...");
DEFINE_string(to_checkpoint, "", "... and write it as a difftron checkpoint under this root");

namespace difftron {

std::string resolve_checkpoint_dir(const std::string& path);  // tools/generate.cpp

namespace {

int convert_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  auto ops = make_cpu_ops();
  if (!FLAGS_to_hf.empty()) {
    const std::string dir = resolve_checkpoint_dir(FLAGS_checkpoint);
    ModelConfig cfg = read_checkpoint_config(dir);
    Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1);
    load_checkpoint(dir, model, nullptr);
    export_hf_diffllama(model, FLAGS_to_hf);
    LOG(INFO) << "wrote " << FLAGS_to_hf << "/config.json and model.safetensors from " << dir;
    return 0;
  }
  if (!FLAGS_from_hf.empty()) {
    if (FLAGS_to_checkpoint.empty()) throw_error("--from_hf needs --to_checkpoint=<root>");
    ModelConfig cfg = read_hf_config(FLAGS_from_hf);
    Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1);
    import_hf_diffllama(FLAGS_from_hf, model);
    CheckpointMeta meta;
    meta.extra = {{"imported_from", FLAGS_from_hf}};
    LOG(INFO) << "wrote " << save_checkpoint(FLAGS_to_checkpoint, meta, model, nullptr);
    return 0;
  }
  throw_error("nothing to do: give --checkpoint=DIR --to_hf=OUT, or --from_hf=DIR --to_checkpoint=ROOT");
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("convert", "checkpoint <-> Hugging Face DiffLlama (safetensors)", difftron::convert_main);
