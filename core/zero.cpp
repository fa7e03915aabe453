// ZeroOptimizer: bucket and shard layout, reduce-scatter of ready buckets, the sharded
// AdamW step (the same per-element arithmetic as core/optimizer.cpp, so sharding changes
// no bits) and the all-gather of the updated weights.
#include "core/zero.h"

#include <algorithm>
#include <cmath>

#include "kernels/ops.h"
#include "parallel/grid.h"

namespace difftron {

ZeroOptimizer::ZeroOptimizer(const OptimizerConfig& config, Ops& ops, ParallelContext& ctx,
                             std::vector<FlatSegment> segments, Tensor values, Tensor grads,
                             ZeroOptions options)
    : cfg_(config), ops_(ops), ctx_(ctx), segments_(std::move(segments)), values_(values), grads_(grads) {
  cfg_.validate();
  dp_ = ctx_.dp_size();
  dp_rank_ = ctx_.dp_rank();
  const int64_t n = values_.numel();
  if (values_.ndim() != 1 || grads_.ndim() != 1 || grads_.numel() != n)
    throw_error("ZeRO: values ", values_.str(), " and grads ", grads_.str(),
                " must be 1-D flat buffers of the same size");
  if (n == 0 || n % dp_ != 0)
    throw_error("ZeRO: the flat buffers' size (", n, ") must be a positive multiple of the DP size (", dp_, ")");
  int64_t prev_end = 0;
  for (auto& s : segments_) {
    if (s.offset < prev_end || s.numel < 0 || s.offset + s.numel > n)
      throw_error("ZeRO: segment '", s.name, "' [", s.offset, ", ", s.offset + s.numel,
                  ") overlaps the previous one or lies outside the flat buffers (", n, ")");
    prev_end = s.offset + s.numel;
  }

  // Buckets from the end of the buffers (where backward finishes first).
  const int64_t g = 64 * int64_t(dp_);
  const int64_t B = std::max(g, options.bucket_numel / g * g);
  for (int64_t end = n; end > 0;) {
    const int64_t begin = std::max<int64_t>(0, end - B);
    buckets_.push_back({begin, end - begin});
    end = begin;
  }

  // This rank's chunk of every bucket, cut by the segments.
  separate_master_ = options.separate_master || (values_.dtype() != DType::F32 && values_.dtype() != DType::F64);
  const bool counts_replicated = ctx_.tp_rank() == 0;
  int64_t shard = 0;
  for (const Bucket& b : buckets_) {
    const int64_t c = b.numel / dp_, lo = b.begin + dp_rank_ * c, hi = lo + c;
    bucket_shard_.push_back(shard);
    const size_t first_piece = pieces_.size(), first_run = update_runs_.size();
    for (size_t si = 0; si < segments_.size(); ++si) {
      const FlatSegment& s = segments_[si];
      const int64_t a = std::max(lo, s.offset), e = std::min(hi, s.offset + s.numel);
      if (e <= a) continue;
      pieces_.push_back({a, e - a, shard + (a - lo), int(si)});
    }
    // Runs: consecutive pieces of this chunk merged (the gaps between them are padding).
    for (size_t i = first_piece; i < pieces_.size(); ++i) {
      const Piece& p = pieces_[i];
      const bool decay = segments_[p.segment].decay;
      if (i > first_piece && update_runs_.back().decay == decay) {
        update_runs_.back().numel = p.flat + p.numel - update_runs_.back().flat;
      } else {
        update_runs_.push_back({p.flat, p.numel, p.shard, decay});
      }
      const bool counted = !segments_[p.segment].replicated || counts_replicated;
      const bool prev_counted = i > first_piece && (!segments_[pieces_[i - 1].segment].replicated || counts_replicated);
      if (!counted) continue;
      if (prev_counted)
        norm_runs_.back().numel = p.flat + p.numel - norm_runs_.back().flat;
      else
        norm_runs_.push_back({p.flat, p.numel, p.shard, false});
    }
    // The step writes the working weights of the update runs with their update; the chunk's
    // other elements (padding outside every segment) it copies from the masters, as the whole
    // chunk was copied before the all-gather (so its bytes are those of Ops::copy).
    if (separate_master_) {
      int64_t at = lo;
      for (size_t r = first_run; r <= update_runs_.size(); ++r) {
        const int64_t end = r < update_runs_.size() ? update_runs_[r].flat : hi;
        if (end > at) pad_runs_.push_back({at, end - at, shard + (at - lo), false});
        if (r < update_runs_.size()) at = update_runs_[r].flat + update_runs_[r].numel;
      }
    }
    shard += c;
  }
  shard_numel_ = shard;

  const int64_t alloc = std::max<int64_t>(1, shard_numel_);
  if (separate_master_) {
    master_ = ops_.empty({alloc}, DType::F32);
    ops_.fill_zero(master_);
    for (size_t i = 0; i < buckets_.size(); ++i) {
      const int64_t c = buckets_[i].numel / dp_;
      if (c == 0) continue;
      Tensor dst = master_.flat_slice(bucket_shard_[i], c);
      ops_.copy(values_.flat_slice(buckets_[i].begin + dp_rank_ * c, c), dst);
    }
  }
  m_ = ops_.empty({alloc}, DType::F32);
  v_ = ops_.empty({alloc}, DType::F32);
  ops_.fill_zero(m_);
  ops_.fill_zero(v_);
}

ZeroOptimizer::~ZeroOptimizer() = default;

void ZeroOptimizer::start_bucket(size_t i) {
  const Bucket& b = buckets_[i];
  const int64_t c = b.numel / dp_;
  Tensor in = grads_.flat_slice(b.begin, b.numel);
  Tensor out = grads_.flat_slice(b.begin + dp_rank_ * c, c);
  pending_.push_back(ctx_.dp().reduce_scatter_async(in, out));
}

void ZeroOptimizer::grads_ready(int64_t flat_begin) {
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_].begin >= flat_begin)
    start_bucket(next_bucket_++);
}

void ZeroOptimizer::finish_grads() {
  while (next_bucket_ < buckets_.size()) start_bucket(next_bucket_++);
  for (auto& w : pending_) w->wait();
  pending_.clear();
}

double ZeroOptimizer::grad_norm() {
  std::vector<Tensor> runs;  // one synchronisation for all runs, summed in run order
  for (const Run& r : norm_runs_) runs.push_back(grads_.flat_slice(r.flat, r.numel));
  double ss = 0;
  for (double s : ops_.sum_squares_each(runs)) ss += s;
  all_reduce_host(ctx_.world_host(), &ss, 1);
  return std::sqrt(ss);
}

StepStats ZeroOptimizer::step(int64_t step) {
  finish_grads();
  const StepStats st = plan_step(cfg_, step, grad_norm());
  // One call for the whole shard; with separate masters it also sets each run's working
  // weights, and the padding the runs leave is copied: every chunk is ready for the all-gather.
  std::vector<AdamWTensors> items;
  items.reserve(update_runs_.size());
  for (const Run& r : update_runs_) {
    Tensor working = values_.flat_slice(r.flat, r.numel);
    items.push_back({separate_master_ ? master_.flat_slice(r.shard, r.numel) : working,
                     grads_.flat_slice(r.flat, r.numel), m_.flat_slice(r.shard, r.numel),
                     v_.flat_slice(r.shard, r.numel), adamw_params(cfg_, st, step, r.decay),
                     separate_master_ ? working : Tensor()});
  }
  ops_.adamw_step_each(items);
  for (const Run& r : pad_runs_) {
    Tensor working = values_.flat_slice(r.flat, r.numel);
    ops_.copy(master_.flat_slice(r.shard, r.numel), working);
  }
  std::vector<std::unique_ptr<CommWork>> gathers;
  for (size_t i = 0; i < buckets_.size(); ++i) {
    const Bucket& b = buckets_[i];
    const int64_t c = b.numel / dp_;
    Tensor chunk = values_.flat_slice(b.begin + dp_rank_ * c, c);
    Tensor whole = values_.flat_slice(b.begin, b.numel);
    gathers.push_back(ctx_.dp().all_gather_async(chunk, whole));
  }
  for (auto& w : gathers) w->wait();
  next_bucket_ = 0;
  return st;
}

}  // namespace difftron
