// HDF5 token shards (docs/DATA.md): writing one shard, opening one
// for reading with every attribute and layout checked, and fast reads of token ranges.
// A reader maps the file and copies tokens straight out of the page cache (no HDF5 call
// after open), so any thread may read from it concurrently.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace difftron {

constexpr const char* kTokenShardFormat = "difftron-tokens";
constexpr int kTokenShardVersion = 1;
constexpr int64_t kDefaultChunkTokens = int64_t(1) << 20;
// The most tokens one shard may hold (readers refuse more): bounds every size derived from it.
constexpr int64_t kMaxShardTokens = int64_t(1) << 40;

// The attributes on a shard's root group.
struct ShardMeta {
  int64_t version = kTokenShardVersion;
  int64_t vocab_size = 0;
  std::string tokenizer;          // "bytes", tokenizer.json text, or "none"; readers also accept
                                  // a path relative to the shard's folder, staying inside it
                                  // (returned resolved; anything else is refused)
  int64_t eos_id = -1;            // -1: the data has no document separator
  int64_t num_tokens = 0;
  int64_t num_documents = 0;      // len(/doc_offsets) - 1
  uint32_t tokens_crc32 = 0;      // zlib crc32 of /tokens' little-endian bytes
  int64_t shard_index = 0;        // position in its dataset: 0 .. num_shards-1
  int64_t num_shards = 0;         // 0: unknown (written before the dataset was complete)
  std::string split;              // "train", "val", or free text
  int64_t starts_mid_document = 0;  // 1 when token 0 continues the previous shard's document
  std::string source;             // free text: what produced the shard
};

// Token width on disk: 2 bytes when vocab <= 65536, else 4.
int token_bytes_for_vocab(int64_t vocab_size);

// Disables HDF5's own error printing on the calling thread (HDF5 keeps this per thread);
// our functions call it themselves and report errors as difftron::Error.
void silence_hdf5_errors();

// Writes one shard: tokens are appended in pieces (documents may span appends), then
// finish() writes /doc_offsets and the attributes. Writes go straight to `path`: callers
// that need atomicity write into a temporary directory and rename it (io/prepare.cpp).
class TokenShardWriter {
 public:
  TokenShardWriter(const std::string& path, const ShardMeta& meta,
                   int64_t chunk_tokens = kDefaultChunkTokens);
  ~TokenShardWriter();
  TokenShardWriter(const TokenShardWriter&) = delete;
  TokenShardWriter& operator=(const TokenShardWriter&) = delete;

  // Marks the next appended token as the start of a document.
  void begin_document();
  // Appends tokens; each must be < vocab_size (else Error naming the shard and value).
  void append(const uint32_t* tokens, int64_t n);
  int64_t num_tokens() const { return count_; }
  // Writes offsets and attributes and closes the file; returns the final metadata.
  ShardMeta finish();

 private:
  void flush_buffer();
  void create_dataset(int64_t chunk);
  std::string path_;
  ShardMeta meta_;
  int64_t chunk_tokens_;
  int token_bytes_;
  int64_t file_ = -1, dset_ = -1;
  std::vector<uint32_t> buffer_;  // tokens not yet written
  int64_t count_ = 0, written_ = 0;
  uint32_t crc_ = 0;
  std::vector<uint64_t> offsets_;
  bool finished_ = false;
};

// Rewrites the dataset-position attributes of a finished shard (after all shards exist).
void set_shard_position(const std::string& path, int64_t shard_index, int64_t num_shards);

class TokenShardReader {
 public:
  // Opens and validates: format, version, attribute types, /tokens dtype and length
  // against num_tokens, /doc_offsets (monotone, ends at num_tokens), the file size against
  // the data's extent. The file is untrusted: every size it declares is checked against the
  // bytes really stored before it sizes an allocation, and a tokenizer path must stay in
  // the shard's folder. Throws Error naming `path` and the problem.
  explicit TokenShardReader(const std::string& path);
  ~TokenShardReader();
  TokenShardReader(const TokenShardReader&) = delete;
  TokenShardReader& operator=(const TokenShardReader&) = delete;

  const std::string& path() const { return path_; }
  const ShardMeta& meta() const { return meta_; }
  int64_t num_tokens() const { return meta_.num_tokens; }
  int token_bytes() const { return token_bytes_; }
  const std::vector<uint64_t>& doc_offsets() const { return doc_offsets_; }
  // "mmap" when tokens are read from the mapped file, "memory" when they were loaded
  // (compressed or unusual layouts written by other tools).
  const char* access_mode() const { return mapped_ ? "mmap" : "memory"; }

  // Tokens [start, start + n) widened to int32. Ids >= vocab_limit raise Error naming
  // the shard, the position and the value (vocab_limit <= 0: the shard's vocab_size).
  void read(int64_t start, int64_t n, int32_t* out, int64_t vocab_limit = 0) const;
  void read(int64_t start, int64_t n, uint32_t* out) const;

  struct Scan {
    uint32_t crc32 = 0;
    int64_t max_token = -1;
    int64_t eos_count = 0;
  };
  // Reads every token: crc32, the largest id and the EOS count.
  Scan scan() const;
  // scan(), then Error when the checksum differs from the attribute or an id >= vocab_size.
  void verify() const;

 private:
  const uint8_t* token_ptr(int64_t i, int64_t* run) const;
  std::string path_;
  ShardMeta meta_;
  int token_bytes_ = 2;
  std::vector<uint64_t> doc_offsets_;
  int64_t chunk_len_ = 0;                  // tokens per chunk
  std::vector<const uint8_t*> chunks_;     // base of chunk k (tokens k*chunk_len_ ...)
  void* map_ = nullptr;
  size_t map_size_ = 0;
  bool mapped_ = false;
  std::vector<uint8_t> owned_;             // the tokens when not mapped
};

}  // namespace difftron
