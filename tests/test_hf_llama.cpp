// Hugging Face Llama interop (the standard-attention baseline) against transformers itself:
// tests/data/hf_llama_tied_sharded was written by LlamaForCausalLM.save_pretrained
// (tools/make_hf_fixtures.py: bf16 shards + index, tied embeddings, GQA, rope_theta 50000) with
// the float64 logits of its weights. Import must reproduce those logits to rounding; export after
// import must give back the very tensors transformers wrote, in its sharded layout.
#include <filesystem>
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

namespace fs = std::filesystem;
const std::string kFixture = std::string(DIFFTRON_SOURCE_DIR) + "/tests/data/hf_llama_tied_sharded";

fs::path scratch(const char* tag) {
  fs::path p = fs::temp_directory_path() / (std::string("difftron_hfllama_") + tag + "_" + std::to_string(getpid()));
  fs::remove_all(p);
  return p;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream f(p);
  return nlohmann::json::parse(f);
}

TEST(HfLlama, ConfigMapsToTheBaseline) {
  ModelConfig c = read_hf_config(kFixture);
  EXPECT_EQ(c.attention, AttentionKind::Standard);
  EXPECT_EQ(c.n_heads, 2);     // 4 heads = 2 n_heads
  EXPECT_EQ(c.n_kv_heads, 1);  // 2 K/V heads
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.d_model, 64);
  EXPECT_EQ(c.ffn_dim, 176);
  EXPECT_EQ(c.vocab_size, 300);
  EXPECT_EQ(c.rope_theta, 50000.0);
  EXPECT_EQ(c.norm_eps, 1e-6);
  EXPECT_TRUE(c.tie_embeddings);
}

TEST(HfLlama, ImportOfTransformersShardsReproducesItsLogits) {
  ModelConfig c = read_hf_config(kFixture);
  auto tok = testing::read_tokens_json(kFixture + "/tokens.json");
  std::vector<int64_t> shape;
  auto ref = testing::read_npy_f64(kFixture + "/logits.npy", &shape);
  ASSERT_EQ(shape, (std::vector<int64_t>{int64_t(tok.size()), c.vocab_size}));
  auto ops = make_cpu_ops();
  for (DType t : {DType::F64, DType::F32}) {
    Model m(c, *ops, ModelPrecision::uniform(t), 1, tok.size());
    import_hf_model(kFixture, m);
    auto got = testing::all_logits(m, tok);
    const double err = testing::rel_l2(got, ref);
    const double bound = testing::hf_logits_bound(c, int64_t(tok.size()), t == DType::F32);
    EXPECT_LT(err, bound) << dtype_name(t);
    std::cout << dtype_name(t) << " logits vs transformers: rel L2 " << err << " (bound " << bound << ")\n";
  }
}

// A wrong head order or a missed norm would move the logits by O(1): the test can fail.
TEST(HfLlama, AMixedUpHeadOrderIsCaught) {
  ModelConfig c = read_hf_config(kFixture);
  auto tok = testing::read_tokens_json(kFixture + "/tokens.json");
  std::vector<int64_t> shape;
  auto ref = testing::read_npy_f64(kFixture + "/logits.npy", &shape);
  auto ops = make_cpu_ops();
  Model m(c, *ops, ModelPrecision::uniform(DType::F64), 1, tok.size());
  import_hf_model(kFixture, m);
  auto& q = m.param("model.layers.0.self_attn.q_proj.weight");  // swap query heads 0 and 1
  std::vector<double> w(q.value.numel());
  ops->download(q.value, w.data());
  const int64_t block = c.head_dim * c.d_model;
  std::swap_ranges(w.begin(), w.begin() + block, w.begin() + block);
  ops->upload(q.value, w.data());
  EXPECT_GT(testing::rel_l2(testing::all_logits(m, tok), ref), 1e-3);
}

TEST(HfLlama, ExportAfterImportGivesBackTransformersTensorsBitwise) {
  ModelConfig c = read_hf_config(kFixture);
  auto ops = make_cpu_ops();
  Model m(c, *ops, ModelPrecision::uniform(DType::F32), 1, 8);
  import_hf_model(kFixture, m);
  const fs::path dir = scratch("bf16");
  HfExportOptions opt;
  opt.dtype = StoreDType::BF16;
  opt.max_shard_bytes = 100000;  // what the fixture used ("100KB")
  opt.tokens.eos = 299;
  auto files = export_hf_model(m, dir.string(), opt);
  EXPECT_TRUE(fs::exists(dir / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
  auto a = read_safetensors_model(kFixture);
  auto b = read_safetensors_model(dir.string());
  ASSERT_EQ(a.size(), b.size());
  EXPECT_FALSE(b.count("lm_head.weight"));  // tied: transformers stores only the embedding
  for (auto& [name, t] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    EXPECT_EQ(b[name].shape, t.shape) << name;
    EXPECT_EQ(b[name].data, t.data) << name;  // bf16 -> f32 -> bf16 is exact
  }
  // Every shard is within the limit unless it holds a single larger tensor, and stored as BF16.
  auto index = read_json(dir / "model.safetensors.index.json");
  std::map<std::string, int> per_shard;
  for (auto& [name, file] : index.at("weight_map").items()) per_shard[file.get<std::string>()]++;
  EXPECT_GE(per_shard.size(), 2u);
  int64_t total = 0;
  for (auto& [file, n] : per_shard) {
    ASSERT_TRUE(std::find(files.begin(), files.end(), file) != files.end()) << file;
    auto shard = read_safetensors((dir / file).string());
    int64_t bytes = 0;
    for (auto& [name, t] : shard) bytes += int64_t(t.data.size()) * 2;
    EXPECT_TRUE(bytes <= opt.max_shard_bytes || n == 1) << file << ": " << bytes;
    total += bytes;
    std::ifstream f(dir / file, std::ios::binary);
    uint64_t len;
    f.read(reinterpret_cast<char*>(&len), 8);
    std::string header(len, '\0');
    f.read(header.data(), len);
    EXPECT_EQ(header.find("\"F32\""), std::string::npos) << file;
  }
  EXPECT_EQ(index.at("metadata").at("total_size").get<int64_t>(), total);
  // The config: Llama's names and the same model back.
  auto cfg = read_json(dir / "config.json");
  EXPECT_EQ(cfg.at("model_type"), "llama");
  EXPECT_EQ(cfg.at("architectures"), nlohmann::json({"LlamaForCausalLM"}));
  EXPECT_EQ(cfg.at("eos_token_id"), 299);
  EXPECT_TRUE(cfg.at("bos_token_id").is_null());
  EXPECT_EQ(cfg.at("dtype"), "bfloat16");
  EXPECT_EQ(cfg.at("mlp_bias"), false);
  auto fixture_cfg = read_json(fs::path(kFixture) / "config.json");
  for (const char* k : {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                        "num_hidden_layers", "vocab_size", "rms_norm_eps", "tie_word_embeddings", "hidden_act"})
    EXPECT_EQ(cfg.at(k), fixture_cfg.at(k)) << k;
  EXPECT_EQ(cfg.at("rope_parameters"), fixture_cfg.at("rope_parameters"));
  fs::remove_all(dir);
}

// A baseline model of difftron's own (untied, random weights): f32 export -> import gives the
// same logits bit for bit; a single file below the shard limit.
TEST(HfLlama, BaselineRoundTripIsBitwise) {
  ModelConfig c;
  c.vocab_size = 97;
  c.d_model = 48;
  c.n_layers = 2;
  c.n_heads = 3;
  c.n_kv_heads = 1;
  c.head_dim = 8;
  c.max_seq_len = 32;
  c.attention = AttentionKind::Standard;
  c.resolve_and_validate();
  auto ops = make_cpu_ops();
  Model m(c, *ops, ModelPrecision::uniform(DType::F32), 1, 16);
  m.init_weights(5);
  std::vector<int32_t> tok = {3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26};
  auto before = testing::all_logits(m, tok);
  const fs::path dir = scratch("f32");
  export_hf_model(m, dir.string());
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  ModelConfig back = read_hf_config(dir.string());
  EXPECT_EQ(back.attention, AttentionKind::Standard);
  EXPECT_EQ(back.n_heads, 3);
  EXPECT_EQ(back.n_kv_heads, 1);
  EXPECT_FALSE(back.tie_embeddings);
  Model m2(back, *ops, ModelPrecision::uniform(DType::F32), 1, 16);
  import_hf_model(dir.string(), m2);
  EXPECT_EQ(testing::all_logits(m2, tok), before);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace difftron
