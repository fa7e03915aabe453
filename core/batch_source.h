// Where training batches come from: the synthetic tasks (io/synthetic_data.h) and the
// HDF5 token-shard loader (io/) both implement this; the trainer knows nothing else.
#pragma once
#include <cstdint>
#include <string>

namespace difftron {

class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // Fills tokens and targets, both [B, S] row-major; a target < 0 is ignored by the loss.
  virtual void next_batch(int64_t B, int64_t S, int32_t* tokens, int32_t* targets) = 0;
  // One line for logs: what this source reads and where it is.
  virtual std::string describe() const = 0;
  // Exact position, serialisable (JSON text), so a resumed run continues with the very
  // next sample; restore_position takes what position() returned.
  virtual std::string position() const { return "{}"; }
  virtual void restore_position(const std::string& /*position*/) {}
};

}  // namespace difftron
