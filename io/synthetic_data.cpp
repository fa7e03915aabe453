// Synthetic tasks: see synthetic_data.h.
#include "io/synthetic_data.h"

#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "base/rng.h"

namespace difftron {
namespace {

// splitmix64's finaliser: decorrelates the per-row generators (Rng(s) and Rng(s + 1) would
// otherwise be the same sequence shifted by one draw)
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

class CopyTask final : public BatchSource {
 public:
  CopyTask(int64_t vocab, uint64_t seed, int dp_rank, int dp_size)
      : vocab_(vocab), seed_(seed), dp_rank_(dp_rank), dp_size_(dp_size) {}

  void next_batch(int64_t B, int64_t S, int32_t* tokens, int32_t* targets) override {
    if (S < 4) throw_error("synthetic copy task needs a sequence length >= 4 (got ", S, ")");
    std::vector<int32_t> row(S + 1);
    const int64_t m = S / 2;
    const uint64_t first = rows_done_ + uint64_t(dp_rank_) * uint64_t(B);
    for (int64_t b = 0; b < B; ++b) {
      Rng rng(mix64(seed_ * 0x9E3779B97F4A7C15ull + first + uint64_t(b)));
      for (int64_t i = 0; i < m; ++i) row[i] = int32_t(2 + rng.below(vocab_ - 2));
      row[m] = 1;
      for (int64_t i = m + 1; i <= S; ++i) row[i] = row[i - m - 1];
      for (int64_t t = 0; t < S; ++t) {
        tokens[b * S + t] = row[t];
        targets[b * S + t] = t + 1 > m ? row[t + 1] : -1;  // score only the copied symbols
      }
    }
    rows_done_ += uint64_t(dp_size_) * uint64_t(B);  // every DP rank's rows of this step
  }
  std::string describe() const override {
    return "synthetic copy task (vocab " + std::to_string(vocab_) + ", seed " + std::to_string(seed_) +
           ", DP rank " + std::to_string(dp_rank_) + " of " + std::to_string(dp_size_) + ")";
  }
  std::string position() const override {
    return nlohmann::json{{"global_rows", rows_done_}}.dump();
  }
  void restore_position(const std::string& p) override {
    const nlohmann::json j = nlohmann::json::parse(p);
    if (!j.contains("global_rows"))
      throw_error("synthetic copy task: the checkpoint's data position ", p,
                  " is from an older version of the task's stream; start a new run (or resume "
                  "with --data set to the same task and a fresh --ckpt_dir)");
    rows_done_ = j.at("global_rows").get<uint64_t>();
  }

 private:
  int64_t vocab_;
  uint64_t seed_;
  int dp_rank_, dp_size_;
  uint64_t rows_done_ = 0;  // global rows consumed by all DP ranks before the next batch
};

}  // namespace

std::unique_ptr<BatchSource> make_synthetic_source(const std::string& name, int64_t vocab,
                                                   uint64_t seed, int dp_rank, int dp_size) {
  if (name != "copy") throw_error("unknown synthetic task '", name, "' (available: copy)");
  if (vocab < 4) throw_error("synthetic copy task needs vocab_size >= 4 (got ", vocab, ")");
  if (dp_size < 1 || dp_rank < 0 || dp_rank >= dp_size)
    throw_error("synthetic copy task: DP rank ", dp_rank, " of ", dp_size, " is not a valid rank");
  return std::make_unique<CopyTask>(vocab, seed, dp_rank, dp_size);
}

}  // namespace difftron
