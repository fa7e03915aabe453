// The step loop: micro-batches with gradient accumulation, the optimizer step, logging
// (loss, lr, gradient norm, tokens/s, MFU, device memory, ETA) and periodic evaluation. With
// a ParallelContext each DP rank trains on its own batches (its BatchSource), gradients are
// synchronised on the last micro-batch only, losses are averaged over DP, and world rank 0
// logs. What a log line or an evaluation reports is also handed to on_log / on_eval (world
// rank 0), e.g. for the run directory's metrics.jsonl (launch/train.cpp).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "core/batch_source.h"
#include "core/model.h"
#include "core/optimizer.h"

namespace difftron {

class ParallelContext;

struct TrainOptions {
  int64_t steps = 100;       // optimizer steps
  int64_t batch = 8;         // sequences per micro-batch
  int64_t seq = 64;          // tokens per sequence
  int64_t grad_accum = 1;    // micro-batches per step
  int64_t log_every = 10;
  int64_t eval_every = 0;    // 0: only at the end (when a validation source is given)
  int64_t eval_batches = 4;
  // One device's peak FLOP/s, for the model FLOPs utilisation (MFU) in the log; 0: unknown
  // (the log says n/a).
  double peak_flops = 0;
};

// What one log line reports (every log_every steps, the first step run and the last).
struct StepLog {
  int64_t step = 0;          // optimizer steps done (1-based)
  double loss = 0;           // mean training loss over the steps since the previous log line
  int64_t window_steps = 0;  // how many steps that mean covers
  double lr = 0, grad_norm = 0;
  bool clipped = false;
  int64_t tokens_seen = 0;   // global, since step 0 of the run (resumes included)
  double tokens_per_second = 0;  // over the window
  double flops_per_second = 0;   // model FLOPs (ModelConfig::flops_per_token), all devices
  double mfu = -1;               // per device, in [0, 1]; -1 when peak_flops is unknown
  double elapsed_seconds = 0;    // since run() began
  MemoryStats memory;            // the backend's (Ops::memory_stats), this rank's device
};

// One evaluation on the validation source.
struct EvalLog {
  int64_t step = 0;      // optimizer steps done when it ran
  double loss = 0;       // mean loss per token
  int64_t tokens = 0;    // tokens scored, all DP ranks
  bool final = false;    // the evaluation at the end of run()
};

struct TrainResult {
  std::vector<double> losses;  // training loss per step (mean over micro-batches)
  double eval_loss = -1;       // last evaluation, -1 if none
  double tokens_per_second = 0;  // over the whole run() (evaluations and callbacks included)
  bool stopped = false;          // should_stop ended the run early
};

class Trainer {
 public:
  // `parallel`: the grid the model and optimizer were built with (null: one process).
  Trainer(Model& model, AdamW& optimizer, BatchSource& train, BatchSource* validation,
          TrainOptions options, ParallelContext* parallel = nullptr);
  // Runs steps [start_step, options.steps).
  TrainResult run(int64_t start_step = 0);
  double evaluate();
  // Called after every optimizer step with the 0-based step index (e.g. to write checkpoints).
  std::function<void(int64_t step, double loss)> on_step;
  // Polled after every step; returning true ends the run early (e.g. on SIGTERM).
  std::function<bool()> should_stop;
  // World rank 0: called with what each log line and each evaluation reports.
  std::function<void(const StepLog&)> on_log;
  std::function<void(const EvalLog&)> on_eval;

 private:
  double evaluate_and_report(int64_t step, bool final);  // evaluate(), then on_eval

  Model& model_;
  AdamW& opt_;
  BatchSource& train_;
  BatchSource* val_;
  TrainOptions o_;
  ParallelContext* par_;
  int dp_ = 1;
  bool logs_ = true;  // world rank 0 logs
};

}  // namespace difftron
