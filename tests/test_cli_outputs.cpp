// Commands that write must not destroy what is already there, and commands that read a
// file or a number must refuse insane ones up front: `prepare --overwrite` replaces only
// a dataset prepare wrote, `convert` never writes into a training run's checkpoint root and
// replaces an export only with --overwrite, `generate` refuses a model larger than the host's
// memory, numbers outside their range and a tokenizer recorded as a path. Each refusal exits 1 naming the flag, file or value.
#include <unistd.h>

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

const std::string kHf = std::string(DIFFTRON_SOURCE_DIR) + "/tests/data/hf_diffllama_gqa";

// A fresh folder for one test, removed at the end.
struct Scratch {
  std::string path;
  explicit Scratch(const std::string& name)
      : path((fs::temp_directory_path() / ("difftron_cli_out_" + name + "_" + std::to_string(getpid()))).string()) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~Scratch() { fs::remove_all(path); }
  std::string operator/(const std::string& s) const { return path + "/" + s; }
};

void write_text(const std::string& path, const std::string& s) { std::ofstream(path) << s; }
std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST(CliOutputs, PrepareOverwriteReplacesOnlyItsOwnDatasets) {
  Scratch s("prepare");
  write_text(s / "a.txt", "some text for a dataset");
  fs::create_directories(s / "mine");
  write_text(s / "mine/precious.txt", "keep me");
  auto r = run("prepare --progress=false --val_fraction=0 --input=" + s / "a.txt" + " --out=" + s / "mine --overwrite");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--overwrite: " + s / "mine" + " is not a dataset written by difftron prepare")) << r.output;
  EXPECT_EQ(read_text(s / "mine/precious.txt"), "keep me");
  r = run("prepare --progress=false --val_fraction=0 --input=" + s / "a.txt" + " --out=" + s.path + " --overwrite");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "is the input")) << r.output;
  r = run("prepare --progress=false --val_fraction=0 --input=" + s / "a.txt" + " --out=" + s / "ds");
  ASSERT_EQ(r.status, 0) << r.output;
  r = run("prepare --progress=false --val_fraction=0 --input=" + s / "a.txt" + " --out=" + s / "ds --overwrite");
  EXPECT_EQ(r.status, 0) << r.output;
  r = run("prepare --input=" + s / "a.txt" + " --out=" + s / "x --jobs=100000");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--jobs (100000) must be in [0, 1024]")) << r.output;
  r = run("prepare --input=" + s / "a.txt" + " --out=" + s / "x --shard_tokens=99999999999999999");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--shard_tokens (99999999999999999) must be in [1, 2^40]")) << r.output;
}

TEST(CliOutputs, ConvertNeverWritesIntoATrainingRun) {
  Scratch s("ckpt");
  auto r = run("convert --from_hf=" + kHf + " --to_checkpoint=" + s / "run");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string latest = read_text(s / "run/latest");
  r = run("convert --from_hf=" + kHf + " --to_checkpoint=" + s / "run");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--to_checkpoint=" + s / "run" + " already holds a training run's checkpoints")) << r.output;
  EXPECT_TRUE(has(r, "choose an empty or new directory")) << r.output;
  EXPECT_EQ(read_text(s / "run/latest"), latest);
  // step_* folders alone (a run whose `latest` is missing) count too.
  fs::create_directories(s / "run2/step_00000100");
  r = run("convert --from_hf=" + kHf + " --to_checkpoint=" + s / "run2");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "(step_00000100)")) << r.output;
  EXPECT_FALSE(fs::exists(s / "run2/latest"));
}

TEST(CliOutputs, ConvertToHfReplacesAFolderOnlyWithOverwrite) {
  Scratch s("hf");
  ASSERT_EQ(run("convert --from_hf=" + kHf + " --to_checkpoint=" + s / "ck").status, 0);
  fs::create_directories(s / "empty");
  auto r = run("convert --checkpoint=" + s / "ck --to_hf=" + s / "empty");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(s / "empty/model.safetensors"));
  fs::create_directories(s / "hf");
  write_text(s / "hf/notes.txt", "mine");
  write_text(s / "hf/config.json", "old");
  r = run("convert --checkpoint=" + s / "ck --to_hf=" + s / "hf");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--to_hf=" + s / "hf" + " is not empty")) << r.output;
  EXPECT_TRUE(has(r, "--overwrite")) << r.output;
  EXPECT_EQ(read_text(s / "hf/config.json"), "old");
  r = run("convert --checkpoint=" + s / "ck --to_hf=" + s / "hf --overwrite");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_text(s / "hf/notes.txt"), "mine");  // other files stay
  EXPECT_NE(read_text(s / "hf/config.json").find("diffllama"), std::string::npos);
  EXPECT_EQ(read_text(s / "hf/config.json"), read_text(s / "empty/config.json"));
  for (const auto& e : fs::directory_iterator(s.path))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  r = run("convert --help");
  EXPECT_TRUE(has(r, "--overwrite")) << "the flag is documented";
}

TEST(CliOutputs, GenerateRefusesInsaneNumbersAndModelsLargerThanMemory) {
  Scratch s("gen");
  ASSERT_EQ(run("convert --from_hf=" + kHf + " --to_checkpoint=" + s / "ck").status, 0);
  auto r = run("generate --device=cpu --checkpoint=" + s / "ck --prompt_ids=1,99999999999");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--prompt_ids: '99999999999' is not a token id in [0, ")) << r.output;
  r = run("generate --device=cpu --checkpoint=" + s / "ck --prompt_ids=1 --max_new_tokens=-5");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--max_new_tokens (-5) must be in [0, 1000000]")) << r.output;
  // A checkpoint whose config claims ~8.8e12 parameters (meta.json is all it takes to read).
  std::string name = read_text(s / "ck/latest");  // "step_00000000\n"
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  const std::string dir = s / ("ck/" + name);
  ASSERT_TRUE(fs::exists(dir + "/meta.json")) << dir;
  nlohmann::json j = nlohmann::json::parse(read_text(dir + "/meta.json"));
  // A tokenizer recorded as a path (train records "bytes" or the JSON text) is not opened.
  j["extra"]["tokenizer"] = "/etc/passwd";
  std::ofstream(dir + "/meta.json") << j.dump(2);
  r = run("generate --device=cpu --checkpoint=" + s / "ck --prompt=x");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "its tokenizer is neither \"bytes\" nor tokenizer.json text ('/etc/passwd')")) << r.output;
  j["extra"].erase("tokenizer");
  auto& c = j["model_config"];
  c["vocab_size"] = int64_t(1) << 30;
  c["d_model"] = 4096;
  c["n_heads"] = 32;
  c["n_kv_heads"] = 32;
  c["head_dim"] = 64;
  c["ffn_dim"] = 11008;
  std::ofstream(dir + "/meta.json") << j.dump(2);
  if (read_text("/proc/meminfo").find("MemAvailable:") == std::string::npos) GTEST_SKIP() << "no MemAvailable";
  r = run("generate --device=cpu --checkpoint=" + s / "ck --prompt_ids=1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "8796700177536 parameters x 4 bytes")) << r.output;
  EXPECT_TRUE(has(r, "GiB available (MemAvailable)")) << r.output;
  r = run("convert --checkpoint=" + s / "ck --to_hf=" + s / "hf");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "GiB of host memory")) << r.output;
  EXPECT_FALSE(fs::exists(s / "hf"));
}

}  // namespace
