// Differential Transformer V2's folder (`convert --to_hf` of an `--attention=diff_v2` model;
// docs/EXPORT.md): transformers has no class for V2, so the folder is difftron's own
// "difftron_diff_v2" format with a README.md. Checked here: config.json's fields are the
// model's; the tensors are the checkpoint's, under the names and shapes of docs/EXPORT.md's
// table and of the README's own table; f32 export -> import gives the same logits bit for bit,
// bf16 the logits of the bf16-rounded weights bit for bit (and the original's within the bound
// derived below); a tampered config, a missing or misshapen tensor and unknown config fields are
// refused by name; the README's RoPE permutation turns rotate-half into interleaved RoPE; and
// the CLI writes, reads back (convert, generate, eval) and overwrites such a folder.
// The README's math is the one tests/test_model.cpp (Model.DiffV2ForwardMatchesAHandWrittenLayer)
// checks difftron's forward against, on the same tensors (checked equal to the folder's here).
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "io/hf_export.h"
#include "io/safetensors.h"
#include "tests/grad_check.h"
#include "tests/run_command.h"
#include "tests/test_hf_util.h"

namespace difftron {
namespace {

namespace fs = std::filesystem;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// 8 query heads over 2 K/V heads (h = 2, h_kv = 1), 2 layers; a larger init_std than training's
// so that lambda = sigmoid(z) moves away from 1/2 and every tensor matters to the logits.
ModelConfig v2_config(bool tied) {
  ModelConfig c;
  c.attention = AttentionKind::DifferentialV2;
  c.vocab_size = 300;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 8;
  c.ffn_dim = 48;
  c.max_seq_len = 64;
  c.rope_theta = 5000.0;
  c.norm_eps = 1e-6;
  c.init_std = 0.2;
  c.tie_embeddings = tied;
  c.resolve_and_validate();
  return c;
}

std::vector<float> download(Model& m, Param& p) {
  std::vector<float> w(p.value.numel());
  m.ops().download(p.value, w.data());
  return w;
}

const std::vector<int32_t> kTokens = {3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 256, 299, 0};

// docs/EXPORT.md's V2 table (and the Llama names of the rest of the block), from the config.
std::map<std::string, std::vector<int64_t>> expected_tensors(const ModelConfig& c) {
  const int64_t d = c.d_model, dh = c.head_dim, h = c.n_heads, hkv = c.n_kv_heads, F = c.ffn_dim, V = c.vocab_size;
  std::map<std::string, std::vector<int64_t>> t = {{"model.embed_tokens.weight", {V, d}}, {"model.norm.weight", {d}}};
  if (!c.tie_embeddings) t["lm_head.weight"] = {V, d};
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t[p + "input_layernorm.weight"] = {d};
    t[p + "self_attn.q_proj.weight"] = {4 * h * dh, d};
    t[p + "self_attn.k_proj.weight"] = {2 * hkv * dh, d};
    t[p + "self_attn.v_proj.weight"] = {2 * hkv * dh, d};
    t[p + "self_attn.lambda_proj.weight"] = {2 * h, d};
    t[p + "self_attn.o_proj.weight"] = {d, 2 * h * dh};
    t[p + "post_attention_layernorm.weight"] = {d};
    t[p + "mlp.gate_proj.weight"] = {F, d};
    t[p + "mlp.up_proj.weight"] = {F, d};
    t[p + "mlp.down_proj.weight"] = {d, F};
  }
  return t;
}

// The README's tensor table ("| name | [a, b] | ..."), with N expanded to every layer.
std::map<std::string, std::vector<int64_t>> readme_tensors(const std::string& readme, int64_t layers) {
  std::map<std::string, std::vector<int64_t>> out;
  const std::regex row(R"(^\| ((?:model|lm_head)[\w.]*) \| \[([0-9, ]+)\] \|)");
  std::stringstream ss(readme);
  for (std::string line; std::getline(ss, line);) {
    std::smatch m;
    if (!std::regex_search(line, m, row)) continue;
    std::vector<int64_t> shape;
    std::stringstream dims(m[2].str());
    for (std::string x; std::getline(dims, x, ',');) shape.push_back(std::stoll(x));
    const std::string name = m[1].str();
    const size_t n = name.find(".N.");
    if (n == std::string::npos) {
      out[name] = shape;
    } else {
      for (int64_t l = 0; l < layers; ++l)
        out[name.substr(0, n) + "." + std::to_string(l) + "." + name.substr(n + 3)] = shape;
    }
  }
  return out;
}

std::map<std::string, std::vector<int64_t>> folder_tensors(const fs::path& dir) {
  std::map<std::string, std::vector<int64_t>> out;
  for (auto& [name, t] : read_safetensors_model(dir.string())) out[name] = t.shape;
  return out;
}

// bf16 round to nearest even, as write_safetensors stores BF16 (finite values).
float to_bf16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  b += 0x7FFF + ((b >> 16) & 1);
  b &= 0xFFFF0000u;
  std::memcpy(&x, &b, 4);
  return x;
}

void write_json(const fs::path& p, const nlohmann::json& j) { std::ofstream(p) << j.dump(2); }

// The last JSON line of a command's output (eval's, whose keys are in alphabetical order).
nlohmann::json last_json(const testing::CommandResult& r) {
  nlohmann::json j = nlohmann::json::object();
  std::stringstream ss(r.output);
  for (std::string line; std::getline(ss, line);)
    if (line.rfind("{", 0) == 0) j = nlohmann::json::parse(line);
  return j;
}

TEST(HfDiffV2, ConfigTensorsAndReadmeDescribeTheModel) {
  for (bool tied : {false, true}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    const ModelConfig c = v2_config(tied);
    auto ops = make_cpu_ops();
    Model m(c, *ops, ModelPrecision::uniform(DType::F32), 1, 16);
    m.init_weights(7);
    const fs::path dir = testing::fresh_dir("difftron_hfv2_", tied ? "cfg_tied" : "cfg");
    HfExportOptions opt;
    auto files = export_hf_folder(m, "bytes", "", opt, dir.string());
    for (const char* f : {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json"}) {
      EXPECT_TRUE(fs::exists(dir / f)) << f;
      EXPECT_NE(std::find(files.begin(), files.end(), f), files.end()) << f;
    }
    // config.json: labelled as no transformers class's, every size the model's
    const auto j = nlohmann::json::parse(testing::read_text_file(dir / "config.json"));
    EXPECT_EQ(j.at("model_type"), "difftron_diff_v2");
    EXPECT_EQ(j.at("architectures"), nlohmann::json::array({"DifftronDiffV2ForCausalLM"}));
    EXPECT_EQ(j.at("difftron_attention"), "diff_v2");
    EXPECT_TRUE(has(j.at("_comment").get<std::string>(), "transformers has no class for it")) << j.dump();
    EXPECT_EQ(j.at("vocab_size"), c.vocab_size);
    EXPECT_EQ(j.at("hidden_size"), c.d_model);
    EXPECT_EQ(j.at("intermediate_size"), c.ffn_dim);
    EXPECT_EQ(j.at("num_hidden_layers"), c.n_layers);
    EXPECT_EQ(j.at("num_attention_heads"), 2 * c.n_heads);
    EXPECT_EQ(j.at("num_query_heads"), 4 * c.n_heads);
    EXPECT_EQ(j.at("num_key_value_heads"), 2 * c.n_kv_heads);
    EXPECT_EQ(j.at("head_dim"), c.head_dim);
    EXPECT_EQ(j.at("max_position_embeddings"), c.max_seq_len);
    EXPECT_EQ(j.at("rms_norm_eps").get<double>(), c.norm_eps);
    EXPECT_EQ(j.at("rope_theta").get<double>(), c.rope_theta);
    EXPECT_EQ(j.at("rope_convention"), "rotate_half");
    EXPECT_EQ(j.at("tie_word_embeddings"), tied);
    EXPECT_EQ(j.at("torch_dtype"), "float32");
    EXPECT_EQ(j.at("eos_token_id"), 256);
    EXPECT_EQ(j.at("pad_token_id"), 256);
    EXPECT_TRUE(j.at("bos_token_id").is_null());
    EXPECT_EQ(nlohmann::json::parse(testing::read_text_file(dir / "generation_config.json")).at("eos_token_id"), 256);
    EXPECT_EQ(testing::read_text_file(dir / "tokenizer.json"), hf_byte_tokenizer_json());
    // ... and it reads back as the same model
    nlohmann::json want = c, got = read_hf_config(dir.string());
    want.erase("lambda_std");  // V1's, not V2's: not in the folder
    got.erase("lambda_std");
    EXPECT_EQ(got, want);

    // The tensors: docs/EXPORT.md's table = the folder = the README's table; the values are
    // the model's (the checkpoint's layout, unpermuted).
    const auto table = expected_tensors(c);
    EXPECT_EQ(folder_tensors(dir), table);
    const std::string readme = testing::read_text_file(dir / "README.md");
    EXPECT_EQ(readme_tensors(readme, c.n_layers), table);
    auto stored = read_safetensors_model(dir.string());
    for (auto& p : m.params()) EXPECT_EQ(stored.at(p.name).data, download(m, p)) << p.name;
    // The README says what a user needs, in this model's numbers.
    EXPECT_EQ(readme.rfind(kHfDiffV2ReadmeTitle, 0), 0u);
    for (const char* s : {"No Hugging Face transformers class implements V2", "`difftron_diff_v2`",
                          "| num_query_heads | 8 |", "| num_key_value_heads | 2 |", "| head_dim | 8 |",
                          "Query head 2i + j is map j of output head i", "O_i = A_(2i) - sigmoid(z_i) A_(2i+1)",
                          "num_heads=4, num_kv_heads=2, head_dim=8", "interleaved row 2c\n= this folder's row c",
                          "W.view(-1, 2, dh // 2, d).transpose(1, 2).reshape(-1, d)",
                          "difftron generate --from_hf=THIS_FOLDER", "AutoTokenizer.from_pretrained"})
      EXPECT_TRUE(has(readme, s)) << s << "\n" << readme;
    fs::remove_all(dir);
  }
}

// f32: bit for bit, sharded or not. bf16: the import holds the bf16 rounding of every weight
// exactly (so its logits are those of the rounded weights, bit for bit), and the logits move
// from the f32 model's by at most the bound derived below.
TEST(HfDiffV2, RoundTripGivesTheSameLogits) {
  const ModelConfig c = v2_config(false);
  auto ops = make_cpu_ops();
  Model m(c, *ops, ModelPrecision::uniform(DType::F32), 1, 16);
  m.init_weights(11);
  const auto before = testing::all_logits(m, kTokens);
  for (int64_t shard : {int64_t(5000000000), int64_t(20000)}) {
    const fs::path dir = testing::fresh_dir("difftron_hfv2_", "f32");
    HfExportOptions opt;
    opt.max_shard_bytes = shard;
    export_hf_folder(m, "", "", opt, dir.string());
    EXPECT_EQ(fs::exists(dir / "model.safetensors.index.json"), shard < 1000000) << shard;
    EXPECT_TRUE(fs::exists(dir / "README.md"));
    EXPECT_FALSE(fs::exists(dir / "tokenizer.json"));  // none given: synthetic data
    EXPECT_TRUE(has(testing::read_text_file(dir / "README.md"), "There is no tokenizer"));
    Model back(read_hf_config(dir.string()), *ops, ModelPrecision::uniform(DType::F32), 1, 16);
    import_hf_model(dir.string(), back);
    EXPECT_EQ(testing::all_logits(back, kTokens), before) << "shard limit " << shard;
    fs::remove_all(dir);
  }

  const fs::path dir = testing::fresh_dir("difftron_hfv2_", "bf16");
  HfExportOptions opt;
  opt.dtype = StoreDType::BF16;
  export_hf_folder(m, "", "", opt, dir.string());
  EXPECT_EQ(nlohmann::json::parse(testing::read_text_file(dir / "config.json")).at("torch_dtype"), "bfloat16");
  Model back(read_hf_config(dir.string()), *ops, ModelPrecision::uniform(DType::F32), 1, 16);
  import_hf_model(dir.string(), back);
  Model rounded(c, *ops, ModelPrecision::uniform(DType::F32), 1, 16);
  for (auto& p : m.params()) {
    std::vector<float> w = download(m, p);
    for (float& x : w) x = to_bf16(x);
    EXPECT_EQ(download(back, back.param(p.name)), w) << p.name;
    ops->upload(rounded.param(p.name).value, w.data());
  }
  const auto got = testing::all_logits(back, kTokens);
  EXPECT_EQ(got, testing::all_logits(rounded, kTokens));
  // Rounding a weight to bf16 changes it by at most u = 2^-9 relative. To first order, a
  // reduction whose terms hold at most two rounded weights (q.k: Wq and Wk; the LM head: the
  // final norm's weight and lm_head) moves by at most 2u of the scale of its terms, and the
  // logits sit at the end of the forward pass's chain of reductions (tests/tolerances.h):
  // relative L2 at most 2u forward_chain(c) (here 19 reductions: 0.074). f32's own rounding is
  // far below that (hf_logits_bound).
  const double bound = 2 * 0x1p-9 * double(testing::forward_chain(c));
  const double err = testing::rel_l2(got, before);
  EXPECT_GT(err, 0.0);  // bf16 did round
  EXPECT_LT(err, bound);
  std::cout << "bf16 export: logits rel L2 " << err << " (bound " << bound << ")\n";
  fs::remove_all(dir);
}

TEST(HfDiffV2, ImportRefusesWhatDisagreesWithTheModel) {
  const ModelConfig c = v2_config(false);
  auto ops = make_cpu_ops();
  Model m(c, *ops, ModelPrecision::uniform(DType::F32), 1, 4);
  m.init_weights(3);
  const fs::path dir = testing::fresh_dir("difftron_hfv2_", "bad");
  export_hf_folder(m, "", "", HfExportOptions{}, dir.string());
  const std::string cfg_text = testing::read_text_file(dir / "config.json");
  const nlohmann::json cfg = nlohmann::json::parse(cfg_text);
  auto import_with = [&](const nlohmann::json& j) {
    write_json(dir / "config.json", j);
    return error_of([&] {
      Model back(read_hf_config(dir.string()), *ops, ModelPrecision::uniform(DType::F32), 1, 4);
      import_hf_model(dir.string(), back);
    });
  };
  EXPECT_EQ(import_with(cfg), "no error");
  // A valid config of another model: 4 K/V heads (h_kv = 2 divides h = 2) where the weights have 2.
  nlohmann::json j = cfg;
  j["num_key_value_heads"] = 4;
  std::string msg = import_with(j);
  EXPECT_TRUE(has(msg, (dir / "model.safetensors").string() + ": tensor 'model.layers.0.self_attn.k_proj.weight' "
                  "has shape [16, 32], but " + (dir / "config.json").string() + " gives [32, 32] = "
                  "[num_key_value_heads x head_dim, hidden_size]")) << msg;
  j = cfg;
  j["hidden_size"] = 64;
  msg = import_with(j);
  EXPECT_TRUE(has(msg, "tensor 'model.embed_tokens.weight' has shape [300, 32]")) << msg;
  EXPECT_TRUE(has(msg, "[vocab_size, hidden_size]")) << msg;
  j = cfg;
  j["num_attention_heads"] = 8;  // query heads 8 = 2 x 4 would need 16
  msg = import_with(j);
  EXPECT_TRUE(has(msg, "num_query_heads (8) must be twice num_attention_heads (8)")) << msg;
  j = cfg;
  j["num_key_value_heads"] = 3;
  EXPECT_TRUE(has(import_with(j), "num_key_value_heads (3) must be even"));
  j = cfg;
  j.erase("head_dim");
  EXPECT_TRUE(has(import_with(j), "difftron_diff_v2 config has no 'head_dim'"));
  // Fields the format does not have, or values difftron does not implement: all named at once.
  j = cfg;
  j.update({{"sliding_window", 128}, {"lambda_init", 0.8}, {"hidden_act", "gelu"}, {"attention_bias", true},
            {"rope_convention", "interleaved"}});
  msg = import_with(j);
  for (const char* s : {"sliding_window = 128 (not a field of a difftron_diff_v2 config)",
                        "lambda_init = 0.8 (not a field", "hidden_act = \"gelu\"", "attention_bias = true",
                        "rope_convention = \"interleaved\" (difftron's RoPE is rotate-half"})
    EXPECT_TRUE(has(msg, s)) << s << "\n" << msg;
  j = cfg;
  j["architectures"] = {"LlamaForCausalLM"};
  EXPECT_TRUE(has(import_with(j), "architectures = [\"LlamaForCausalLM\"]"));
  // A V1 config over V2's tensors: lambda_proj has no place in DiffLlama, q_proj the wrong rows.
  j = cfg;
  j["model_type"] = "diffllama";
  for (const char* k : {"_comment", "difftron_attention", "num_query_heads", "rope_convention"}) j.erase(k);
  EXPECT_TRUE(has(import_with(j), "tensor 'model.layers.0.self_attn.q_proj.weight' has shape [64, 32]"));
  write_json(dir / "config.json", cfg);

  // A missing tensor, a misshapen one: named with their file, single-file and sharded.
  auto t = read_safetensors((dir / "model.safetensors").string());
  auto t_missing = t;
  t_missing.erase("model.layers.1.self_attn.lambda_proj.weight");
  write_safetensors((dir / "model.safetensors").string(), t_missing);
  msg = import_with(cfg);
  EXPECT_TRUE(has(msg, (dir / "model.safetensors").string() +
                       " has no tensor 'model.layers.1.self_attn.lambda_proj.weight' (" +
                       (dir / "config.json").string() + " gives [4, 32] = [num_attention_heads, hidden_size])"))
      << msg;
  fs::remove(dir / "model.safetensors");
  std::vector<NamedTensor> named;
  for (auto& [name, ten] : t_missing) named.push_back({name, ten});
  write_safetensors_model(dir.string(), named, StoreDType::F32, 8000);
  msg = import_with(cfg);
  EXPECT_TRUE(has(msg, (dir / "model.safetensors.index.json").string() +
                       " lists no tensor 'model.layers.1.self_attn.lambda_proj.weight'")) << msg;
  for (auto& e : fs::directory_iterator(dir))
    if (is_safetensors_model_file(e.path().filename().string())) fs::remove(e.path());
  named.clear();
  for (auto& [name, ten] : t) named.push_back({name, ten});
  ASSERT_EQ(t.rbegin()->first, "model.norm.weight");
  named.back() = {"model.norm.weight", HostTensor{{31}, std::vector<float>(31, 1.0f)}};
  auto files = write_safetensors_model(dir.string(), named, StoreDType::F32, 8000);
  msg = import_with(cfg);
  const auto index = nlohmann::json::parse(testing::read_text_file(dir / "model.safetensors.index.json"));
  const std::string shard = index.at("weight_map").at("model.norm.weight");
  EXPECT_TRUE(has(msg, (dir / shard).string() + ": tensor 'model.norm.weight' has shape [31], but")) << msg;
  fs::remove_all(dir);
}

// The README's RoPE permutation: rows of a head reordered so (interleaved row 2c, 2c + 1) =
// (row c, row c + dh/2) give, under interleaved (GPT-J) RoPE, the scores rotate-half RoPE gives
// on the original rows.
TEST(HfDiffV2, ReadmesRopePermutationMatchesInterleavedRope) {
  const int64_t dh = 8;
  const double theta = 10000.0;
  auto q = testing::randn(dh, 1), k = testing::randn(dh, 2);
  auto angle = [&](int64_t pos, int64_t c) { return double(pos) * std::pow(theta, -2.0 * double(c) / double(dh)); };
  auto rotate_half = [&](std::vector<double> x, int64_t pos) {
    for (int64_t c = 0; c < dh / 2; ++c) {
      const double a = x[c], b = x[c + dh / 2], t = angle(pos, c);
      x[c] = a * std::cos(t) - b * std::sin(t);
      x[c + dh / 2] = b * std::cos(t) + a * std::sin(t);
    }
    return x;
  };
  auto interleaved = [&](std::vector<double> x, int64_t pos) {
    for (int64_t c = 0; c < dh / 2; ++c) {
      const double a = x[2 * c], b = x[2 * c + 1], t = angle(pos, c);
      x[2 * c] = a * std::cos(t) - b * std::sin(t);
      x[2 * c + 1] = b * std::cos(t) + a * std::sin(t);
    }
    return x;
  };
  auto permute = [&](const std::vector<double>& x) {  // the README's rule
    std::vector<double> y(dh);
    for (int64_t c = 0; c < dh / 2; ++c) {
      y[2 * c] = x[c];
      y[2 * c + 1] = x[c + dh / 2];
    }
    return y;
  };
  auto dot = [](const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
  };
  const std::vector<double> qv(q.begin(), q.end()), kv(k.begin(), k.end());
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      const double want = dot(rotate_half(qv, i), rotate_half(kv, j));
      EXPECT_NEAR(dot(interleaved(permute(qv), i), interleaved(permute(kv), j)), want, 1e-12) << i << " " << j;
      // without the permutation the scores differ (the test can fail)
      if (i != j) EXPECT_GT(std::abs(dot(interleaved(qv, i), interleaved(kv, j)) - want), 1e-6);
    }
}

// The program end to end: train 3 steps of diff_v2 on bytes, convert --to_hf writes the
// difftron_diff_v2 folder (not a llama one) that convert, generate and eval read back with the
// checkpoint's results; an export over it with --overwrite of a baseline checkpoint removes
// the V2 README, and keeps a user's own.
TEST(HfDiffV2, ConvertWritesAndReadsTheFolder) {
  const fs::path s = testing::fresh_dir("difftron_hfv2_", "cli");
  {
    std::ofstream f(s / "a.txt");
    const char* words[] = {"the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"};
    for (int i = 0; i < 600; ++i) f << words[(i * 7 + i / 9) % 9] << (i % 11 == 10 ? "\n" : " ");
  }
  const std::string data = (s / "data").string(), ck = (s / "ck").string(), hf = (s / "hf").string();
  auto r = testing::run_difftron("prepare --progress=false --val_fraction=0 --input=" + (s / "a.txt").string() +
                                 " --out=" + data);
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string model = " --device=cpu --data=" + data + "/train --seq=16 --batch=4 --d_model=32 --n_heads=2 "
                            "--n_kv_heads=1 --n_layers=2 --steps=3 --ckpt_every=3";
  r = testing::run_difftron("train --attention=diff_v2" + model + " --ckpt_dir=" + ck);
  ASSERT_EQ(r.status, 0) << r.output;
  r = testing::run_difftron("convert --checkpoint=" + ck + " --to_hf=" + hf);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r.output, "difftron_diff_v2")) << r.output;
  EXPECT_TRUE(has(r.output, "no transformers class")) << r.output;
  const auto cfg = nlohmann::json::parse(testing::read_text_file(fs::path(hf) / "config.json"));
  EXPECT_EQ(cfg.at("model_type"), "difftron_diff_v2");  // no longer refused, and not `llama`
  EXPECT_EQ(cfg.at("eos_token_id"), 256);
  for (const char* f : {"README.md", "model.safetensors", "generation_config.json", "tokenizer.json",
                        "tokenizer_config.json", "special_tokens_map.json"})
    EXPECT_TRUE(fs::exists(fs::path(hf) / f)) << f;

  // The same logits from the folder as from the checkpoint (f32), and generate/eval agree.
  r = testing::run_difftron("convert --checkpoint=" + ck + " --prompt='the quick' --logits_out=" +
                            (s / "a.npy").string());
  ASSERT_EQ(r.status, 0) << r.output;
  r = testing::run_difftron("convert --from_hf=" + hf + " --prompt='the quick' --logits_out=" + (s / "b.npy").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r.output, "prompt_ids: 116,104,101,32,113,117,105,99,107")) << r.output;  // its tokenizer.json
  EXPECT_EQ(testing::read_text_file(s / "a.npy"), testing::read_text_file(s / "b.npy"));
  const std::string gen = " --prompt='the quick' --max_new_tokens=6 --temperature=0 --ignore_eos --json";
  auto g1 = testing::run_difftron("generate --device=cpu --checkpoint=" + ck + gen);
  auto g2 = testing::run_difftron("generate --device=cpu --from_hf=" + hf + gen);
  ASSERT_EQ(g1.status, 0) << g1.output;
  ASSERT_EQ(g2.status, 0) << g2.output;
  EXPECT_EQ(testing::json_line(g2, "batch")["sequences"][0]["tokens"],
            testing::json_line(g1, "batch")["sequences"][0]["tokens"]);
  const std::string ev = " --data=" + data + "/train --seq=16 --batch=4 --json";
  auto e1 = testing::run_difftron("eval --device=cpu --checkpoint=" + ck + ev);
  auto e2 = testing::run_difftron("eval --device=cpu --from_hf=" + hf + ev);
  ASSERT_EQ(e1.status, 0) << e1.output;
  ASSERT_EQ(e2.status, 0) << e2.output;
  ASSERT_TRUE(last_json(e1).contains("loss")) << e1.output;
  EXPECT_EQ(last_json(e2).at("loss"), last_json(e1).at("loss"));
  // Back to a checkpoint, and bf16 shards.
  r = testing::run_difftron("convert --from_hf=" + hf + " --to_checkpoint=" + (s / "back").string());
  ASSERT_EQ(r.status, 0) << r.output;
  r = testing::run_difftron("generate --device=cpu --checkpoint=" + (s / "back").string() + gen);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(testing::json_line(r, "batch")["sequences"][0]["tokens"],
            testing::json_line(g1, "batch")["sequences"][0]["tokens"]);
  r = testing::run_difftron("convert --checkpoint=" + ck + " --to_hf=" + (s / "hf16").string() +
                            " --dtype=bf16 --max_shard_size=20KB");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(s / "hf16/model.safetensors.index.json"));
  EXPECT_TRUE(has(testing::read_text_file(s / "hf16/README.md"), "| torch_dtype, dtype | \"bfloat16\""));
  r = testing::run_difftron("convert --from_hf=" + (s / "hf16").string() + " --prompt='the quick' --logits_out=" +
                            (s / "c.npy").string());
  ASSERT_EQ(r.status, 0) << r.output;

  // --overwrite with a baseline's export: the V2 README goes (it would describe the wrong
  // model), a user's own README stays.
  r = testing::run_difftron("train --attention=standard" + model + " --ckpt_dir=" + (s / "std").string());
  ASSERT_EQ(r.status, 0) << r.output;
  r = testing::run_difftron("convert --checkpoint=" + (s / "std").string() + " --to_hf=" + hf + " --overwrite");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(nlohmann::json::parse(testing::read_text_file(fs::path(hf) / "config.json")).at("model_type"), "llama");
  EXPECT_FALSE(fs::exists(fs::path(hf) / "README.md"));
  std::ofstream(fs::path(hf) / "README.md") << "# my notes\n";
  r = testing::run_difftron("convert --checkpoint=" + (s / "std").string() + " --to_hf=" + hf + " --overwrite");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(testing::read_text_file(fs::path(hf) / "README.md"), "# my notes\n");
  fs::remove_all(s);
}

}  // namespace
}  // namespace difftron
