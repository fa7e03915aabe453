// Opening a token dataset (a directory or glob of HDF5 shards, docs/DATA.md) as a
// stream of training batches. Implemented by io/loader.cpp.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/batch_source.h"

namespace difftron {

struct DatasetOptions {
  std::string path;          // directory or glob of shards
  int64_t vocab_size = 0;    // the model's vocabulary: shards with a larger vocab are rejected
  uint64_t seed = 0;         // global shuffle seed (epoch order = f(seed, epoch))
  bool shuffle = true;       // false for validation: sequential, repeatable
  int dp_rank = 0, dp_size = 1;  // data-parallel ranks read disjoint samples of each global batch
  bool verify_checksums = true;  // crc32 + id range of every token at open (reads all data once)
  int prefetch_batches = 4;      // ring size of the background reader
  int64_t cycle_batches = 0;     // > 0: rewind to the first sample after this many batches
                                 // (validation: = eval batches, so each evaluation sees the same data)
};

std::unique_ptr<BatchSource> open_token_dataset(const DatasetOptions& options);
// The tokenizer spec stored in the dataset's shards ("bytes" or tokenizer.json text).
std::string dataset_tokenizer_spec(const std::string& path);
// The vocabulary size stored in the dataset's shards.
int64_t dataset_vocab_size(const std::string& path);

}  // namespace difftron
