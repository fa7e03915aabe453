// Synthetic batch sources for tests and smoke runs (no files needed). "copy": each row is
// m = S/2 random symbols, a separator, then the symbols again; only the copied half is scored,
// so a model that learned the task reaches a loss near zero.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/batch_source.h"

namespace difftron {

// name: "copy". vocab >= 4 (token 0 unused, 1 = separator, symbols in [2, vocab)).
// Data parallel: the rows form one global stream (row n drawn from its own generator, seeded by
// (seed, n)); at each step DP rank r takes the B rows after those of ranks 0..r-1, so DP ranks
// never repeat each other and dp_size ranks with batch B see what one process with batch
// dp_size * B sees. position() is the global row count consumed (the same on every rank), so a
// run resumed on a different DP size continues the stream with no row repeated or skipped.
std::unique_ptr<BatchSource> make_synthetic_source(const std::string& name, int64_t vocab,
                                                   uint64_t seed, int dp_rank = 0,
                                                   int dp_size = 1);

}  // namespace difftron
