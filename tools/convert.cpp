// `difftron convert`: checkpoint -> Hugging Face DiffLlama directory (--to_hf), or a
// DiffLlama directory -> a difftron checkpoint (--from_hf), e.g. to fine-tune it.
// Neither may destroy what is already there: --to_checkpoint refuses a training run's root
// (writing there would move its `latest` to the import), --to_hf a non-empty folder unless
// --overwrite, and the export is written beside the target and renamed into place.
#include <unistd.h>

#include <filesystem>

#include <gflags/gflags.h>
#include <glog/logging.h>

#include "io/checkpoint.h"
#include "io/hf_diffllama.h"
#include "launch/command.h"

DECLARE_string(checkpoint);
DECLARE_bool(overwrite);  // tools/prepare.cpp (gflags names are global)
DEFINE_string(to_hf, "", "write the --checkpoint's weights as a Hugging Face DiffLlama directory here (a new or "
              "empty folder; with --overwrite, a folder whose config.json and model.safetensors are replaced)");
DEFINE_string(from_hf, "", "read this Hugging Face DiffLlama directory ...");
DEFINE_string(to_checkpoint, "", "... and write it as a difftron checkpoint under this root (a new or empty "
              "directory, never a training run's --ckpt_dir)");

namespace difftron {

std::string resolve_checkpoint_dir(const std::string& path);  // tools/generate.cpp
void check_model_fits_host(const ModelConfig& cfg, bool on_cpu, int64_t seq, const std::string& source);

namespace {
namespace fs = std::filesystem;

// A training run's root has `latest` and step_* folders: saving an import there would point
// `latest` at it, and the run's next `train` would resume from the import instead.
void check_new_checkpoint_root(const std::string& root) {
  std::error_code ec;
  if (fs::exists(fs::symlink_status(fs::path(root) / "latest", ec)))
    throw_error("--to_checkpoint=", root, " already holds a training run's checkpoints (a 'latest' file); "
                "choose an empty or new directory");
  if (!fs::is_directory(root, ec)) return;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().filename().string().rfind("step_", 0) == 0)
      throw_error("--to_checkpoint=", root, " already holds a training run's checkpoints (",
                  it->path().filename().string(), "); choose an empty or new directory");
  if (ec) throw_error("--to_checkpoint=", root, ": cannot list the directory: ", ec.message());
}

// Removes a temporary folder unless the export was moved into place.
struct TempDir {
  std::string path;
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

// Writes the export into a sibling of `dir` and renames it into place, so a failed export
// leaves `dir` as it was: a new or empty `dir` is replaced whole; a non-empty one (only with
// --overwrite) gets its two files replaced one rename each, keeping anything else in it.
void export_hf_safely(Model& model, const std::string& dir_flag) {
  std::error_code ec;
  fs::path dir = fs::absolute(dir_flag, ec).lexically_normal();
  if (!dir.has_filename() && dir != dir.root_path()) dir = dir.parent_path();
  const bool exists = fs::exists(fs::symlink_status(dir, ec));
  if (exists && !fs::is_directory(dir, ec)) throw_error("--to_hf=", dir_flag, " exists and is not a folder");
  const bool empty = !exists || fs::is_empty(dir, ec);
  if (!empty && !FLAGS_overwrite)
    throw_error("--to_hf=", dir_flag, " is not empty: choose a new or empty folder, or pass --overwrite to "
                "replace its config.json and model.safetensors");
  TempDir tmp{dir.string() + ".tmp-" + std::to_string(::getpid())};
  fs::remove_all(tmp.path, ec);
  export_hf_diffllama(model, tmp.path);
  if (empty) {
    if (exists) fs::remove(dir, ec);  // an empty folder: rename(2) would replace it, but be explicit
    fs::rename(tmp.path, dir, ec);
    if (ec) throw_error("cannot rename ", tmp.path, " to ", dir.string(), ": ", ec.message());
    tmp.path.clear();
    return;
  }
  for (const char* name : {"model.safetensors", "config.json"}) {  // config last: it names the model
    fs::rename(fs::path(tmp.path) / name, dir / name, ec);
    if (ec) throw_error("cannot rename ", tmp.path, "/", name, " to ", (dir / name).string(), ": ", ec.message());
  }
}

int convert_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  auto ops = make_cpu_ops();
  if (!FLAGS_to_hf.empty()) {
    const std::string dir = resolve_checkpoint_dir(FLAGS_checkpoint);
    ModelConfig cfg = read_checkpoint_config(dir);
    check_model_fits_host(cfg, /*on_cpu=*/true, 1, dir);
    Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1);
    load_checkpoint(dir, model, nullptr);
    export_hf_safely(model, FLAGS_to_hf);
    LOG(INFO) << "wrote " << FLAGS_to_hf << "/config.json and model.safetensors from " << dir;
    return 0;
  }
  if (!FLAGS_from_hf.empty()) {
    if (FLAGS_to_checkpoint.empty()) throw_error("--from_hf needs --to_checkpoint=<root>");
    check_new_checkpoint_root(FLAGS_to_checkpoint);  // before the (slow) import
    ModelConfig cfg = read_hf_config(FLAGS_from_hf);
    check_model_fits_host(cfg, /*on_cpu=*/true, 1, FLAGS_from_hf + "/config.json");
    Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1);
    import_hf_diffllama(FLAGS_from_hf, model);
    CheckpointMeta meta;
    meta.extra = {{"imported_from", FLAGS_from_hf}};
    check_new_checkpoint_root(FLAGS_to_checkpoint);  // again: it may have changed meanwhile
    LOG(INFO) << "wrote " << save_checkpoint(FLAGS_to_checkpoint, meta, model, nullptr);
    return 0;
  }
  throw_error("nothing to do: give --checkpoint=DIR --to_hf=OUT, or --from_hf=DIR --to_checkpoint=ROOT");
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("convert", "checkpoint <-> Hugging Face DiffLlama (safetensors)", difftron::convert_main);
