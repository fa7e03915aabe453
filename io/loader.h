// The streaming loader: a dataset of token shards seen as one token stream, cut into
// samples of S+1 tokens; a deterministic per-epoch shuffle; DP ranks take disjoint slices
// of each global batch; a background thread fills a ring of host buffers ahead of the
// trainer. (The GPU copy happens in the model; a pinned host ring with asynchronous
// copies is a later optimisation.)
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "io/dataset.h"
#include "io/token_shards.h"

namespace difftron {

// The shard files of a dataset path: a directory (its *.h5, sorted), a glob, or one file.
// Throws Error naming the path when nothing matches.
std::vector<std::string> list_dataset_shards(const std::string& path);

// Every shard of a dataset, opened and checked for consistency (same vocab, tokenizer,
// EOS; for a directory, shard_index 0..num_shards-1 all present).
class TokenDataset {
 public:
  // verify: crc32 and id range of every token (parallel over shards; reads all the data).
  TokenDataset(const std::string& path, bool verify, int threads = 0);

  const std::string& path() const { return path_; }
  int64_t num_tokens() const { return total_; }
  int64_t num_documents() const { return documents_; }
  int64_t vocab_size() const { return vocab_; }
  int64_t eos_id() const { return eos_; }
  const std::string& tokenizer() const { return tokenizer_; }
  size_t num_shards() const { return shards_.size(); }
  const TokenShardReader& shard(size_t i) const { return *shards_[i]; }
  int64_t shard_start(size_t i) const { return starts_[i]; }
  // Tokens [start, start + n) of the concatenated stream (may span shards).
  void read(int64_t start, int64_t n, int32_t* out) const;

 private:
  std::string path_;
  std::vector<std::unique_ptr<TokenShardReader>> shards_;
  std::vector<int64_t> starts_;  // first global token of each shard
  int64_t total_ = 0, documents_ = 0, vocab_ = 0, eos_ = -1;
  std::string tokenizer_;
};

// A bijection of [0, n) chosen by (seed, epoch): a balanced Feistel network on the next
// even power of two with cycle walking. O(1) memory, random access.
class IndexPermutation {
 public:
  IndexPermutation(uint64_t n, uint64_t seed, uint64_t epoch);
  uint64_t operator()(uint64_t i) const;
  uint64_t size() const { return n_; }
  uint64_t epoch() const { return epoch_; }

 private:
  uint64_t encrypt(uint64_t x) const;
  uint64_t n_, epoch_;
  int half_bits_ = 1;
  uint64_t mask_ = 1;
  uint64_t keys_[6] = {};
};

struct LoaderStats {
  int64_t batches = 0;
  int64_t tokens = 0;          // tokens handed to the caller (B * S per batch)
  double wait_seconds = 0;     // time next_batch() spent blocked on the reader thread
  double read_seconds = 0;     // time the reader thread spent building batches
};

// Sample k of epoch e (k-th of the epoch's order) covers stream tokens [p*S, p*S + S + 1)
// with p = perm_{seed,e}(k) (identity without shuffle); there are (T - 1) / S samples per
// epoch. The global batch j is samples [j*B*dp, (j+1)*B*dp) of the endless sequence of
// epochs; rank r takes its r-th slice of B. position() is the count of global samples
// handed out, so a resumed run (even on another DP size) continues with the next one.
class TokenLoader final : public BatchSource {
 public:
  TokenLoader(std::shared_ptr<const TokenDataset> dataset, const DatasetOptions& options);
  ~TokenLoader() override;

  void next_batch(int64_t B, int64_t S, int32_t* tokens, int32_t* targets) override;
  std::string describe() const override;
  std::string position() const override;
  void restore_position(const std::string& position) override;

  LoaderStats stats() const;
  const TokenDataset& dataset() const { return *ds_; }

 private:
  struct Slot {
    int64_t next_samples = 0, next_cycle = 0;
    std::vector<int32_t> tokens, targets;
    std::exception_ptr error;
  };
  void start_reader(int64_t B, int64_t S);
  void stop_reader();
  void reader_loop();
  void fill(Slot& slot, int64_t samples, int64_t B, int64_t S, std::vector<int32_t>& scratch,
            std::unique_ptr<IndexPermutation>& perm);

  std::shared_ptr<const TokenDataset> ds_;
  DatasetOptions o_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
  bool stop_ = false, running_ = false;
  std::vector<Slot> slots_;
  std::vector<int> filled_;         // FIFO of filled slot indices
  std::vector<int> free_;
  // consumer position (what position() reports)
  int64_t samples_ = 0, cycle_ = 0, seq_ = 0;
  // reader state
  int64_t B_ = 0, S_ = 0, samples_per_epoch_ = 0;
  int64_t r_samples_ = 0, r_cycle_ = 0;
  LoaderStats stats_;
};

// Opens the dataset and a loader in one step (the concrete type of open_token_dataset).
std::unique_ptr<TokenLoader> open_token_loader(const DatasetOptions& options);

}  // namespace difftron
