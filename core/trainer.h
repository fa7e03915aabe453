// The step loop: micro-batches with gradient accumulation, the optimizer step, logging
// (loss, lr, gradient norm, tokens/s, ETA) and periodic evaluation. With a ParallelContext
// each DP rank trains on its own batches (its BatchSource), gradients are synchronised on
// the last micro-batch only, losses are averaged over DP, and world rank 0 logs.
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
};

struct TrainResult {
  std::vector<double> losses;  // training loss per step (mean over micro-batches)
  double eval_loss = -1;       // last evaluation, -1 if none
  double tokens_per_second = 0;
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

 private:
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
