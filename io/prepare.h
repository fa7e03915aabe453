// Building token datasets (`difftron prepare`): text files, folders or stdin are tokenised
// in parallel (in input order), or already-tokenised files are imported (llm.c .bin,
// Megatron .bin/.idx, .npy, raw uint16/uint32); documents are split into OUT/train and
// OUT/val and written as HDF5 shards (io/token_shards.h). The whole OUT folder is built
// under a temporary name and renamed at the end, so a failed run leaves nothing behind (and
// an old OUT it was to replace intact). OUT is never /, $HOME, an input or a folder above
// one; an existing OUT is replaced only with --overwrite and only when prepare wrote it
// (prepare.json, train/ and val/ of shards, nothing else).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "io/token_shards.h"

namespace difftron {

constexpr int kMaxThreads = 1024;                      // --jobs
constexpr int64_t kMaxChunkTokens = int64_t(1) << 28;  // --chunk_tokens: HDF5 chunks must stay < 4 GiB

struct PrepareProgress {
  int64_t files_done = 0, files_total = 0;
  int64_t bytes_done = 0, bytes_total = 0;  // input bytes as stored (compressed for .gz); total 0 = unknown
  int64_t text_bytes = 0;  // bytes after decompression (what the tokenizer saw)
  int64_t tokens = 0;
  double seconds = 0;
};

struct PrepareOptions {
  std::vector<std::string> inputs;  // files, folders (recursive) or "-" for stdin
  std::string out;                  // the dataset folder: OUT/train, OUT/val
  std::string tokenizer;            // text: "bytes" (default) or a tokenizer.json path; imports: optional
  std::string eos_token;            // BPE: name of the EOS token ("" = the tokenizer's own)
  std::string format = "auto";      // auto | text | llmc | megatron | npy | raw16 | raw32
  std::vector<std::string> extensions = {"txt", "rst", "md"};  // text files taken from folders (+ .gz)
  int64_t shard_tokens = 100000000;
  int64_t chunk_tokens = kDefaultChunkTokens;
  double val_fraction = 0.01;       // every round(1/f)-th document goes to OUT/val
  int threads = 0;                  // tokeniser threads; 0 = all cores
  bool overwrite = false;           // replace an existing OUT that prepare wrote (nothing else)
  bool dedup = true;                // skip files whose content was already seen
  std::string doc_separator;        // "" = one document per file; else split text at this string
  int64_t import_vocab_size = 0;    // imports: vocabulary (0 = from the format or --tokenizer)
  int64_t import_eos_id = -2;       // imports: EOS id (-2 = from the format or tokenizer, -1 = none)
  std::function<void(const PrepareProgress&)> on_progress;  // about twice a second
};

struct SplitReport {
  int64_t documents = 0, tokens = 0, shards = 0;
};

struct PrepareReport {
  std::string format;               // what was read: "text" or an import format
  int64_t vocab_size = 0, eos_id = -1;
  int64_t files_read = 0, bytes_read = 0;  // bytes_read: after decompression
  int64_t skipped_extension = 0;    // folder entries without a listed extension
  int64_t skipped_binary = 0;       // text files with NUL bytes
  int64_t skipped_duplicate = 0;    // identical content seen before
  int64_t skipped_empty = 0;        // empty documents
  SplitReport train, val;
  double seconds = 0;
};

PrepareReport prepare_dataset(const PrepareOptions& options);

// Text of a file; .gz files are decompressed (zlib). Throws Error naming the file.
std::string read_text_input(const std::string& path);

}  // namespace difftron
