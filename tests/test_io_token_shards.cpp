// Token shards (io/token_shards.h): the writer's files are checked with raw HDF5 calls
// against docs/DATA.md and an independent bitwise CRC-32; the reader round-trips
// every layout (chunked, contiguous, compressed); damaged and malformed files must give an
// Error naming the file and the problem, never a crash or wrong data.
#include <sys/stat.h>

#include <cstring>
#include <filesystem>
#include <random>

#include "io/token_shards.h"
#include "io_test_util.h"

using namespace difftron;
using iotest::TempDir;

namespace {

uint32_t token_at(int64_t i, int64_t vocab) { return uint32_t((i * 7919 + 13) % vocab); }

// Writes n formula tokens with documents starting at doc_starts.
ShardMeta write_shard(const std::string& path, int64_t n, int64_t vocab, std::vector<int64_t> doc_starts,
                      int64_t chunk = kDefaultChunkTokens, const std::string& tokenizer = "bytes",
                      int64_t eos = -1) {
  ShardMeta m;
  m.vocab_size = vocab;
  m.tokenizer = tokenizer;
  m.eos_id = eos;
  m.split = "train";
  TokenShardWriter w(path, m, chunk);
  std::vector<uint32_t> buf;
  size_t d = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (d < doc_starts.size() && doc_starts[d] == i) {
      if (!buf.empty()) w.append(buf.data(), int64_t(buf.size()));
      buf.clear();
      w.begin_document();
      ++d;
    }
    buf.push_back(token_at(i, vocab));
    if (buf.size() == 333) {  // odd piece sizes: appends never line up with chunks
      w.append(buf.data(), int64_t(buf.size()));
      buf.clear();
    }
  }
  if (!buf.empty()) w.append(buf.data(), int64_t(buf.size()));
  return w.finish();
}

uint64_t env_seed() {
  const char* s = std::getenv("DIFFTRON_FUZZ_SEED");
  return s ? std::strtoull(s, nullptr, 10) : 123;
}

void open_shard(const std::string& path) { TokenShardReader r(path); }

int64_t raw_attr_i64(hid_t f, const char* name) {
  hid_t a = H5Aopen(f, name, H5P_DEFAULT);
  EXPECT_GE(a, 0) << name;
  int64_t v = -12345;
  H5Aread(a, H5T_NATIVE_INT64, &v);
  H5Aclose(a);
  return v;
}

std::string raw_attr_str(hid_t f, const char* name) {
  hid_t a = H5Aopen(f, name, H5P_DEFAULT);
  EXPECT_GE(a, 0) << name;
  hid_t t = H5Aget_type(a);
  EXPECT_EQ(H5Tget_class(t), H5T_STRING) << name;
  std::string s(H5Tget_size(t), '\0');
  H5Aread(a, t, s.data());
  while (!s.empty() && s.back() == '\0') s.pop_back();
  H5Tclose(t);
  H5Aclose(a);
  return s;
}

}  // namespace

TEST(TokenShards, WriterProducesTheDocumentedLayout) {
  TempDir dir;
  const std::string path = dir / "s.h5";
  const int64_t n = 2500, vocab = 3000;
  write_shard(path, n, vocab, {0, 100, 1000}, /*chunk=*/1024, "bytes", 256);

  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  EXPECT_EQ(raw_attr_str(f, "format"), "difftron-tokens");
  EXPECT_EQ(raw_attr_i64(f, "version"), 1);
  EXPECT_EQ(raw_attr_i64(f, "vocab_size"), vocab);
  EXPECT_EQ(raw_attr_str(f, "tokenizer"), "bytes");
  EXPECT_EQ(raw_attr_i64(f, "num_tokens"), n);
  EXPECT_EQ(raw_attr_i64(f, "num_documents"), 3);
  EXPECT_EQ(raw_attr_i64(f, "eos_id"), 256);
  EXPECT_EQ(raw_attr_i64(f, "starts_mid_document"), 0);

  hid_t d = H5Dopen2(f, "/tokens", H5P_DEFAULT);
  hid_t t = H5Dget_type(d);
  EXPECT_EQ(H5Tget_size(t), 2u);  // vocab <= 65536: uint16
  EXPECT_EQ(H5Tget_sign(t), H5T_SGN_NONE);
  hid_t dcpl = H5Dget_create_plist(d);
  EXPECT_EQ(H5Pget_layout(dcpl), H5D_CHUNKED);
  hsize_t cdim = 0;
  H5Pget_chunk(dcpl, 1, &cdim);
  EXPECT_EQ(cdim, 1024u);
  std::vector<uint16_t> tok(n);
  ASSERT_GE(H5Dread(d, H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, tok.data()), 0);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(tok[i], token_at(i, vocab)) << i;
  const uint32_t crc = iotest::bitwise_crc32(reinterpret_cast<const uint8_t*>(tok.data()), n * 2);
  EXPECT_EQ(uint32_t(raw_attr_i64(f, "tokens_crc32")), crc);
  H5Pclose(dcpl);
  H5Tclose(t);
  H5Dclose(d);

  d = H5Dopen2(f, "/doc_offsets", H5P_DEFAULT);
  std::vector<uint64_t> off(4);
  hid_t s = H5Dget_space(d);
  EXPECT_EQ(H5Sget_simple_extent_npoints(s), 4);
  H5Dread(d, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, off.data());
  EXPECT_EQ(off, (std::vector<uint64_t>{0, 100, 1000, 2500}));
  H5Sclose(s);
  H5Dclose(d);
  H5Fclose(f);
}

TEST(TokenShards, ReaderRoundTripsUint16AndUint32) {
  TempDir dir;
  for (int64_t vocab : {int64_t(50000), int64_t(100000)}) {
    const std::string path = dir / ("s" + std::to_string(vocab) + ".h5");
    const int64_t n = 5000;
    write_shard(path, n, vocab, {0, 7, 4000}, /*chunk=*/512, "none", vocab - 1);
    TokenShardReader r(path);
    EXPECT_STREQ(r.access_mode(), "mmap");
    EXPECT_EQ(r.token_bytes(), vocab <= 65536 ? 2 : 4);
    EXPECT_EQ(r.num_tokens(), n);
    EXPECT_EQ(r.meta().num_documents, 3);
    EXPECT_EQ(r.doc_offsets(), (std::vector<uint64_t>{0, 7, 4000, 5000}));
    std::mt19937_64 rng(7);
    for (int trial = 0; trial < 200; ++trial) {
      int64_t start = int64_t(rng() % n), len = int64_t(rng() % 1500);
      len = std::min(len, n - start);
      std::vector<int32_t> out(len + 1, -1);
      r.read(start, len, out.data());
      for (int64_t j = 0; j < len; ++j) ASSERT_EQ(out[j], int32_t(token_at(start + j, vocab))) << start + j;
      EXPECT_EQ(out[len], -1);  // nothing written past the range
    }
    // scan: crc32 over the stored little-endian bytes, max id, EOS count.
    std::vector<uint8_t> bytes;
    int64_t maxv = -1, eos = 0;
    for (int64_t i = 0; i < n; ++i) {
      uint32_t v = token_at(i, vocab);
      for (int b = 0; b < r.token_bytes(); ++b) bytes.push_back(uint8_t(v >> (8 * b)));
      maxv = std::max<int64_t>(maxv, v);
      eos += v == uint32_t(vocab - 1);
    }
    auto sc = r.scan();
    EXPECT_EQ(sc.crc32, iotest::bitwise_crc32(bytes.data(), bytes.size()));
    EXPECT_EQ(sc.max_token, maxv);
    EXPECT_EQ(sc.eos_count, eos);
    EXPECT_NO_THROW(r.verify());
  }
}

TEST(TokenShards, DataBeforeTheFirstDocumentMarksAContinuation) {
  TempDir dir;
  const std::string path = dir / "c.h5";
  ShardMeta m;
  m.vocab_size = 10;
  TokenShardWriter w(path, m, 4);
  uint32_t a[3] = {1, 2, 3}, b[2] = {4, 5};
  w.append(a, 3);  // continues a document from an earlier shard
  w.begin_document();
  w.append(b, 2);
  ShardMeta out = w.finish();
  EXPECT_EQ(out.starts_mid_document, 1);
  TokenShardReader r(path);
  EXPECT_EQ(r.doc_offsets(), (std::vector<uint64_t>{0, 3, 5}));
  EXPECT_EQ(r.meta().starts_mid_document, 1);
}

TEST(TokenShards, SmallShardGetsOneExactChunkAndLargeAttributesWork) {
  TempDir dir;
  const std::string path = dir / "small.h5";
  std::string big(3 << 20, 'x');  // a tokenizer.json can be megabytes
  for (size_t i = 0; i < big.size(); i += 97) big[i] = char('a' + i % 26);
  big[0] = '{';  // JSON text (anything else would be taken for a path)
  write_shard(path, 10, 300, {0}, kDefaultChunkTokens, big);
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_LT(st.st_size, int64_t(big.size()) + 64 * 1024);  // no 2 MB chunk of padding
  TokenShardReader r(path);
  EXPECT_EQ(r.meta().tokenizer, big);
  std::vector<int32_t> out(10);
  r.read(0, 10, out.data());
  for (int i = 0; i < 10; ++i) EXPECT_EQ(out[i], int32_t(token_at(i, 300)));
}

TEST(TokenShards, EmptyShardIsValid) {
  TempDir dir;
  const std::string path = dir / "e.h5";
  write_shard(path, 0, 300, {});
  TokenShardReader r(path);
  EXPECT_EQ(r.num_tokens(), 0);
  EXPECT_EQ(r.meta().num_documents, 0);
  EXPECT_NO_THROW(r.verify());
}

// Shards written by another tool: compressed chunks (read through HDF5 into memory) and a
// contiguous dataset (mapped); fixed-length string attributes.
TEST(TokenShards, ForeignLayoutsAreRead) {
  TempDir dir;
  const int64_t n = 3000, vocab = 1000;
  std::vector<uint16_t> tok(n);
  for (int64_t i = 0; i < n; ++i) tok[i] = uint16_t(token_at(i, vocab));
  const uint32_t crc = iotest::bitwise_crc32(reinterpret_cast<const uint8_t*>(tok.data()), n * 2);
  for (int compressed = 0; compressed < 2; ++compressed) {
    const std::string path = dir / (compressed ? "gz.h5" : "contig.h5");
    hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t dims = n;
    hid_t s = H5Screate_simple(1, &dims, nullptr);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (compressed) {
      hsize_t c = 700;
      H5Pset_chunk(dcpl, 1, &c);
      H5Pset_deflate(dcpl, 4);
    }
    hid_t d = H5Dcreate2(f, "/tokens", H5T_STD_U16LE, s, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Dwrite(d, H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, tok.data());
    H5Dclose(d);
    H5Pclose(dcpl);
    H5Sclose(s);
    uint64_t off[2] = {0, uint64_t(n)};
    hsize_t two = 2;
    s = H5Screate_simple(1, &two, nullptr);
    d = H5Dcreate2(f, "/doc_offsets", H5T_STD_U64LE, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(d, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, off);
    H5Dclose(d);
    H5Sclose(s);
    H5Fclose(f);
    iotest::h5_set_attr_str(path, "format", "difftron-tokens");
    iotest::h5_set_attr_i64(path, "version", 1);
    iotest::h5_set_attr_i64(path, "vocab_size", vocab);
    iotest::h5_set_attr_str(path, "tokenizer", "none");
    iotest::h5_set_attr_i64(path, "num_tokens", n);
    iotest::h5_set_attr_i64(path, "eos_id", -1);
    iotest::h5_set_attr_i64(path, "tokens_crc32", crc);
    TokenShardReader r(path);
    EXPECT_STREQ(r.access_mode(), compressed ? "memory" : "mmap");
    std::vector<int32_t> out(n);
    r.read(0, n, out.data());
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out[i], tok[i]) << i;
    EXPECT_NO_THROW(r.verify());
  }
}

// ---- bad input ---------------------------------------------------------------------------

TEST(TokenShardErrors, MissingNotHdf5AndTruncatedFiles) {
  TempDir dir;
  EXPECT_ERROR_HAS(open_shard(dir / "nope.h5"), dir / "nope.h5", "No such file");
  iotest::write_text(dir / "text.h5", "this is not HDF5\n");
  EXPECT_ERROR_HAS(open_shard(dir / "text.h5"), dir / "text.h5", "not an HDF5 file");
  const std::string path = dir / "t.h5";
  write_shard(path, 200000, 50000, {0}, 65536);
  auto bytes = iotest::read_file(path);
  for (double keep : {0.9, 0.5, 0.999}) {
    const std::string cut = dir / "cut.h5";
    iotest::write_file(cut, bytes.data(), size_t(bytes.size() * keep));
    EXPECT_ERROR_HAS(open_shard(cut), cut, "truncated");
  }
  iotest::write_file(dir / "head.h5", bytes.data(), 100);
  EXPECT_ERROR_HAS(open_shard(dir / "head.h5"), dir / "head.h5");
}

TEST(TokenShardErrors, WrongFormatVersionAndAttributes) {
  TempDir dir;
  const std::string path = dir / "s.h5";
  auto fresh = [&] { write_shard(path, 1000, 500, {0, 10}, 256); };
  fresh();
  iotest::h5_set_attr_str(path, "format", "megatron");
  EXPECT_ERROR_HAS(open_shard(path), path, "format is 'megatron'");
  fresh();
  iotest::h5_delete_attr(path, "format");
  EXPECT_ERROR_HAS(open_shard(path), path, "not a difftron token shard");
  fresh();
  iotest::h5_set_attr_i64(path, "version", 2);
  EXPECT_ERROR_HAS(open_shard(path), path, "version 2 is not supported");
  fresh();
  iotest::h5_delete_attr(path, "tokens_crc32");
  EXPECT_ERROR_HAS(open_shard(path), path, "missing attribute 'tokens_crc32'");
  fresh();
  iotest::h5_set_attr_str(path, "vocab_size", "500");
  EXPECT_ERROR_HAS(open_shard(path), path, "'vocab_size' should be an integer");
  fresh();
  iotest::h5_set_attr_i64(path, "num_tokens", 1500);
  EXPECT_ERROR_HAS(open_shard(path), path, "ends at 1000 but num_tokens is 1500");
  fresh();
  iotest::h5_set_attr_i64(path, "num_documents", 7);
  EXPECT_ERROR_HAS(open_shard(path), path, "num_documents attribute is 7");
  fresh();
  iotest::h5_set_attr_i64(path, "eos_id", 500);
  EXPECT_ERROR_HAS(open_shard(path), path, "eos_id 500");
  fresh();
  iotest::h5_set_attr_i64(path, "vocab_size", 70000);  // ids would not fit uint16
  EXPECT_ERROR_HAS(open_shard(path), path, "does not fit the uint16");
}

TEST(TokenShardErrors, BadDocOffsets) {
  TempDir dir;
  const std::string path = dir / "s.h5";
  write_shard(path, 1000, 500, {0, 10, 20}, 256);
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  hid_t d = H5Dopen2(f, "/doc_offsets", H5P_DEFAULT);
  uint64_t bad[4] = {0, 30, 20, 1000};
  H5Dwrite(d, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, bad);
  H5Dclose(d);
  H5Fclose(f);
  EXPECT_ERROR_HAS(open_shard(path), path, "/doc_offsets decreases at index 2");
}

TEST(TokenShardErrors, ChecksumMismatchAndIdsOutOfRange) {
  TempDir dir;
  const std::string path = dir / "s.h5";
  write_shard(path, 4000, 500, {0}, 1024);
  iotest::h5_poke_token(path, 2500, token_at(2500, 500) ^ 1);
  {
    TokenShardReader r(path);  // opening is cheap and does not read tokens
    EXPECT_ERROR_HAS(r.verify(), path, "checksum mismatch");
  }
  // Flip one byte of token data on disk directly (not through HDF5).
  write_shard(path, 4000, 500, {0}, 1024);
  {
    auto bytes = iotest::read_file(path);
    std::vector<uint16_t> pattern(8);
    for (int j = 0; j < 8; ++j) pattern[j] = uint16_t(token_at(3000 + j, 500));
    auto it = std::search(bytes.begin(), bytes.end(), reinterpret_cast<char*>(pattern.data()),
                          reinterpret_cast<char*>(pattern.data()) + 16);
    ASSERT_NE(it, bytes.end());
    *it ^= 0x01;
    iotest::write_file(path, bytes.data(), bytes.size());
    TokenShardReader r(path);
    EXPECT_ERROR_HAS(r.verify(), path, "checksum mismatch");
  }
  // A stored id >= vocab_size (here: vocab_size lowered after writing).
  write_shard(path, 4000, 500, {0}, 1024);
  iotest::h5_set_attr_i64(path, "vocab_size", 100);
  {
    TokenShardReader r(path);
    EXPECT_ERROR_HAS(r.verify(), path, "is >= the shard's vocab_size 100");
    std::vector<int32_t> out(50);
    EXPECT_ERROR_HAS(r.read(0, 50, out.data()), path, "at position", ">= the shard's vocab_size 100");
  }
  // The writer refuses ids >= vocab.
  ShardMeta m;
  m.vocab_size = 10;
  TokenShardWriter w(dir / "w.h5", m);
  uint32_t t[3] = {1, 10, 2};
  EXPECT_ERROR_HAS(w.append(t, 3), dir / "w.h5", "token id 10", ">= vocab_size 10");
}

// Random damage anywhere in a shard: opening and verifying must either succeed with the
// right tokens or raise difftron::Error; never crash, hang or return other data silently.
TEST(TokenShardErrors, RandomCorruptionIsDetected) {
  TempDir dir;
  const std::string path = dir / "s.h5";
  const int64_t n = 3000, vocab = 700;
  write_shard(path, n, vocab, {0, 50}, 1024);
  const auto clean = iotest::read_file(path);
  std::mt19937_64 rng(env_seed());
  int errors = 0, clean_reads = 0;
  const char* env = std::getenv("DIFFTRON_FUZZ_TRIALS");  // more for a longer local run
  const int trials = env ? std::atoi(env) : 300;
  for (int trial = 0; trial < trials; ++trial) {
    auto bytes = clean;
    const int flips = 1 + int(rng() % 4);
    for (int k = 0; k < flips; ++k) bytes[rng() % bytes.size()] ^= char(1 + rng() % 255);
    const std::string bad = dir / "bad.h5";
    iotest::write_file(bad, bytes.data(), bytes.size());
    try {
      TokenShardReader r(bad);
      r.verify();
      std::vector<int32_t> out(n);
      r.read(0, n, out.data());
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(out[i], int32_t(token_at(i, vocab))) << "trial " << trial;
      ++clean_reads;
    } catch (const difftron::Error& e) {
      ++errors;
    }
  }
  EXPECT_GT(errors, 0);
  EXPECT_EQ(errors + clean_reads, trials);
}

// ---- untrusted files ---------------------------------------------------------------------

// A `tokenizer` attribute that is a path may only name a file in the shard's own folder:
// absolute paths, ".." and symlinks leading out are refused with the shard and the value.
TEST(TokenShardUntrusted, TokenizerPathMustStayInTheShardFolder) {
  TempDir dir;
  std::filesystem::create_directories(dir / "ds");
  iotest::write_text(dir / "outside.json", "{}");
  const std::string path = dir / "ds/s.h5";
  for (const std::string bad : {"../../../../../../../../etc/shadow", "../outside.json", "sub/../../outside.json"}) {
    write_shard(path, 10, 300, {0}, kDefaultChunkTokens, bad);
    EXPECT_ERROR_HAS(open_shard(path), path, "tokenizer attribute '" + bad + "'", "outside the shard's folder");
  }
  write_shard(path, 10, 300, {0}, kDefaultChunkTokens, "/etc/shadow");
  EXPECT_ERROR_HAS(open_shard(path), path, "absolute path '/etc/shadow'", "re-run difftron prepare");
  std::filesystem::create_directory_symlink(dir.path(), dir / "ds/up");
  write_shard(path, 10, 300, {0}, kDefaultChunkTokens, "up/outside.json");
  EXPECT_ERROR_HAS(open_shard(path), path, "'up/outside.json'", "outside the shard's folder");
  // A file inside the folder is accepted and handed on resolved.
  iotest::write_text(dir / "ds/tok.json", "{}");
  write_shard(path, 10, 300, {0}, kDefaultChunkTokens, "./tok.json");
  TokenShardReader r(path);
  EXPECT_EQ(r.meta().tokenizer, std::filesystem::weakly_canonical(dir / "ds/tok.json").string());
}

// A shard written by hand with the HDF5 C API: /tokens (uint16) of `ntok` elements, chunked
// (`chunk` > 0, optionally deflated) or contiguous (`chunk` == 0), never written (so nothing
// is allocated: HDF5 would supply fill values), /doc_offsets = {0, ntok} unless `ndoc` says
// another length (then also unwritten), and the attributes claiming `num_tokens`.
void craft_shard(const std::string& path, hsize_t ntok, hsize_t chunk, bool deflate, hsize_t ndoc,
                 int64_t num_tokens) {
  hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  hsize_t maxd = H5S_UNLIMITED;
  hid_t s = H5Screate_simple(1, &ntok, chunk ? &maxd : nullptr);
  hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  if (chunk) H5Pset_chunk(dcpl, 1, &chunk);
  if (deflate) H5Pset_deflate(dcpl, 4);
  hid_t d = H5Dcreate2(f, "/tokens", H5T_STD_U16LE, s, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  ASSERT_GE(d, 0);
  H5Dclose(d);
  H5Sclose(s);
  s = H5Screate_simple(1, &ndoc, &maxd);
  hsize_t c = 1024;
  H5Pset_chunk(dcpl, 1, &c);
  d = H5Dcreate2(f, "/doc_offsets", H5T_STD_U64LE, s, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  ASSERT_GE(d, 0);
  if (ndoc == 2) {
    uint64_t off[2] = {0, uint64_t(ntok)};
    H5Dwrite(d, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, off);
  }
  H5Dclose(d);
  H5Sclose(s);
  H5Pclose(dcpl);
  H5Fclose(f);
  iotest::h5_set_attr_str(path, "format", "difftron-tokens");
  iotest::h5_set_attr_i64(path, "version", 1);
  iotest::h5_set_attr_i64(path, "vocab_size", 1000);
  iotest::h5_set_attr_str(path, "tokenizer", "none");
  iotest::h5_set_attr_i64(path, "num_tokens", num_tokens);
  iotest::h5_set_attr_i64(path, "eos_id", -1);
  iotest::h5_set_attr_i64(path, "tokens_crc32", 0);
}

// Sizes declared by a small file (a few KB) that would make the reader allocate terabytes,
// divide by zero or read past the mapping: each is refused with an Error naming the file.
TEST(TokenShardUntrusted, DeclaredSizesAreCheckedBeforeAllocation) {
  TempDir dir;
  const std::string path = dir / "crafted.h5";
  const hsize_t huge = hsize_t(1) << 39;  // 1 TB of uint16 tokens
  craft_shard(path, huge, 1 << 20, false, 2, int64_t(huge));  // chunked, nothing stored
  EXPECT_ERROR_HAS(open_shard(path), path, "/tokens should hold", "the shard is truncated, damaged or crafted");
  craft_shard(path, huge, 1 << 20, true, 2, int64_t(huge));  // compressed, nothing stored
  EXPECT_ERROR_HAS(open_shard(path), path, "/tokens should hold", "compressed");
  craft_shard(path, huge, 0, false, 2, int64_t(huge));  // contiguous, never allocated
  EXPECT_ERROR_HAS(open_shard(path), path, "/tokens should hold");
  craft_shard(path, 100, 64, false, huge, 100);  // /doc_offsets of 2^39 entries
  EXPECT_ERROR_HAS(open_shard(path), path, "/doc_offsets holds 549755813888 entries");
  craft_shard(path, 100, 64, false, 101, 100);  // plausible length, but never written
  EXPECT_ERROR_HAS(open_shard(path), path, "/doc_offsets should hold 808 bytes");
  craft_shard(path, 100, 64, false, 2, int64_t(1) << 62);  // num_tokens near overflow
  EXPECT_ERROR_HAS(open_shard(path), path, "num_tokens 4611686018427387904 is out of range");
}
