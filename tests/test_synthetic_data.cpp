// The synthetic copy task's global row stream (io/synthetic_data.h): DP ranks split every step's
// rows without repeats, dp_size ranks with batch B see what one process with batch dp_size * B
// sees, and a position saved on one DP size resumes on another with nothing repeated or skipped.
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "base/error.h"
#include "io/synthetic_data.h"

namespace difftron {
namespace {

constexpr int64_t kS = 12;

struct Rows {
  std::vector<int32_t> tokens, targets;
};
Rows draw(BatchSource& src, int64_t B) {
  Rows r{std::vector<int32_t>(B * kS), std::vector<int32_t>(B * kS)};
  src.next_batch(B, kS, r.tokens.data(), r.targets.data());
  return r;
}
void append(Rows& all, const Rows& more) {
  all.tokens.insert(all.tokens.end(), more.tokens.begin(), more.tokens.end());
  all.targets.insert(all.targets.end(), more.targets.begin(), more.targets.end());
}

TEST(SyntheticData, DataParallelRanksSplitOneStream) {
  const int64_t B = 3;
  auto single = make_synthetic_source("copy", 16, 5);
  std::vector<std::unique_ptr<BatchSource>> ranks;
  for (int r = 0; r < 2; ++r) ranks.push_back(make_synthetic_source("copy", 16, 5, r, 2));
  std::set<std::vector<int32_t>> seen;
  for (int step = 0; step < 4; ++step) {
    const Rows want = draw(*single, 2 * B);
    Rows got;
    for (auto& r : ranks) append(got, draw(*r, B));
    EXPECT_EQ(got.tokens, want.tokens) << "step " << step;
    EXPECT_EQ(got.targets, want.targets) << "step " << step;
    for (int64_t b = 0; b < 2 * B; ++b)
      seen.insert(std::vector<int32_t>(want.tokens.begin() + b * kS, want.tokens.begin() + (b + 1) * kS));
  }
  // 24 rows of 6 random symbols from 14: all distinct unless the rows' generators collide
  EXPECT_EQ(seen.size(), size_t(4 * 2 * B));
  EXPECT_EQ(ranks[0]->position(), ranks[1]->position());
}

TEST(SyntheticData, ResumesOnAnotherDataParallelSize) {
  const int64_t B = 4;
  std::vector<std::unique_ptr<BatchSource>> two;
  for (int r = 0; r < 2; ++r) two.push_back(make_synthetic_source("copy", 16, 7, r, 2));
  for (int step = 0; step < 3; ++step)
    for (auto& r : two) draw(*r, B);
  const std::string pos = two[0]->position();  // 3 steps x 2 ranks x 4 rows consumed

  Rows got;
  for (int r = 0; r < 3; ++r) {
    auto three = make_synthetic_source("copy", 16, 7, r, 3);
    three->restore_position(pos);
    append(got, draw(*three, B));
  }
  auto single = make_synthetic_source("copy", 16, 7);
  draw(*single, 3 * 2 * B);  // the rows the two ranks consumed
  const Rows want = draw(*single, 3 * B);
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.targets, want.targets);
}

TEST(SyntheticData, RejectsOldPositionsAndBadRanks) {
  auto src = make_synthetic_source("copy", 16, 1);
  try {
    src->restore_position("{\"rng_state\": 5}");
    FAIL() << "an old-format position was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("older version"), std::string::npos) << e.what();
  }
  EXPECT_THROW(make_synthetic_source("copy", 16, 1, 2, 2), Error);
  EXPECT_THROW(make_synthetic_source("copy", 16, 1, -1, 2), Error);
}

}  // namespace
}  // namespace difftron
