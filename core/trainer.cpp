// Trainer: see trainer.h. Losses are reported per step; a progress line carries the mean
// loss of the steps since the previous one, throughput, MFU and an ETA.
#include "core/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include <glog/logging.h>

#include "parallel/grid.h"

namespace difftron {

static std::string format_duration(double s) {
  char buf[32];
  if (s < 0 || !std::isfinite(s)) return "?";
  int h = int(s / 3600), m = int(std::fmod(s, 3600) / 60), sec = int(std::fmod(s, 60));
  std::snprintf(buf, sizeof buf, "%d:%02d:%02d", h, m, sec);
  return buf;
}

Trainer::Trainer(Model& model, AdamW& optimizer, BatchSource& train, BatchSource* validation,
                 TrainOptions options, ParallelContext* parallel)
    : model_(model), opt_(optimizer), train_(train), val_(validation), o_(options), par_(parallel) {
  if (par_) {
    dp_ = par_->dp_size();
    logs_ = par_->world_rank() == 0;
  }
  if (o_.batch <= 0) throw_error("batch (", o_.batch, ") must be positive");
  if (o_.seq <= 0) throw_error("seq (", o_.seq, ") must be positive");
  if (o_.grad_accum <= 0) throw_error("grad_accum (", o_.grad_accum, ") must be positive");
  if (o_.batch > model.max_batch() || o_.seq > model.max_seq())
    throw_error("batch ", o_.batch, " x seq ", o_.seq, " exceeds the model instance's ",
                model.max_batch(), " x ", model.max_seq());
}

double Trainer::evaluate() {
  if (!val_) return -1;
  std::vector<int32_t> tok(o_.batch * o_.seq), tgt(o_.batch * o_.seq);
  double sum = 0;
  for (int64_t i = 0; i < o_.eval_batches; ++i) {
    val_->next_batch(o_.batch, o_.seq, tok.data(), tgt.data());
    sum += model_.forward_loss(tok.data(), tgt.data(), o_.batch, o_.seq);
  }
  if (par_) all_reduce_host(par_->dp_host(), &sum, 1);  // each DP rank saw its own batches
  return sum / double(o_.eval_batches * dp_);
}

TrainResult Trainer::run(int64_t start_step) {
  using clock = std::chrono::steady_clock;
  TrainResult res;
  const int64_t tokens_per_step = o_.batch * o_.seq * o_.grad_accum * dp_;
  std::vector<int32_t> tok(o_.batch * o_.seq), tgt(o_.batch * o_.seq);
  if (logs_) {
    LOG(INFO) << "training " << model_.config().summary();
    LOG(INFO) << "steps " << start_step << ".." << o_.steps << ", " << tokens_per_step
              << " tokens/step (batch " << o_.batch << " x seq " << o_.seq << " x accum "
              << o_.grad_accum << " x dp " << dp_ << "), data: " << train_.describe();
  }
  Watchdog* watchdog = par_ ? par_->watchdog() : nullptr;
  const double step_timeout = watchdog ? watchdog->options().step_timeout_s : 0.0;
  const double flops_per_token = model_.config().flops_per_token(o_.seq);
  const int devices = par_ ? par_->world_size() : 1;
  auto t_start = clock::now();
  auto t_window = t_start;
  int64_t window_tokens = 0, window_steps = 0;
  double window_loss = 0;  // sum of the window's step losses, in step order
  // Tokens/s over the whole run(), however it ends.
  auto finish = [&](int64_t steps_run) {
    const double total = std::chrono::duration<double>(clock::now() - t_start).count();
    res.tokens_per_second = total > 0 ? double(tokens_per_step * steps_run) / total : 0;
  };
  for (int64_t step = start_step; step < o_.steps; ++step) {
    Watchdog::Scope watch(watchdog, "the training loop", "step " + std::to_string(step + 1), step_timeout);
    model_.zero_grads();
    double loss = 0;
    for (int64_t m = 0; m < o_.grad_accum; ++m) {
      train_.next_batch(o_.batch, o_.seq, tok.data(), tgt.data());
      // gradients are reduced across ranks on the last micro-batch only
      model_.set_grad_sync(m + 1 == o_.grad_accum);
      loss += model_.forward_backward(tok.data(), tgt.data(), o_.batch, o_.seq,
                                      1.0f / float(o_.grad_accum * dp_));
    }
    loss /= double(o_.grad_accum);
    if (par_) {  // the mean over DP ranks (the same bits on every rank)
      all_reduce_host(par_->dp_host(), &loss, 1);
      loss /= double(dp_);
    }
    if (!std::isfinite(loss)) throw_error("training loss is ", loss, " at step ", step);
    StepStats st = opt_.step(step);
    res.losses.push_back(loss);
    window_tokens += tokens_per_step;
    window_loss += loss;
    ++window_steps;
    if (on_step) on_step(step, loss);
    const bool last = step + 1 == o_.steps;
    if (logs_ && ((o_.log_every > 0 && (step + 1) % o_.log_every == 0) || last || step == start_step)) {
      model_.ops().synchronize();
      auto now = clock::now();
      StepLog sl;
      sl.step = step + 1;
      sl.loss = window_loss / double(window_steps);
      sl.window_steps = window_steps;
      sl.lr = st.lr;
      sl.grad_norm = st.grad_norm;
      sl.clipped = st.clip_scale < 1;
      sl.tokens_seen = (step + 1) * tokens_per_step;
      const double win = std::chrono::duration<double>(now - t_window).count();
      sl.tokens_per_second = win > 0 ? window_tokens / win : 0;
      sl.flops_per_second = sl.tokens_per_second * flops_per_token;
      if (o_.peak_flops > 0) sl.mfu = sl.flops_per_second / (o_.peak_flops * devices);
      sl.elapsed_seconds = std::chrono::duration<double>(now - t_start).count();
      sl.memory = model_.ops().memory_stats();
      const double eta = sl.elapsed_seconds / double(step + 1 - start_step) * double(o_.steps - step - 1);
      char mfu[32] = "n/a", mem[48] = "";
      if (sl.mfu >= 0) std::snprintf(mfu, sizeof mfu, "%.1f%%", 100 * sl.mfu);
      if (sl.memory.peak > 0) std::snprintf(mem, sizeof mem, " | mem %.2f GiB", sl.memory.peak / 1073741824.0);
      char line[320];
      std::snprintf(line, sizeof line,
                    "step %6lld/%lld | loss %.4f | lr %.3e | grad norm %.3f%s | %.0f tok/s | "
                    "%.3g TFLOP/s | MFU %s%s | elapsed %s | ETA %s",
                    (long long)(step + 1), (long long)o_.steps, sl.loss, st.lr, st.grad_norm,
                    sl.clipped ? " (clipped)" : "", sl.tokens_per_second, sl.flops_per_second / 1e12, mfu,
                    mem, format_duration(sl.elapsed_seconds).c_str(), format_duration(eta).c_str());
      LOG(INFO) << line;
      if (on_log) on_log(sl);
      t_window = now;
      window_tokens = 0;
      window_steps = 0;
      window_loss = 0;
    }
    if (val_ && o_.eval_every > 0 && (step + 1) % o_.eval_every == 0 && !last) {
      const double vl = evaluate_and_report(step + 1, false);
      if (logs_) LOG(INFO) << "step " << step + 1 << " validation loss " << vl;
    }
    bool stop = !last && should_stop && should_stop();
    if (par_ && !last && should_stop) {  // every rank stops at the same step, or none does
      double any = stop ? 1.0 : 0.0;
      all_reduce_host(par_->world_host(), &any, 1);
      stop = any > 0;
    }
    if (stop) {
      LOG(WARNING) << "stopping early after step " << step + 1 << " as asked";
      res.stopped = true;
      finish(step + 1 - start_step);
      return res;
    }
  }
  finish(std::max<int64_t>(o_.steps - start_step, 0));
  if (val_) {
    res.eval_loss = evaluate_and_report(std::max(start_step, o_.steps), true);
    if (logs_) LOG(INFO) << "final validation loss " << res.eval_loss;
  }
  return res;
}

double Trainer::evaluate_and_report(int64_t step, bool final) {
  const double loss = evaluate();
  if (logs_ && on_eval) {
    EvalLog e;
    e.step = step;
    e.loss = loss;
    e.tokens = o_.eval_batches * o_.batch * o_.seq * dp_;
    e.final = final;
    on_eval(e);
  }
  return loss;
}

}  // namespace difftron
