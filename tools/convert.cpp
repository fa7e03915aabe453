// `difftron convert`: checkpoint -> Hugging Face folder (--to_hf: DiffLlama for differential
// attention, Llama for the baseline, difftron's own documented "difftron_diff_v2" folder with a
// README.md for V2, which has no transformers class; with the tokenizer and generation config;
// docs/EXPORT.md),
// or such a folder -> a difftron checkpoint (--from_hf), e.g. to fine-tune it. --logits_out
// writes the logits of a prompt (from --checkpoint or --from_hf), to compare with another
// engine's (tools/hf_check.py).
// Neither may destroy what is already there: --to_checkpoint refuses a training run's root
// (writing there would move its `latest` to the import), --to_hf a non-empty folder unless
// --overwrite, and the export is written beside the target and renamed into place.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <fstream>
#include <sstream>

#include <gflags/gflags.h>
#include <glog/logging.h>

#include "io/checkpoint.h"
#include "io/hf_export.h"
#include "io/tokenizer.h"
#include "launch/command.h"

DECLARE_string(checkpoint);
DECLARE_bool(overwrite);      // tools/prepare.cpp (gflags names are global)
DECLARE_string(eos_token);    // tools/prepare.cpp
DECLARE_string(prompt);       // tools/generate.cpp
DECLARE_string(prompt_ids);   // tools/generate.cpp
DEFINE_string(to_hf, "", "write the --checkpoint as a Hugging Face folder here (DiffLlama or, for the baseline, "
              "Llama; diff_v2, which no transformers class implements, as difftron's own 'difftron_diff_v2' folder "
              "with a README.md; with tokenizer files and generation_config.json): a new or empty folder; with "
              "--overwrite, a folder whose model, config and tokenizer files are replaced");
DEFINE_string(dtype, "f32", "convert --to_hf: how the weights are stored, f32 (exact) or bf16 (half the size)");
DEFINE_string(max_shard_size, "5GB", "convert --to_hf: weights above this size are split into shards "
              "model-0000K-of-0000N.safetensors with model.safetensors.index.json (e.g. 5GB, 500MB, 2GiB)");
DEFINE_string(from_hf, "", "a Hugging Face DiffLlama or Llama folder, or a difftron_diff_v2 one, to read (convert: "
              "to write it --to_checkpoint; "
              "generate, eval: the model to run, instead of --checkpoint)");
DEFINE_string(to_checkpoint, "", "convert --from_hf: write the folder as a difftron checkpoint under this root (a new "
              "or empty directory, never a training run's --ckpt_dir)");
DEFINE_string(logits_out, "", "convert: write the logits of every position of --prompt_ids (or --prompt, encoded "
              "with the model's tokenizer) as a float32 .npy [tokens, vocab], from --checkpoint or --from_hf");

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

std::string read_first_line(const fs::path& path) {
  std::ifstream f(path);
  std::string line;
  std::getline(f, line);
  return line;
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
// --overwrite) gets each file replaced by a rename, and weight files of an earlier export that
// this one did not write (a single file now sharded, or the other way) and a README.md of an
// earlier V2 export (when this one writes none) removed, keeping anything else in it.
void export_hf_safely(Model& model, const std::string& tokenizer_spec, const HfExportOptions& opt,
                      const std::string& dir_flag) {
  std::error_code ec;
  fs::path dir = fs::absolute(dir_flag, ec).lexically_normal();
  if (!dir.has_filename() && dir != dir.root_path()) dir = dir.parent_path();
  const bool exists = fs::exists(fs::symlink_status(dir, ec));
  if (exists && !fs::is_directory(dir, ec)) throw_error("--to_hf=", dir_flag, " exists and is not a folder");
  const bool empty = !exists || fs::is_empty(dir, ec);
  if (!empty && !FLAGS_overwrite)
    throw_error("--to_hf=", dir_flag, " is not empty: choose a new or empty folder, or pass --overwrite to "
                "replace its model, config and tokenizer files");
  TempDir tmp{dir.string() + ".tmp-" + std::to_string(::getpid())};
  fs::remove_all(tmp.path, ec);
  std::vector<std::string> files = export_hf_folder(model, tokenizer_spec, FLAGS_eos_token, opt, tmp.path);
  if (empty) {
    if (exists) fs::remove(dir, ec);  // an empty folder: rename(2) would replace it, but be explicit
    fs::rename(tmp.path, dir, ec);
    if (ec) throw_error("cannot rename ", tmp.path, " to ", dir.string(), ": ", ec.message());
    tmp.path.clear();
    return;
  }
  std::vector<std::string> stale;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (std::find(files.begin(), files.end(), name) != files.end()) continue;
    if (is_safetensors_model_file(name)) stale.push_back(name);
    // A V2 export's README.md describes the model it came with; a user's own README stays.
    if (name == "README.md" && read_first_line(it->path()) == kHfDiffV2ReadmeTitle) stale.push_back(name);
  }
  // config.json last: it names the model
  std::stable_partition(files.begin(), files.end(), [](const std::string& f) { return f != "config.json"; });
  for (const std::string& name : files) {
    if (name == "config.json")
      for (const std::string& old : stale) fs::remove(dir / old, ec);
    fs::rename(fs::path(tmp.path) / name, dir / name, ec);
    if (ec) throw_error("cannot rename ", tmp.path, "/", name, " to ", (dir / name).string(), ": ", ec.message());
  }
}

// A checkpoint's tokenizer as meta.json records it: "bytes" or tokenizer.json text (anything
// else load_tokenizer would open as a path, which a crafted meta.json could point anywhere).
std::string checked_tokenizer_spec(const CheckpointMeta& meta, const std::string& dir) {
  const std::string spec = meta.extra.value("tokenizer", std::string());
  const size_t first = spec.find_first_not_of(" \t\r\n");
  if (!spec.empty() && spec != "bytes" && (first == std::string::npos || spec[first] != '{'))
    throw_error(dir, "/meta.json: its tokenizer is neither \"bytes\" nor tokenizer.json text ('",
                spec.substr(0, 200), "'); refusing to open it as a file");
  return spec;
}

// Minimal .npy (version 1.0) writer for a little-endian float32 C-order [rows, cols] array.
void write_npy_f32(const std::string& path, const std::vector<float>& v, int64_t rows, int64_t cols) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(rows) + ", " +
                       std::to_string(cols) + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // 10-byte preamble + header + '\n': a multiple of 64
  header += '\n';
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw_error(path, ": cannot create");
  const uint16_t len = uint16_t(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.write(reinterpret_cast<const char*>(&len), 2);
  f << header;
  f.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  if (!f.flush()) throw_error(path, ": write failed");
}

// --logits_out: the logits of every prefix of the prompt, by the same forward pass generate uses.
int dump_logits(Ops& ops) {
  ModelConfig cfg;
  std::string source, spec;
  const bool from_hf = !FLAGS_from_hf.empty();
  if (from_hf) {
    source = FLAGS_from_hf;
    cfg = read_hf_config(source);
    std::string why;
    spec = tokenizer_spec_from_hf(source, &why);
  } else {
    source = resolve_checkpoint_dir(FLAGS_checkpoint);
    cfg = read_checkpoint_config(source);
  }
  check_model_fits_host(cfg, /*on_cpu=*/true, cfg.max_seq_len, source);
  Model model(cfg, ops, ModelPrecision::uniform(DType::F32), 1, cfg.max_seq_len);
  model.keep_attention_state(false);
  if (from_hf) {
    import_hf_model(source, model);
  } else {
    spec = checked_tokenizer_spec(load_checkpoint(source, model, nullptr), source);
  }
  std::vector<int32_t> ids;
  if (!FLAGS_prompt_ids.empty()) {
    std::stringstream ss(FLAGS_prompt_ids);
    for (std::string item; std::getline(ss, item, ',');) {
      const std::optional<long long> id = parse_whole<long long>(item);
      if (!id || *id < 0 || *id >= cfg.vocab_size)
        throw_error("--prompt_ids: '", item, "' is not a token id in [0, ", cfg.vocab_size, ")");
      ids.push_back(int32_t(*id));
    }
  } else {
    if (spec.empty()) throw_error(source, " has no tokenizer difftron reads: give --prompt_ids=1,2,3");
    ids = load_tokenizer(spec)->encode(FLAGS_prompt);
  }
  if (ids.empty() || int64_t(ids.size()) > cfg.max_seq_len)
    throw_error("the prompt has ", ids.size(), " tokens; --logits_out needs 1 to max_seq_len (", cfg.max_seq_len, ")");
  std::vector<float> logits;
  for (size_t t = 1; t <= ids.size(); ++t) {
    std::vector<float> row = model.last_logits(ids.data(), int64_t(t));
    logits.insert(logits.end(), row.begin(), row.end());
  }
  write_npy_f32(FLAGS_logits_out, logits, int64_t(ids.size()), cfg.vocab_size);
  std::string list;
  for (int32_t id : ids) list += (list.empty() ? "" : ",") + std::to_string(id);
  std::cout << "prompt_ids: " << list << "\n";
  LOG(INFO) << "wrote the logits of " << ids.size() << " positions to " << FLAGS_logits_out << " from " << source;
  return 0;
}

int convert_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  auto ops = make_cpu_ops();
  if (!FLAGS_logits_out.empty()) return dump_logits(*ops);
  if (!FLAGS_to_hf.empty()) {
    HfExportOptions opt;
    opt.dtype = parse_store_dtype(FLAGS_dtype);
    opt.max_shard_bytes = parse_byte_size(FLAGS_max_shard_size, "--max_shard_size");
    const std::string dir = resolve_checkpoint_dir(FLAGS_checkpoint);
    ModelConfig cfg = read_checkpoint_config(dir);
    check_model_fits_host(cfg, /*on_cpu=*/true, 1, dir);
    Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1);
    const std::string spec = checked_tokenizer_spec(load_checkpoint(dir, model, nullptr), dir);
    if (spec.empty())
      LOG(WARNING) << dir << " records no tokenizer (synthetic data): the export has no tokenizer files";
    export_hf_safely(model, spec, opt, FLAGS_to_hf);
    LOG(INFO) << "wrote " << FLAGS_to_hf << " (" << hf_model_type(cfg) << ", " << FLAGS_dtype << ") from " << dir;
    if (cfg.attention == AttentionKind::DifferentialV2)
      LOG(INFO) << "attention=diff_v2 has no transformers class: the folder is difftron's own format, for difftron "
                   "--from_hf or your own code; its README.md gives the tensors, the math and the RoPE permutation "
                   "for the authors' reference module";
    return 0;
  }
  if (!FLAGS_from_hf.empty()) {
    if (FLAGS_to_checkpoint.empty()) throw_error("--from_hf needs --to_checkpoint=<root>");
    check_new_checkpoint_root(FLAGS_to_checkpoint);  // before the (slow) import
    ModelConfig cfg = read_hf_config(FLAGS_from_hf);
    check_model_fits_host(cfg, /*on_cpu=*/true, 1, FLAGS_from_hf + "/config.json");
    Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 1, 1);
    import_hf_model(FLAGS_from_hf, model);
    CheckpointMeta meta;
    std::string why;
    const std::string spec = tokenizer_spec_from_hf(FLAGS_from_hf, &why);
    if (spec.empty()) LOG(WARNING) << "no tokenizer recorded: " << why;
    meta.extra = {{"imported_from", FLAGS_from_hf}, {"tokenizer", spec}};
    check_new_checkpoint_root(FLAGS_to_checkpoint);  // again: it may have changed meanwhile
    LOG(INFO) << "wrote " << save_checkpoint(FLAGS_to_checkpoint, meta, model, nullptr);
    return 0;
  }
  throw_error("nothing to do: give --checkpoint=DIR --to_hf=OUT, --from_hf=DIR --to_checkpoint=ROOT, or "
              "--checkpoint=DIR|--from_hf=DIR --logits_out=FILE.npy");
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("convert", "checkpoint <-> Hugging Face folder (DiffLlama / Llama / difftron_diff_v2, safetensors, tokenizer)", difftron::convert_main);
