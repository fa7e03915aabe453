// `difftron bench-checkpoint`: how fast this machine saves and resumes a training checkpoint.
// Builds a model of the given size (--d_model, --n_layers, --vocab_size, --n_heads; --device)
// with AdamW state, saves a checkpoint (synchronously, as the final save of a run does) into a
// temporary directory, loads it back into the same objects, and prints seconds and GB/s of
// both. The files stay in the page cache between the two, as they do on a resume right after
// a save; --ckpt_bench_cold evicts them first (a resume on a fresh machine).
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>

#include <gflags/gflags.h>

#include "base/error.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "io/checkpoint.h"
#include "launch/command.h"

DECLARE_string(device);  // launch/train.cpp (gflags names are global)
DECLARE_int64(vocab_size);
DECLARE_int64(d_model);
DECLARE_int64(n_layers);
DECLARE_int64(n_heads);
DEFINE_string(ckpt_bench_dir, "", "bench-checkpoint: checkpoint root (default: a new directory under $TMPDIR, removed after)");
DEFINE_int32(ckpt_bench_loads, 1, "bench-checkpoint: how many times to load the checkpoint back");
DEFINE_bool(ckpt_bench_cold, false, "bench-checkpoint: evict the rank files from the page cache before each load");
DEFINE_bool(ckpt_bench_verify, false,
            "bench-checkpoint: scramble the state before each load, and after it save again and compare every array's "
            "checksum with the first save's (costs a save per load)");

namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;
double since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

int64_t dir_bytes(const fs::path& dir) {
  int64_t n = 0;
  for (const auto& f : fs::directory_iterator(dir))
    if (f.is_regular_file()) n += int64_t(f.file_size());
  return n;
}

// Fills the weights and the AdamW moments with values that depend on `seed` (moments are zero
// before a first step: a load that forgot them would go unnoticed).
void scramble(difftron::Model& model, difftron::AdamW& opt, uint64_t seed) {
  model.init_weights(seed);
  uint64_t id = 1000;
  for (auto& st : opt.state())
    for (difftron::Tensor* t : {&st.master, &st.m, &st.v}) {
      if (t->raw() == nullptr) continue;
      model.ops().init_normal(*t, seed, id++, 1.0, t->numel(), 0, 0);
    }
}

void evict(const fs::path& dir) {
  for (const auto& f : fs::directory_iterator(dir)) {
    const int fd = ::open(f.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

int bench_checkpoint_main(int argc, char** argv) {
  using namespace difftron;
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  ModelConfig cfg;
  cfg.vocab_size = FLAGS_vocab_size > 0 ? FLAGS_vocab_size : 32000;
  cfg.d_model = FLAGS_d_model;
  cfg.n_layers = FLAGS_n_layers;
  cfg.n_heads = FLAGS_n_heads;
  cfg.n_kv_heads = FLAGS_n_heads;
  cfg.max_seq_len = 16;
  cfg.resolve_and_validate();
  const bool cuda = FLAGS_device == "cuda" || (FLAGS_device == "auto" && cuda_available());
  std::unique_ptr<Ops> ops = cuda ? make_cuda_ops(0) : make_cpu_ops();
  const ModelPrecision prec = cuda ? ModelPrecision::cuda_mixed() : ModelPrecision::uniform(DType::F32);

  auto t = clock_type::now();
  Model model(cfg, *ops, prec, 1, cfg.max_seq_len);
  OptimizerConfig oc;
  AdamW opt(oc, model);
  scramble(model, opt, 1);
  ops->synchronize();
  std::printf("model %s on %s: %lld parameters (built in %.1f s)\n", cfg.summary().c_str(), ops->name().c_str(),
              (long long)cfg.num_parameters(), since(t));

  const bool own_dir = FLAGS_ckpt_bench_dir.empty();
  const fs::path root = own_dir ? fs::temp_directory_path() / ("difftron_bench_ckpt_" + std::to_string(::getpid()))
                                : fs::path(FLAGS_ckpt_bench_dir);
  if (own_dir) fs::remove_all(root);
  CheckpointMeta meta;
  meta.step = 1;
  CheckpointTimings st;
  t = clock_type::now();
  const std::string dir = save_checkpoint(root.string(), meta, model, &opt, nullptr, "", &st);
  const double save_s = since(t);
  const double gb = double(dir_bytes(dir)) / 1e9;
  std::printf("save (synchronous, fsynced): %.2f s, %.2f GB, %.2f GB/s\n", save_s, gb, gb / save_s);
  std::printf("  download %.2f s, write %.2f s, close + fsync %.2f s, publish %.2f s; %d threads hashed for %.2f s\n",
              st.download, st.write, st.sync, st.publish, st.threads, st.verify_busy);

  const auto saved = FLAGS_ckpt_bench_verify ? checkpoint_digests(dir) : std::map<std::string, std::string>();
  for (int i = 0; i < FLAGS_ckpt_bench_loads; ++i) {
    if (FLAGS_ckpt_bench_verify) scramble(model, opt, 100 + i);
    if (FLAGS_ckpt_bench_cold) evict(dir);
    CheckpointTimings lt;
    t = clock_type::now();
    load_checkpoint(dir, model, &opt, nullptr, &lt);
    ops->synchronize();
    const double load_s = since(t);
    std::printf("load%s: %.2f s, %.2f GB/s\n", FLAGS_ckpt_bench_cold ? " (cold)" : "", load_s, gb / load_s);
    std::printf("  open + plan %.2f s, waiting for reads + checksums %.2f s, upload %.2f s; "
                "%d threads read for %.2f s, verified for %.2f s\n",
                lt.open, lt.wait, lt.upload, lt.threads, lt.read_busy, lt.verify_busy);
    if (FLAGS_ckpt_bench_verify) {
      meta.step = 2 + i;
      if (checkpoint_digests(save_checkpoint(root.string(), meta, model, &opt)) != saved)
        throw_error("bench-checkpoint: the state after load ", i + 1, " differs from the state saved");
      std::printf("  verified: saving the loaded state again gives every array's checksum of the first save\n");
    }
  }
  if (own_dir) fs::remove_all(root);
  return 0;
}

}  // namespace

DIFFTRON_COMMAND("bench-checkpoint", "measure checkpoint save and load throughput for a model of a given size",
                 bench_checkpoint_main);
