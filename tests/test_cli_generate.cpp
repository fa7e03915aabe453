// `difftron generate` (K/V cache, batched prompts, stop strings, tokens/s, --json) and
// `difftron eval` (loss, perplexity, bits per byte) on a tiny model trained for a few steps on
// a byte-level dataset: a batch gives what each prompt gives alone, a Hugging Face export
// generates and evaluates as its checkpoint does, stop strings cut the text, and refusals
// name the flag.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/run_command.h"

namespace {

namespace fs = std::filesystem;
using Result = difftron::testing::CommandResult;
Result run(const std::string& args) { return difftron::testing::run_difftron(args); }
bool has(const Result& r, const std::string& s) { return r.output.find(s) != std::string::npos; }

using difftron::testing::json_line;

// A byte-level dataset of repetitive text, a tiny model trained on it (checkpoint) and its
// Hugging Face export (f32), made once for all tests.
class CliGenerate : public ::testing::Test {
 protected:
  static std::string dir;
  static void SetUpTestSuite() {
    dir = (fs::temp_directory_path() / ("difftron_cli_gen_" + std::to_string(getpid()))).string();
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::ofstream f(dir + "/a.txt");
    const char* words[] = {"the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"};
    for (int i = 0; i < 2000; ++i) f << words[(i * 7 + i / 9) % 9] << (i % 11 == 10 ? "\n" : " ");
    f.close();
    auto r = run("prepare --progress=false --val_fraction=0 --input=" + dir + "/a.txt --out=" + dir + "/data");
    ASSERT_EQ(r.status, 0) << r.output;
    r = run("train --device=cpu --data=" + dir + "/data/train --steps=40 --seq=32 --batch=8 --d_model=32 "
            "--n_layers=2 --n_heads=2 --n_kv_heads=1 --log_every=20 --ckpt_dir=" + dir + "/ck");
    ASSERT_EQ(r.status, 0) << r.output;
    r = run("convert --checkpoint=" + dir + "/ck --to_hf=" + dir + "/hf");
    ASSERT_EQ(r.status, 0) << r.output;
  }
  static void TearDownTestSuite() { fs::remove_all(dir); }
};
std::string CliGenerate::dir;

TEST_F(CliGenerate, BatchOfPromptsEqualsEachAloneAndReportsTokensPerSecond) {
  const std::string base = "generate --device=cpu --checkpoint=" + dir + "/ck --max_new_tokens=12 --temperature=0 --json";
  auto r = run(base + " --prompt='the quick' --prompt='a lazy dog jumps'");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "batch 2: prompt 25 tokens in")) << r.output;
  EXPECT_TRUE(has(r, "tokens/s")) << r.output;
  const nlohmann::json j = json_line(r, "batch");
  ASSERT_EQ(j["sequences"].size(), 2u);
  EXPECT_EQ(j["prompt_tokens"], 25);
  EXPECT_GT(j["decode_tokens_per_s"].get<double>(), 0);
  EXPECT_GT(j["prompt_tokens_per_s"].get<double>(), 0);
  const char* alone[] = {"the quick", "a lazy dog jumps"};
  for (int i = 0; i < 2; ++i) {
    auto a = run(base + " --prompt='" + alone[i] + "'");
    ASSERT_EQ(a.status, 0) << a.output;
    const nlohmann::json ja = json_line(a, "batch");
    EXPECT_EQ(ja["sequences"][0]["tokens"], j["sequences"][i]["tokens"]) << alone[i];
    EXPECT_EQ(ja["sequences"][0]["text"], j["sequences"][i]["text"]) << alone[i];
    // the printed text is the prompt and its continuation
    EXPECT_TRUE(has(a, std::string(alone[i]) + ja["sequences"][0]["text"].get<std::string>())) << a.output;
  }
  // a prompts file is the same batch
  std::ofstream(dir + "/prompts.txt") << "the quick\n\na lazy dog jumps\n";
  auto f = run(base + " --prompts_file=" + dir + "/prompts.txt");
  ASSERT_EQ(f.status, 0) << f.output;
  EXPECT_EQ(json_line(f, "batch")["sequences"], j["sequences"]);
}

TEST_F(CliGenerate, StopsAtAStopString) {
  const std::string base = "generate --device=cpu --checkpoint=" + dir + "/ck --prompt='the quick' --max_new_tokens=24 "
                           "--temperature=0 --json";
  auto r = run(base);
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string text = json_line(r, "batch")["sequences"][0]["text"];
  ASSERT_GE(text.size(), 12u) << r.output;
  const std::string stop = text.substr(6, 3);  // something it generates
  auto s = run(base + " --stop='no such text' --stop='" + stop + "'");
  ASSERT_EQ(s.status, 0) << s.output;
  const nlohmann::json js = json_line(s, "batch")["sequences"][0];
  EXPECT_EQ(js["finish"], "stop") << s.output;
  EXPECT_EQ(js["text"], text.substr(0, text.find(stop))) << s.output;
  EXPECT_LT(js["tokens"].size(), 24u);
}

TEST_F(CliGenerate, HfExportGeneratesAndEvaluatesAsItsCheckpoint) {
  const std::string gen = "generate --device=cpu --prompt='over the' --max_new_tokens=10 --temperature=0 --json ";
  auto a = run(gen + "--checkpoint=" + dir + "/ck");
  auto b = run(gen + "--from_hf=" + dir + "/hf");
  ASSERT_EQ(a.status, 0) << a.output;
  ASSERT_EQ(b.status, 0) << b.output;
  EXPECT_EQ(json_line(a, "batch")["sequences"], json_line(b, "batch")["sequences"]);

  const std::string ev = "eval --device=cpu --data=" + dir + "/data/train --seq=32 --batch=3 ";
  auto ea = run(ev + "--checkpoint=" + dir + "/ck");
  auto eb = run(ev + "--from_hf=" + dir + "/hf");
  ASSERT_EQ(ea.status, 0) << ea.output;
  ASSERT_EQ(eb.status, 0) << eb.output;
  const nlohmann::json ja = json_line(ea, "bits_per_byte"), jb = json_line(eb, "bits_per_byte");
  EXPECT_NEAR(ja["loss"].get<double>(), jb["loss"].get<double>(), 1e-5);
  EXPECT_EQ(ja["tokens"], jb["tokens"]);
  // the whole dataset: (T - 1) / 32 sequences of 32 targets; bytes: one per byte token
  const int64_t tokens = ja["tokens"];
  EXPECT_EQ(tokens, ja["sequences"].get<int64_t>() * 32);
  EXPECT_GT(tokens, 9000);
  const double loss = ja["loss"];
  EXPECT_GT(loss, 0.1);
  EXPECT_LT(loss, std::log(257.0));  // it has learned something
  EXPECT_NEAR(ja["perplexity"].get<double>(), std::exp(loss), 1e-9 * std::exp(loss));
  EXPECT_NEAR(ja["bits_per_token"].get<double>(), loss / std::log(2.0), 1e-12);
  EXPECT_EQ(ja["bytes"], ja["tokens"]);  // byte tokens, no eos in one document
  EXPECT_NEAR(ja["bits_per_byte"].get<double>(), ja["bits_per_token"].get<double>(), 1e-12);
  EXPECT_TRUE(has(ea, "bits/byte")) << ea.output;
  // --max_tokens: whole sequences up to it
  auto ec = run(ev + "--checkpoint=" + dir + "/ck --max_tokens=100");
  ASSERT_EQ(ec.status, 0) << ec.output;
  EXPECT_EQ(json_line(ec, "bits_per_byte")["tokens"], 128);
}

TEST_F(CliGenerate, RefusalsNameTheFlag) {
  auto r = run("eval --device=cpu --checkpoint=" + dir + "/ck");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--data: give a token dataset directory")) << r.output;
  r = run("eval --device=cpu --checkpoint=" + dir + "/ck --data=" + dir + "/data/train --seq=4096");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--seq (4096) is longer than the model's context")) << r.output;
  r = run("generate --device=cpu --checkpoint=" + dir + "/ck --top_p=0");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--top_p (0) must be in (0, 1]")) << r.output;
  r = run("generate --device=cpu --checkpoint=" + dir + "/ck --from_hf=" + dir + "/hf");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "give --checkpoint or --from_hf, not both")) << r.output;
  r = run("generate --device=cpu --checkpoint=" + dir + "/ck --prompts_file=" + dir + "/none.txt");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--prompts_file=" + dir + "/none.txt: cannot open")) << r.output;
}

}  // namespace
