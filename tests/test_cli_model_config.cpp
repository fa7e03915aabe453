// What a model is made of, as `difftron train` and `difftron plan` are told it: --model_config
// behaves like the model flags (the dataset's vocabulary and n_kv_heads = n_heads when the file
// leaves them out, flags given override it, unknown fields refused naming the field and the
// file); `plan --model_config` plans that model and ends with its bottom line; a dataset of
// token ids imported without a tokenizer (prepare --input_format=raw16) trains and samples
// ids; --init_from starts a new run from a checkpoint's or a Hugging Face folder's weights.
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/run_command.h"

namespace {

namespace fs = std::filesystem;
using Result = difftron::testing::CommandResult;
Result run(const std::string& args) { return difftron::testing::run_difftron(args); }
bool has(const Result& r, const std::string& s) { return r.output.find(s) != std::string::npos; }
fs::path fresh(const char* tag) { return difftron::testing::fresh_dir("difftron_model_config_", tag); }

void write_text(const fs::path& p, const std::string& s) { std::ofstream(p) << s; }

// The records of a run's metrics.jsonl with this `event`.
std::vector<nlohmann::json> records(const fs::path& run_dir, const std::string& event) {
  std::vector<nlohmann::json> out;
  std::ifstream f(run_dir / "metrics.jsonl");
  for (std::string line; std::getline(f, line);) {
    nlohmann::json r = nlohmann::json::parse(line);
    if (r.value("event", "") == event) out.push_back(r);
  }
  return out;
}

// A text dataset of the byte tokenizer (vocabulary 257): DIR/ds/train.
std::string byte_dataset(const fs::path& dir) {
  std::string text;
  for (int i = 0; i < 200; ++i) text += "the quick brown fox jumps over the lazy dog " + std::to_string(i) + "\n";
  write_text(dir / "a.txt", text);
  auto r = run("prepare --progress=false --val_fraction=0 --input=" + (dir / "a.txt").string() + " --out=" +
               (dir / "ds").string());
  EXPECT_EQ(r.status, 0) << r.output;
  return (dir / "ds/train").string();
}

const std::string kTrain = "train --device=cpu --seq=16 --batch=4 --log_every=1 ";

TEST(CliModelConfig, FieldsLeftOutFollowTheFlagsAndTheData) {
  const fs::path dir = fresh("fields");
  const std::string data = byte_dataset(dir);
  // no vocab_size, no n_kv_heads, no max_seq_len
  write_text(dir / "m.json", R"({"d_model": 32, "n_layers": 1, "n_heads": 4, "rope_theta": 5000.0})");
  auto r = run(kTrain + "--steps=1 --data=" + data + " --model_config=" + (dir / "m.json").string() +
               " --ckpt_dir=" + (dir / "run").string());
  ASSERT_EQ(r.status, 0) << r.output;
  auto start = records(dir / "run", "start");
  ASSERT_EQ(start.size(), 1u);
  const nlohmann::json& c = start[0]["model_config"];
  EXPECT_EQ(c["vocab_size"], 257) << c;  // the dataset's
  EXPECT_EQ(c["n_kv_heads"], 4) << c;    // n_heads, as --n_kv_heads=0 gives
  EXPECT_EQ(c["d_model"], 32) << c;
  EXPECT_EQ(c["n_layers"], 1) << c;
  EXPECT_EQ(c["head_dim"], 4) << c;      // d_model / (2 n_heads)
  EXPECT_EQ(c["max_seq_len"], 16) << c;  // --seq
  EXPECT_EQ(c["rope_theta"], 5000.0) << c;

  // flags given on the command line override the file; the file's max_seq_len is kept when longer
  write_text(dir / "m2.json", R"({"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 1, "max_seq_len": 64})");
  r = run(kTrain + "--steps=1 --model_config=" + (dir / "m2.json").string() + " --n_layers=2 --n_kv_heads=2 --ckpt_dir=" +
          (dir / "run2").string());
  ASSERT_EQ(r.status, 0) << r.output;
  start = records(dir / "run2", "start");
  ASSERT_EQ(start.size(), 1u);
  const nlohmann::json& c2 = start[0]["model_config"];
  EXPECT_EQ(c2["n_layers"], 2) << c2;
  EXPECT_EQ(c2["n_kv_heads"], 2) << c2;
  EXPECT_EQ(c2["vocab_size"], 16) << c2;  // the synthetic task's
  EXPECT_EQ(c2["max_seq_len"], 64) << c2;

  // a vocabulary smaller than the data's is refused
  write_text(dir / "m3.json", R"({"d_model": 32, "n_layers": 1, "vocab_size": 100})");
  r = run(kTrain + "--steps=1 --data=" + data + " --model_config=" + (dir / "m3.json").string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--vocab_size (100) is smaller than the dataset's vocabulary (257)")) << r.output;
  fs::remove_all(dir);
}

TEST(CliModelConfig, UnknownFieldsAndWrongTypesAreRefusedNamingTheFile) {
  const fs::path dir = fresh("unknown");
  const std::string file = (dir / "m.json").string();
  write_text(file, R"({"d_model": 32, "n_layer": 4, "dropout": 0.1, "n_heads": "four"})");
  for (const char* cmd : {"train --device=cpu --steps=1", "plan"}) {
    auto r = run(std::string(cmd) + " --model_config=" + file);
    EXPECT_EQ(r.status, 1) << cmd << "\n" << r.output;
    EXPECT_TRUE(has(r, "--model_config: '" + file + "' is not a valid model config")) << cmd << "\n" << r.output;
    EXPECT_TRUE(has(r, "unknown field \"n_layer\"")) << cmd << "\n" << r.output;
    EXPECT_TRUE(has(r, "unknown field \"dropout\"")) << cmd << "\n" << r.output;
    EXPECT_TRUE(has(r, "field \"n_heads\" must be an integer, not a string")) << cmd << "\n" << r.output;
  }
  write_text(file, "[1, 2]");
  auto r = run("train --device=cpu --steps=1 --model_config=" + file);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "holds an array, not a JSON object")) << r.output;
  // resuming: a file that describes another model than the checkpoint's is a conflict
  const std::string ck = (dir / "run").string();
  write_text(file, R"({"d_model": 32, "n_layers": 1})");
  r = run(kTrain + "--steps=1 --model_config=" + file + " --ckpt_dir=" + ck);
  ASSERT_EQ(r.status, 0) << r.output;
  r = run(kTrain + "--steps=2 --model_config=" + file + " --ckpt_dir=" + ck);  // the same file: resumes
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "resumed from")) << r.output;
  write_text(file, R"({"d_model": 32, "n_layers": 3})");
  r = run(kTrain + "--steps=3 --model_config=" + file + " --ckpt_dir=" + ck);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--model_config=" + file + " sets n_layers to 3, the checkpoint has 1")) << r.output;
  fs::remove_all(dir);
}

// "a step takes X s, Y tokens/s"
bool step_and_speed(const std::string& out, double* step_s, double* tokens_per_s) {
  std::smatch m;
  if (!std::regex_search(out, m, std::regex("a step takes ([0-9.e+-]+) s, ([0-9.e+-]+) tokens/s"))) return false;
  *step_s = std::stod(m[1]);
  *tokens_per_s = std::stod(m[2]);
  return true;
}

TEST(CliModelConfig, PlanHonoursTheFileAndEndsWithABottomLine) {
  const fs::path dir = fresh("plan");
  const std::string file = (dir / "m.json").string();
  // the 1.3B of docs/PERFORMANCE.md (51.6 GiB at micro-batch 8 x 2048 on the H200)
  write_text(file, R"({"d_model": 2048, "n_layers": 24, "n_heads": 8, "head_dim": 128, "ffn_dim": 5632,
                       "vocab_size": 32000, "max_seq_len": 2048})");
  auto from_file = run("plan --batch=8 --model_config=" + file);
  ASSERT_EQ(from_file.status, 0) << from_file.output;
  auto from_flags = run("plan --batch=8 --seq=2048 --d_model=2048 --n_layers=24 --n_heads=8 --head_dim=128 "
                        "--ffn_dim=5632 --vocab_size=32000");
  ASSERT_EQ(from_flags.status, 0) << from_flags.output;
  EXPECT_EQ(from_file.output, from_flags.output);
  EXPECT_TRUE(has(from_file, "d=2048 L=24 h=8 h_kv=8 dh=128 ffn=5632 vocab=32000 seq=2048")) << from_file.output;
  // the bottom line is the last line
  const std::string& out = from_file.output;
  const size_t last = out.rfind('\n', out.size() - 2);
  const std::string bottom = out.substr(last + 1);
  EXPECT_EQ(bottom.rfind("bottom line: fits on a GPU of 140 GiB (--plan_gpu_gib): peak 51.6 GiB per rank", 0), 0u)
      << bottom;
  double step_s = 0, tokens_per_s = 0;
  ASSERT_TRUE(step_and_speed(bottom, &step_s, &tokens_per_s)) << bottom;
  EXPECT_NEAR(step_s * tokens_per_s, 8 * 2048, 8 * 2048 * 0.01) << bottom;  // one step's tokens
  EXPECT_GT(step_s, 0.1);
  EXPECT_LT(step_s, 1.0);
  // at twice the MFU the step takes half as long
  auto faster = run("plan --batch=8 --model_config=" + file + " --plan_mfu=0.8");
  ASSERT_EQ(faster.status, 0) << faster.output;
  double step2 = 0, speed2 = 0;
  ASSERT_TRUE(step_and_speed(faster.output, &step2, &speed2)) << faster.output;
  EXPECT_NEAR(step2, step_s / 2, step_s * 0.01);
  // a smaller GPU: does not fit, with what to change
  auto small = run("plan --batch=8 --model_config=" + file + " --plan_gpu_gib=40");
  ASSERT_EQ(small.status, 0) << small.output;
  EXPECT_TRUE(has(small, "bottom line: does NOT fit on a GPU of 40 GiB")) << small.output;
  EXPECT_TRUE(has(small, "to fit: --recompute=selective or full")) << small.output;
  // --seq given wins over the file's max_seq_len; the vocabulary comes from --data when the
  // file has none
  write_text(file, R"({"d_model": 64, "n_layers": 2, "n_heads": 2})");
  const std::string data = byte_dataset(dir);
  auto r = run("plan --seq=32 --model_config=" + file + " --data=" + data);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "h_kv=2 dh=16 ffn=256 vocab=257 seq=32")) << r.output;
  r = run("plan --preset=1.4B --model_config=" + file);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "give --preset or --model_config, not both")) << r.output;
  fs::remove_all(dir);
}

TEST(CliModelConfig, ImportedTokenIdsWithoutATokenizerTrain) {
  const fs::path dir = fresh("raw16");
  // four documents of uint16 ids below 100, one of them for validation
  std::vector<std::string> files;
  for (int d = 0; d < 4; ++d) {
    std::vector<uint16_t> ids(1000);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = uint16_t((i * 7 + d) % 100);
    files.push_back((dir / ("doc" + std::to_string(d) + ".bin")).string());
    std::ofstream(files.back(), std::ios::binary).write(reinterpret_cast<const char*>(ids.data()), ids.size() * 2);
  }
  auto r = run("prepare --progress=false --input_format=raw16 --import_vocab_size=100 --val_fraction=0.25 --input=" +
               files[0] + "," + files[1] + "," + files[2] + "," + files[3] + " --out=" + (dir / "ds").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "next: difftron inspect")) << r.output;
  const std::string data = " --data=" + (dir / "ds/train").string() + " --val_data=" + (dir / "ds/val").string();
  r = run(kTrain + "--steps=3 --d_model=32 --n_layers=1 --sample_tokens=6" + data + " --ckpt_dir=" +
          (dir / "run").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "----- sample (token ids: the dataset has no tokenizer) -----")) << r.output;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.output, m, std::regex("\nsample:((?: [0-9]+)+)\n"))) << r.output;
  std::istringstream ids(m[1].str());
  int n = 0;
  for (int id; ids >> id; ++n) EXPECT_LT(id, 100);
  EXPECT_EQ(n, 6);
  auto start = records(dir / "run", "start");
  ASSERT_EQ(start.size(), 1u);
  EXPECT_EQ(start[0]["model_config"]["vocab_size"], 100);
  auto evals = records(dir / "run", "eval");
  ASSERT_FALSE(evals.empty());
  EXPECT_FALSE(evals.back().contains("bits_per_byte"));  // no text, no bytes
  EXPECT_TRUE(std::isfinite(evals.back()["loss"].get<double>()));
  // a text prompt cannot be encoded without a tokenizer: refused before training
  r = run(kTrain + "--steps=3 --d_model=32 --sample_prompt=hello" + data);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--sample_prompt needs a tokenizer")) << r.output;
  fs::remove_all(dir);
}

// The training loss of step 1 in a run's metrics.jsonl.
double first_loss(const fs::path& run_dir) {
  auto steps = records(run_dir, "step");
  return steps.empty() ? -1 : steps.front()["loss"].get<double>();
}

TEST(CliModelConfig, InitFromACheckpointOrAnHfFolderStartsANewRun) {
  const fs::path dir = fresh("init");
  const std::string model = "--d_model=32 --n_layers=1 ";
  // A: a model trained for a while on the copy task
  auto r = run(kTrain + model + "--steps=40 --lr=3e-3 --warmup=5 --ckpt_dir=" + (dir / "A").string());
  ASSERT_EQ(r.status, 0) << r.output;
  // B from A's weights: step 0, the schedule's warm-up again, no model flags needed
  r = run(kTrain + "--steps=3 --warmup=10 --init_from=" + (dir / "A").string() + " --ckpt_dir=" + (dir / "B").string());
  ASSERT_EQ(r.status, 0) << r.output;
  auto start = records(dir / "B", "start");
  ASSERT_EQ(start.size(), 1u);
  EXPECT_EQ(start[0]["start_step"], 0);
  EXPECT_EQ(start[0]["resumed"], false);
  EXPECT_EQ(start[0]["init_from"], (dir / "A/step_00000040").string());
  EXPECT_EQ(start[0]["model_config"]["d_model"], 32);
  auto steps = records(dir / "B", "step");
  ASSERT_EQ(steps.size(), 3u);
  EXPECT_EQ(steps[0]["step"], 1);
  EXPECT_DOUBLE_EQ(steps[0]["lr"].get<double>(), 1e-3 / 10);  // warm-up step 1 of 10 at the default --lr
  EXPECT_TRUE(fs::exists(dir / "B/step_00000003/meta.json"));
  const nlohmann::json meta = nlohmann::json::parse(difftron::testing::read_text_file(dir / "B/step_00000003/meta.json"));
  EXPECT_EQ(meta["step"], 3);
  EXPECT_EQ(meta["extra"]["init_from"], (dir / "A/step_00000040").string());
  // a fresh model of the same shape, for comparison: its first loss is the untrained one
  r = run(kTrain + model + "--steps=1 --ckpt_dir=" + (dir / "F").string());
  ASSERT_EQ(r.status, 0) << r.output;
  const double fresh_loss = first_loss(dir / "F"), from_a = first_loss(dir / "B");
  EXPECT_LT(from_a, fresh_loss - 0.1) << "B should start from A's trained weights";

  // C from A exported as a Hugging Face folder: the same weights, the same first loss
  r = run("convert --checkpoint=" + (dir / "A").string() + " --to_hf=" + (dir / "hf").string());
  ASSERT_EQ(r.status, 0) << r.output;
  r = run(kTrain + "--steps=1 --init_from=" + (dir / "hf").string() + " --ckpt_dir=" + (dir / "C").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "initialised from the Hugging Face folder")) << r.output;
  EXPECT_NEAR(first_loss(dir / "C"), from_a, 1e-4);

  // the model is --init_from's: model flags that disagree are refused
  r = run(kTrain + "--steps=1 --d_model=64 --init_from=" + (dir / "A").string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "model flags conflict with the model there")) << r.output;
  EXPECT_TRUE(has(r, "--d_model=64, the model there has 32")) << r.output;
  r = run(kTrain + "--steps=1 --seq=512 --init_from=" + (dir / "A").string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--seq=512 is longer than the max_seq_len (16)")) << r.output;
  r = run(kTrain + "--steps=1 --init_from=" + (dir / "nothing").string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "is neither a checkpoint")) << r.output;
  // B again: it resumes its own checkpoint, --init_from is for the start only
  r = run(kTrain + "--steps=4 --warmup=10 --init_from=" + (dir / "A").string() + " --ckpt_dir=" + (dir / "B").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "resumed from")) << r.output;
  start = records(dir / "B", "start");
  ASSERT_EQ(start.size(), 2u);
  EXPECT_EQ(start[1]["start_step"], 3);
  EXPECT_EQ(start[1]["init_from"], (dir / "A/step_00000040").string());
  fs::remove_all(dir);
}

}  // namespace
