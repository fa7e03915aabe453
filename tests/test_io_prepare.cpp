// `prepare` (io/prepare.h, io/token_import.h) and the prepare/inspect commands: expected
// token streams are built by hand from the input bytes (byte tokenizer), from Hugging Face's
// ids (BPE) or from the numbers written into the import files; the shards are read back
// with the shard reader. Also: sharding, the train/val rule, dedup, determinism across
// thread counts, atomic output, and errors for bad inputs of every format.
#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "io/loader.h"
#include "io/prepare.h"
#include "io_test_util.h"
#include "tests/run_command.h"

using namespace difftron;
using iotest::TempDir;
namespace fs = std::filesystem;

namespace {

void write_gz(const std::string& path, const std::string& text) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  gzwrite(f, text.data(), unsigned(text.size()));
  gzclose(f);
}

// The whole stream of a split, and its documents' lengths.
struct Stream {
  std::vector<uint32_t> tokens;
  std::vector<uint64_t> doc_lengths;
};

Stream read_split(const std::string& dir) {
  Stream s;
  TokenDataset ds(dir, /*verify=*/true);
  for (size_t i = 0; i < ds.num_shards(); ++i) {
    const TokenShardReader& r = ds.shard(i);
    std::vector<uint32_t> t(size_t(r.num_tokens()));
    r.read(0, r.num_tokens(), t.data());
    const auto& off = r.doc_offsets();
    for (size_t k = 1; k < off.size(); ++k) {
      if (k == 1 && r.meta().starts_mid_document) s.doc_lengths.back() += off[1] - off[0];
      else s.doc_lengths.push_back(off[k] - off[k - 1]);
    }
    s.tokens.insert(s.tokens.end(), t.begin(), t.end());
  }
  return s;
}

std::vector<uint32_t> bytes_doc(const std::string& text) {
  std::vector<uint32_t> v(text.begin(), text.end());
  for (auto& x : v) x &= 0xFF;
  v.push_back(256);
  return v;
}

PrepareOptions text_opts(const std::vector<std::string>& inputs, const std::string& out) {
  PrepareOptions o;
  o.inputs = inputs;
  o.out = out;
  o.val_fraction = 0;
  o.threads = 2;
  return o;
}

using CmdResult = difftron::testing::CommandResult;
CmdResult run(const std::string& args) { return difftron::testing::run_difftron(args); }

}  // namespace

TEST(Prepare, TextFoldersInSortedOrderWithSkips) {
  TempDir dir;
  fs::create_directories(dir / "in/sub");
  iotest::write_text(dir / "in/a.txt", "hello");
  iotest::write_text(dir / "in/sub/b.rst", "world!\n");
  write_gz(dir / "in/c.md.gz", "gzipped text\xc3\xa9");
  iotest::write_text(dir / "in/d.html", "<p>skipped by extension</p>");
  iotest::write_text(dir / "in/e.txt", std::string("bin\0ary", 7));
  iotest::write_text(dir / "in/empty.txt", "");
  iotest::write_text(dir / "in/f.txt", "hello");  // duplicate of a.txt
  PrepareReport r = prepare_dataset(text_opts({dir / "in"}, dir / "out"));
  EXPECT_EQ(r.vocab_size, 257);
  EXPECT_EQ(r.eos_id, 256);
  EXPECT_EQ(r.skipped_extension, 1);
  EXPECT_EQ(r.skipped_binary, 1);
  EXPECT_EQ(r.skipped_duplicate, 1);
  EXPECT_EQ(r.skipped_empty, 1);
  EXPECT_EQ(r.train.documents, 3);
  std::vector<uint32_t> want;
  for (const char* t : {"hello", "gzipped text\xc3\xa9", "world!\n"}) {
    auto d = bytes_doc(t);
    want.insert(want.end(), d.begin(), d.end());
  }
  Stream s = read_split(dir / "out/train");
  EXPECT_EQ(s.tokens, want);
  EXPECT_EQ(s.doc_lengths, (std::vector<uint64_t>{6, 15, 8}));
  EXPECT_FALSE(fs::exists(dir / "out/val"));
  EXPECT_TRUE(fs::exists(dir / "out/prepare.json"));
}

TEST(Prepare, ShardsOfAFixedSizeAndTheValidationRule) {
  TempDir dir;
  std::string text;
  std::vector<std::string> docs;
  for (int d = 0; d < 20; ++d) {
    docs.push_back("document " + std::to_string(d) + std::string(size_t(d % 7), 'x'));
    text += docs.back() + (d + 1 < 20 ? "\n\n" : "");
  }
  iotest::write_text(dir / "all.txt", text);
  PrepareOptions o = text_opts({dir / "all.txt"}, dir / "out");
  o.doc_separator = "\n\n";
  o.val_fraction = 0.25;
  o.shard_tokens = 7;
  PrepareReport r = prepare_dataset(o);
  std::vector<uint32_t> want_train, want_val;
  for (int d = 0; d < 20; ++d) {
    auto t = bytes_doc(docs[size_t(d)]);
    auto& dst = (d % 4 == 3) ? want_val : want_train;  // floor((d+1)/4) > floor(d/4)
    dst.insert(dst.end(), t.begin(), t.end());
  }
  EXPECT_EQ(r.train.documents, 15);
  EXPECT_EQ(r.val.documents, 5);
  Stream tr = read_split(dir / "out/train"), va = read_split(dir / "out/val");
  EXPECT_EQ(tr.tokens, want_train);
  EXPECT_EQ(va.tokens, want_val);
  EXPECT_EQ(tr.doc_lengths.size(), 15u);
  EXPECT_EQ(r.train.shards, int64_t((want_train.size() + 6) / 7));
  for (const auto& e : fs::directory_iterator(dir / "out/train")) {
    TokenShardReader sh(e.path().string());
    EXPECT_LE(sh.num_tokens(), 7);
    EXPECT_EQ(sh.meta().num_shards, r.train.shards);
    EXPECT_EQ(sh.meta().split, "train");
  }
}

TEST(Prepare, SameOutputWithAnyThreadCount) {
  TempDir dir;
  fs::create_directories(dir / "in");
  for (int i = 0; i < 60; ++i) {
    std::string t;
    for (int k = 0; k < 50 + i * 13; ++k) t += char('a' + (i * 7 + k) % 26);
    iotest::write_text(dir / ("in/f" + std::to_string(1000 + i) + ".txt"), t);
    if (i % 10 == 0) iotest::write_text(dir / ("in/g" + std::to_string(i) + ".txt"), t);  // duplicates
  }
  PrepareOptions o = text_opts({dir / "in"}, dir / "a");
  o.threads = 1;
  o.val_fraction = 0.1;
  o.tokenizer = std::string(DIFFTRON_SOURCE_DIR) + "/tests/data/bpe/gpt2_tokenizer.json";
  prepare_dataset(o);
  o.threads = 5;
  o.out = dir / "b";
  PrepareReport r = prepare_dataset(o);
  EXPECT_EQ(r.skipped_duplicate, 6);
  EXPECT_EQ(read_split(dir / "a/train").tokens, read_split(dir / "b/train").tokens);
  EXPECT_EQ(read_split(dir / "a/val").tokens, read_split(dir / "b/val").tokens);
}

TEST(Prepare, BpeTokensMatchHuggingFace) {
  TempDir dir;
  const std::string data = std::string(DIFFTRON_SOURCE_DIR) + "/tests/data/bpe/";
  const auto json = iotest::read_file(data + "expected_gpt2.json");
  auto expected = nlohmann::json::parse(std::string(json.begin(), json.end()));
  PrepareOptions o = text_opts({data + "sample.txt"}, dir / "out");
  o.tokenizer = data + "gpt2_tokenizer.json";
  PrepareReport r = prepare_dataset(o);
  EXPECT_EQ(r.vocab_size, 1200);
  std::vector<uint32_t> want = expected["cases"][0]["ids"].get<std::vector<uint32_t>>();
  want.push_back(0);  // <|endoftext|>
  EXPECT_EQ(read_split(dir / "out/train").tokens, want);
  const auto spec = iotest::read_file(data + "gpt2_tokenizer.json");
  EXPECT_EQ(dataset_tokenizer_spec(dir / "out/train"), std::string(spec.begin(), spec.end()));
}

TEST(Prepare, OutputIsAtomic) {
  TempDir dir;
  iotest::write_text(dir / "a.txt", "some text");
  prepare_dataset(text_opts({dir / "a.txt"}, dir / "out"));
  EXPECT_ERROR_HAS(prepare_dataset(text_opts({dir / "a.txt"}, dir / "out")), "already exists", "--overwrite");
  // A damaged .gz in the middle: the run fails and neither a new nor a half-written OUT remains.
  write_gz(dir / "b.txt.gz", std::string(100000, 'z'));
  auto gz = iotest::read_file(dir / "b.txt.gz");
  iotest::write_file(dir / "b.txt.gz", gz.data(), gz.size() / 2);
  PrepareOptions o = text_opts({dir / "a.txt", dir / "b.txt.gz"}, dir / "out2");
  EXPECT_ERROR_HAS(prepare_dataset(o), dir / "b.txt.gz");
  EXPECT_FALSE(fs::exists(dir / "out2"));
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  // --overwrite replaces the old folder only once the new one is complete.
  iotest::write_text(dir / "c.txt", "new");
  PrepareOptions w = text_opts({dir / "c.txt"}, dir / "out");
  w.overwrite = true;
  prepare_dataset(w);
  EXPECT_EQ(read_split(dir / "out/train").tokens, bytes_doc("new"));
}

// --overwrite deletes the old OUT: only a dataset prepare wrote (prepare.json, train/ and
// val/ of shards, nothing else) may be replaced; never /, $HOME, an input or a folder
// holding one. A failed run leaves the old dataset as it was.
TEST(Prepare, OverwriteReplacesOnlyAPrepareOutput) {
  TempDir dir;
  fs::create_directories(dir / "corpus");
  iotest::write_text(dir / "corpus/a.txt", "some text");
  auto opts = [&](const std::string& out) {
    PrepareOptions o = text_opts({dir / "corpus"}, out);
    o.overwrite = true;
    return o;
  };
  // Not a dataset: a folder of someone's files, or a dataset with a stranger inside.
  fs::create_directories(dir / "mine");
  iotest::write_text(dir / "mine/precious.txt", "keep me");
  EXPECT_ERROR_HAS(prepare_dataset(opts(dir / "mine")), "--overwrite: " + dir / "mine",
                   "not a dataset written by difftron prepare", "precious.txt");
  EXPECT_TRUE(fs::exists(dir / "mine/precious.txt"));
  prepare_dataset(opts(dir / "out"));
  iotest::write_text(dir / "out/train/notes.txt", "mine");
  EXPECT_ERROR_HAS(prepare_dataset(opts(dir / "out")), dir / "out", "notes.txt", "which prepare does not write");
  fs::remove(dir / "out/train/notes.txt");
  iotest::write_text(dir / "out/prepare.json", "[1, 2]");
  EXPECT_ERROR_HAS(prepare_dataset(opts(dir / "out")), dir / "out", "prepare.json is not one prepare wrote");
  fs::remove(dir / "out/prepare.json");
  EXPECT_ERROR_HAS(prepare_dataset(opts(dir / "out")), dir / "out", "has no prepare.json");
  EXPECT_TRUE(fs::exists(dir / "out/train/shard_00000.h5"));
  // The inputs, a folder above them, the root folder and $HOME (or above it) are refused.
  EXPECT_ERROR_HAS(prepare_dataset(opts(dir / "corpus")), "--out=" + dir / "corpus", "is the input");
  EXPECT_ERROR_HAS(prepare_dataset(opts(dir.path())), "--out=" + dir.path(), "is the input");
  EXPECT_ERROR_HAS(prepare_dataset(opts(dir / "corpus/..")), "is the input");
  EXPECT_ERROR_HAS(prepare_dataset(opts("/")), "--out=/", "root folder");
  const char* old_home = std::getenv("HOME");
  const std::string saved = old_home ? old_home : "";
  fs::create_directories(dir / "home/me");
  ::setenv("HOME", (dir / "home/me").c_str(), 1);
  PrepareOptions h = opts(dir / "home/me");
  h.inputs = {dir / "corpus/a.txt"};
  EXPECT_ERROR_HAS(prepare_dataset(h), "--out=" + dir / "home/me", "home folder");
  h.out = dir / "home";
  EXPECT_ERROR_HAS(prepare_dataset(h), "--out=" + dir / "home", "home folder", "or a folder holding it");
  if (old_home) ::setenv("HOME", saved.c_str(), 1);
  else ::unsetenv("HOME");
  // A real dataset is replaced (also spelled with a trailing slash) ...
  prepare_dataset(opts(dir / "ds"));
  iotest::write_text(dir / "corpus/a.txt", "new text");
  prepare_dataset(opts(dir / "ds/"));
  EXPECT_EQ(read_split(dir / "ds/train").tokens, bytes_doc("new text"));
  // ... but a run that fails leaves it as it was, and no temporary folder behind.
  write_gz(dir / "corpus/b.txt.gz", std::string(100000, 'z'));
  auto gz = iotest::read_file(dir / "corpus/b.txt.gz");
  iotest::write_file(dir / "corpus/b.txt.gz", gz.data(), gz.size() / 2);
  EXPECT_ERROR_HAS(prepare_dataset(opts(dir / "ds")), dir / "corpus/b.txt.gz");
  EXPECT_EQ(read_split(dir / "ds/train").tokens, bytes_doc("new text"));
  for (const auto& e : fs::directory_iterator(dir.path())) {
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
    EXPECT_EQ(e.path().filename().string().find(".old-"), std::string::npos) << e.path();
  }
}

// Numbers that would overflow or exhaust the machine are refused naming the flag and range.
TEST(Prepare, OutOfRangeNumbersAreRefused) {
  TempDir dir;
  iotest::write_text(dir / "a.txt", "text");
  PrepareOptions o = text_opts({dir / "a.txt"}, dir / "o");
  o.threads = 100000;
  EXPECT_ERROR_HAS(prepare_dataset(o), "--jobs (100000) must be in [0, 1024]");
  o.threads = -3;
  EXPECT_ERROR_HAS(prepare_dataset(o), "--jobs (-3) must be in [0, 1024]");
  o = text_opts({dir / "a.txt"}, dir / "o");
  o.shard_tokens = int64_t(1) << 50;
  EXPECT_ERROR_HAS(prepare_dataset(o), "--shard_tokens (1125899906842624) must be in [1, 2^40]");
  o = text_opts({dir / "a.txt"}, dir / "o");
  o.chunk_tokens = int64_t(1) << 40;
  EXPECT_ERROR_HAS(prepare_dataset(o), "--chunk_tokens (1099511627776) must be in [1, 2^28]");
  o = text_opts({dir / "a.txt"}, dir / "o");
  o.import_vocab_size = -7;
  EXPECT_ERROR_HAS(prepare_dataset(o), "--import_vocab_size (-7) must be in [0, 2^32]");
  EXPECT_FALSE(fs::exists(dir / "o"));
}

TEST(Prepare, BadTextInputs) {
  TempDir dir;
  EXPECT_ERROR_HAS(prepare_dataset(text_opts({dir / "missing"}, dir / "o")), dir / "missing", "no such file");
  fs::create_directories(dir / "htmlonly");
  iotest::write_text(dir / "htmlonly/x.html", "<p/>");
  EXPECT_ERROR_HAS(prepare_dataset(text_opts({dir / "htmlonly"}, dir / "o")), "no input files found");
  iotest::write_text(dir / "one.txt", "just one document");
  PrepareOptions o = text_opts({dir / "one.txt"}, dir / "o");
  o.val_fraction = 0.01;
  EXPECT_ERROR_HAS(prepare_dataset(o), "no document went to the validation split", "--val_fraction");
  o.val_fraction = 1.5;
  EXPECT_ERROR_HAS(prepare_dataset(o), "--val_fraction (1.5)");
  o = text_opts({dir / "one.txt"}, dir / "o");
  o.format = "parquet";
  EXPECT_ERROR_HAS(prepare_dataset(o), "unknown format 'parquet'");
  o.format = "auto";
  o.tokenizer = dir / "nope.json";
  EXPECT_ERROR_HAS(prepare_dataset(o), dir / "nope.json");
  EXPECT_FALSE(fs::exists(dir / "o"));
}

// ---- imports ---------------------------------------------------------------------------

TEST(PrepareImport, LlmcGpt2Shard) {
  TempDir dir;
  // llm.c style: each document is preceded by EOT (50256).
  std::vector<uint16_t> tok = {50256, 10, 20, 30, 50256, 40, 50, 50256, 60};
  std::vector<int32_t> header(256, 0);
  header[0] = 20240520;
  header[1] = 1;
  header[2] = int32_t(tok.size());
  {
    std::ofstream f(dir / "a.bin", std::ios::binary);
    f.write(reinterpret_cast<char*>(header.data()), 1024);
    f.write(reinterpret_cast<char*>(tok.data()), std::streamsize(tok.size() * 2));
  }
  PrepareReport r = prepare_dataset(text_opts({dir / "a.bin"}, dir / "out"));
  EXPECT_EQ(r.format, "llmc");
  EXPECT_EQ(r.vocab_size, 50257);
  EXPECT_EQ(r.eos_id, 50256);
  Stream s = read_split(dir / "out/train");
  EXPECT_EQ(s.tokens, std::vector<uint32_t>(tok.begin(), tok.end()));
  EXPECT_EQ(s.doc_lengths, (std::vector<uint64_t>{1, 4, 3, 1}));  // documents end at EOS
  // truncated: header says 9 tokens, file holds 8
  auto bytes = iotest::read_file(dir / "a.bin");
  iotest::write_file(dir / "t.bin", bytes.data(), bytes.size() - 2);
  PrepareOptions o = text_opts({dir / "t.bin"}, dir / "o2");
  o.format = "llmc";
  EXPECT_ERROR_HAS(prepare_dataset(o), dir / "t.bin", "declares 9 tokens", "truncated");
  header[0] = 12345;
  {
    std::ofstream f(dir / "m.bin", std::ios::binary);
    f.write(reinterpret_cast<char*>(header.data()), 1024);
  }
  o.inputs = {dir / "m.bin"};
  EXPECT_ERROR_HAS(prepare_dataset(o), dir / "m.bin", "magic number is 12345");
}

TEST(PrepareImport, MegatronPair) {
  TempDir dir;
  // three documents of uint16 tokens; the second has two sequences
  std::vector<std::vector<uint16_t>> seqs = {{1, 2, 3}, {4, 5}, {6}, {7, 8, 9, 10}};
  std::vector<int64_t> doc_idx = {0, 1, 3, 4};
  std::vector<int32_t> sizes;
  std::vector<int64_t> ptrs;
  std::vector<uint16_t> bin;
  for (auto& s : seqs) {
    sizes.push_back(int32_t(s.size()));
    ptrs.push_back(int64_t(bin.size() * 2));
    bin.insert(bin.end(), s.begin(), s.end());
  }
  iotest::write_file(dir / "d_text_document.bin", bin.data(), bin.size() * 2);
  auto write_idx = [&](const std::vector<int64_t>& pointers) {
    std::ofstream f(dir / "d_text_document.idx", std::ios::binary);
    f.write("MMIDIDX\x00\x00", 9);
    uint64_t version = 1, nseq = sizes.size(), ndoc = doc_idx.size();
    uint8_t code = 8;
    f.write(reinterpret_cast<char*>(&version), 8);
    f.write(reinterpret_cast<char*>(&code), 1);
    f.write(reinterpret_cast<char*>(&nseq), 8);
    f.write(reinterpret_cast<char*>(&ndoc), 8);
    f.write(reinterpret_cast<const char*>(sizes.data()), std::streamsize(sizes.size() * 4));
    f.write(reinterpret_cast<const char*>(pointers.data()), std::streamsize(pointers.size() * 8));
    f.write(reinterpret_cast<const char*>(doc_idx.data()), std::streamsize(doc_idx.size() * 8));
  };
  write_idx(ptrs);
  PrepareOptions o = text_opts({dir / "d_text_document"}, dir / "out");  // the prefix, as Megatron names it
  EXPECT_ERROR_HAS(prepare_dataset(o), "vocabulary", "--import_vocab_size");
  o.import_vocab_size = 11;
  PrepareReport r = prepare_dataset(o);
  EXPECT_EQ(r.format, "megatron");
  EXPECT_EQ(r.eos_id, -1);
  Stream s = read_split(dir / "out/train");
  EXPECT_EQ(s.tokens, (std::vector<uint32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  EXPECT_EQ(s.doc_lengths, (std::vector<uint64_t>{3, 3, 4}));
  // a pointer beyond the .bin
  auto bad = ptrs;
  bad[3] = 100;
  write_idx(bad);
  o.out = dir / "out2";
  EXPECT_ERROR_HAS(prepare_dataset(o), "d_text_document.idx", "sequence 3", "outside the .bin");
  // ids >= vocab
  write_idx(ptrs);
  o.import_vocab_size = 8;
  EXPECT_ERROR_HAS(prepare_dataset(o), "d_text_document.bin", "has id 8", "vocab_size 8");
}

TEST(PrepareImport, NpyAndRaw) {
  TempDir dir;
  auto write_npy = [&](const std::string& path, const std::string& descr, const std::string& shape,
                       const void* data, size_t bytes) {
    std::string h = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
    while ((10 + h.size() + 1) % 64) h += ' ';
    h += '\n';
    std::string f = "\x93NUMPY";
    f += char(1);
    f += char(0);
    const uint16_t hl = uint16_t(h.size());
    f.append(reinterpret_cast<const char*>(&hl), 2);
    f += h;
    f.append(static_cast<const char*>(data), bytes);
    iotest::write_file(path, f.data(), f.size());
  };
  std::vector<int32_t> v = {5, 6, 0, 7, 8, 9, 0, 1, 2, 3, 4, 0};
  write_npy(dir / "a.npy", "<i4", "(3, 4)", v.data(), v.size() * 4);
  PrepareOptions o = text_opts({dir / "a.npy"}, dir / "out");
  o.import_vocab_size = 10;
  o.import_eos_id = 0;
  PrepareReport r = prepare_dataset(o);
  EXPECT_EQ(r.format, "npy");
  Stream s = read_split(dir / "out/train");
  EXPECT_EQ(s.tokens, std::vector<uint32_t>(v.begin(), v.end()));
  EXPECT_EQ(s.doc_lengths, (std::vector<uint64_t>{3, 4, 5}));

  std::vector<float> f = {1.0f};
  write_npy(dir / "f.npy", "<f4", "(1,)", f.data(), 4);
  o.inputs = {dir / "f.npy"};
  o.out = dir / "o2";
  EXPECT_ERROR_HAS(prepare_dataset(o), dir / "f.npy", "dtype '<f4' is not supported");
  std::vector<int32_t> neg = {1, -3};
  write_npy(dir / "n.npy", "<i4", "(2,)", neg.data(), 8);
  o.inputs = {dir / "n.npy"};
  EXPECT_ERROR_HAS(prepare_dataset(o), dir / "n.npy", "token 1 has id -3");
  write_npy(dir / "s.npy", "<i4", "(20,)", v.data(), 8);
  o.inputs = {dir / "s.npy"};
  EXPECT_ERROR_HAS(prepare_dataset(o), dir / "s.npy", "truncated");

  std::vector<uint32_t> raw = {70000, 1, 2, 70000, 3};
  iotest::write_file(dir / "r.u32", raw.data(), raw.size() * 4);
  o.inputs = {dir / "r.u32"};
  o.format = "raw32";
  o.import_vocab_size = 70001;
  o.import_eos_id = 70000;
  o.out = dir / "o3";
  r = prepare_dataset(o);
  EXPECT_EQ(read_split(dir / "o3/train").tokens, raw);
  EXPECT_EQ(TokenShardReader(dir / "o3/train/shard_00000.h5").token_bytes(), 4);  // vocab > 65536: uint32
  iotest::write_file(dir / "odd.u16", raw.data(), 5);
  o.inputs = {dir / "odd.u16"};
  o.format = "raw16";
  o.out = dir / "o4";
  EXPECT_ERROR_HAS(prepare_dataset(o), dir / "odd.u16", "not a multiple of 2");
  o.inputs = {dir / "r.u32", dir / "a.npy"};
  o.format = "auto";
  iotest::write_text(dir / "t.txt", "text");
  o.inputs = {dir / "t.txt", dir / "a.npy"};
  EXPECT_ERROR_HAS(prepare_dataset(o), "mix text");
}

// ---- the commands -------------------------------------------------------------------------

TEST(PrepareCommands, PrepareInspectAndDamage) {
  TempDir dir;
  std::string text;
  for (int i = 0; i < 40; ++i) text += "paragraph number " + std::to_string(i) + " of the test text.\n\n";
  iotest::write_text(dir / "t.txt", text);
  auto r = run("prepare --input=" + dir / "t.txt" + " --out=" + dir / "ds" + " --doc_separator='\\n\\n' --val_fraction=0.1");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("train: 36 documents"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("val:   4 documents"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("tok/s"), std::string::npos) << r.output;  // a progress line

  r = run("inspect " + dir / "ds/train" + " --decode_tokens=30");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("crc32"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(" ok"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("paragraph number 0 of the test"), std::string::npos) << r.output;
  r = run("inspect " + dir / "ds/val/shard_00000.h5");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("num_documents: 4"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("paragraph number 9 of"), std::string::npos) << r.output;

  iotest::h5_poke_token(dir / "ds/train/shard_00000.h5", 3, 'X');
  r = run("inspect " + dir / "ds/train");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("MISMATCH"), std::string::npos) << r.output;

  r = run("prepare --input=" + dir / "t.txt" + " --out=" + dir / "ds");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("already exists"), std::string::npos) << r.output;
  r = run("prepare --input=" + dir / "t.txt" + " --out=" + dir / "x" + " --shard_tokens=0");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--shard_tokens (0) must be positive"), std::string::npos) << r.output;

  r = run("prepare --input=- --out=" + dir / "stdin" + " --val_fraction=0 < " + dir / "t.txt");
  EXPECT_EQ(r.status, 0) << r.output;
  std::vector<uint32_t> want = bytes_doc(text);
  EXPECT_EQ(read_split(dir / "stdin/train").tokens, want);
}
