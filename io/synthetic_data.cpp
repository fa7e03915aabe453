// Synthetic tasks: see synthetic_data.h.
#include "io/synthetic_data.h"

#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"

namespace difftron {
namespace {

class CopyTask final : public BatchSource {
 public:
  CopyTask(int64_t vocab, uint64_t seed) : vocab_(vocab), seed_(seed), rng_(seed) {}

  void next_batch(int64_t B, int64_t S, int32_t* tokens, int32_t* targets) override {
    if (S < 4) throw_error("synthetic copy task needs a sequence length >= 4 (got ", S, ")");
    std::vector<int32_t> row(S + 1);
    const int64_t m = S / 2;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < m; ++i) row[i] = int32_t(2 + rng_.below(vocab_ - 2));
      row[m] = 1;
      for (int64_t i = m + 1; i <= S; ++i) row[i] = row[i - m - 1];
      for (int64_t t = 0; t < S; ++t) {
        tokens[b * S + t] = row[t];
        targets[b * S + t] = t + 1 > m ? row[t + 1] : -1;  // score only the copied symbols
      }
    }
  }
  std::string describe() const override {
    return "synthetic copy task (vocab " + std::to_string(vocab_) + ", seed " + std::to_string(seed_) + ")";
  }
  std::string position() const override {
    return nlohmann::json{{"rng_state", rng_.state()}}.dump();
  }
  void restore_position(const std::string& p) override {
    rng_.set_state(nlohmann::json::parse(p).at("rng_state").get<uint64_t>());
  }

 private:
  int64_t vocab_;
  uint64_t seed_;
  Rng rng_;
};

}  // namespace

std::unique_ptr<BatchSource> make_synthetic_source(const std::string& name, int64_t vocab,
                                                   uint64_t seed) {
  if (name != "copy") throw_error("unknown synthetic task '", name, "' (available: copy)");
  if (vocab < 4) throw_error("synthetic copy task needs vocab_size >= 4 (got ", vocab, ")");
  return std::make_unique<CopyTask>(vocab, seed);
}

}  // namespace difftron
