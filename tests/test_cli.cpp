// The `difftron` program as a user meets it: bad flags give one clear error line naming the
// flag and value and exit 1; unknown commands exit 2; a short synthetic run trains and logs ETA.
#include <cstdio>
#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "tests/run_command.h"

namespace {

using Result = difftron::testing::CommandResult;
Result run(const std::string& args) { return difftron::testing::run_difftron(args); }

bool has(const Result& r, const std::string& s) { return r.output.find(s) != std::string::npos; }

TEST(Cli, InvalidModelConfigNamesTheFields) {
  auto r = run("train --device=cpu --d_model=96 --n_heads=3 --n_kv_heads=2 --steps=1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "n_heads (3) must be a multiple of --n_kv_heads (2)")) << r.output;
}

// The library names config fields; the program names them as the flags that set them.
TEST(Cli, ConfigFieldsInMessagesAreNamedAsFlags) {
  auto r = run("train --device=cpu --d_model=96 --n_heads=3 --n_kv_heads=2 --steps=1");
  EXPECT_TRUE(has(r, "--n_heads (3) must be a multiple of --n_kv_heads (2)")) << r.output;
  r = run("plan --tp=3 --d_model=64 --n_heads=2");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "not a multiple of --tp (3)")) << r.output;
  EXPECT_TRUE(has(r, "--n_heads (2)")) << r.output;
}

TEST(Cli, UnknownDevice) {
  auto r = run("train --device=tpu --steps=1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--device: unknown device 'tpu'")) << r.output;
}

TEST(Cli, BadOptimizerValue) {
  auto r = run("train --device=cpu --lr=-0.5 --steps=1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "lr (-0.5) must be > 0")) << r.output;
}

TEST(Cli, MissingModelConfigFile) {
  auto r = run("train --device=cpu --model_config=/nonexistent/cfg.json --steps=1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "--model_config: cannot open '/nonexistent/cfg.json'")) << r.output;
}

TEST(Cli, UnknownCommand) {
  auto r = run("frobnicate");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_TRUE(has(r, "unknown command 'frobnicate'")) << r.output;
  EXPECT_TRUE(has(r, "train")) << "the usage lists the commands: " << r.output;
}

TEST(Cli, SyntheticRunTrainsAndReportsProgress) {
  auto r = run("train --device=cpu --data=synthetic:copy --steps=30 --seq=16 --batch=8 --d_model=32 "
               "--log_every=10 --sample_tokens=8");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "step     30/30")) << r.output;
  EXPECT_TRUE(has(r, "ETA")) << r.output;
  EXPECT_TRUE(has(r, "continuation:")) << r.output;
}

}  // namespace

namespace {

TEST(Cli, ConvertRoundTripAndGenerate) {
  const std::string src = std::string(DIFFTRON_SOURCE_DIR) + "/tests/data/hf_diffllama_gqa";
  const std::string tmp = "/tmp/difftron_cli_" + std::to_string(getpid());
  auto r = run("convert --from_hf=" + src + " --to_checkpoint=" + tmp + "/ckpt");
  ASSERT_EQ(r.status, 0) << r.output;
  r = run("generate --device=cpu --checkpoint=" + tmp + "/ckpt --prompt_ids=1,11,35 --max_new_tokens=4 --temperature=0");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "1 11 35 ")) << r.output;
  r = run("convert --checkpoint=" + tmp + "/ckpt --to_hf=" + tmp + "/hf");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(std::filesystem::exists(tmp + "/hf/config.json"));
  EXPECT_TRUE(std::filesystem::exists(tmp + "/hf/model.safetensors"));
  r = run("generate --device=cpu --checkpoint=" + tmp + "/nothing");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "is neither a checkpoint nor a root holding one")) << r.output;
  std::filesystem::remove_all(tmp);
}

}  // namespace

namespace {

TEST(Cli, RunThatCannotFitInHostMemoryIsRefusedUpFront) {
  auto r = run("train --device=cpu --data=synthetic:copy --d_model=1024 --n_layers=24 --n_heads=8 --seq=65536 "
               "--batch=64 --steps=1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r, "GiB of host memory per rank")) << r.output;
  EXPECT_TRUE(has(r, "lower --batch or --seq")) << r.output;
}

}  // namespace
