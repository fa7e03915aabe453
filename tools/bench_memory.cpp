// `difftron bench-memory`: for each model and recomputation mode, the memory `plan` predicts
// against the peak the backend's allocator measured over real training steps (forward,
// backward, AdamW with f32 masters, random tokens), with the step's tokens/s and MFU. A model
// that does not fit is reported as such and the next one runs. This is how the largest model
// one GPU trains is found, and how the plan is held to within 10% (docs/PERFORMANCE.md).
#include <gflags/gflags.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/rng.h"
#include "core/config.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "core/plan.h"
#include "kernels/ops.h"
#include "launch/command.h"

DEFINE_string(mem_models, "350M,1.3B", "bench-memory: models, comma-separated: 350M, 1.3B (d 2048, ffn 5632), "
              "2.8B, 3B, 6.8B (the paper's presets, docs/MODEL.md), or tiny (a CPU smoke test)");
DEFINE_string(mem_recompute, "none,selective,full", "bench-memory: recomputation modes, comma-separated");
DEFINE_int64(mem_batch, 8, "bench-memory: sequences per micro-batch");
DEFINE_int64(mem_seq, 2048, "bench-memory: sequence length");
DEFINE_int32(mem_steps, 3, "bench-memory: timed training steps (after one warm-up step)");
DEFINE_string(mem_device, "cuda", "bench-memory: cuda or cpu");
DEFINE_double(mem_peak_tflops, 989, "bench-memory: peak dense TFLOP/s for MFU (H100/H200 bf16)");

namespace difftron {
namespace {

ModelConfig model_named(const std::string& name) {
  struct Row {
    const char* name;
    int64_t d, L, h, dh, ffn;
  };
  // vocab 32000; 350M as `difftron bench` times it
  const Row rows[] = {{"350M", 1024, 24, 8, 64, 2816},   {"1.3B", 2048, 24, 8, 128, 5632},
                      {"2.8B", 2560, 32, 10, 128, 6912}, {"3B", 3072, 28, 12, 128, 8192},
                      {"6.8B", 4096, 32, 16, 128, 11008}};
  ModelConfig c;
  c.vocab_size = 32000;
  if (name == "tiny") {
    c.d_model = 64;
    c.n_layers = 4;
    c.n_heads = c.n_kv_heads = 2;
    c.head_dim = 16;
    c.ffn_dim = 160;
    c.vocab_size = 257;
    return c;
  }
  for (const Row& r : rows)
    if (name == r.name) {
      c.d_model = r.d;
      c.n_layers = r.L;
      c.n_heads = c.n_kv_heads = r.h;
      c.head_dim = r.dh;
      c.ffn_dim = r.ffn;
      return c;
    }
  throw_error("--mem_models: unknown model '", name, "' (expected 350M, 1.3B, 2.8B, 3B, 6.8B or tiny)");
}

double gib(double b) { return b / double(int64_t(1) << 30); }

// One model in one mode: the plan's peak, then real steps and the allocator's peak.
void measure(Ops& ops, const std::string& name, Recompute rc) {
  ModelConfig cfg = model_named(name);
  const int64_t B = FLAGS_mem_batch, S = FLAGS_mem_seq;
  cfg.max_seq_len = S;
  cfg.resolve_and_validate();
  const bool cuda = ops.device() == Device::CUDA;
  const Plan plan = make_plan(plan_input_for_run(cfg, cuda, 1, 1, S, B, 1, true, rc));
  std::printf("%-6s %-9s %6.2fB params  plan %7.2f GiB", name.c_str(), recompute_name(rc),
              double(cfg.num_parameters()) / 1e9, gib(plan.peak_bytes()));
  std::fflush(stdout);
  ops.synchronize();
  ops.reset_peak_memory();
  const int64_t before = ops.memory_stats().allocated;  // the backend's own workspaces
  try {
    Model model(cfg, ops, cuda ? ModelPrecision::cuda_mixed() : ModelPrecision::uniform(DType::F32), B, S, {}, rc);
    model.init_weights(1);
    OptimizerConfig oc;
    oc.warmup_steps = 0;
    oc.total_steps = 1000;
    AdamW opt(oc, model);
    Rng rng(7);
    std::vector<int32_t> tok(B * S), tgt(B * S);
    for (int64_t i = 0; i < B * S; ++i) {
      tok[i] = int32_t(rng.below(uint64_t(cfg.vocab_size)));
      tgt[i] = int32_t(rng.below(uint64_t(cfg.vocab_size)));
    }
    using clock = std::chrono::steady_clock;
    double secs = 0, loss = 0;
    for (int step = 0; step <= FLAGS_mem_steps; ++step) {
      ops.synchronize();
      const auto t0 = clock::now();
      model.zero_grads();
      loss = model.forward_backward(tok.data(), tgt.data(), B, S);
      opt.step(step);
      ops.synchronize();
      if (step > 0) secs += std::chrono::duration<double>(clock::now() - t0).count();  // step 0: warm-up
    }
    const MemoryStats m = ops.memory_stats();
    const double tps = FLAGS_mem_steps > 0 ? double(B * S) * FLAGS_mem_steps / secs : 0;
    const double mfu = tps * cfg.flops_per_token(S) / (FLAGS_mem_peak_tflops * 1e12);
    const double measured = double(m.peak - before);
    if (measured > 0)
      std::printf("  measured %7.2f GiB (plan %+5.1f%%)  device used %7.2f GiB", gib(measured),
                  100.0 * (plan.peak_bytes() - measured) / measured, gib(double(m.device_used)));
    else
      std::printf("  (this backend does not count its memory)");
    std::printf("  %9.0f tok/s  MFU %5.1f%%  loss %.3f\n", tps, 100.0 * mfu, loss);
  } catch (const Error& e) {
    std::string what = e.what();
    if (what.size() > 160) what = what.substr(0, 160) + "...";
    std::printf("  does not fit or failed: %s\n", what.c_str());
  }
  std::fflush(stdout);
}

int bench_memory_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc > 1) throw_error("unexpected argument '", argv[1], "' (flags are --name=value)");
  std::unique_ptr<Ops> ops;
  if (FLAGS_mem_device == "cuda") ops = make_cuda_ops(0);
  else if (FLAGS_mem_device == "cpu") ops = make_cpu_ops();
  else throw_error("--mem_device: '", FLAGS_mem_device, "' (expected cuda or cpu)");
  std::vector<Recompute> modes;
  for (const auto& m : split_flag_list(FLAGS_mem_recompute)) modes.push_back(parse_recompute(m));
  std::printf("bench-memory on %s: micro-batch %lld x seq %lld, %d timed steps; plan = `difftron plan` "
              "(weights, gradients, AdamW state, activations, attention workspace); measured = the "
              "allocator's peak over the steps (tensors + workspaces), less what the backend held before\n",
              ops->name().c_str(), (long long)FLAGS_mem_batch, (long long)FLAGS_mem_seq, FLAGS_mem_steps);
  for (const auto& name : split_flag_list(FLAGS_mem_models))
    for (Recompute rc : modes) measure(*ops, name, rc);
  return 0;
}

}  // namespace
}  // namespace difftron

static int bench_memory_command(int argc, char** argv) { return difftron::bench_memory_main(argc, argv); }
DIFFTRON_COMMAND("bench-memory", "plan vs measured peak memory and tokens/s per model and --recompute mode",
                 bench_memory_command);
