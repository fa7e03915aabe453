// `--attention=diff_v2` (Differential Transformer V2, docs/MODEL.md section 5) through the
// program, on the CPU, on a byte-level dataset: a few training steps with a checkpoint, the
// same command resuming from it (and refusing another variant), `generate` (K/V cache) and
// `eval` from the checkpoint, whose meta.json names the variant.
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

using difftron::testing::json_line;

TEST(CliDiffV2, TrainsResumesGeneratesAndEvaluates) {
  const fs::path dir = fs::temp_directory_path() / ("difftron_cli_v2_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  {
    std::ofstream f(dir / "a.txt");
    const char* words[] = {"the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"};
    for (int i = 0; i < 600; ++i) f << words[(i * 7 + i / 9) % 9] << (i % 11 == 10 ? "\n" : " ");
  }
  const std::string data = (dir / "data").string(), ck = (dir / "ck").string();
  auto r = run("prepare --progress=false --val_fraction=0 --input=" + (dir / "a.txt").string() + " --out=" + data);
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string model = " --device=cpu --data=" + data + "/train --seq=16 --batch=4 --d_model=32 --n_heads=2 "
                            "--n_kv_heads=1 --log_every=1 --ckpt_dir=" + ck;
  const std::string train = "train --attention=diff_v2" + model;
  r = run(train + " --steps=3");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "diff_v2 transformer")) << r.output;
  ASSERT_TRUE(fs::exists(ck + "/step_00000003")) << r.output;

  // the checkpoint's config names the variant
  std::ifstream meta(ck + "/step_00000003/meta.json");
  ASSERT_TRUE(meta.good());
  const std::string meta_text((std::istreambuf_iterator<char>(meta)), std::istreambuf_iterator<char>());
  EXPECT_NE(meta_text.find("\"diff_v2\""), std::string::npos) << meta_text;

  // the same command with more steps resumes from it
  r = run(train + " --steps=5");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "resumed from " + ck + "/step_00000003")) << r.output;
  EXPECT_TRUE(fs::exists(ck + "/step_00000005")) << r.output;

  // and a different variant is refused on resume
  r = run("train --attention=diff --steps=6" + model);
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_TRUE(has(r, "--attention=diff, the checkpoint has diff_v2")) << r.output;

  r = run("generate --device=cpu --checkpoint=" + ck + " --prompt='the quick' --max_new_tokens=6 --temperature=0 "
          "--ignore_eos --json");
  ASSERT_EQ(r.status, 0) << r.output;
  const nlohmann::json j = json_line(r, "batch");
  ASSERT_EQ(j["sequences"].size(), 1u) << r.output;
  EXPECT_EQ(j["sequences"][0]["tokens"].size(), 6u) << r.output;

  // no transformers class exists for V2: export writes difftron's own labelled folder with a
  // README (its contents: tests/test_hf_diff_v2.cpp)
  const std::string hf = (dir / "hf").string();
  r = run("convert --checkpoint=" + ck + " --to_hf=" + hf);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(difftron::testing::read_text_file(hf + "/config.json").find("\"difftron_diff_v2\""), std::string::npos);
  EXPECT_TRUE(fs::exists(hf + "/README.md")) << r.output;

  r = run("eval --device=cpu --checkpoint=" + ck + " --data=" + data + "/train --seq=16 --batch=4 --json");
  ASSERT_EQ(r.status, 0) << r.output;
  nlohmann::json e;  // the JSON line (its keys in alphabetical order)
  std::stringstream ss(r.output);
  for (std::string line; std::getline(ss, line);)
    if (line.rfind("{", 0) == 0) e = nlohmann::json::parse(line);
  ASSERT_TRUE(e.contains("loss")) << r.output;
  EXPECT_GT(e["loss"].get<double>(), 0.0) << r.output;
  fs::remove_all(dir);
}

}  // namespace
