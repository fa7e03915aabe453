// `difftron plan`: memory and communication per rank for a model on a TP x DP grid, so
// that runs at scale can be sized on paper (formulas: docs/PARALLEL.md). Takes the model
// flags and --model_config of `difftron train` (or --preset, one of the paper's
// configurations, docs/MODEL.md), and ends with a bottom line: whether one rank's peak fits
// on a GPU of --plan_gpu_gib, the step time and tokens/s at --plan_mfu.
#include <cstdio>
#include <iostream>

#include <gflags/gflags.h>

#include "base/error.h"
#include "core/config.h"
#include "core/plan.h"
#include "io/dataset.h"
#include "launch/command.h"
#include "launch/host_memory.h"
#include "launch/model_config.h"

// Shared with `difftron train` (launch/train.cpp defines them).
DECLARE_string(model_config);
DECLARE_string(attention);
DECLARE_int64(vocab_size);
DECLARE_int64(d_model);
DECLARE_int64(n_layers);
DECLARE_int64(n_heads);
DECLARE_int64(n_kv_heads);
DECLARE_int64(head_dim);
DECLARE_int64(ffn_dim);
DECLARE_int64(seq);
DECLARE_int64(batch);
DECLARE_int64(grad_accum);
DECLARE_int32(tp);
DECLARE_int32(dp);
DECLARE_string(device);
DECLARE_string(data);

DECLARE_bool(keep_attention_state);
DECLARE_string(recompute);
DEFINE_string(preset, "", "paper configuration: 830M, 1.4B, 2.8B, 6.8B, 13.1B or 3B (docs/MODEL.md); "
              "model flags given explicitly override it");
DEFINE_double(plan_tp_gbps, 370, "plan: TP bus bandwidth in GB/s (NVLink within a node)");
DEFINE_double(plan_dp_gbps, 45, "plan: DP bus bandwidth in GB/s (e.g. 400 Gb/s InfiniBand per GPU)");
DEFINE_double(plan_peak_tflops, 989, "plan: peak dense TFLOP/s of one GPU (H100/H200 bf16)");
DEFINE_double(plan_mfu, 0.4, "plan: model FLOPs utilisation assumed for the compute estimate");
DEFINE_double(plan_gpu_gib, 140,
              "plan: memory of one GPU in GiB for the bottom line (140: the H200, whose 143771 MiB are 140.4 GiB; "
              "80 for an H100)");

namespace difftron {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
// What a GPU holds beyond the plan's peak: the CUDA context, cuBLAS and attention workspaces,
// the allocator's slack (0.6-1.2 GiB measured on the H200, docs/PERFORMANCE.md).
constexpr double kGpuReserveGiB = 2.0;

bool flag_set(const char* name) { return !gflags::GetCommandLineFlagInfoOrDie(name).is_default; }

std::string gib_str(double bytes) {
  char b[32];
  if (bytes >= kGiB) std::snprintf(b, sizeof b, "%.1f GiB", bytes / kGiB);
  else std::snprintf(b, sizeof b, "%.1f MiB", bytes / (1024.0 * 1024.0));
  return b;
}

struct Preset {
  const char* name;
  int64_t d, L, h, dh, ffn, seq;
};
constexpr Preset kPresets[] = {{"830M", 1536, 24, 8, 96, 4096, 2048},   {"1.4B", 2048, 24, 8, 128, 5504, 2048},
                               {"2.8B", 2560, 32, 10, 128, 6912, 2048}, {"6.8B", 4096, 32, 16, 128, 11008, 2048},
                               {"13.1B", 5120, 40, 20, 128, 13696, 2048}, {"3B", 3072, 28, 12, 128, 8192, 4096}};

// The last line: does one rank's peak fit (a GPU of --plan_gpu_gib, or this host's memory for
// --device=cpu), and the step time and tokens/s at the assumed MFU (which covers the
// communication as a measured MFU does).
std::string bottom_line(const Plan& p, bool cpu) {
  const double need = p.peak_bytes();
  const double step_s = p.flops_per_rank / (FLAGS_plan_peak_tflops * 1e12 * FLAGS_plan_mfu);
  char speed[256];
  std::snprintf(speed, sizeof speed, "a step takes %.3g s, %.0f tokens/s (all ranks) at MFU %.2f of %g TFLOP/s",
                step_s, double(p.tokens_per_step) / step_s, FLAGS_plan_mfu, FLAGS_plan_peak_tflops);
  char fit[256];
  if (cpu) {
    const double avail = host_memory_available();
    if (avail <= 0)
      std::snprintf(fit, sizeof fit, "needs %s of host memory per rank (this host's is unknown)", gib_str(need).c_str());
    else
      std::snprintf(fit, sizeof fit, "%s in this host's available memory (%s): %s per rank",
                    need <= 0.9 * avail ? "fits" : "does NOT fit", gib_str(avail).c_str(), gib_str(need).c_str());
    return std::string("bottom line: ") + fit + "\n";
  }
  const bool fits = need / kGiB + kGpuReserveGiB <= FLAGS_plan_gpu_gib;
  std::snprintf(fit, sizeof fit, "%s on a GPU of %g GiB (--plan_gpu_gib): peak %s per rank + %.0f GiB kept for "
                "the CUDA context and workspaces", fits ? "fits" : "does NOT fit", FLAGS_plan_gpu_gib,
                gib_str(need).c_str(), kGpuReserveGiB);
  std::string hint;
  if (!fits)
    hint = std::string("to fit: ") +
           (p.in.recompute != Recompute::Full ? "--recompute=selective or full (activations), " : "") +
           "a smaller --batch, or more --tp (weights and activations) or --dp (optimizer state)\n";
  return hint + "bottom line: " + fit + "; " + speed + "\n";
}

int plan_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc > 1) throw_error("unexpected argument '", argv[1], "' (flags are --name=value)");
  if (!(FLAGS_plan_mfu > 0 && FLAGS_plan_mfu <= 1)) throw_error("--plan_mfu (", FLAGS_plan_mfu, ") must be in (0, 1]");
  if (!(FLAGS_plan_peak_tflops > 0)) throw_error("--plan_peak_tflops (", FLAGS_plan_peak_tflops, ") must be > 0");
  if (!(FLAGS_plan_gpu_gib > 0)) throw_error("--plan_gpu_gib (", FLAGS_plan_gpu_gib, ") must be > 0");
  if (!FLAGS_preset.empty() && !FLAGS_model_config.empty())
    throw_error("give --preset or --model_config, not both");
  ModelConfig c;
  int64_t seq = FLAGS_seq;
  if (FLAGS_preset.empty()) {
    // as `difftron train` builds it; the vocabulary is --data's when given, else 32000, and
    // the sequence length the file's max_seq_len unless --seq is given
    const ModelConfigFile file = read_model_config_file(FLAGS_model_config);
    if (!flag_set("seq") && file.has("max_seq_len") && file.fields["max_seq_len"].get<int64_t>() > 0)
      seq = file.fields["max_seq_len"].get<int64_t>();
    const bool dataset = flag_set("data") && FLAGS_data.rfind("synthetic:", 0) != 0;
    c = model_config_from_flags(file, dataset ? dataset_vocab_size(FLAGS_data) : 32000, seq);
  } else {
    const Preset* p = nullptr;
    for (auto& q : kPresets)
      if (FLAGS_preset == q.name) p = &q;
    if (!p) throw_error("--preset: unknown '", FLAGS_preset, "' (expected 830M, 1.4B, 2.8B, 6.8B, 13.1B or 3B)");
    c.d_model = p->d;
    c.n_layers = p->L;
    c.n_heads = c.n_kv_heads = p->h;
    c.head_dim = p->dh;
    c.ffn_dim = p->ffn;
    c.vocab_size = 32000;
    if (!flag_set("seq")) seq = p->seq;
    // model flags given explicitly override the preset
    auto pick = [&](const char* name, int64_t v, int64_t& field) {
      if (flag_set(name)) field = v;
    };
    pick("d_model", FLAGS_d_model, c.d_model);
    pick("n_layers", FLAGS_n_layers, c.n_layers);
    pick("n_heads", FLAGS_n_heads, c.n_heads);
    pick("head_dim", FLAGS_head_dim, c.head_dim);
    pick("ffn_dim", FLAGS_ffn_dim, c.ffn_dim);
    if (flag_set("n_kv_heads")) c.n_kv_heads = FLAGS_n_kv_heads > 0 ? FLAGS_n_kv_heads : c.n_heads;
    if (FLAGS_vocab_size > 0) c.vocab_size = FLAGS_vocab_size;
    c.attention = parse_attention_kind(FLAGS_attention);
    c.max_seq_len = seq;
    c.resolve_and_validate();
  }

  PlanInput in = plan_input_for_run(c, FLAGS_device != "cpu", FLAGS_tp, FLAGS_dp, seq, FLAGS_batch, FLAGS_grad_accum,
                                    FLAGS_keep_attention_state, parse_recompute(FLAGS_recompute));
  Plan p = make_plan(in);
  std::cout << format_plan(p, FLAGS_plan_tp_gbps, FLAGS_plan_dp_gbps, FLAGS_plan_peak_tflops, FLAGS_plan_mfu);
  std::cout << "\n" << bottom_line(p, FLAGS_device == "cpu");
  return 0;
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("plan", "memory and communication per rank for a model on a TP x DP grid", difftron::plan_main);
