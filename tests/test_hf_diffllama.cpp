// Hugging Face DiffLlama interop against logits written by transformers itself
// (tests/data/hf_diffllama_gqa, copied from the shared fixtures): import must reproduce its
// logits; export after import must give back the same tensors; a non-unit sub-layer norm
// weight must survive export (folded into o_proj) with unchanged logits; bad files fail clearly.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/model.h"
#include "io/hf_diffllama.h"
#include "io/safetensors.h"
#include "tests/grad_check.h"
#include "tests/test_hf_util.h"

namespace difftron {
namespace {

using testing::all_logits;
using testing::read_npy_f64;

const std::string kFixture = std::string(DIFFTRON_SOURCE_DIR) + "/tests/data/hf_diffllama_gqa";

std::vector<int32_t> fixture_tokens() {
  std::ifstream f(kFixture + "/tokens.json");
  return nlohmann::json::parse(f).get<std::vector<int32_t>>();
}

TEST(HfDiffLlama, ConfigMapsSingleMapHeadsToDifferentialHeads) {
  ModelConfig c = read_hf_config(kFixture);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.d_model, 128);
  EXPECT_EQ(c.ffn_dim, 352);
  EXPECT_EQ(c.vocab_size, 300);
  EXPECT_FALSE(c.tie_embeddings);
}

TEST(HfDiffLlama, ImportReproducesTransformersLogits) {
  ModelConfig c = read_hf_config(kFixture);
  auto tok = fixture_tokens();
  std::vector<int64_t> shape;
  auto ref = read_npy_f64(kFixture + "/logits.npy", &shape);
  ASSERT_EQ(shape, (std::vector<int64_t>{int64_t(tok.size()), c.vocab_size}));
  auto ops = make_cpu_ops();
  for (DType t : {DType::F64, DType::F32}) {
    Model m(c, *ops, ModelPrecision::uniform(t), 1, tok.size());
    import_hf_model(kFixture, m);
    auto got = all_logits(m, tok);
    double err = testing::rel_l2(got, ref);
    EXPECT_LT(err, t == DType::F64 ? 1e-5 : 2e-5) << dtype_name(t);
    std::cout << dtype_name(t) << " logits vs transformers: rel L2 " << err << "\n";
  }
}

TEST(HfDiffLlama, ExportAfterImportGivesTheSameTensors) {
  ModelConfig c = read_hf_config(kFixture);
  auto ops = make_cpu_ops();
  Model m(c, *ops, ModelPrecision::uniform(DType::F32), 1, 8);
  import_hf_model(kFixture, m);
  auto dir = std::filesystem::temp_directory_path() / ("difftron_hf_" + std::to_string(getpid()));
  export_hf_model(m, dir.string());
  auto a = read_safetensors(kFixture + "/model.safetensors");
  auto b = read_safetensors((dir / "model.safetensors").string());
  ASSERT_EQ(a.size(), b.size());
  for (auto& [name, t] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    EXPECT_EQ(b[name].shape, t.shape) << name;
    EXPECT_EQ(b[name].data, t.data) << name;  // bit-exact: only permutations and x1 folds
  }
  ModelConfig back = read_hf_config(dir.string());
  EXPECT_EQ(back.n_heads, c.n_heads);
  EXPECT_EQ(back.n_kv_heads, c.n_kv_heads);
  std::filesystem::remove_all(dir);
}

TEST(HfDiffLlama, SublnWeightIsFoldedIntoOProjOnExport) {
  ModelConfig c = read_hf_config(kFixture);
  auto tok = fixture_tokens();
  tok.resize(12);
  auto ops = make_cpu_ops();
  Model m(c, *ops, ModelPrecision::uniform(DType::F64), 1, tok.size());
  import_hf_model(kFixture, m);
  for (int64_t l = 0; l < c.n_layers; ++l) {  // a trained model's w_sub is not all ones
    auto& p = m.param("model.layers." + std::to_string(l) + ".self_attn.subln.weight");
    auto w = testing::randn(p.value.numel(), 40 + l, 0.3);
    for (auto& x : w) x += 1.0;
    ops->upload(p.value, w.data());
  }
  auto before = all_logits(m, tok);
  auto dir = std::filesystem::temp_directory_path() / ("difftron_hf2_" + std::to_string(getpid()));
  export_hf_model(m, dir.string());
  Model m2(c, *ops, ModelPrecision::uniform(DType::F64), 1, tok.size());
  import_hf_model(dir.string(), m2);
  EXPECT_LT(testing::rel_l2(all_logits(m2, tok), before), 1e-6);  // f32 file precision
  std::filesystem::remove_all(dir);
}

TEST(HfDiffLlama, BadFilesFailNamingTheProblem) {
  auto dir = std::filesystem::temp_directory_path() / ("difftron_hf3_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  {
    std::ofstream f(dir / "config.json");
    f << R"({"model_type": "mistral", "vocab_size": 10})";
  }
  try {
    read_hf_config(dir.string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model_type is 'mistral'; difftron reads 'diffllama'"), std::string::npos) << e.what();
  }
  {
    std::ofstream f(dir / "model.safetensors", std::ios::binary);
    uint64_t len = 1000;
    f.write(reinterpret_cast<const char*>(&len), 8);
    f << "{}";
  }
  try {
    read_safetensors((dir / "model.safetensors").string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds the file size"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

// safetensors headers are untrusted: negative or overflowing shapes and offsets that wrap
// around must give an Error naming the file and tensor, not a huge allocation or a crash.
TEST(HfDiffLlama, CraftedSafetensorsHeadersAreRefused) {
  auto dir = std::filesystem::temp_directory_path() / ("difftron_hf4_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "model.safetensors").string();
  auto attempt = [&](const std::string& header) -> std::string {
    {
      std::ofstream f(path, std::ios::binary | std::ios::trunc);
      uint64_t len = header.size();
      f.write(reinterpret_cast<const char*>(&len), 8);
      f << header << std::string(64, '\0');
    }
    try {
      read_safetensors(path);
    } catch (const Error& e) {
      return e.what();
    } catch (const std::exception& e) {
      return std::string("non-difftron exception: ") + e.what();
    }
    return "no error";
  };
  // shape -2 x 2 = -4 elements; 4 x -4 bytes wraps to 2^64 - 16, and 8 + header + that wraps too.
  std::string msg = attempt(R"({"w": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 18446744073709551600]}})");
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("tensor 'w' has shape [-2, 2]"), std::string::npos) << msg;
  // 2^32 x 2^32 elements overflow to 0, matching empty offsets.
  msg = attempt(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})");
  EXPECT_NE(msg.find("more than the file holds"), std::string::npos) << msg;
  msg = attempt(R"({"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}})");
  EXPECT_NE(msg.find("tensor 'w' has a malformed header entry"), std::string::npos) << msg;
  msg = attempt(R"([1, 2])");
  EXPECT_NE(msg.find("not a JSON object"), std::string::npos) << msg;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace difftron
