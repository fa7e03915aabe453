// The streaming loader (io/loader.h): datasets whose token at stream position i is i, so
// every sample can be checked by arithmetic: contiguous S+1 windows at multiples of S,
// each exactly once per epoch, shards crossed seamlessly, DP ranks disjoint and together
// equal to the single-rank batch, exact resume (also on another DP size), validation
// order, and clear errors for every kind of bad dataset.
#include <algorithm>
#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "io/loader.h"
#include "io_test_util.h"

using namespace difftron;
using iotest::TempDir;

namespace {

// Shards of the given sizes in `dir`; token at global position i is value(i).
void make_dataset(const std::string& dir, const std::vector<int64_t>& sizes, int64_t vocab,
                  const std::function<uint32_t(int64_t)>& value = [](int64_t i) { return uint32_t(i); },
                  const std::string& tokenizer = "none") {
  std::filesystem::create_directories(dir);
  int64_t pos = 0;
  for (size_t s = 0; s < sizes.size(); ++s) {
    const std::string path = dir + "/shard_" + std::to_string(s) + ".h5";
    ShardMeta m;
    m.vocab_size = vocab;
    m.tokenizer = tokenizer;
    m.shard_index = int64_t(s);
    m.num_shards = int64_t(sizes.size());
    TokenShardWriter w(path, m, 256);
    w.begin_document();
    std::vector<uint32_t> t;
    for (int64_t i = 0; i < sizes[s]; ++i) t.push_back(value(pos + i));
    w.append(t.data(), int64_t(t.size()));
    w.finish();
    pos += sizes[s];
  }
}

struct Batch {
  std::vector<int32_t> tok, tgt;
};

Batch next(BatchSource& src, int64_t B, int64_t S) {
  Batch b{std::vector<int32_t>(B * S, -7), std::vector<int32_t>(B * S, -7)};
  src.next_batch(B, S, b.tok.data(), b.tgt.data());
  return b;
}

// Start of row r, after checking that the row is the window [start, start + S] of the stream.
int64_t row_start(const Batch& b, int64_t r, int64_t S) {
  const int64_t start = b.tok[r * S];
  EXPECT_EQ(start % S, 0) << "sample does not start at a multiple of S";
  for (int64_t j = 0; j < S; ++j) {
    EXPECT_EQ(b.tok[r * S + j], start + j);
    EXPECT_EQ(b.tgt[r * S + j], start + j + 1);
  }
  return start;
}

DatasetOptions opts(const std::string& path, uint64_t seed = 5) {
  DatasetOptions o;
  o.path = path;
  o.seed = seed;
  return o;
}

}  // namespace

TEST(IndexPermutation, IsABijectionForEverySize) {
  for (uint64_t n : {1ull, 2ull, 3ull, 5ull, 16ull, 17ull, 1000ull, 4097ull, 65536ull}) {
    IndexPermutation p(n, 42, 3);
    std::vector<int> seen(n, 0);
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t v = p(i);
      ASSERT_LT(v, n);
      seen[v]++;
    }
    EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; })) << "n=" << n;
  }
  IndexPermutation a(1000, 42, 3), b(1000, 42, 3), c(1000, 42, 4), d(1000, 43, 3);
  int same_ab = 0, same_ac = 0, same_ad = 0, fixed = 0;
  for (uint64_t i = 0; i < 1000; ++i) {
    same_ab += a(i) == b(i);
    same_ac += a(i) == c(i);
    same_ad += a(i) == d(i);
    fixed += a(i) == i;
  }
  EXPECT_EQ(same_ab, 1000);
  EXPECT_LT(same_ac, 50);  // a random pair of permutations agrees at ~1 place
  EXPECT_LT(same_ad, 50);
  EXPECT_LT(fixed, 50);
}

TEST(TokenLoader, SamplesAreWindowsCoveringEachEpochOnce) {
  TempDir dir;
  make_dataset(dir / "ds", {1000, 37, 2500}, 70000);
  const int64_t S = 50, B = 4, N = (3537 - 1) / S;  // 70 samples per epoch
  auto loader = open_token_loader(opts(dir / "ds"));
  EXPECT_EQ(loader->dataset().num_tokens(), 3537);
  std::vector<int64_t> order;
  for (int k = 0; k < 30; ++k) {
    Batch b = next(*loader, B, S);
    for (int64_t r = 0; r < B; ++r) order.push_back(row_start(b, r, S) / S);
  }
  for (int e = 0; e < 1; ++e) {
    std::set<int64_t> epoch(order.begin() + e * N, order.begin() + (e + 1) * N);
    EXPECT_EQ(int64_t(epoch.size()), N);
    EXPECT_EQ(*epoch.begin(), 0);
    EXPECT_EQ(*epoch.rbegin(), N - 1);
  }
  std::vector<int64_t> e0(order.begin(), order.begin() + N), e1(order.begin() + N, order.begin() + 2 * N);
  EXPECT_NE(e0, e1);  // a new order each epoch
  EXPECT_FALSE(std::is_sorted(e0.begin(), e0.end()));
  const LoaderStats st = loader->stats();
  EXPECT_EQ(st.batches, 30);
  EXPECT_EQ(st.tokens, 30 * B * S);
}

TEST(TokenLoader, DataParallelRanksAreDisjointSlicesOfTheGlobalBatch) {
  TempDir dir;
  make_dataset(dir / "ds", {800, 800}, 70000);
  const int64_t S = 16, B = 3;
  DatasetOptions o = opts(dir / "ds");
  auto single = open_token_loader(o);
  o.dp_size = 2;
  o.dp_rank = 0;
  auto r0 = open_token_loader(o);
  o.dp_rank = 1;
  auto r1 = open_token_loader(o);
  for (int k = 0; k < 40; ++k) {  // 240 samples: crosses the 99-sample epochs twice
    Batch g = next(*single, 2 * B, S), a = next(*r0, B, S), b = next(*r1, B, S);
    std::vector<int32_t> both = a.tok;
    both.insert(both.end(), b.tok.begin(), b.tok.end());
    ASSERT_EQ(both, g.tok) << "global batch " << k;
    std::set<int64_t> sa, sb;
    for (int64_t r = 0; r < B; ++r) {
      sa.insert(row_start(a, r, S));
      sb.insert(row_start(b, r, S));
    }
    for (int64_t s : sa) EXPECT_EQ(sb.count(s), 0u) << "ranks share a sample in batch " << k;
  }
}

TEST(TokenLoader, ResumeContinuesWithTheNextSampleEvenOnAnotherDpSize) {
  TempDir dir;
  make_dataset(dir / "ds", {3000, 1234}, 70000);
  const int64_t S = 32, B = 4;
  auto a = open_token_loader(opts(dir / "ds"));
  for (int k = 0; k < 7; ++k) next(*a, B, S);
  const std::string pos = a->position();
  std::vector<Batch> after;
  for (int k = 0; k < 40; ++k) after.push_back(next(*a, B, S));  // crosses an epoch

  auto b = open_token_loader(opts(dir / "ds"));
  b->restore_position(pos);
  for (int k = 0; k < 40; ++k) ASSERT_EQ(next(*b, B, S).tok, after[k].tok) << k;

  DatasetOptions o = opts(dir / "ds");
  o.dp_size = 2;
  o.dp_rank = 0;
  auto c0 = open_token_loader(o);
  o.dp_rank = 1;
  auto c1 = open_token_loader(o);
  c0->restore_position(pos);
  c1->restore_position(pos);
  for (int k = 0; k < 10; ++k) {
    Batch x = next(*c0, B / 2, S), y = next(*c1, B / 2, S);
    x.tok.insert(x.tok.end(), y.tok.begin(), y.tok.end());
    ASSERT_EQ(x.tok, after[k].tok) << k;
  }
  // position() is exact while the reader thread runs ahead.
  auto d = open_token_loader(opts(dir / "ds"));
  d->restore_position(pos);
  next(*d, B, S);
  auto e = open_token_loader(opts(dir / "ds"));
  e->restore_position(d->position());
  EXPECT_EQ(next(*e, B, S).tok, after[1].tok);
}

TEST(TokenLoader, ValidationIsSequentialAndCanCycle) {
  TempDir dir;
  make_dataset(dir / "ds", {500}, 70000);
  DatasetOptions o = opts(dir / "ds");
  o.shuffle = false;
  auto v = open_token_loader(o);
  const int64_t S = 10, B = 2;
  for (int k = 0; k < 30; ++k) {  // 49 samples per epoch: wraps to sample 0
    Batch b = next(*v, B, S);
    for (int64_t r = 0; r < B; ++r) EXPECT_EQ(row_start(b, r, S), ((2 * k + r) % 49) * S);
  }
  o.cycle_batches = 3;
  auto c = open_token_loader(o);
  std::vector<Batch> first;
  for (int k = 0; k < 3; ++k) first.push_back(next(*c, B, S));
  for (int round = 0; round < 3; ++round)
    for (int k = 0; k < 3; ++k) EXPECT_EQ(next(*c, B, S).tok, first[k].tok);
}

TEST(TokenLoader, BatchSizeMayChangeSequenceLengthMayNot) {
  TempDir dir;
  make_dataset(dir / "ds", {2000}, 70000);
  const int64_t S = 20;
  auto a = open_token_loader(opts(dir / "ds"));
  auto ref = open_token_loader(opts(dir / "ds"));
  Batch r = next(*ref, 6, S);
  Batch x = next(*a, 2, S), y = next(*a, 4, S);
  x.tok.insert(x.tok.end(), y.tok.begin(), y.tok.end());
  EXPECT_EQ(x.tok, r.tok);
  std::vector<int32_t> t(2 * 30), g(2 * 30);
  EXPECT_ERROR_HAS(a->next_batch(2, 30, t.data(), g.data()), "sequence length 20", "asked for 30");
  auto fresh = open_token_loader(opts(dir / "ds"));
  next(*fresh, 2, 30);  // before anything was consumed, any length is fine
}

TEST(TokenLoader, BadDatasetsGiveClearErrors) {
  TempDir dir;
  make_dataset(dir / "ds", {300, 300, 300}, 70000);
  DatasetOptions o = opts(dir / "ds");
  o.vocab_size = 50000;
  EXPECT_ERROR_HAS(open_token_loader(o), "vocab_size 70000", "model's vocab_size is 50000");

  auto l = open_token_loader(opts(dir / "ds"));
  std::vector<int32_t> t(1000), g(1000);
  EXPECT_ERROR_HAS(l->next_batch(1, 900, t.data(), g.data()), "has 900 tokens", "sequence length 900",
                   "at least 901");

  EXPECT_ERROR_HAS(open_token_loader(opts(dir / "nothing")), dir / "nothing", "no such file");
  std::filesystem::create_directories(dir / "out/train");
  std::filesystem::create_directories(dir / "out/val");
  EXPECT_ERROR_HAS(open_token_loader(opts(dir / "out")), "pass '" + dir / "out/train" + "'");
  std::filesystem::create_directories(dir / "emptydir");
  EXPECT_ERROR_HAS(open_token_loader(opts(dir / "emptydir")), "no shards");
  EXPECT_ERROR_HAS(open_token_loader(opts(dir / "ds/*.nope")), "matches no file");

  make_dataset(dir / "zero", {0}, 300);
  EXPECT_ERROR_HAS(open_token_loader(opts(dir / "zero")), dir / "zero", "is empty");

  make_dataset(dir / "gap", {100, 100, 100}, 300, [](int64_t i) { return uint32_t(i % 300); });
  std::filesystem::remove(dir / "gap/shard_1.h5");
  EXPECT_ERROR_HAS(open_token_loader(opts(dir / "gap")), "incomplete", "2 of 3", "shard_index 1 is missing");
  // A glob may pick a subset on purpose.
  EXPECT_NO_THROW(open_token_loader(opts(dir / "gap/shard_[02].h5")));

  make_dataset(dir / "mix", {100, 100}, 300, [](int64_t i) { return uint32_t(i % 300); });
  iotest::h5_set_attr_i64(dir / "mix/shard_1.h5", "vocab_size", 400);
  EXPECT_ERROR_HAS(open_token_loader(opts(dir / "mix")), "vocab mismatch", "shard_0.h5", "shard_1.h5");

  make_dataset(dir / "crc", {1000, 1000}, 70000);
  iotest::h5_poke_token(dir / "crc/shard_1.h5", 10, 5);
  EXPECT_ERROR_HAS(open_token_loader(opts(dir / "crc")), dir / "crc/shard_1.h5", "checksum mismatch");

  // Without verification, bad ids are still caught when the reader thread meets them, and
  // the error reaches the caller of next_batch naming the shard.
  make_dataset(dir / "ids", {1000}, 70000);
  iotest::h5_set_attr_i64(dir / "ids/shard_0.h5", "vocab_size", 500);
  DatasetOptions nv = opts(dir / "ids");
  nv.verify_checksums = false;
  nv.shuffle = false;
  auto bad = open_token_loader(nv);
  std::vector<int32_t> t2(8 * 100), g2(8 * 100);
  EXPECT_ERROR_HAS(bad->next_batch(8, 100, t2.data(), g2.data()), dir / "ids/shard_0.h5", "token id");
}

TEST(TokenLoader, PositionsFromElsewhereAreRefused) {
  TempDir dir;
  make_dataset(dir / "a", {1000}, 70000);
  make_dataset(dir / "b", {1200}, 70000);
  auto a = open_token_loader(opts(dir / "a"));
  next(*a, 2, 10);
  auto b = open_token_loader(opts(dir / "b"));
  EXPECT_ERROR_HAS(b->restore_position(a->position()), "has 1200 tokens", "1000 tokens");
  auto c = open_token_loader(opts(dir / "a", /*seed=*/6));
  EXPECT_ERROR_HAS(c->restore_position(a->position()), "seed 5");
  EXPECT_ERROR_HAS(c->restore_position("{oops"), "not valid JSON");
  EXPECT_ERROR_HAS(c->restore_position("{}"), "not a token-dataset position");
}

TEST(TokenLoader, DatasetEntryPoints) {
  TempDir dir;
  make_dataset(dir / "ds", {100, 50}, 300, [](int64_t i) { return uint32_t(i % 300); }, "bytes");
  EXPECT_EQ(dataset_vocab_size(dir / "ds"), 300);
  EXPECT_EQ(dataset_tokenizer_spec(dir / "ds"), "bytes");
  std::unique_ptr<BatchSource> src = open_token_dataset(opts(dir / "ds"));
  Batch b = next(*src, 2, 8);
  for (int64_t r = 0; r < 2; ++r) row_start(b, r, 8);
  EXPECT_NE(src->describe().find("150 tokens"), std::string::npos) << src->describe();
  EXPECT_EQ(nlohmann::json::parse(src->position())["samples"].get<int64_t>(), 2);
}
