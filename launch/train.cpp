// `difftron train`: builds the model from flags, opens the data (a token dataset
// directory or a synthetic task), trains with AdamW and samples from the result.
// With --tp / --dp (under mpirun or srun, world = tp x dp ranks) it trains tensor- and
// ZeRO-1 data-parallel over the process grid of parallel/grid.h; without them it is one
// process and never touches MPI. With --ckpt_dir the run directory also records the run:
// ROOT/metrics.jsonl (start, steps, evaluations, checkpoints, end; rank 0) and a log file
// per rank under ROOT/logs (docs/TRAINING.md).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>

#include <gflags/gflags.h>
#include <glog/logging.h>
#include <nlohmann/json.hpp>

#include "core/generate.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "core/plan.h"
#include "core/trainer.h"
#include "io/checkpoint.h"
#include "io/dataset.h"
#include "io/hf_diffllama.h"
#include "io/run_lock.h"
#include "io/synthetic_data.h"
#include "io/tokenizer.h"
#include "kernels/profiling_ops.h"
#include "launch/command.h"
#include "launch/host_memory.h"
#include "launch/model_config.h"
#include "parallel/grid.h"
#include "parallel/mpi_comm.h"
#ifdef DIFFTRON_HAVE_CUDA
#include "kernels/cuda/cuda_ops.h"
#endif

DEFINE_string(device, "auto", "cpu, cuda, or auto (cuda when a GPU is present)");
DEFINE_string(data, "synthetic:copy", "training data: a token dataset directory (difftron prepare) or synthetic:copy");
DEFINE_string(val_data, "", "validation dataset directory (optional)");
DEFINE_string(model_config, "",
              "JSON file of model config fields (those of a checkpoint's model_config); model flags given on the "
              "command line override it, fields it leaves out take the flags' values (vocab_size: the dataset's, "
              "n_kv_heads: n_heads); unknown fields are refused");
DEFINE_string(init_from, "",
              "start a new run (step 0, fresh optimizer and schedule) from the weights of a checkpoint, a "
              "--ckpt_dir root (its latest) or a Hugging Face DiffLlama/Llama folder; the model is that one. "
              "Ignored when --ckpt_dir already holds a checkpoint to resume");
DEFINE_string(attention, "diff",
              "diff (Differential Transformer), diff_v2 (Differential Transformer V2) or standard (baseline "
              "Transformer)");
DEFINE_int64(vocab_size, 0, "vocabulary size; 0 = from the dataset (or 16 for synthetic tasks)");
DEFINE_int64(d_model, 128, "model width d");
DEFINE_int64(n_layers, 2, "number of layers L");
DEFINE_int64(n_heads, 2, "differential heads h (the baseline uses 2h heads)");
DEFINE_int64(n_kv_heads, 0, "key/value groups h_kv; 0 = n_heads");
DEFINE_int64(head_dim, 0, "per-map head width dh; 0 = d_model / (2 n_heads)");
DEFINE_int64(ffn_dim, 0, "SwiGLU width; 0 = 8/3 d rounded up to 128");
DEFINE_int64(seq, 64, "sequence length");
DEFINE_int64(batch, 8, "sequences per micro-batch");
DEFINE_int64(grad_accum, 1, "micro-batches per optimizer step");
DEFINE_int64(steps, 200, "optimizer steps");
DEFINE_double(lr, 1e-3, "peak learning rate");
DEFINE_double(min_lr_ratio, 0.1, "final learning rate as a fraction of --lr");
DEFINE_int64(warmup, 20, "warm-up steps");
DEFINE_string(lr_schedule, "cosine", "cosine, linear or constant");
DEFINE_double(beta1, 0.9, "AdamW beta1");
DEFINE_double(beta2, 0.98, "AdamW beta2");
DEFINE_double(weight_decay, 0.05, "AdamW decoupled weight decay (matrices only by default)");
DEFINE_double(grad_clip, 1.0, "global gradient-norm clip; 0 disables");
DEFINE_uint64(seed, 1234, "seed for initialisation, data order and sampling");
DEFINE_int64(log_every, 10, "log every N steps");
DEFINE_int64(eval_every, 0, "evaluate on --val_data every N steps (0: only at the end)");
DEFINE_int64(eval_batches, 4, "validation batches per evaluation");
DEFINE_int64(sample_tokens, 0, "after training, sample this many tokens");
DEFINE_string(sample_prompt, "", "prompt text for the sample (needs a text dataset's tokenizer)");
DEFINE_double(temperature, 0.8, "sampling temperature (0: greedy)");
DEFINE_string(ckpt_dir, "", "checkpoint root: saved every --ckpt_every steps, at the end, and on SIGTERM/SIGINT");
DEFINE_int64(ckpt_every, 0, "save a checkpoint every N steps (0: only at the end / on a signal)");
DEFINE_int32(ckpt_keep, 0,
             "keep only the newest N checkpoints under --ckpt_dir, deleting older step_* directories after "
             "each successful save (0: keep all; the one `latest` names is never deleted)");
DEFINE_bool(async_save, true,
            "--ckpt_every saves: training goes on while the checkpoint is written (it waits only while "
            "this rank's state is copied to host memory, which needs room for one such copy); false: "
            "every save blocks until written. The final and the signal saves always block");
DEFINE_bool(resume, true, "continue from --ckpt_dir's latest checkpoint when there is one");
DEFINE_int64(top_k, 40, "sample from the k most likely tokens (0: all)");
DEFINE_string(recompute, "none",
              "activation recomputation: none | selective (recompute the element-wise outputs: norms, SwiGLU) | "
              "full (keep each layer's input only, run its forward again in the backward); `difftron plan "
              "--recompute=...` predicts the memory of each");
DEFINE_bool(keep_attention_state, true,
            "GPU: keep the fused attention's O2n for the backward: one extra [B,S,h,2dh] bf16 "
            "activation per layer, takes ~12-15% off the attention backward; false saves that memory "
            "(gradients equal to bf16 rounding, docs/PERFORMANCE.md)");
DEFINE_bool(deterministic, false,
            "GPU: bitwise repeatable steps. By default the Hopper fused attention backward adds "
            "dQ with float atomics (fastest; last-bit differences between runs); this selects "
            "its fixed-order path (~20% slower attention "
            "backward)");
DEFINE_int32(tp, 1, "tensor-parallel ranks (consecutive ranks, one node); world size = tp x dp");
DEFINE_int32(dp, 1, "data-parallel (ZeRO-1) ranks; world size = tp x dp");
DEFINE_double(collective_timeout, 600, "seconds a collective may take before the watchdog ends the job (0: never)");
DEFINE_bool(grid, false, "use the MPI process grid (NCCL on the GPU) even when tp x dp = 1");
DEFINE_double(step_timeout, 0, "seconds a training step may take before the watchdog ends the job (0: never)");
DEFINE_int64(profile_ops, 0,
             "time every op (synchronising around each) over this many steps after 2 warm-up steps and print "
             "where a step's time goes, also into metrics.jsonl (single process; slows those steps; "
             "docs/PERFORMANCE.md); 0: off");
DEFINE_double(peak_tflops, 0,
              "one device's peak TFLOP/s for the model FLOPs utilisation (MFU) in the log and metrics.jsonl; "
              "0: 989 (H100/H200 dense bf16) on CUDA, none (n/a) on the CPU");

namespace difftron {
namespace {

// On the CPU a too-large --batch x --seq would allocate its way into swap or the OOM killer:
// refuse it up front with the estimate (the plan model, tested against real allocations).
// Ranks sharing this node's memory, as the MPI launcher announced them (1 when unknown).
int ranks_on_this_node() {
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"})
    if (const char* s = std::getenv(v)) return std::max(1, std::atoi(s));
  return 1;
}

void check_host_memory(const ModelConfig& cfg, int tp, int dp) {
  PlanInput in;
  in.cfg = cfg;
  in.tp = tp;
  in.dp = dp;
  in.seq = FLAGS_seq;
  in.micro_batch = FLAGS_batch;
  in.grad_accum = FLAGS_grad_accum;
  in.param_bytes = in.act_bytes = in.grad_bytes = in.stat_bytes = 4;
  const Plan p = make_plan(in);
  const double need = p.weight_bytes + p.grad_bytes + p.optimizer_bytes + p.activation_bytes;
  const double avail = host_memory_available();
  const double gib = 1024.0 * 1024.0 * 1024.0;
  const int local = ranks_on_this_node();
  if (avail > 0 && need * local > 0.9 * avail) {
    char msg[512];
    std::snprintf(msg, sizeof msg,
                  "this run needs about %.1f GiB of host memory per rank (activations %.1f GiB for --batch=%lld x "
                  "--seq=%lld), more than 90%% of the %.1f GiB available to the %d rank(s) on this node: lower "
                  "--batch or --seq (`difftron plan --device=cpu ...` shows the breakdown)",
                  need / gib, p.activation_bytes / gib, (long long)FLAGS_batch, (long long)FLAGS_seq, avail / gib,
                  local);
    throw Error(msg);
  }
}

// When the process started (static initialisation, before main): the start-up phases in the
// log and in metrics.jsonl count from here.
const std::chrono::steady_clock::time_point g_process_start = std::chrono::steady_clock::now();

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// The run directory's records (docs/TRAINING.md): rank 0 appends one JSON object a line to
// ROOT/metrics.jsonl; every rank copies what it logs to ROOT/logs/train_rank<NNNNN>.log (a
// glog sink; stderr keeps its copy). Both files are opened in append mode, so a resumed run
// continues them, and every line is flushed as it is written. A record that cannot be
// written is a warning, never the end of the run.
class RunRecords : public google::LogSink {
 public:
  using Record = nlohmann::ordered_json;  // fields in the order they are set

  RunRecords() = default;
  RunRecords(const RunRecords&) = delete;
  RunRecords& operator=(const RunRecords&) = delete;
  ~RunRecords() override {
    google::RemoveLogSink(this);  // nothing when it was never added
    if (log_) std::fclose(log_);
    if (metrics_) std::fclose(metrics_);
  }

  // From the start of a run with --ckpt_dir: log lines are kept in memory until open().
  void capture() {
    capturing_ = true;
    google::AddLogSink(this);
  }
  // After --ckpt_dir is locked for this job (rank 0 holds the lock; every rank agreed): the
  // log file gets the lines captured so far, then every line; rank 0 opens metrics.jsonl.
  void open(const std::string& root, int world_rank, bool metrics) {
    const std::string logs = root + "/logs";
    std::error_code ec;
    std::filesystem::create_directories(logs, ec);
    char name[64];
    std::snprintf(name, sizeof name, "/train_rank%05d.log", world_rank);
    log_path_ = logs + name;
    {
      std::lock_guard<std::mutex> g(mu_);
      log_ = std::fopen(log_path_.c_str(), "a");
      if (log_) {
        std::fwrite(captured_.data(), 1, captured_.size(), log_);
        std::fflush(log_);
      }
      captured_.clear();
      capturing_ = false;
    }
    if (!log_) LOG(WARNING) << "cannot open the log file " << log_path_ << ": " << std::strerror(errno) << " (logging to stderr only)";
    if (!metrics) return;
    metrics_path_ = root + "/metrics.jsonl";
    metrics_ = std::fopen(metrics_path_.c_str(), "a");
    if (!metrics_)
      LOG(WARNING) << "cannot open " << metrics_path_ << ": " << std::strerror(errno) << " (no metrics are recorded)";
  }
  bool recording() const { return metrics_ != nullptr; }

  // Appends `r` with the wall-clock time and the seconds since the process started.
  void write(Record r) {
    if (!metrics_) return;
    r["time"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    r["elapsed_s"] = seconds_since(g_process_start);
    const std::string line = r.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
    if (std::fwrite(line.data(), 1, line.size(), metrics_) != line.size() || std::fflush(metrics_) != 0) {
      if (!write_failed_)
        LOG(WARNING) << "cannot write to " << metrics_path_ << ": " << std::strerror(errno)
                     << " (training goes on; later records may be missing)";
      write_failed_ = true;
      std::clearerr(metrics_);
    }
  }

  // The run ends with an exception: an `end` record naming it, and the message in the log file
  // (the program prints it on stderr once the run's objects, this sink included, are gone).
  void failed(const std::string& what) {
    if (ended_) return;
    ended_ = true;
    Record r;
    r["event"] = "end";
    r["stop"] = "error";
    r["error"] = what;
    write(std::move(r));
    std::lock_guard<std::mutex> g(mu_);
    if (log_) {
      std::fprintf(log_, "error: %s\n", what.c_str());
      std::fflush(log_);
    }
  }
  void ended() { ended_ = true; }

  // google::LogSink: called under glog's lock, so it must not log itself.
  void send(google::LogSeverity severity, const char* /*full_filename*/, const char* base_filename, int line,
            const google::LogMessageTime& time, const char* message, size_t message_len) override {
    const std::string text = ToString(severity, base_filename, line, time, message, message_len) + "\n";
    std::lock_guard<std::mutex> g(mu_);
    if (capturing_) captured_ += text;
    else if (log_ && std::fwrite(text.data(), 1, text.size(), log_) == text.size()) std::fflush(log_);
  }

 private:
  std::FILE* metrics_ = nullptr;
  std::FILE* log_ = nullptr;
  std::string metrics_path_, log_path_;
  bool write_failed_ = false, ended_ = false;
  std::mutex mu_;  // the log file: glog's threads and failed()
  bool capturing_ = false;
  std::string captured_;  // lines logged before open()
};

std::atomic<int> g_stop_signal{0};  // set by SIGTERM/SIGINT: finish the step, checkpoint, exit
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }

bool flag_set(const char* name) { return !gflags::GetCommandLineFlagInfoOrDie(name).is_default; }

// Numeric flags checked before anything is allocated: ranges, and products that must not
// overflow (tokens per step, tokens of the whole run).
void check_run_flags(int dp) {
  auto in_range = [](const char* flag, int64_t v, int64_t lo, int64_t hi) {
    if (v < lo || v > hi) throw_error("--", flag, "=", v, " is out of range [", lo, ", ", hi, "]");
  };
  in_range("batch", FLAGS_batch, 1, int64_t(1) << 24);
  in_range("seq", FLAGS_seq, 2, int64_t(1) << 24);
  in_range("grad_accum", FLAGS_grad_accum, 1, int64_t(1) << 24);
  in_range("steps", FLAGS_steps, 0, int64_t(1) << 40);
  in_range("warmup", FLAGS_warmup, 0, int64_t(1) << 40);
  in_range("ckpt_every", FLAGS_ckpt_every, 0, int64_t(1) << 40);
  in_range("ckpt_keep", FLAGS_ckpt_keep, 0, 1 << 20);
  in_range("eval_batches", FLAGS_eval_batches, 1, int64_t(1) << 24);
  int64_t rows = 0, tokens = 0, total = 0;
  if (__builtin_mul_overflow(FLAGS_batch, FLAGS_grad_accum, &rows) || __builtin_mul_overflow(rows, int64_t(dp), &rows) ||
      __builtin_mul_overflow(rows, FLAGS_seq, &tokens) || tokens > (int64_t(1) << 53) ||
      __builtin_mul_overflow(tokens, std::max<int64_t>(FLAGS_steps, 1), &total))
    throw_error("--batch=", FLAGS_batch, " x --seq=", FLAGS_seq, " x --grad_accum=", FLAGS_grad_accum, " x --dp=", dp,
                " x --steps=", FLAGS_steps, " tokens overflow a 64-bit count");
}

// The flags of the optimizer, schedule and batch that a checkpoint records; a resumed run
// logs every one that changed.
nlohmann::json run_flags() {
  return {{"lr", FLAGS_lr},           {"min_lr_ratio", FLAGS_min_lr_ratio}, {"warmup", FLAGS_warmup},
          {"lr_schedule", FLAGS_lr_schedule}, {"beta1", FLAGS_beta1},   {"beta2", FLAGS_beta2},
          {"weight_decay", FLAGS_weight_decay}, {"grad_clip", FLAGS_grad_clip}, {"steps", FLAGS_steps},
          {"batch", FLAGS_batch},     {"seq", FLAGS_seq},                   {"grad_accum", FLAGS_grad_accum},
          {"seed", FLAGS_seed}};
}

// Resuming: the model flags given and --model_config must agree with the checkpoint's model
// (the run would otherwise silently train the old one); changed optimizer/schedule flags are logged.
void check_resume_flags(const std::string& dir, const ModelConfig& ckpt, const nlohmann::json& extra,
                        const ModelConfigFile& file) {
  const std::string conflicts = model_config_conflicts(file, ckpt, FLAGS_seq, "the checkpoint");
  if (!conflicts.empty())
    throw_error("resuming from ", dir, ": model flags conflict with the checkpoint's model:", conflicts,
                "\nDrop these flags to continue that run, or start a new run with another --ckpt_dir (or --resume=false).");
  const nlohmann::json before = extra.value("flags", nlohmann::json::object()), now = run_flags();
  for (auto it = now.begin(); it != now.end(); ++it)
    if (before.contains(it.key()) && before[it.key()] != it.value())
      LOG(WARNING) << "--" << it.key() << " changed on resume: " << before[it.key()].dump() << " -> "
                   << it.value().dump()
                   << (it.key() == "steps" || it.key() == "warmup" || it.key() == "lr" || it.key() == "lr_schedule" ||
                               it.key() == "min_lr_ratio"
                           ? " (the learning-rate schedule is rebuilt from these flags)"
                           : "");
}

// The validation set must give at least one batch: found now, not after the whole run.
void check_validation_data(BatchSource& val) {
  const std::string pos = val.position();
  std::vector<int32_t> tok(FLAGS_batch * FLAGS_seq), tgt(tok.size());
  try {
    val.next_batch(FLAGS_batch, FLAGS_seq, tok.data(), tgt.data());
  } catch (const Error& e) {
    throw_error("--val_data=", FLAGS_val_data, ": cannot give a batch of --batch=", FLAGS_batch, " x --seq=", FLAGS_seq,
                ": ", e.what());
  }
  val.restore_position(pos);
}

// The world size an MPI launcher announced (mpirun, srun), 1 when started directly.
int launcher_world_size() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"})
    if (const char* s = std::getenv(v)) return std::max(1, std::atoi(s));
  return 1;
}

// ---- the sections of train_main --------------------------------------------------------

// The backend (--device) and the precision it trains in.
std::unique_ptr<Ops> make_backend(int local_rank, ModelPrecision* precision) {
  *precision = ModelPrecision::uniform(DType::F32);
  if (FLAGS_device == "cuda" || (FLAGS_device == "auto" && cuda_available())) {
    CudaOptions co;
    co.deterministic = FLAGS_deterministic;
    *precision = ModelPrecision::cuda_mixed();
    return make_cuda_ops(local_rank, co);  // one GPU per rank of a node
  }
  if (FLAGS_device == "cpu" || FLAGS_device == "auto") return make_cpu_ops();
  throw_error("--device: unknown device '", FLAGS_device, "' (expected cpu, cuda or auto)");
}

// The TP x DP grid over the MPI world (--tp, --dp), on the backend's memory.
std::unique_ptr<ParallelContext> make_grid(Ops& ops, int local_rank) {
  GridOptions go;
  go.tp = FLAGS_tp;
  go.dp = FLAGS_dp;
  go.device = ops.device();
  go.cuda_device = local_rank;
  go.ops = &ops;
#ifdef DIFFTRON_HAVE_CUDA
  // NCCL work is ordered after the backend's stream by events (no host waits)
  if (auto* cctx = cuda::context_of(ops)) go.cuda_stream = cctx->stream();
#endif
  go.watchdog.collective_timeout_s = FLAGS_collective_timeout;
  go.watchdog.step_timeout_s = FLAGS_step_timeout;
  auto par = ParallelContext::from_mpi_world(go);
  LOG(INFO) << "process grid: tp " << FLAGS_tp << " x dp " << FLAGS_dp << "; " << par->describe();
  return par;
}

// --ckpt_dir writable and ours alone: rank 0 holds the lock for the job; every rank agrees.
std::unique_ptr<RunDirLock> lock_run_dir(bool rank0, ParallelContext* par) {
  if (FLAGS_ckpt_dir.empty()) return nullptr;
  std::unique_ptr<RunDirLock> lock;
  std::string err;
  if (rank0) {
    try {
      lock = std::make_unique<RunDirLock>(FLAGS_ckpt_dir);
    } catch (const Error& e) {
      err = e.what();
    }
  }
  agree_or_throw(par ? &par->world_host() : nullptr, err, "checking --ckpt_dir");
  return lock;
}

// The training and validation data (--data, --val_data): opened in two steps, since a token
// dataset's reader needs the model's vocabulary, which may come from a checkpoint.
struct RunData {
  bool synthetic = false;
  int64_t vocab = 16;  // the data's vocabulary (synthetic: 16 unless --vocab_size)
  std::unique_ptr<BatchSource> train, val;
  std::unique_ptr<Tokenizer> tokenizer;
};

RunData describe_data(int dp_rank, int dp_size) {
  RunData d;
  d.synthetic = FLAGS_data.rfind("synthetic:", 0) == 0;
  if (d.synthetic) {
    const int64_t vocab = FLAGS_vocab_size > 0 ? FLAGS_vocab_size : d.vocab;
    // one global stream, each DP rank its share of every step (the TP ranks of a DP group
    // read the same rows); resumable on another DP size (io/synthetic_data.h)
    d.train = make_synthetic_source(FLAGS_data.substr(10), vocab, FLAGS_seed, dp_rank, dp_size);
    d.val = make_synthetic_source(FLAGS_data.substr(10), vocab, FLAGS_seed + 1, dp_rank, dp_size);
  } else {
    d.vocab = dataset_vocab_size(FLAGS_data);
    // token ids imported by prepare (--input_format=raw16, ...) may come without a tokenizer
    const std::string spec = dataset_tokenizer_spec(FLAGS_data);
    if (!spec.empty() && spec != "none")
      d.tokenizer = load_tokenizer(spec);
    else if (!FLAGS_sample_prompt.empty())
      throw_error("--sample_prompt needs a tokenizer and --data=", FLAGS_data,
                  " has none (token ids imported by prepare): leave it out to sample after half a training "
                  "sequence, printed as token ids");
  }
  return d;
}

void open_data(RunData& d, const ModelConfig& cfg, int dp_rank, int dp_size) {
  if (!d.synthetic) {
    DatasetOptions o;
    o.path = FLAGS_data;
    o.vocab_size = cfg.vocab_size;
    o.seed = FLAGS_seed;
    o.dp_rank = dp_rank;
    o.dp_size = dp_size;
    d.train = open_token_dataset(o);
    if (!FLAGS_val_data.empty()) {
      o.path = FLAGS_val_data;
      o.shuffle = false;
      o.cycle_batches = FLAGS_eval_batches;  // every evaluation scores the same batches
      d.val = open_token_dataset(o);
    }
  }
  if (d.val) check_validation_data(*d.val);
}

// --init_from: the weights a new run starts from (step 0, a fresh optimizer and schedule).
struct InitFrom {
  std::string dir;  // the checkpoint directory or HF folder; "" = none
  bool hf = false;
  ModelConfig cfg;
  int64_t step = 0;  // the checkpoint's step, for the log
};

// A checkpoint directory (meta.json), a Hugging Face folder (config.json) or a --ckpt_dir root
// (its latest checkpoint); its model config.
InitFrom describe_init_from(const std::string& path) {
  InitFrom init;
  if (std::filesystem::exists(path + "/meta.json")) {
    init.dir = path;
  } else if (std::filesystem::exists(path + "/config.json")) {
    init.dir = path;
    init.hf = true;
  } else {
    init.dir = latest_checkpoint(path);
  }
  if (init.dir.empty())
    throw_error("--init_from=", path, " is neither a checkpoint (meta.json), a --ckpt_dir root holding one (latest) ",
                "nor a Hugging Face folder (config.json)");
  init.cfg = init.hf ? read_hf_config(init.dir) : read_checkpoint_config(init.dir);
  if (!init.hf) init.step = read_checkpoint_meta(init.dir).value("step", int64_t(0));
  return init;
}

// The model is --init_from's: model flags given and --model_config must describe it; the run's
// sequences, the data's vocabulary and the layout must fit it.
void check_init_from(const InitFrom& init, const ModelConfigFile& file, int64_t data_vocab) {
  const std::string conflicts = model_config_conflicts(file, init.cfg, FLAGS_seq, "the model there");
  if (!conflicts.empty())
    throw_error("--init_from=", init.dir, ": model flags conflict with the model there:", conflicts,
                "\nThe model is the one --init_from names: drop these flags.");
  if (FLAGS_seq > init.cfg.max_seq_len)
    throw_error("--seq=", FLAGS_seq, " is longer than the max_seq_len (", init.cfg.max_seq_len, ") of --init_from=",
                init.dir);
  if (data_vocab > init.cfg.vocab_size)
    throw_error("--data=", FLAGS_data, " has a vocabulary of ", data_vocab, " tokens, more than the vocab_size (",
                init.cfg.vocab_size, ") of --init_from=", init.dir);
  if (init.hf && FLAGS_tp > 1)
    throw_error("--init_from=", init.dir, " is a Hugging Face folder, which loads with --tp=1 only: convert it to a ",
                "checkpoint first (difftron convert --from_hf=", init.dir, " --to_checkpoint=ROOT) and give ",
                "--init_from=ROOT");
}

// Fills the model's weights from --init_from (any TP x DP layout for a checkpoint); no
// optimizer state is read.
void load_init_weights(const InitFrom& init, Model& model, ParallelContext* par) {
  if (init.hf) {
    import_hf_model(init.dir, model);
    LOG(INFO) << "initialised from the Hugging Face folder " << init.dir << "; a new run from step 0";
  } else {
    load_checkpoint(init.dir, model, nullptr, par);
    LOG(INFO) << "initialised from " << init.dir << " (its step " << init.step
              << "); a new run from step 0 with a fresh optimizer and schedule";
  }
}

OptimizerConfig optimizer_config_from_flags() {
  OptimizerConfig oc;
  oc.lr = FLAGS_lr;
  oc.min_lr_ratio = FLAGS_min_lr_ratio;
  oc.warmup_steps = FLAGS_warmup;
  oc.total_steps = FLAGS_steps;
  oc.schedule = parse_lr_schedule(FLAGS_lr_schedule);
  oc.beta1 = FLAGS_beta1;
  oc.beta2 = FLAGS_beta2;
  oc.weight_decay = FLAGS_weight_decay;
  oc.grad_clip = FLAGS_grad_clip;
  return oc;
}

TrainOptions train_options_from_flags() {
  TrainOptions to;
  to.steps = FLAGS_steps;
  to.batch = FLAGS_batch;
  to.seq = FLAGS_seq;
  to.grad_accum = FLAGS_grad_accum;
  to.log_every = FLAGS_log_every;
  to.eval_every = FLAGS_eval_every;
  to.eval_batches = FLAGS_eval_batches;
  return to;
}

// The run's checkpoints under --ckpt_dir: periodic saves in the background (--ckpt_every,
// --async_save), blocking saves at the end and on a signal, pruning (--ckpt_keep). Each
// published save is a `checkpoint` record: how long the step loop was held up (stall) and
// how long the writing took.
nlohmann::ordered_json changed_flags();

class RunCheckpoints {
 public:
  RunCheckpoints(Model& model, AdamW& opt, ParallelContext* par, BatchSource& train, const Tokenizer* tokenizer,
                 bool rank0, RunRecords& records, std::string init_from, std::string command_line)
      : model_(model), opt_(opt), par_(par), train_(train), tokenizer_(tokenizer), rank0_(rank0), records_(records),
        init_from_(std::move(init_from)), command_line_(std::move(command_line)) {
    async_.on_published = [this](const std::string& dir, int64_t step, double write_s) { published(dir, step, write_s); };
  }
  // After optimizer step `step` (0-based): a periodic save, in the background.
  void after_step(int64_t step) {
    if (FLAGS_ckpt_dir.empty() || FLAGS_ckpt_every <= 0) return;
    // The snapshot buffer (pinned: ~13 s for 1.3B on the H200, which holds up CUDA calls
    // meanwhile) is allocated in the background once training runs, not before step 1.
    if (FLAGS_async_save && !prepared_) {
      prepared_ = true;
      async_.prepare(model_, &opt_, par_);
    }
    if ((step + 1) % FLAGS_ckpt_every != 0 || step + 1 >= FLAGS_steps) return;
    if (!FLAGS_async_save) return save(step + 1, "periodic");
    // the stall: waiting for the previous save (and publishing it), then the snapshot
    const auto t0 = std::chrono::steady_clock::now();
    pending_[step + 1] = {0, "periodic", true};
    async_.start(FLAGS_ckpt_dir, meta_at(step + 1), model_, &opt_, par_, train_.position());
    pending_[step + 1].stall_s = seconds_since(t0);
    char secs[32];
    std::snprintf(secs, sizeof secs, "%.2f", async_.last_snapshot_seconds());
    LOG(INFO) << "checkpoint step " << step + 1 << ": snapshot took " << secs
              << " s (training continues; writing in the background)";
  }
  // Blocking save: first the one in flight, then this step unless that was it. `reason`:
  // "periodic", "final" or "signal" (for the record).
  void save(int64_t steps_done, const char* reason) {
    if (FLAGS_ckpt_dir.empty()) return;
    async_.wait();
    if (last_published_ == steps_done) return;
    const auto t0 = std::chrono::steady_clock::now();
    pending_[steps_done] = {0, reason, false};
    const std::string dir = save_checkpoint(FLAGS_ckpt_dir, meta_at(steps_done), model_, &opt_, par_, train_.position());
    const double s = seconds_since(t0);
    pending_[steps_done].stall_s = s;  // the step loop waited for all of it
    published(dir, steps_done, s);
  }

 private:
  struct Pending {
    double stall_s;
    const char* reason;
    bool async;
  };

  CheckpointMeta meta_at(int64_t steps_done) const {
    CheckpointMeta meta;
    meta.step = steps_done;
    meta.tokens_seen = steps_done * FLAGS_batch * FLAGS_seq * FLAGS_grad_accum * (par_ ? par_->dp_size() : 1);
    meta.seed = FLAGS_seed;
    meta.data_position = train_.position();
    // what made this checkpoint: the command, every flag that differs from its default, and
    // the flags a resume must agree with (check_resume_flags); the model config is meta's own
    meta.extra = {{"tokenizer", tokenizer_ ? tokenizer_->spec() : std::string("")},
                  {"data", FLAGS_data},
                  {"flags", run_flags()},
                  {"command_line", command_line_},
                  {"changed_flags", changed_flags()}};
    if (!init_from_.empty()) meta.extra["init_from"] = init_from_;
    return meta;
  }
  void published(const std::string& dir, int64_t step, double write_s) {
    last_published_ = step;
    char secs[32];
    std::snprintf(secs, sizeof secs, "%.2f", write_s);
    LOG(INFO) << "checkpoint written: " << dir << " (write " << secs << " s)";
    const Pending p = pending_.count(step) ? pending_[step] : Pending{0, "periodic", true};
    pending_.erase(step);
    RunRecords::Record r;
    r["event"] = "checkpoint";
    r["step"] = step;
    r["reason"] = p.reason;
    r["async"] = p.async;
    r["stall_s"] = p.stall_s;
    r["write_s"] = write_s;
    r["path"] = dir;
    records_.write(std::move(r));
    // pruning only after a publish: `latest` then names the new checkpoint, which is kept
    if (rank0_ && FLAGS_ckpt_keep > 0) {
      const int removed = prune_checkpoints(FLAGS_ckpt_dir, FLAGS_ckpt_keep);
      if (removed > 0) LOG(INFO) << "removed " << removed << " old checkpoint(s) (--ckpt_keep=" << FLAGS_ckpt_keep << ")";
    }
  }

  Model& model_;
  AdamW& opt_;
  ParallelContext* par_;
  BatchSource& train_;
  const Tokenizer* tokenizer_;
  bool rank0_;
  RunRecords& records_;
  int64_t last_published_ = -1;
  bool prepared_ = false;
  std::map<int64_t, Pending> pending_;  // saves started, by step: what their records need
  std::string init_from_;               // the weights the run started from ("" = initialised)
  std::string command_line_;
  AsyncCheckpointer async_;  // its destructor waits for a save in flight
};

// After training: --sample_tokens from --sample_prompt (a text dataset's tokenizer); for the
// synthetic copy task, a prompt and the model's greedy continuation; for token ids without a
// tokenizer (an imported dataset), a sample after the first half of a training sequence, as
// ids. Every rank runs it (under TP the logits are gathered); rank 0 prints.
void print_sample(Model& model, BatchSource& train, const Tokenizer* tokenizer, bool synthetic) {
  SampleOptions so;
  so.max_new_tokens = FLAGS_sample_tokens;
  so.temperature = FLAGS_temperature;
  so.top_k = FLAGS_top_k;
  so.seed = FLAGS_seed;
  std::vector<int32_t> prompt;
  if (tokenizer) {
    prompt = tokenizer->encode(FLAGS_sample_prompt.empty() ? "The" : FLAGS_sample_prompt);
    auto ids = sample(model, prompt, so);
    std::cout << "----- sample -----\n" << tokenizer->decode(ids) << "\n------------------\n";
    return;
  }
  std::vector<int32_t> tok(FLAGS_seq), tgt(FLAGS_seq);
  train.next_batch(1, FLAGS_seq, tok.data(), tgt.data());
  const int64_t m = FLAGS_seq / 2;
  if (!synthetic) {
    prompt.assign(tok.begin(), tok.begin() + m);
    auto ids = sample(model, prompt, so);
    std::cout << "----- sample (token ids: the dataset has no tokenizer) -----\nprompt:";
    for (int64_t i = 0; i < m; ++i) std::cout << " " << ids[i];
    std::cout << "\nsample:";
    for (size_t i = m; i < ids.size(); ++i) std::cout << " " << ids[i];
    std::cout << "\n------------------\n";
    return;
  }
  prompt.assign(tok.begin(), tok.begin() + m + 1);
  so.max_new_tokens = std::min<int64_t>(FLAGS_sample_tokens, m);
  so.temperature = 0;
  auto ids = sample(model, prompt, so);
  std::cout << "prompt:       ";
  for (int64_t i = 0; i < m; ++i) std::cout << tok[i] << " ";
  std::cout << "\ncontinuation: ";
  for (size_t i = m + 1; i < ids.size(); ++i) std::cout << ids[i] << " ";
  std::cout << "\n";
}

// ---- what the run records ------------------------------------------------------------

std::string join_command_line(int argc, char** argv) {
  std::string s;
  for (int i = 0; i < argc; ++i) s += (i ? " " : "") + std::string(argv[i]);
  return s;
}

// Every flag given a value other than its default (this program's flags are global: any
// command's may appear), as name -> value text.
nlohmann::ordered_json changed_flags() {
  std::vector<gflags::CommandLineFlagInfo> all;
  gflags::GetAllFlags(&all);
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& f : all)
    if (!f.is_default && f.current_value != f.default_value && f.name != "logtostderr")  // main sets that
      j[f.name] = f.current_value;
  return j;
}

// Bytes of text per target token in the batches every evaluation scores (the validation
// source rewinds to them), over all DP ranks: the EOS counts no bytes. -1 without a tokenizer.
// Collective over the DP group.
double eval_bytes_per_token(BatchSource& val, const Tokenizer* tokenizer, int64_t vocab, ParallelContext* par) {
  if (!tokenizer) return -1;
  std::vector<double> bytes_of(size_t(vocab), 0.0);
  for (int64_t id = 0; id < vocab && id < tokenizer->vocab_size(); ++id)
    if (id != tokenizer->eos_id()) bytes_of[size_t(id)] = double(tokenizer->decode({int32_t(id)}).size());
  const std::string pos = val.position();
  std::vector<int32_t> tok(FLAGS_batch * FLAGS_seq), tgt(tok.size());
  double sums[2] = {0, 0};  // bytes, tokens
  for (int64_t b = 0; b < FLAGS_eval_batches; ++b) {
    val.next_batch(FLAGS_batch, FLAGS_seq, tok.data(), tgt.data());
    for (int32_t t : tgt)
      if (t >= 0 && t < vocab) {
        sums[0] += bytes_of[size_t(t)];
        sums[1] += 1;
      }
  }
  val.restore_position(pos);
  if (par) all_reduce_host(par->dp_host(), sums, 2);
  return sums[1] > 0 && sums[0] > 0 ? sums[0] / sums[1] : -1;
}

// The device memory the plan model predicts for this run (one rank's peak), -1 when it
// cannot (the plan's rules refuse the layout).
double planned_peak_bytes(const ModelConfig& cfg, bool cuda) {
  try {
    const PlanInput in = plan_input_for_run(cfg, cuda, FLAGS_tp, FLAGS_dp, FLAGS_seq, FLAGS_batch, FLAGS_grad_accum,
                                            FLAGS_keep_attention_state, parse_recompute(FLAGS_recompute));
    return make_plan(in).peak_bytes();
  } catch (const Error& e) {
    LOG(WARNING) << "no memory plan for this run: " << e.what();
    return -1;
  }
}

// A byte count, or null where the backend has none (the CPU counts nothing).
nlohmann::ordered_json bytes_or_null(int64_t b) { return b > 0 ? nlohmann::ordered_json(b) : nlohmann::ordered_json(); }

// The start-up, phase by phase (seconds): config (flags, data), allocation (model and
// optimizer), init (the weights), load (a checkpoint, when resuming), first_step.
struct StartupTimes {
  double config = 0, allocation = 0, init = 0, load = -1, first_step = 0, to_first_step = 0;
  std::string describe() const {
    char load_s[32] = "";
    if (load >= 0) std::snprintf(load_s, sizeof load_s, ", load %.2f s", load);
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "start-up: config %.2f s, allocation %.2f s, init %.2f s%s, first step %.2f s; the first step "
                  "was done %.2f s after the process started",
                  config, allocation, init, load_s, first_step, to_first_step);
    return buf;
  }
  nlohmann::ordered_json json() const {
    nlohmann::ordered_json j = {{"config", config}, {"allocation", allocation}, {"init", init}};
    if (load >= 0) j["load"] = load;
    j["first_step"] = first_step;
    j["to_first_step"] = to_first_step;
    return j;
  }
};

int train(int argc, char** argv, RunRecords& records) {
  using clock = std::chrono::steady_clock;
  const std::string command_line = join_command_line(argc, argv);
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (!FLAGS_ckpt_dir.empty()) records.capture();
  if (argc > 1) throw_error("unexpected argument '", argv[1], "' (flags are --name=value)");

  // ---- process grid (only for multi-rank runs: a single process never starts MPI)
  const bool multi = int64_t(FLAGS_tp) * FLAGS_dp > 1 || FLAGS_grid;
  if (!multi && launcher_world_size() > 1)
    throw_error("started as one of ", launcher_world_size(), " MPI ranks but --tp (", FLAGS_tp, ") x --dp (",
                FLAGS_dp, ") = 1: set --tp and --dp so that tp x dp = ", launcher_world_size());
  std::unique_ptr<MpiRuntime> mpi;
  int local_rank = 0;
  if (multi) {
    mpi = std::make_unique<MpiRuntime>(&argc, &argv);
    local_rank = node_local_rank();
  }
  const int world_rank = mpi ? mpi->world_rank() : 0;
  const bool rank0 = world_rank == 0;
  if (!rank0) FLAGS_minloglevel = std::max(FLAGS_minloglevel, 1);  // rank 0 tells the story

  // ---- backend, grid, run directory
  ModelPrecision precision;
  std::unique_ptr<Ops> ops = make_backend(local_rank, &precision);
  ProfilingOps* profiler = nullptr;  // --profile_ops: every op of the model goes through it
  if (FLAGS_profile_ops < 0) throw_error("--profile_ops (", FLAGS_profile_ops, ") must be 0 (off) or a number of steps");
  if (FLAGS_profile_ops > 0) {
    if (multi)
      throw_error("--profile_ops runs in a single process only (it synchronises around every op); run it without "
                  "--tp/--dp/--grid");
    auto p = std::make_unique<ProfilingOps>(std::move(ops));
    profiler = p.get();
    ops = std::move(p);
  }
  LOG(INFO) << "backend: " << ops->name();
  const bool cuda = ops->device() == Device::CUDA;
  std::unique_ptr<ParallelContext> par = multi ? make_grid(*ops, local_rank) : nullptr;
  const int dp_rank = par ? par->dp_rank() : 0, dp_size = par ? par->dp_size() : 1;
  check_run_flags(dp_size);
  std::unique_ptr<RunDirLock> lock = lock_run_dir(rank0, par.get());
  if (!FLAGS_ckpt_dir.empty()) {
    records.open(FLAGS_ckpt_dir, world_rank, rank0);
    LOG(INFO) << "command line: " << command_line;
  }

  // ---- data and model config: the checkpoint's when resuming, --init_from's model when
  // starting from it, else the model flags and --model_config
  RunData data = describe_data(dp_rank, dp_size);
  const ModelConfigFile config_file = read_model_config_file(FLAGS_model_config);
  std::string resume_dir;
  if (!FLAGS_ckpt_dir.empty() && FLAGS_resume) resume_dir = latest_checkpoint(FLAGS_ckpt_dir);
  InitFrom init;
  std::string init_from_record;  // what the run's checkpoints and `start` record name
  ModelConfig cfg;
  if (!resume_dir.empty()) {
    cfg = read_checkpoint_config(resume_dir);
    const nlohmann::json extra = read_checkpoint_meta(resume_dir).value("extra", nlohmann::json::object());
    check_resume_flags(resume_dir, cfg, extra, config_file);
    init_from_record = extra.value("init_from", std::string());
    if (!FLAGS_init_from.empty())
      LOG(INFO) << "--init_from is for a run's start: resuming " << resume_dir << " instead";
  } else if (!FLAGS_init_from.empty()) {
    init = describe_init_from(FLAGS_init_from);
    check_init_from(init, config_file, data.vocab);
    cfg = init.cfg;
    init_from_record = init.dir;
  } else {
    cfg = model_config_from_flags(config_file, data.vocab, FLAGS_seq);
    if (data.vocab > cfg.vocab_size)
      throw_error("--vocab_size (", cfg.vocab_size, ") is smaller than the dataset's vocabulary (", data.vocab, ")");
  }
  open_data(data, cfg, dp_rank, dp_size);
  const double bytes_per_token = !FLAGS_ckpt_dir.empty() && data.val
                                     ? eval_bytes_per_token(*data.val, data.tokenizer.get(), cfg.vocab_size, par.get())
                                     : -1;
  StartupTimes startup;
  startup.config = seconds_since(g_process_start);

  // ---- model + optimizer, resumed
  if (ops->device() == Device::CPU) check_host_memory(cfg, FLAGS_tp, FLAGS_dp);
  auto t = clock::now();
  Model model(cfg, *ops, precision, FLAGS_batch, FLAGS_seq, par ? model_parallel(*par) : ModelParallel{},
              parse_recompute(FLAGS_recompute));
  startup.allocation = seconds_since(t);
  t = clock::now();
  // the optimizer's f32 masters are taken from these weights (on the GPU: --init_from's
  // weights rounded to bf16)
  if (init.dir.empty()) model.init_weights(FLAGS_seed);
  else load_init_weights(init, model, par.get());
  model.keep_attention_state(FLAGS_keep_attention_state);
  startup.init = seconds_since(t);
  t = clock::now();
  AdamW opt(optimizer_config_from_flags(), model, par.get());
  startup.allocation += seconds_since(t);
  int64_t start_step = 0;
  if (!resume_dir.empty()) {
    t = clock::now();
    CheckpointMeta meta = load_checkpoint(resume_dir, model, &opt, par.get());
    start_step = meta.step;
    if (!meta.data_position.empty()) data.train->restore_position(meta.data_position);
    startup.load = seconds_since(t);
    LOG(INFO) << "resumed from " << resume_dir << " at step " << start_step;
    if (start_step >= FLAGS_steps) LOG(WARNING) << "--steps=" << FLAGS_steps << " already reached";
  }

  // ---- what the run records: the `start` record is written once the first step is done
  const double peak_flops = (FLAGS_peak_tflops > 0 ? FLAGS_peak_tflops : cuda ? 989.0 : 0.0) * 1e12;
  RunRecords::Record start;
  start["event"] = "start";
  start["command_line"] = command_line;
  start["flags"] = changed_flags();
  start["model_config"] = nlohmann::ordered_json::parse(nlohmann::json(cfg).dump());
  start["parameters"] = cfg.num_parameters();
  start["device"] = ops->name();
  start["device_memory_total"] = bytes_or_null(ops->memory_stats().device_total);
  start["world"] = {{"tp", FLAGS_tp}, {"dp", FLAGS_dp}};
  start["tokens_per_step"] = FLAGS_batch * FLAGS_seq * FLAGS_grad_accum * dp_size;
  start["peak_flops"] = peak_flops > 0 ? nlohmann::ordered_json(peak_flops) : nlohmann::ordered_json();
  const double plan_peak = planned_peak_bytes(cfg, cuda);
  start["plan_peak_bytes"] = plan_peak > 0 ? nlohmann::ordered_json(int64_t(plan_peak)) : nlohmann::ordered_json();
  start["resumed"] = !resume_dir.empty();
  if (!resume_dir.empty()) {
    start["resumed_from"] = resume_dir;
    start["resume_step"] = start_step;
  }
  start["start_step"] = start_step;
  if (!init_from_record.empty()) start["init_from"] = init_from_record;
  bool start_written = false;
  auto write_start = [&] {
    start_written = true;
    start["startup_s"] = startup.json();
    records.write(start);
  };

  // ---- train, checkpointing; every rank stops after the same step
  TrainOptions to = train_options_from_flags();
  to.peak_flops = peak_flops;
  Trainer trainer(model, opt, *data.train, data.val.get(), to, par.get());
  RunCheckpoints checkpoints(model, opt, par.get(), *data.train, data.tokenizer.get(), rank0, records,
                             init_from_record, command_line);
  const auto t_first_step = clock::now();
  // --profile_ops: steps start_step + 2 .. start_step + 1 + K (the window excludes the saves and
  // evaluations of its first and last on_step; one the run ends inside is reported at its end)
  clock::time_point t_profile;
  auto report_profile = [&](int64_t steps) {
    profiler->set_active(false);
    model.ops().synchronize();
    const double wall = seconds_since(t_profile);
    const std::vector<OpProfileRow> rows = profiler->rows();
    LOG(INFO) << "op profile of " << steps << " step(s) (--profile_ops; each op timed alone between "
              << "synchronisations, so the steps ran slower than unprofiled ones):\n"
              << format_op_profile(rows, steps, wall);
    RunRecords::Record r;
    r["event"] = "profile";
    r["steps"] = steps;
    r["wall_s_per_step"] = wall / double(std::max<int64_t>(steps, 1));
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const auto& row : rows)
      list.push_back({{"op", row.op}, {"calls", row.calls}, {"seconds", row.seconds}, {"bytes", row.bytes},
                      {"flops", row.flops}});
    r["ops"] = std::move(list);
    records.write(std::move(r));
  };
  trainer.on_step = [&](int64_t step, double) {
    if (step == start_step) {
      model.ops().synchronize();
      startup.first_step = seconds_since(t_first_step);
      startup.to_first_step = seconds_since(g_process_start);
      LOG(INFO) << startup.describe();
      write_start();
    }
    if (profiler && profiler->active() && step - (start_step + 1) == FLAGS_profile_ops)
      report_profile(FLAGS_profile_ops);
    checkpoints.after_step(step);
    if (profiler && step == start_step + 1) {
      model.ops().synchronize();
      t_profile = clock::now();
      profiler->set_active(true);
    }
  };
  double last_logged_loss = -1;
  trainer.on_log = [&](const StepLog& sl) {
    last_logged_loss = sl.loss;
    RunRecords::Record r;
    r["event"] = "step";
    r["step"] = sl.step;
    r["loss"] = sl.loss;
    r["window_steps"] = sl.window_steps;
    r["lr"] = sl.lr;
    r["grad_norm"] = sl.grad_norm;
    r["clipped"] = sl.clipped;
    r["tokens"] = sl.tokens_seen;
    r["tokens_per_s"] = sl.tokens_per_second;
    r["tflops"] = sl.flops_per_second / 1e12;
    r["mfu"] = sl.mfu >= 0 ? nlohmann::ordered_json(sl.mfu) : nlohmann::ordered_json();
    r["mem_peak_bytes"] = bytes_or_null(sl.memory.peak);
    r["mem_allocated_bytes"] = bytes_or_null(sl.memory.allocated);
    r["device_used_bytes"] = bytes_or_null(sl.memory.device_used);
    records.write(std::move(r));
  };
  trainer.on_eval = [&](const EvalLog& e) {
    RunRecords::Record r;
    r["event"] = "eval";
    r["step"] = e.step;
    r["loss"] = e.loss;
    r["perplexity"] = std::exp(e.loss);
    r["bits_per_token"] = e.loss / std::log(2.0);
    if (bytes_per_token > 0) r["bits_per_byte"] = e.loss / std::log(2.0) / bytes_per_token;
    r["tokens"] = e.tokens;
    r["final"] = e.final;
    records.write(std::move(r));
  };
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
  std::unique_ptr<Ops> host_ops = par ? make_cpu_ops() : nullptr;
  Tensor stop_flag = par ? host_ops->empty({1}, DType::F32) : Tensor();
  trainer.should_stop = [&] {
    if (!par) return g_stop_signal != 0;
    float mine = g_stop_signal != 0 ? 1.0f : 0.0f;
    host_ops->upload(stop_flag, &mine);
    par->world_host().all_reduce(stop_flag);
    float any;
    host_ops->download(stop_flag, &any);
    return any > 0;
  };
  TrainResult res = trainer.run(start_step);
  if (!start_written) write_start();  // no step ran (--steps already reached)
  const int64_t steps_done = start_step + int64_t(res.losses.size());
  if (profiler && profiler->active()) report_profile(steps_done - (start_step + 2));
  if (profiler && res.losses.size() < 3)
    LOG(WARNING) << "--profile_ops: the run did " << res.losses.size() << " step(s); profiling starts after 2";
  checkpoints.save(steps_done, g_stop_signal ? "signal" : "final");

  RunRecords::Record end;
  end["event"] = "end";
  end["stop"] = g_stop_signal ? "signal" : "done";
  if (g_stop_signal) end["signal"] = int(g_stop_signal);
  end["steps"] = steps_done;
  end["steps_run"] = int64_t(res.losses.size());
  end["final_loss"] = last_logged_loss >= 0 ? nlohmann::ordered_json(last_logged_loss) : nlohmann::ordered_json();
  end["last_step_loss"] = res.losses.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(res.losses.back());
  if (res.eval_loss >= 0) end["eval_loss"] = res.eval_loss;
  end["tokens_per_s"] = res.tokens_per_second;
  end["mem_peak_bytes"] = bytes_or_null(ops->memory_stats().peak);
  records.write(std::move(end));
  records.ended();
  if (g_stop_signal) {
    LOG(WARNING) << "stopped by signal " << g_stop_signal << " after step " << steps_done
                 << (FLAGS_ckpt_dir.empty() ? " (no --ckpt_dir: progress not saved)" : "; resume with the same command");
    return 128 + g_stop_signal;
  }
  if (!res.losses.empty())
    LOG(INFO) << "done: first loss " << res.losses.front() << ", last loss " << res.losses.back()
              << ", " << static_cast<int64_t>(res.tokens_per_second) << " tokens/s";

  if (!rank0) std::cout.setstate(std::ios::failbit);
  if (FLAGS_sample_tokens > 0) print_sample(model, *data.train, data.tokenizer.get(), data.synthetic);
  return 0;
}

int train_main(int argc, char** argv) {
  RunRecords records;  // outlives the run's objects: their last words are recorded too
  try {
    return train(argc, argv, records);
  } catch (const std::exception& e) {
    records.failed(e.what());
    throw;
  }
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("train", "train a model (one process, or --tp x --dp ranks under mpirun/srun; see --help)",
                 difftron::train_main);
