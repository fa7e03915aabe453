// The Hugging Face folder around the weights (io/hf_export.h, io/safetensors.h) and the config
// fields import refuses: the byte tokenizer's tokenizer.json encodes the byte tokenizer's ids,
// a BPE tokenizer.json is handed on with the right special tokens, sharded weights round-trip
// and a bad index fails clearly, every unimplemented config field is refused by name and value,
// and `difftron convert` writes the whole folder (and re-exports over it without stale shards).
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "io/hf_export.h"
#include "io/safetensors.h"
#include "io/tokenizer.h"
#include "tests/grad_check.h"
#include "tests/run_command.h"
#include "tests/test_hf_util.h"

namespace difftron {
namespace {

namespace fs = std::filesystem;
const std::string kData = std::string(DIFFTRON_SOURCE_DIR) + "/tests/data";

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(HfExport, ByteTokenizerJsonEncodesTheByteTokenizersIds) {
  auto bytes = make_byte_tokenizer();
  // difftron's BPE reads tokenizer.json as Hugging Face's tokenizers does
  // (tests/test_io_tokenizer_bpe.cpp checks that against ids tokenizers wrote).
  auto as_bpe = load_tokenizer(hf_byte_tokenizer_json());
  EXPECT_EQ(as_bpe->vocab_size(), bytes->vocab_size());
  EXPECT_EQ(as_bpe->eos_id(), bytes->eos_id());
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(char(b));
  std::vector<std::string> texts = {all, "Hello, world!\n", "  two  spaces\t\r\n", "caf\xc3\xa9 \xe2\x82\xac 1234567",
                                    "\xff\xfe invalid utf-8 \x80", ""};
  auto noise = testing::randn(2000, 11);
  std::string random;
  for (double x : noise) random.push_back(char(int64_t(std::abs(x) * 1000) % 256));
  texts.push_back(random);
  for (const auto& t : texts) {
    EXPECT_EQ(as_bpe->encode(t), bytes->encode(t)) << t;
    EXPECT_EQ(as_bpe->decode(bytes->encode(t)), t);
  }
}

TEST(HfExport, TokenizerFilesNameTheSpecialTokens) {
  HfTokenizerFiles b = hf_tokenizer_files("bytes", "", 512, 260);
  EXPECT_EQ(b.ids.eos, 256);
  EXPECT_EQ(b.ids.pad, 256);
  EXPECT_EQ(b.ids.bos, -1);  // difftron's data has no BOS
  EXPECT_EQ(b.tokenizer_config.at("eos_token"), "<|eos|>");
  EXPECT_EQ(b.tokenizer_config.at("model_max_length"), 512);
  EXPECT_EQ(b.tokenizer_config.at("tokenizer_class"), "PreTrainedTokenizerFast");
  EXPECT_EQ(b.special_tokens_map.at("eos_token"), "<|eos|>");
  auto gen = hf_generation_config(b.ids);
  EXPECT_EQ(gen.at("eos_token_id"), 256);
  EXPECT_EQ(gen.at("pad_token_id"), 256);
  EXPECT_FALSE(gen.contains("bos_token_id"));

  const std::string gpt2 = testing::read_text_file(kData + "/bpe/gpt2_tokenizer.json");
  HfTokenizerFiles g = hf_tokenizer_files(gpt2, "", 256, 1200);
  EXPECT_EQ(g.ids.eos, 0);
  EXPECT_EQ(g.tokenizer_config.at("eos_token"), "<|endoftext|>");
  EXPECT_EQ(nlohmann::json::parse(g.tokenizer_json), nlohmann::json::parse(gpt2));  // handed on as it is
  // An EOS named at prepare time, and a BOS template difftron's encoding never applied.
  nlohmann::json l3 = nlohmann::json::parse(testing::read_text_file(kData + "/bpe/llama3_tokenizer.json"));
  l3["post_processor"] = {{"type", "TemplateProcessing"},
                          {"single", {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}}}}};
  HfTokenizerFiles l = hf_tokenizer_files(l3.dump(), "<|begin_of_text|>", 256, 1200);
  EXPECT_EQ(l.ids.eos, 0);
  EXPECT_EQ(l.tokenizer_config.at("eos_token"), "<|begin_of_text|>");
  EXPECT_TRUE(nlohmann::json::parse(l.tokenizer_json).at("post_processor").is_null());
  EXPECT_NE(error_of([&] { hf_tokenizer_files(gpt2, "", 256, 1000); })
                .find("the tokenizer has 1200 tokens, more than the model's vocab_size (1000)"),
            std::string::npos);
}

TEST(HfExport, ShardedWeightsRoundTripAndBadIndexesFail) {
  const fs::path dir = testing::fresh_dir("difftron_hfexp_", "shards");
  std::vector<NamedTensor> ts;
  for (int i = 0; i < 5; ++i) {
    auto v = testing::randn(100 * (i + 1), 20 + i);
    ts.push_back({"t" + std::to_string(i), HostTensor{{int64_t(v.size())}, std::vector<float>(v.begin(), v.end())}});
  }
  // 400..2000 bytes each in f32: a 1000-byte limit gives [t0], [t1], [t2], [t3], [t4]; t0+t1 = 1200 > 1000
  auto files = write_safetensors_model(dir.string(), ts, StoreDType::F32, 1000);
  EXPECT_EQ(files.size(), 6u);
  EXPECT_TRUE(fs::exists(dir / "model-00005-of-00005.safetensors"));
  EXPECT_TRUE(is_safetensors_model_file("model-00005-of-00005.safetensors"));
  EXPECT_FALSE(is_safetensors_model_file("model-00005-of-00005.safetensors.bak"));
  auto back = read_safetensors_model(dir.string());
  ASSERT_EQ(back.size(), 5u);
  for (auto& t : ts) EXPECT_EQ(back.at(t.name).data, t.tensor.data) << t.name;
  // bf16: rounded to nearest even, 2 bytes each: 200..1000 bytes; t0 + t1 = 600 fit in one shard
  fs::remove_all(dir);
  fs::create_directories(dir);
  files = write_safetensors_model(dir.string(), ts, StoreDType::BF16, 1000);
  EXPECT_EQ(files.front(), "model-00001-of-00004.safetensors");
  back = read_safetensors_model(dir.string());
  for (auto& t : ts)
    for (size_t i = 0; i < t.tensor.data.size(); ++i)
      ASSERT_NEAR(back.at(t.name).data[i], t.tensor.data[i], std::abs(t.tensor.data[i]) * 0x1p-8) << t.name;
  // A bad index: a tensor its shard lacks, a path outside the folder.
  const std::string index = (dir / "model.safetensors.index.json").string();
  auto j = nlohmann::json::parse(testing::read_text_file(index));
  j["weight_map"]["t0"] = "model-00002-of-00004.safetensors";
  std::ofstream(index) << j.dump();
  EXPECT_NE(error_of([&] { read_safetensors_model(dir.string()); })
                .find("lists tensor 't0' in model-00002-of-00004.safetensors, which does not hold it"),
            std::string::npos);
  j["weight_map"]["t0"] = "../elsewhere.safetensors";
  std::ofstream(index) << j.dump();
  EXPECT_NE(error_of([&] { read_safetensors_model(dir.string()); }).find("which is not a file name in"),
            std::string::npos);
  fs::remove(index);
  EXPECT_NE(error_of([&] { read_safetensors_model(dir.string()); })
                .find("has neither model.safetensors nor model.safetensors.index.json"),
            std::string::npos);
  EXPECT_EQ(parse_byte_size("5GB", "x"), 5000000000);
  EXPECT_EQ(parse_byte_size("2MiB", "x"), 2097152);
  EXPECT_EQ(parse_byte_size("12345", "x"), 12345);
  EXPECT_NE(error_of([] { parse_byte_size("5 parsecs", "--max_shard_size"); }).find("--max_shard_size '5 parsecs'"),
            std::string::npos);
  fs::remove_all(dir);
}

TEST(HfExport, ImportRefusesEveryConfigFieldItDoesNotImplement) {
  const nlohmann::json base = nlohmann::json::parse(
      testing::read_text_file(kData + "/hf_llama_tied_sharded/config.json"));
  EXPECT_NO_THROW(model_config_from_hf(base, "c.json"));
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"hidden_act", "gelu_pytorch_tanh"}}, "hidden_act = \"gelu_pytorch_tanh\""},
      {{{"attention_bias", true}}, "attention_bias = true"},
      {{{"mlp_bias", true}}, "mlp_bias = true"},
      {{{"rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}}}}, "rope_scaling = {\"factor\":2.0"},
      {{{"rope_parameters", {{"rope_type", "yarn"}, {"rope_theta", 1e4}, {"factor", 4.0}}}},
       "rope_parameters.rope_type = \"yarn\""},
      {{{"quantization_config", {{"quant_method", "gptq"}}}}, "quantization_config = {\"quant_method\":\"gptq\"}"},
      {{{"sliding_window", 4096}}, "sliding_window = 4096"},
      {{{"final_logit_softcapping", 30.0}}, "final_logit_softcapping = 30.0"},
  };
  for (const auto& [patch, expect] : cases) {
    nlohmann::json c = base;
    c.update(patch);
    const std::string msg = error_of([&] { model_config_from_hf(c, "c.json"); });
    EXPECT_NE(msg.find("c.json: config fields that change the model and that difftron does not implement"),
              std::string::npos) << msg;
    EXPECT_NE(msg.find(expect), std::string::npos) << msg;
  }
  nlohmann::json c = base;  // all at once: every one named
  c.update({{"hidden_act", "relu"}, {"attention_bias", true}, {"mlp_bias", true}});
  const std::string msg = error_of([&] { model_config_from_hf(c, "c.json"); });
  for (const char* f : {"hidden_act = \"relu\"", "attention_bias = true", "mlp_bias = true"})
    EXPECT_NE(msg.find(f), std::string::npos) << msg;
  // the same for DiffLlama
  nlohmann::json d = nlohmann::json::parse(testing::read_text_file(kData + "/hf_diffllama_gqa/config.json"));
  d["attention_bias"] = true;
  EXPECT_NE(error_of([&] { model_config_from_hf(d, "d.json"); }).find("attention_bias = true"), std::string::npos);
  nlohmann::json odd = base;
  odd["num_key_value_heads"] = 1;
  EXPECT_NE(error_of([&] { model_config_from_hf(odd, "c.json"); }).find("num_key_value_heads (1) must be even"),
            std::string::npos);
}

TEST(HfExport, ImportRefusesTensorsItWouldDrop) {
  const fs::path dir = testing::fresh_dir("difftron_hfexp_", "bias");
  const std::string src = kData + "/hf_diffllama_gqa";
  fs::copy_file(src + "/config.json", dir / "config.json");
  auto t = read_safetensors(src + "/model.safetensors");
  t["model.layers.0.self_attn.q_proj.bias"] = HostTensor{{128}, std::vector<float>(128, 0.5f)};
  write_safetensors((dir / "model.safetensors").string(), t);
  ModelConfig c = read_hf_config(dir.string());
  auto ops = make_cpu_ops();
  Model m(c, *ops, ModelPrecision::uniform(DType::F32), 1, 4);
  EXPECT_NE(error_of([&] { import_hf_model(dir.string(), m); })
                .find("tensor 'model.layers.0.self_attn.q_proj.bias' (shape [128]) has no counterpart"),
            std::string::npos);
  fs::remove_all(dir);
}

// The CLI end to end: a byte-tokenizer checkpoint -> a complete folder (bf16, sharded), its
// --logits_out agrees with the checkpoint's, and an f32 re-export over it (--overwrite, one
// file now) leaves no stale shard behind.
TEST(HfExport, ConvertWritesTheWholeFolder) {
  const fs::path s = testing::fresh_dir("difftron_hfexp_", "cli");
  {
    std::ofstream f(s / "a.txt");
    for (int i = 0; i < 200; ++i) f << "the quick brown fox " << i << " jumps over the lazy dog.\n";
  }
  auto r = testing::run_difftron("prepare --progress=false --val_fraction=0 --input=" + (s / "a.txt").string() +
                                 " --out=" + (s / "ds").string());
  ASSERT_EQ(r.status, 0) << r.output;
  r = testing::run_difftron("train --device=cpu --data=" + (s / "ds/train").string() + " --steps=2 --seq=32 --batch=2 "
                            "--d_model=32 --n_heads=2 --n_kv_heads=1 --n_layers=1 --vocab_size=260 "
                            "--attention=standard --ckpt_dir=" + (s / "run").string() + " --ckpt_every=2");
  ASSERT_EQ(r.status, 0) << r.output;
  r = testing::run_difftron("convert --checkpoint=" + (s / "run").string() + " --to_hf=" + (s / "hf").string() +
                            " --dtype=bf16 --max_shard_size=10KB");
  ASSERT_EQ(r.status, 0) << r.output;
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "model.safetensors.index.json"})
    EXPECT_TRUE(fs::exists(s / "hf" / f)) << f;
  // 16.6 KB embedding and LM head in bf16: each a shard of its own, the layer and norms a third
  auto index = nlohmann::json::parse(testing::read_text_file(s / "hf/model.safetensors.index.json"));
  std::set<std::string> shards;
  for (auto& [name, file] : index.at("weight_map").items()) shards.insert(file.get<std::string>());
  EXPECT_GE(shards.size(), 3u);
  for (const auto& f : shards) EXPECT_TRUE(fs::exists(s / "hf" / f)) << f;
  auto cfg = nlohmann::json::parse(testing::read_text_file(s / "hf/config.json"));
  EXPECT_EQ(cfg.at("model_type"), "llama");
  EXPECT_EQ(cfg.at("eos_token_id"), 256);
  EXPECT_EQ(cfg.at("dtype"), "bfloat16");
  auto gen = nlohmann::json::parse(testing::read_text_file(s / "hf/generation_config.json"));
  EXPECT_EQ(gen.at("eos_token_id"), 256);
  EXPECT_EQ(testing::read_text_file(s / "hf/tokenizer.json"), hf_byte_tokenizer_json());

  // Logits: the checkpoint's vs the folder's (bf16 weights: within bf16 rounding of the weights).
  r = testing::run_difftron("convert --checkpoint=" + (s / "run").string() + " --prompt=the --logits_out=" +
                            (s / "a.npy").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("prompt_ids: 116,104,101"), std::string::npos) << r.output;
  r = testing::run_difftron("convert --from_hf=" + (s / "hf").string() + " --prompt=the --logits_out=" +
                            (s / "b.npy").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("prompt_ids: 116,104,101"), std::string::npos) << r.output;  // its tokenizer.json
  auto npy = [](const fs::path& p) {
    const std::string all = testing::read_text_file(p);
    uint16_t hlen;
    std::memcpy(&hlen, all.data() + 8, 2);
    EXPECT_NE(all.find("'descr': '<f4'"), std::string::npos);
    EXPECT_NE(all.find("'shape': (3, 260)"), std::string::npos);
    std::vector<float> v((all.size() - 10 - hlen) / 4);
    std::memcpy(v.data(), all.data() + 10 + hlen, v.size() * 4);
    return std::vector<double>(v.begin(), v.end());
  };
  auto a = npy(s / "a.npy"), b = npy(s / "b.npy");
  ASSERT_EQ(a.size(), 3u * 260);
  const double err = testing::rel_l2(a, b);
  EXPECT_GT(err, 0.0);    // bf16 did round
  EXPECT_LT(err, 5e-2);   // a few bf16 roundings (2^-9) through a 1-layer model
  // Re-export in f32 over it: one file, and the shards of the bf16 export are gone.
  r = testing::run_difftron("convert --checkpoint=" + (s / "run").string() + " --to_hf=" + (s / "hf").string() +
                            " --overwrite");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(s / "hf/model.safetensors"));
  EXPECT_FALSE(fs::exists(s / "hf/model.safetensors.index.json"));
  for (const auto& f : shards) EXPECT_FALSE(fs::exists(s / "hf" / f)) << f;
  r = testing::run_difftron("convert --from_hf=" + (s / "hf").string() + " --prompt=the --logits_out=" +
                            (s / "c.npy").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(npy(s / "c.npy"), a);  // f32: the same weights, the same logits
  // Back into a checkpoint: the tokenizer comes along, so `generate --prompt` works.
  r = testing::run_difftron("convert --from_hf=" + (s / "hf").string() + " --to_checkpoint=" + (s / "back").string());
  ASSERT_EQ(r.status, 0) << r.output;
  r = testing::run_difftron("generate --device=cpu --checkpoint=" + (s / "back").string() +
                            " --prompt=the --max_new_tokens=3 --temperature=0");
  EXPECT_EQ(r.status, 0) << r.output;
  r = testing::run_difftron("convert --checkpoint=" + (s / "run").string() + " --to_hf=" + (s / "x").string() +
                            " --dtype=fp8");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("dtype 'fp8' is not one of bf16, f32"), std::string::npos) << r.output;
  fs::remove_all(s);
}

}  // namespace
}  // namespace difftron
