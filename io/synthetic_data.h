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
std::unique_ptr<BatchSource> make_synthetic_source(const std::string& name, int64_t vocab,
                                                   uint64_t seed);

}  // namespace difftron
