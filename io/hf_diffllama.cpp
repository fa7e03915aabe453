// DiffLlama conversion: see hf_diffllama.h. Row permutation for q/k/v: difftron block 2*i + j
// (map j of head or group i) is HF block i + j * n, with n = h for q and n = h_kv for k and v.
#include "io/hf_diffllama.h"

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"

namespace difftron {
namespace {

// Reorders row blocks of width `rows_per_block` of a [2n * rows_per_block, cols] matrix.
// to_hf: difftron (interleaved) -> HF (halves); else the inverse.
std::vector<float> permute_blocks(const std::vector<float>& w, int64_t n, int64_t rows_per_block,
                                  int64_t cols, bool to_hf) {
  std::vector<float> out(w.size());
  const int64_t block = rows_per_block * cols;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < 2; ++j) {
      int64_t ours = 2 * i + j, hf = i + j * n;
      int64_t src = to_hf ? ours : hf, dst = to_hf ? hf : ours;
      std::copy(w.begin() + src * block, w.begin() + (src + 1) * block, out.begin() + dst * block);
    }
  return out;
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

}  // namespace

ModelConfig model_config_from_hf(const nlohmann::json& hf, const std::string& source) {
  auto need = [&](const char* key) -> const nlohmann::json& {
    if (!hf.contains(key)) throw_error(source, ": DiffLlama config has no '", key, "'");
    return hf.at(key);
  };
  if (hf.value("model_type", std::string()) != "diffllama")
    throw_error(source, ": model_type is '", hf.value("model_type", std::string("(none)")),
                "', expected 'diffllama'");
  ModelConfig c;
  c.vocab_size = need("vocab_size").get<int64_t>();
  c.d_model = need("hidden_size").get<int64_t>();
  c.n_layers = need("num_hidden_layers").get<int64_t>();
  int64_t heads = need("num_attention_heads").get<int64_t>();
  int64_t kv = hf.value("num_key_value_heads", heads);
  if (heads % 2 || kv % 2)
    throw_error(source, ": num_attention_heads (", heads, ") and num_key_value_heads (", kv,
                ") must be even (they count single-map heads, two per differential head)");
  c.n_heads = heads / 2;
  c.n_kv_heads = kv / 2;
  c.head_dim = hf.value("head_dim", c.d_model / heads);
  c.ffn_dim = need("intermediate_size").get<int64_t>();
  c.max_seq_len = hf.value("max_position_embeddings", int64_t(2048));
  c.norm_eps = hf.value("rms_norm_eps", 1e-5);
  if (hf.contains("rope_parameters")) {
    auto& rp = hf.at("rope_parameters");
    if (rp.value("rope_type", std::string("default")) != "default")
      throw_error(source, ": rope_type '", rp.value("rope_type", std::string()), "' is not supported (only default)");
    c.rope_theta = rp.value("rope_theta", 10000.0);
  } else {
    c.rope_theta = hf.value("rope_theta", 10000.0);
  }
  if (hf.contains("rope_scaling") && !hf.at("rope_scaling").is_null())
    throw_error(source, ": rope_scaling is not supported");
  c.lambda_std = hf.value("lambda_std_dev", 0.1);
  c.init_std = hf.value("initializer_range", 0.02);
  c.tie_embeddings = hf.value("tie_word_embeddings", false);
  c.attention = AttentionKind::Differential;
  c.resolve_and_validate();
  return c;
}

nlohmann::json hf_config_from_model(const ModelConfig& c) {
  return {{"architectures", {"DiffLlamaForCausalLM"}},
          {"model_type", "diffllama"},
          {"vocab_size", c.vocab_size},
          {"hidden_size", c.d_model},
          {"num_hidden_layers", c.n_layers},
          {"num_attention_heads", 2 * c.n_heads},
          {"num_key_value_heads", 2 * c.n_kv_heads},
          {"head_dim", c.head_dim},
          {"intermediate_size", c.ffn_dim},
          {"max_position_embeddings", c.max_seq_len},
          {"rms_norm_eps", c.norm_eps},
          {"rope_theta", c.rope_theta},
          {"rope_parameters", {{"rope_theta", c.rope_theta}, {"rope_type", "default"}}},
          {"hidden_act", "silu"},
          {"attention_bias", false},
          {"attention_dropout", 0.0},
          {"lambda_std_dev", c.lambda_std},
          {"initializer_range", c.init_std},
          {"tie_word_embeddings", c.tie_embeddings},
          {"dtype", "float32"}};
}

ModelConfig read_hf_config(const std::string& dir) {
  const std::string path = dir + "/config.json";
  std::ifstream f(path);
  if (!f) throw_error(path, ": cannot open (is '", dir, "' a Hugging Face model directory?)");
  try {
    return model_config_from_hf(nlohmann::json::parse(f), path);
  } catch (const nlohmann::json::exception& e) {
    throw_error(path, ": ", e.what());
  }
}

void import_hf_diffllama(const std::string& dir, Model& model) {
  const ModelConfig& c = model.config();
  if (c.attention != AttentionKind::Differential)
    throw_error("import_hf_diffllama: the model must use differential attention");
  const std::string path = dir + "/model.safetensors";
  auto tensors = read_safetensors(path);
  for (auto& p : model.params()) {
    std::vector<float> w;
    if (ends_with(p.name, "self_attn.subln.weight")) {
      w.assign(p.value.numel(), 1.0f);  // HF's group norm has no weight
    } else {
      auto it = tensors.find(p.name);
      if (it == tensors.end()) throw_error(path, ": missing tensor '", p.name, "'");
      if (it->second.shape != p.value.shape())
        throw_error(path, ": tensor '", p.name, "' has shape ", shape_str(it->second.shape),
                    ", the model expects ", shape_str(p.value.shape()));
      w = it->second.data;
      if (ends_with(p.name, "q_proj.weight")) w = permute_blocks(w, c.n_heads, c.head_dim, c.d_model, false);
      if (ends_with(p.name, "k_proj.weight") || ends_with(p.name, "v_proj.weight"))
        w = permute_blocks(w, c.n_kv_heads, c.head_dim, c.d_model, false);
    }
    model.ops().upload(p.value, w.data());
  }
}

void export_hf_diffllama(Model& model, const std::string& dir) {
  const ModelConfig& c = model.config();
  if (c.attention != AttentionKind::Differential)
    throw_error("export_hf_diffllama: only differential-attention models map to DiffLlama");
  std::filesystem::create_directories(dir);
  std::map<std::string, HostTensor> out;
  auto fetch = [&](Param& p) {
    std::vector<float> w(p.value.numel());
    model.ops().download(p.value, w.data());
    return w;
  };
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".self_attn.";
    std::vector<float> wsub = fetch(model.param(pre + "subln.weight"));
    Param& o = model.param(pre + "o_proj.weight");  // [d, h * 2dh]
    std::vector<float> wo = fetch(o);
    const int64_t cols = c.q_dim(), width = 2 * c.head_dim;
    for (int64_t r = 0; r < c.d_model; ++r)
      for (int64_t col = 0; col < cols; ++col) wo[r * cols + col] *= wsub[col % width];
    out[o.name] = HostTensor{o.value.shape(), wo};
  }
  for (auto& p : model.params()) {
    if (ends_with(p.name, "subln.weight") || ends_with(p.name, "o_proj.weight")) continue;
    std::vector<float> w = fetch(p);
    if (ends_with(p.name, "q_proj.weight")) w = permute_blocks(w, c.n_heads, c.head_dim, c.d_model, true);
    if (ends_with(p.name, "k_proj.weight") || ends_with(p.name, "v_proj.weight"))
      w = permute_blocks(w, c.n_kv_heads, c.head_dim, c.d_model, true);
    out[p.name] = HostTensor{p.value.shape(), w};
  }
  write_safetensors(dir + "/model.safetensors", out);
  const std::string cfg_path = dir + "/config.json", tmp = cfg_path + ".tmp";
  {
    std::ofstream f(tmp);
    f << hf_config_from_model(c).dump(2) << "\n";
    if (!f) throw_error(tmp, ": write failed");
  }
  std::filesystem::rename(tmp, cfg_path);
}

}  // namespace difftron
