// The communication-volume and memory model of a TP x DP training run, so that runs at
// scale can be planned on paper (`difftron plan`, docs/PARALLEL.md gives the formulas).
// It follows what core/model.cpp and core/zero.cpp actually allocate and send:
// ring-algorithm volumes, bytes sent per rank per optimizer step.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/model.h"

namespace difftron {

struct PlanInput {
  ModelConfig cfg;  // resolved (head_dim, ffn_dim filled)
  int tp = 1, dp = 1;
  int64_t seq = 2048, micro_batch = 1, grad_accum = 1;  // micro_batch: sequences per rank
  // Element sizes: the GPU's mixed precision by default (bf16 weights/activations, f32
  // gradients and statistics); CPU training is all 4.
  int64_t param_bytes = 2, act_bytes = 2, grad_bytes = 4, stat_bytes = 4;
  // The GPU's fused differential attention keeps O2n per layer for the backward ([N, q_dim] in
  // bf16, Ops::diff_attention_saved_numel); the CPU keeps nothing.
  bool attention_saved_o2 = false;
  // Hopper's fused attention backward (the default there) sums dQ in an f32 [N, q_dim] buffer
  // and keeps D [N, 2h] in a backend workspace, one layer at a time.
  bool attention_fused_dq = false;
  Recompute recompute = Recompute::None;  // what the layers keep for the backward
};

// One kind of traffic: `calls` collectives per step, each over `buffer_bytes`, which puts
// `bytes_per_rank` on each rank's links (ring: all-reduce 2(p-1)/p, reduce-scatter and
// all-gather (p-1)/p of the full buffer).
struct CommLine {
  std::string group;  // "tp" or "dp"
  std::string what;
  int64_t calls = 0;
  double buffer_bytes = 0;
  double bytes_per_rank = 0;
};

struct Plan {
  PlanInput in;
  // parameter elements
  int64_t params_total = 0;       // the whole model
  int64_t params_per_rank = 0;    // held by one TP rank (its shards + the replicated ones)
  int64_t flat_elements = 0;      // the flat buffers (alignment, zero rows, DP padding)
  int64_t shard_elements = 0;     // one DP rank's ZeRO shard of them
  // bytes per rank
  double weight_bytes = 0, grad_bytes = 0, optimizer_bytes = 0, activation_bytes = 0;
  double attention_workspace_bytes = 0;  // PlanInput::attention_fused_dq
  std::vector<CommLine> lines;
  double tp_bytes_per_rank = 0, dp_bytes_per_rank = 0;  // per step
  int64_t tokens_per_step = 0;                          // global
  double flops_per_rank = 0;                            // per step (docs/MODEL.md section 4)
  // What one rank's device holds at its peak: weights, gradients, optimizer, activations and
  // the attention workspace (the backend's small workspaces excluded).
  double peak_bytes() const {
    return weight_bytes + grad_bytes + optimizer_bytes + activation_bytes + attention_workspace_bytes;
  }
};

// Throws difftron::Error when the config does not split over tp (same rules as the model).
Plan make_plan(const PlanInput& in);

// The input for a run as `difftron train` sets it up: element sizes of the backend (CUDA's
// mixed precision, or all f32 on the CPU) and, on CUDA, the fused attention's saved state
// (keep_attention_state, head_dim 64 or 128) and dQ workspace.
PlanInput plan_input_for_run(const ModelConfig& cfg, bool cuda, int tp, int dp, int64_t seq, int64_t micro_batch,
                             int64_t grad_accum, bool keep_attention_state, Recompute recompute);

// A human-readable table; bandwidths in GB/s (NCCL bus bandwidth) for the time estimates,
// `peak_tflops` x `mfu` for the compute estimate.
std::string format_plan(const Plan& p, double tp_gbps, double dp_gbps, double peak_tflops, double mfu);

}  // namespace difftron
