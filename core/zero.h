// ZeRO-1 data parallelism over flat parameter / gradient buffers: the gradient buffer is
// cut into buckets (counted from its end, where backward finishes first); each bucket is
// reduce-scattered over the DP group as soon as backward has produced it, so that DP rank
// r holds the summed gradient of chunk r of every bucket; AdamW runs on that shard of f32
// master weights and moments; the updated weights are all-gathered bucket by bucket.
// Gradient norms are global over TP and DP (parameters every TP rank holds whole count once).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/optimizer.h"
#include "base/tensor.h"
#include "parallel/comm.h"

namespace difftron {

class Ops;
class ParallelContext;

// One parameter's place in the flat buffers. Gaps between segments are padding: their
// gradients stay zero and their values are never read.
struct FlatSegment {
  std::string name;
  int64_t offset = 0, numel = 0;
  bool decay = false;       // decoupled weight decay applies
  bool replicated = false;  // every TP rank holds the same values (counted once in the norm)
};

struct ZeroOptions {
  // Elements per gradient bucket, rounded down to a multiple of 64 x dp (at least that).
  int64_t bucket_numel = int64_t(1) << 24;
  // Keep f32 master shards even when the working weights are f32 or f64 themselves (always
  // done for bf16 weights): lets the CPU tests run the bf16 path's bookkeeping, where each
  // update also writes the working weights and the padding is copied.
  bool separate_master = false;
};

class ZeroOptimizer {
 public:
  // `values` (working weights) and `grads` are 1-D flat buffers of the same numel, a multiple
  // of the DP size; `segments` lie inside them, sorted and disjoint. The values must hold the
  // initial weights, identical on the ranks of a DP group.
  ZeroOptimizer(const OptimizerConfig& config, Ops& ops, ParallelContext& ctx,
                std::vector<FlatSegment> segments, Tensor values, Tensor grads,
                ZeroOptions options = {});
  ~ZeroOptimizer();

  // Gradients [flat_begin, numel) are final for this step: reduce-scatter every bucket that
  // lies inside (asynchronously where the communicator can). Call with decreasing offsets.
  void grads_ready(int64_t flat_begin);
  // Reduce-scatters the buckets not yet started and waits for all of them.
  void finish_grads();
  // One AdamW step (0-based `step`) on this rank's shard, then the weights are all-gathered.
  // Calls finish_grads() first if needed.
  StepStats step(int64_t step);
  // The global L2 norm of the reduced gradients (after finish_grads()).
  double grad_norm();

  struct Bucket {
    int64_t begin = 0, numel = 0;  // numel is a multiple of the DP size; chunks of numel / dp
  };
  // A run of this rank's shard: flat [flat, flat + numel) <-> shard [shard, shard + numel).
  struct Piece {
    int64_t flat = 0, numel = 0, shard = 0;
    int segment = -1;
  };
  const std::vector<Bucket>& buckets() const { return buckets_; }
  const std::vector<Piece>& pieces() const { return pieces_; }
  const std::vector<FlatSegment>& segments() const { return segments_; }
  int64_t shard_numel() const { return shard_numel_; }
  // f32 [shard_numel] master weights of this rank's shard; undefined when the working
  // weights are f32 or f64 (they are their own masters: read them through pieces()).
  const Tensor& shard_master() const { return master_; }
  // f32 [shard_numel] AdamW moments of this rank's shard.
  const Tensor& shard_m() const { return m_; }
  const Tensor& shard_v() const { return v_; }
  const OptimizerConfig& config() const { return cfg_; }

 private:
  // A run of the shard updated with one call: flat offset, length, decay.
  struct Run {
    int64_t flat = 0, numel = 0, shard = 0;
    bool decay = false;
  };
  void start_bucket(size_t i);

  OptimizerConfig cfg_;
  Ops& ops_;
  ParallelContext& ctx_;
  std::vector<FlatSegment> segments_;
  Tensor values_, grads_;
  int dp_ = 1, dp_rank_ = 0;
  std::vector<Bucket> buckets_;
  std::vector<Piece> pieces_;
  std::vector<Run> update_runs_;  // pieces merged by decay (padding between is harmless)
  std::vector<Run> pad_runs_;     // separate masters: the rest of each chunk (padding)
  std::vector<Run> norm_runs_;    // pieces counted in the norm, merged
  std::vector<int64_t> bucket_shard_;  // shard offset of each bucket's chunk
  int64_t shard_numel_ = 0;
  bool separate_master_ = false;
  Tensor master_, m_, v_;
  std::vector<std::unique_ptr<CommWork>> pending_;
  size_t next_bucket_ = 0;  // buckets [0, next_bucket_) have been started this step
};

}  // namespace difftron
