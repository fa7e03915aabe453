// Shared by the checkpoint tests (test_checkpoint.cpp, test_checkpoint_async.cpp): a small
// model with AdamW and synthetic copy-task data, trained in one process.
#pragma once
#include <cstdint>
#include <memory>

#include "core/model.h"
#include "core/optimizer.h"
#include "core/trainer.h"
#include "io/synthetic_data.h"

namespace difftron::testing {

inline ModelConfig small_checkpoint_config() {
  ModelConfig c;
  c.vocab_size = 16;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.max_seq_len = 16;
  return c;
}

// Model, optimizer (lr 3e-3, `warmup` steps, schedule over `steps`), data and train options
// for `steps` steps of batch 4 x seq 16.
template <int64_t kStepsTotal, int64_t kWarmup>
struct TrainingRunOf {
  std::unique_ptr<Ops> ops = make_cpu_ops();
  Model model{small_checkpoint_config(), *ops, ModelPrecision::uniform(DType::F32), 4, 16};
  OptimizerConfig oc = [] {
    OptimizerConfig o;
    o.lr = 3e-3;
    o.warmup_steps = kWarmup;
    o.total_steps = kStepsTotal;
    return o;
  }();
  AdamW opt{oc, model};
  std::unique_ptr<BatchSource> data = make_synthetic_source("copy", 16, 9);
  TrainOptions to = [] {
    TrainOptions t;
    t.batch = 4;
    t.seq = 16;
    t.steps = kStepsTotal;
    t.log_every = 0;
    return t;
  }();
};

}  // namespace difftron::testing
