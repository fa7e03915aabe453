// `difftron inspect PATH...`: a token shard's or dataset's attributes, token and document
// counts, vocabulary, checksum status (every token is read and checked), and a decoded
// sample. Exit status 1 when any shard is unreadable, damaged or inconsistent.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>

#include <gflags/gflags.h>

#include "base/error.h"
#include "io/loader.h"
#include "io/tokenizer.h"
#include "launch/command.h"

DEFINE_int64(decode_tokens, 200, "inspect: tokens to decode as a text sample (0 = none)");
DEFINE_int64(decode_at, 0, "inspect: stream position of the decoded sample");
DEFINE_bool(verify_tokens, true, "inspect: read every token: crc32 against the attribute, ids < vocab");

namespace {

using difftron::ShardMeta;
using difftron::TokenShardReader;

std::string tokenizer_summary(const std::string& spec) {
  if (spec == "bytes" || spec == "none" || spec.empty()) return spec.empty() ? "(empty)" : spec;
  return "tokenizer.json (" + std::to_string(spec.size()) + " bytes of JSON)";
}

std::string crc_hex(uint32_t v) {
  char b[16];
  std::snprintf(b, sizeof b, "%08x", v);
  return b;
}

void print_sample(const std::string& spec, const std::vector<int32_t>& ids, int64_t at) {
  std::printf("sample (%zu tokens from position %lld):\n", ids.size(), (long long)at);
  std::unique_ptr<difftron::Tokenizer> tok;
  try {
    if (spec != "none" && !spec.empty()) tok = difftron::load_tokenizer(spec);
  } catch (const difftron::Error& e) {
    std::printf("  (cannot rebuild the tokenizer: %s)\n", e.what());
  }
  if (tok) {
    std::printf("----\n%s\n----\n", tok->decode(ids).c_str());
  } else {
    std::printf("  ids:");
    for (size_t i = 0; i < ids.size() && i < 64; ++i) std::printf(" %d", ids[i]);
    std::printf("%s\n", ids.size() > 64 ? " ..." : "");
  }
}

// Prints one shard; returns false when it is damaged.
bool inspect_shard(const std::string& path, bool detailed, int64_t* tokens, int64_t* docs) {
  std::unique_ptr<TokenShardReader> r;
  try {
    r = std::make_unique<TokenShardReader>(path);
  } catch (const difftron::Error& e) {
    std::printf("%s: ERROR: %s\n", path.c_str(), e.what());
    return false;
  }
  const ShardMeta& m = r->meta();
  *tokens += m.num_tokens;
  *docs += m.num_documents;
  std::string status = "not checked";
  bool ok = true;
  TokenShardReader::Scan scan;
  if (FLAGS_verify_tokens) {
    scan = r->scan();
    if (scan.crc32 != m.tokens_crc32) {
      status = "MISMATCH (data " + crc_hex(scan.crc32) + ", attribute " + crc_hex(m.tokens_crc32) + ")";
      ok = false;
    } else if (scan.max_token >= m.vocab_size) {
      status = "BAD: token id " + std::to_string(scan.max_token) + " >= vocab_size";
      ok = false;
    } else {
      status = "ok";
    }
  }
  if (!detailed) {
    std::printf("  [%lld/%lld] %s: %lld tokens, %lld documents, crc32 %s %s\n", (long long)m.shard_index,
                (long long)m.num_shards, std::filesystem::path(path).filename().c_str(), (long long)m.num_tokens,
                (long long)m.num_documents, crc_hex(m.tokens_crc32).c_str(), status.c_str());
    return ok;
  }
  std::printf("%s\n", path.c_str());
  std::printf("  format: difftron-tokens version %lld, /tokens uint%d (%s)\n", (long long)m.version,
              8 * r->token_bytes(), r->access_mode());
  std::printf("  vocab_size: %lld, eos_id: %lld, tokenizer: %s\n", (long long)m.vocab_size, (long long)m.eos_id,
              tokenizer_summary(m.tokenizer).c_str());
  std::printf("  num_tokens: %lld, num_documents: %lld%s\n", (long long)m.num_tokens, (long long)m.num_documents,
              m.starts_mid_document ? " (the first continues the previous shard's)" : "");
  const auto& off = r->doc_offsets();
  if (off.size() >= 2) {
    uint64_t lo = UINT64_MAX, hi = 0;
    for (size_t i = 1; i < off.size(); ++i) {
      lo = std::min(lo, off[i] - off[i - 1]);
      hi = std::max(hi, off[i] - off[i - 1]);
    }
    std::printf("  document length: min %llu, mean %.1f, max %llu tokens\n", (unsigned long long)lo,
                double(m.num_tokens) / double(off.size() - 1), (unsigned long long)hi);
  }
  std::printf("  shard %lld of %lld, split '%s', source: %s\n", (long long)m.shard_index, (long long)m.num_shards,
              m.split.c_str(), m.source.c_str());
  std::printf("  tokens_crc32: %s: %s", crc_hex(m.tokens_crc32).c_str(), status.c_str());
  if (FLAGS_verify_tokens)
    std::printf(" (max id %lld, %lld EOS tokens)", (long long)scan.max_token, (long long)scan.eos_count);
  std::printf("\n");
  if (ok && FLAGS_decode_tokens > 0 && m.num_tokens > 0) {
    const int64_t at = std::min(std::max<int64_t>(0, FLAGS_decode_at), m.num_tokens - 1);
    std::vector<int32_t> ids(size_t(std::min(FLAGS_decode_tokens, m.num_tokens - at)));
    r->read(at, int64_t(ids.size()), ids.data());
    print_sample(m.tokenizer, ids, at);
  }
  return ok;
}

bool inspect_path(const std::string& path) {
  std::error_code ec;
  const bool is_file = std::filesystem::is_regular_file(path, ec);
  if (is_file) {
    int64_t t = 0, d = 0;
    return inspect_shard(path, true, &t, &d);
  }
  std::vector<std::string> files;
  try {
    files = difftron::list_dataset_shards(path);
  } catch (const difftron::Error& e) {
    std::printf("%s: ERROR: %s\n", path.c_str(), e.what());
    return false;
  }
  std::printf("dataset %s: %zu shard file(s)\n", path.c_str(), files.size());
  bool ok = true;
  int64_t tokens = 0, docs = 0;
  for (const auto& f : files) ok = inspect_shard(f, false, &tokens, &docs) && ok;
  std::printf("  total: %lld tokens, %lld documents\n", (long long)tokens, (long long)docs);
  try {
    difftron::TokenDataset ds(path, /*verify=*/false);
    std::printf("  vocab_size: %lld, eos_id: %lld, tokenizer: %s\n", (long long)ds.vocab_size(),
                (long long)ds.eos_id(), tokenizer_summary(ds.tokenizer()).c_str());
    std::printf("  consistency (one vocabulary, tokenizer and EOS; all shards present): ok\n");
    if (ok && FLAGS_decode_tokens > 0) {
      const int64_t at = std::min(std::max<int64_t>(0, FLAGS_decode_at), ds.num_tokens() - 1);
      std::vector<int32_t> ids(size_t(std::min(FLAGS_decode_tokens, ds.num_tokens() - at)));
      ds.read(at, int64_t(ids.size()), ids.data());
      print_sample(ds.tokenizer(), ids, at);
    }
  } catch (const difftron::Error& e) {
    std::printf("  consistency: ERROR: %s\n", e.what());
    ok = false;
  }
  return ok;
}

int inspect_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc < 2) {
    std::cerr << "usage: difftron inspect SHARD.h5|DATASET_DIR|'GLOB' ... [--decode_tokens=N] [--decode_at=POS]\n";
    return 2;
  }
  bool ok = true;
  for (int i = 1; i < argc; ++i) ok = inspect_path(argv[i]) && ok;
  return ok ? 0 : 1;
}

}  // namespace

DIFFTRON_COMMAND("inspect", "show a token shard's or dataset's attributes, checksums and a decoded sample",
                 inspect_main);
