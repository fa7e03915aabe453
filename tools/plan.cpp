// `difftron plan`: memory and communication per rank for a model on a TP x DP grid, so
// that runs at scale can be sized on paper (formulas: docs/PARALLEL.md). Takes the model
// flags of `difftron train` (or --preset, one of the paper's configurations, docs/MODEL.md).
#include <iostream>

#include <gflags/gflags.h>

#include "core/config.h"
#include "base/error.h"
#include "launch/command.h"
#include "core/plan.h"

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

DECLARE_bool(keep_attention_state);
DECLARE_string(recompute);
DEFINE_string(preset, "", "paper configuration: 830M, 1.4B, 2.8B, 6.8B, 13.1B or 3B (docs/MODEL.md); "
              "model flags given explicitly override it");
DEFINE_double(plan_tp_gbps, 370, "plan: TP bus bandwidth in GB/s (NVLink within a node)");
DEFINE_double(plan_dp_gbps, 45, "plan: DP bus bandwidth in GB/s (e.g. 400 Gb/s InfiniBand per GPU)");
DEFINE_double(plan_peak_tflops, 989, "plan: peak dense TFLOP/s of one GPU (H100/H200 bf16)");
DEFINE_double(plan_mfu, 0.4, "plan: model FLOPs utilisation assumed for the compute estimate");

namespace difftron {
namespace {

bool flag_set(const char* name) { return !gflags::GetCommandLineFlagInfoOrDie(name).is_default; }

struct Preset {
  const char* name;
  int64_t d, L, h, dh, ffn, seq;
};
constexpr Preset kPresets[] = {{"830M", 1536, 24, 8, 96, 4096, 2048},   {"1.4B", 2048, 24, 8, 128, 5504, 2048},
                               {"2.8B", 2560, 32, 10, 128, 6912, 2048}, {"6.8B", 4096, 32, 16, 128, 11008, 2048},
                               {"13.1B", 5120, 40, 20, 128, 13696, 2048}, {"3B", 3072, 28, 12, 128, 8192, 4096}};

int plan_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc > 1) throw_error("unexpected argument '", argv[1], "' (flags are --name=value)");
  ModelConfig c;
  int64_t seq = FLAGS_seq;
  if (!FLAGS_preset.empty()) {
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
  } else {
    c.d_model = FLAGS_d_model;
    c.n_layers = FLAGS_n_layers;
    c.n_heads = FLAGS_n_heads;
    c.head_dim = FLAGS_head_dim;
    c.ffn_dim = FLAGS_ffn_dim;
    c.vocab_size = 32000;
  }
  auto pick = [&](const char* name, int64_t v, int64_t& field) {
    if (flag_set(name) || FLAGS_preset.empty()) field = v;
  };
  pick("d_model", FLAGS_d_model, c.d_model);
  pick("n_layers", FLAGS_n_layers, c.n_layers);
  pick("n_heads", FLAGS_n_heads, c.n_heads);
  pick("head_dim", FLAGS_head_dim, c.head_dim);
  pick("ffn_dim", FLAGS_ffn_dim, c.ffn_dim);
  if (flag_set("n_kv_heads") || FLAGS_preset.empty()) c.n_kv_heads = FLAGS_n_kv_heads > 0 ? FLAGS_n_kv_heads : c.n_heads;
  if (FLAGS_vocab_size > 0) c.vocab_size = FLAGS_vocab_size;
  c.attention = parse_attention_kind(FLAGS_attention);
  c.max_seq_len = seq;
  c.resolve_and_validate();

  PlanInput in = plan_input_for_run(c, FLAGS_device != "cpu", FLAGS_tp, FLAGS_dp, seq, FLAGS_batch, FLAGS_grad_accum,
                                    FLAGS_keep_attention_state, parse_recompute(FLAGS_recompute));
  Plan p = make_plan(in);
  std::cout << format_plan(p, FLAGS_plan_tp_gbps, FLAGS_plan_dp_gbps, FLAGS_plan_peak_tflops, FLAGS_plan_mfu);
  return 0;
}

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("plan", "memory and communication per rank for a model on a TP x DP grid", difftron::plan_main);
