// tools/paper_runs.sh (the [paper] experiments, docs/RESULTS.md) end to end at toy sizes on the
// CPU: seed runs and the main pair train, every eval task runs on the main checkpoints, and each
// number lands in results.jsonl under the right labels; the recorded loss is the one `difftron
// eval` computes on the kept checkpoint; a missing dataset is refused by name.
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/run_command.h"

namespace difftron::testing {
namespace {

namespace fs = std::filesystem;

std::vector<nlohmann::json> read_jsonl(const fs::path& p) {
  std::vector<nlohmann::json> out;
  std::stringstream ss(read_text_file(p));
  for (std::string line; std::getline(ss, line);)
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

class CliPaperRuns : public ::testing::Test {
 protected:
  static fs::path dir;
  static CommandResult result;
  static void SetUpTestSuite() {
    dir = fresh_dir("difftron_paper_runs", "");
    const std::string src = DIFFTRON_SOURCE_DIR;
    // a corpus of real prose (the repo's docs), tokenised with the small GPT-2 style test BPE
    fs::create_directories(dir / "corpus");
    for (const auto& e : fs::directory_iterator(src + "/docs"))
      if (e.path().extension() == ".md") fs::copy_file(e.path(), dir / "corpus" / e.path().filename());
    const std::string tok = src + "/tests/data/bpe/gpt2_tokenizer.json";
    auto r = run_difftron("prepare --progress=false --val_fraction=0.25 --input=" + (dir / "corpus").string() +
                          " --out=" + (dir / "data").string() + " --tokenizer=" + tok);
    ASSERT_EQ(r.status, 0) << r.output;
    fs::copy_file(tok, dir / "data" / "tokenizer.json");
    const std::string tiny = "--d_model=32 --n_layers=2 --n_heads=2 --head_dim=8 --ffn_dim=64";
    result = run_command(
        "env DEVICE=cpu MAIN_FLAGS='" + tiny + "' SMALL_FLAGS='" + tiny + "' SEQ=128 BATCH=2 MAIN_STEPS=6 "
        "MAIN_WARMUP=1 SMALL_STEPS=3 SMALL_WARMUP=1 SEEDS='1 2' VARIANTS_SEEDS='standard diff_v2' "
        "VARIANTS_MAIN='standard diff' EVAL_EVERY=3 NEEDLE_LENGTHS=100 NEEDLE_SAMPLES=1 NEEDLE_COUNT=2 "
        "NEEDLE_QUERIES=1 STAT_TOKENS=128 LOSS_TOKENS=512 SEED_TASKS='loss activations' OMP_NUM_THREADS=1 "
        "bash " + src + "/tools/paper_runs.sh --data " + (dir / "data").string() + " --out " +
        (dir / "out").string() + " --bin " + DIFFTRON_BINARY_DIR + "/difftron");
  }
  static void TearDownTestSuite() { fs::remove_all(dir); }

  // the records of one run and task
  static std::vector<nlohmann::json> records(const std::string& part, const std::string& variant, int seed,
                                             const std::string& what) {
    std::vector<nlohmann::json> out;
    for (const auto& r : read_jsonl(dir / "out" / "results.jsonl"))
      if (r["part"] == part && r["variant"] == variant && r["seed"] == seed && r["what"] == what) out.push_back(r);
    return out;
  }
};
fs::path CliPaperRuns::dir;
CommandResult CliPaperRuns::result;

TEST_F(CliPaperRuns, EveryRunTrainsAndEveryTaskIsRecorded) {
  ASSERT_EQ(result.status, 0) << result.output;
  EXPECT_EQ(result.output.find("FAILED"), std::string::npos) << result.output;
  for (const std::string v : {"standard", "diff_v2"}) {
    double loss[2] = {0, 0};
    for (int s : {1, 2}) {
      const auto loss_recs = records("small", v, s, "loss");
      ASSERT_EQ(loss_recs.size(), 1u) << v << " seed " << s;
      loss[s - 1] = loss_recs[0]["loss"].get<double>();
      EXPECT_GT(loss[s - 1], 0.0);
      bool end = false;
      for (const auto& r : records("small", v, s, "train"))
        if (r["event"] == "end") end = r["steps"] == 3;
      EXPECT_TRUE(end) << v << " seed " << s << ": no end record of 3 steps";
      bool all_layers = false;
      for (const auto& r : records("small", v, s, "activations")) all_layers |= r["layer"] == "all";
      EXPECT_TRUE(all_layers) << v << " seed " << s;
      // the weights of seed runs are not kept, their records are
      EXPECT_FALSE(fs::exists(dir / "out" / ("small-" + v + "-s" + std::to_string(s)) / "latest"));
    }
    EXPECT_NE(loss[0], loss[1]) << v << ": the seed did not reach the run";
  }
  for (const std::string v : {"standard", "diff"}) {
    std::set<std::string> bits;
    for (const auto& r : records("main", v, 1, "quant")) bits.insert(r["bits"].get<std::string>());
    EXPECT_EQ(bits, (std::set<std::string>{"float", "8", "6", "4", "3"})) << v;
    bool needles_all = false, noise_all = false;
    for (const auto& r : records("main", v, 1, "needles"))
      if (r.contains("group") && r["group"] == "all") needles_all = r["total"].get<int64_t>() > 0;
    for (const auto& r : records("main", v, 1, "noise"))
      if (r["layer"] == "all") noise_all = r["attention"] == v;
    EXPECT_TRUE(needles_all) << v;
    EXPECT_TRUE(noise_all) << v;
  }
}

TEST_F(CliPaperRuns, TheRecordedLossIsTheCheckpointsLoss) {
  ASSERT_EQ(result.status, 0) << result.output;
  for (const std::string v : {"standard", "diff"}) {
    const auto recs = records("main", v, 1, "loss");
    ASSERT_EQ(recs.size(), 1u) << v;
    auto r = run_difftron("eval --device=cpu --task=loss --seq=128 --batch=8 --max_tokens=512 --checkpoint=" +
                          (dir / "out" / ("main-" + v + "-s1")).string() + " --data=" + (dir / "data" / "val").string());
    ASSERT_EQ(r.status, 0) << r.output;
    const nlohmann::json j = json_line(r, "bits_per_byte");
    EXPECT_EQ(j["loss"].get<double>(), recs[0]["loss"].get<double>()) << v;
    EXPECT_EQ(j["tokens"], recs[0]["tokens"]) << v;
  }
}

TEST_F(CliPaperRuns, RefusesAMissingDatasetByName) {
  auto r = run_command("bash " + std::string(DIFFTRON_SOURCE_DIR) + "/tools/paper_runs.sh --data " +
                       (dir / "no_such_data").string() + " --bin " + DIFFTRON_BINARY_DIR + "/difftron");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find((dir / "no_such_data" / "train").string() + " is missing"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace difftron::testing
