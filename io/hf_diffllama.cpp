// Hugging Face conversion: see hf_diffllama.h. DiffLlama's row permutation for q/k/v: difftron
// block 2*i + j (map j of head or group i) is HF block i + j * n, with n = h for q and n = h_kv
// for k and v. Llama (the baseline) and difftron_diff_v2 need none.
#include "io/hf_diffllama.h"

#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

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

bool is_set(const nlohmann::json& hf, const char* key) { return hf.contains(key) && !hf.at(key).is_null(); }

// Config fields of Llama / DiffLlama (and a few that related architectures put in a Llama
// config) that change the computation in ways difftron does not implement, each with its value.
std::vector<std::string> unsupported_fields(const nlohmann::json& hf) {
  std::vector<std::string> out;
  auto refuse = [&](const std::string& field, const nlohmann::json& value, const std::string& why) {
    out.push_back(field + " = " + value.dump() + " (" + why + ")");
  };
  if (is_set(hf, "hidden_act") && hf.at("hidden_act") != "silu")
    refuse("hidden_act", hf.at("hidden_act"), "difftron's MLP is SwiGLU with silu only");
  for (const char* key : {"attention_bias", "mlp_bias"})
    if (is_set(hf, key) && hf.at(key) != false) refuse(key, hf.at(key), "difftron's projections have no biases");
  if (is_set(hf, "rope_scaling")) refuse("rope_scaling", hf.at("rope_scaling"), "only unscaled RoPE is implemented");
  if (is_set(hf, "rope_parameters")) {
    const auto& rp = hf.at("rope_parameters");
    if (!rp.is_object()) {
      refuse("rope_parameters", rp, "expected an object");
    } else {
      for (auto it = rp.begin(); it != rp.end(); ++it) {
        const std::string k = it.key();
        if (k == "rope_theta") continue;
        if (k == "rope_type" && it.value() == "default") continue;
        if (k == "partial_rotary_factor" && it.value().is_number() && it.value().get<double>() == 1.0) continue;
        refuse("rope_parameters." + k, it.value(), "only default RoPE over the whole head is implemented");
      }
    }
  }
  if (is_set(hf, "partial_rotary_factor") && hf.at("partial_rotary_factor") != 1.0)
    refuse("partial_rotary_factor", hf.at("partial_rotary_factor"), "RoPE covers the whole head");
  if (is_set(hf, "quantization_config"))
    refuse("quantization_config", hf.at("quantization_config"), "quantized weights are not read");
  for (const char* key : {"sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "logit_scale",
                          "logits_scaling", "embedding_multiplier", "residual_multiplier", "attention_multiplier"})
    if (is_set(hf, key)) refuse(key, hf.at(key), "not part of the Llama computation difftron implements");
  return out;
}

// config.json fields of a difftron_diff_v2 folder: what hf_config_from_model writes, plus
// metadata a loader may add. No other program writes this format, so anything else is refused.
const std::set<std::string>& diff_v2_config_fields() {
  static const std::set<std::string> f = {
      "architectures", "model_type", "_comment", "difftron_attention", "vocab_size", "hidden_size",
      "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_query_heads", "num_key_value_heads",
      "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_convention", "hidden_act",
      "attention_bias", "mlp_bias", "initializer_range", "tie_word_embeddings", "bos_token_id", "eos_token_id",
      "pad_token_id", "use_cache", "dtype", "torch_dtype", "transformers_version", "_name_or_path"};
  return f;
}

ModelConfig diff_v2_config_from_hf(const nlohmann::json& hf, const std::string& source) {
  std::vector<std::string> bad;
  nlohmann::json known = nlohmann::json::object();
  for (auto it = hf.begin(); it != hf.end(); ++it) {
    if (diff_v2_config_fields().count(it.key()))
      known[it.key()] = it.value();
    else
      bad.push_back(it.key() + " = " + it.value().dump() + " (not a field of a " + kHfDiffV2ModelType + " config)");
  }
  for (auto& b : unsupported_fields(known)) bad.push_back(b);
  auto expect_value = [&](const char* key, const nlohmann::json& want, const std::string& why) {
    if (known.contains(key) && known.at(key) != want)
      bad.push_back(std::string(key) + " = " + known.at(key).dump() + " (" + why + ")");
  };
  expect_value("architectures", nlohmann::json::array({kHfDiffV2Architecture}),
               std::string("a ") + kHfDiffV2ModelType + " folder is a " + kHfDiffV2Architecture);
  expect_value("difftron_attention", "diff_v2", "a " + std::string(kHfDiffV2ModelType) + " folder is diff_v2");
  expect_value("rope_convention", "rotate_half",
               "difftron's RoPE is rotate-half; the rows of q_proj and k_proj must be in that order (README.md)");
  if (!bad.empty()) {
    std::string msg;
    for (const auto& b : bad) msg += "\n  " + b;
    throw_error(source, ": config fields that difftron's ", kHfDiffV2ModelType, " model does not have or implement:",
                msg);
  }
  auto need = [&](const char* key) -> const nlohmann::json& {
    if (!known.contains(key) || known.at(key).is_null())
      throw_error(source, ": ", kHfDiffV2ModelType, " config has no '", key, "'");
    return known.at(key);
  };
  need("rope_convention");
  ModelConfig c;
  c.attention = AttentionKind::DifferentialV2;
  c.vocab_size = need("vocab_size").get<int64_t>();
  c.d_model = need("hidden_size").get<int64_t>();
  c.n_layers = need("num_hidden_layers").get<int64_t>();
  c.ffn_dim = need("intermediate_size").get<int64_t>();
  const int64_t heads = need("num_attention_heads").get<int64_t>();
  const int64_t queries = need("num_query_heads").get<int64_t>();
  const int64_t kv = need("num_key_value_heads").get<int64_t>();
  if (queries != 2 * heads)
    throw_error(source, ": num_query_heads (", queries, ") must be twice num_attention_heads (", heads,
                "): output head i subtracts query head 2i + 1 from query head 2i");
  if (heads % 2 || kv % 2)
    throw_error(source, ": num_attention_heads (", heads, ") and num_key_value_heads (", kv, ") must be even (",
                "difftron's diff_v2 has 2 n_heads output heads over 2 n_kv_heads K/V heads)");
  c.n_heads = heads / 2;
  c.n_kv_heads = kv / 2;
  c.head_dim = need("head_dim").get<int64_t>();
  c.max_seq_len = need("max_position_embeddings").get<int64_t>();
  c.norm_eps = need("rms_norm_eps").get<double>();
  c.rope_theta = need("rope_theta").get<double>();
  c.tie_embeddings = need("tie_word_embeddings").get<bool>();
  c.init_std = known.value("initializer_range", 0.02);
  c.resolve_and_validate();
  return c;
}

// The config.json fields every folder difftron writes has in common (Llama's names): sizes,
// norm, RoPE base, token ids, dtype. nlohmann::json objects keep keys sorted; the order of the
// fields does not matter.
nlohmann::json hf_common_config(const ModelConfig& c, const HfSpecialTokens& tokens, StoreDType dtype) {
  auto id = [](int64_t v) { return v < 0 ? nlohmann::json(nullptr) : nlohmann::json(v); };
  const char* dtype_name = dtype == StoreDType::BF16 ? "bfloat16" : "float32";
  return {{"vocab_size", c.vocab_size},
          {"hidden_size", c.d_model},
          {"intermediate_size", c.ffn_dim},
          {"num_hidden_layers", c.n_layers},
          {"num_attention_heads", 2 * c.n_heads},
          {"num_key_value_heads", 2 * c.n_kv_heads},
          {"head_dim", c.head_dim},
          {"max_position_embeddings", c.max_seq_len},
          {"rms_norm_eps", c.norm_eps},
          {"rope_theta", c.rope_theta},
          {"hidden_act", "silu"},
          {"attention_bias", false},
          {"initializer_range", c.init_std},
          {"tie_word_embeddings", c.tie_embeddings},
          {"bos_token_id", id(tokens.bos)},
          {"eos_token_id", id(tokens.eos)},
          {"pad_token_id", id(tokens.pad)},
          {"use_cache", true},
          // "dtype" for transformers >= 4.56, "torch_dtype" for older readers
          {"dtype", dtype_name},
          {"torch_dtype", dtype_name}};
}

nlohmann::json diff_v2_hf_config(const ModelConfig& c, const HfSpecialTokens& tokens, StoreDType dtype) {
  nlohmann::json j = hf_common_config(c, tokens, dtype);
  j.update({{"architectures", {kHfDiffV2Architecture}},
            {"model_type", kHfDiffV2ModelType},
            {"_comment", "Differential Transformer V2 written by difftron (convert --to_hf). transformers has no "
                         "class for it: README.md in this folder gives the math, the tensors and how to load them."},
            {"difftron_attention", "diff_v2"},
            // num_attention_heads: the output heads (the reference's num_heads)
            {"num_query_heads", 4 * c.n_heads},  // q_proj's heads: two per output head
            {"rope_convention", "rotate_half"},
            {"mlp_bias", false}});
  return j;
}

// How config.json sets a tensor's shape, for messages ("" when the name is not one of ours).
std::string shape_rule(const std::string& name, AttentionKind a) {
  auto has = [&](const char* suffix) { return ends_with(name, suffix); };
  if (has("q_proj.weight"))
    return a == AttentionKind::DifferentialV2 ? "[num_query_heads x head_dim, hidden_size]"
                                              : "[num_attention_heads x head_dim, hidden_size]";
  if (has("k_proj.weight") || has("v_proj.weight")) return "[num_key_value_heads x head_dim, hidden_size]";
  if (has("o_proj.weight")) return "[hidden_size, num_attention_heads x head_dim]";
  if (has("lambda_proj.weight")) return "[num_attention_heads, hidden_size]";
  if (has("gate_proj.weight") || has("up_proj.weight")) return "[intermediate_size, hidden_size]";
  if (has("down_proj.weight")) return "[hidden_size, intermediate_size]";
  if (name == "model.embed_tokens.weight" || name == "lm_head.weight") return "[vocab_size, hidden_size]";
  if (has("layernorm.weight") || name == "model.norm.weight") return "[hidden_size]";
  if (has("lambda_q1") || has("lambda_k1") || has("lambda_q2") || has("lambda_k2")) return "[head_dim]";
  return "";
}

// The weight file of a folder that holds (or should hold) tensor `name`, for messages.
std::string weight_file_of(const std::string& dir, const std::string& name) {
  namespace fs = std::filesystem;
  if (fs::exists(dir + "/model.safetensors")) return dir + "/model.safetensors";
  const std::string index = dir + "/model.safetensors.index.json";
  try {
    std::ifstream f(index);
    const auto j = nlohmann::json::parse(f);
    if (j.at("weight_map").contains(name)) return dir + "/" + j.at("weight_map").at(name).get<std::string>();
  } catch (const std::exception&) {
  }
  return index;
}

}  // namespace

const char* hf_model_type(const ModelConfig& c) {
  switch (c.attention) {
    case AttentionKind::Differential: return "diffllama";
    case AttentionKind::Standard: return "llama";
    case AttentionKind::DifferentialV2: return kHfDiffV2ModelType;
  }
  throw_error("attention=", attention_kind_name(c.attention), " has no Hugging Face folder format");
}

ModelConfig model_config_from_hf(const nlohmann::json& hf, const std::string& source) {
  if (!hf.is_object()) throw_error(source, ": not a JSON object");
  const std::string type = hf.contains("model_type") && hf.at("model_type").is_string()
                               ? hf.at("model_type").get<std::string>()
                               : std::string("(none)");
  if (type == kHfDiffV2ModelType) return diff_v2_config_from_hf(hf, source);
  if (type != "diffllama" && type != "llama")
    throw_error(source, ": model_type is '", type, "'; difftron reads 'diffllama' (differential attention), "
                "'llama' (the standard-attention baseline) and '", kHfDiffV2ModelType,
                "' (Differential Transformer V2, difftron's own format)");
  const bool diff = type == "diffllama";
  auto need = [&](const char* key) -> const nlohmann::json& {
    if (!hf.contains(key)) throw_error(source, ": ", type, " config has no '", key, "'");
    return hf.at(key);
  };
  if (auto bad = unsupported_fields(hf); !bad.empty()) {
    std::string msg;
    for (const auto& b : bad) msg += "\n  " + b;
    throw_error(source, ": config fields that change the model and that difftron does not implement:", msg);
  }
  ModelConfig c;
  c.vocab_size = need("vocab_size").get<int64_t>();
  c.d_model = need("hidden_size").get<int64_t>();
  c.n_layers = need("num_hidden_layers").get<int64_t>();
  const int64_t heads = need("num_attention_heads").get<int64_t>();
  const int64_t kv = is_set(hf, "num_key_value_heads") ? hf.at("num_key_value_heads").get<int64_t>() : heads;
  if (heads % 2 || kv % 2)
    throw_error(source, ": num_attention_heads (", heads, ") and num_key_value_heads (", kv, ") must be even (",
                diff ? "they count single-map heads, two per differential head"
                     : "difftron's baseline has 2 n_heads heads over 2 n_kv_heads K/V heads",
                ")");
  c.n_heads = heads / 2;
  c.n_kv_heads = kv / 2;
  c.head_dim = is_set(hf, "head_dim") ? hf.at("head_dim").get<int64_t>() : (heads > 0 ? c.d_model / heads : 0);
  c.ffn_dim = need("intermediate_size").get<int64_t>();
  c.max_seq_len = hf.value("max_position_embeddings", int64_t(2048));
  c.norm_eps = hf.value("rms_norm_eps", 1e-5);
  if (is_set(hf, "rope_parameters"))
    c.rope_theta = hf.at("rope_parameters").value("rope_theta", hf.value("rope_theta", 10000.0));
  else
    c.rope_theta = hf.value("rope_theta", 10000.0);
  c.lambda_std = hf.value("lambda_std_dev", 0.1);
  c.init_std = hf.value("initializer_range", 0.02);
  c.tie_embeddings = hf.value("tie_word_embeddings", false);
  c.attention = diff ? AttentionKind::Differential : AttentionKind::Standard;
  c.resolve_and_validate();
  return c;
}

nlohmann::json hf_config_from_model(const ModelConfig& c, const HfSpecialTokens& tokens, StoreDType dtype) {
  if (c.attention == AttentionKind::DifferentialV2) return diff_v2_hf_config(c, tokens, dtype);
  const bool diff = c.attention == AttentionKind::Differential;
  nlohmann::json j = hf_common_config(c, tokens, dtype);
  j.update({{"architectures", {diff ? "DiffLlamaForCausalLM" : "LlamaForCausalLM"}},
            {"model_type", hf_model_type(c)},
            {"rope_parameters", {{"rope_theta", c.rope_theta}, {"rope_type", "default"}}},
            {"attention_dropout", 0.0}});
  if (diff) {
    j["lambda_std_dev"] = c.lambda_std;
  } else {
    j["mlp_bias"] = false;
    j["pretraining_tp"] = 1;
  }
  return j;
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

void import_hf_model(const std::string& dir, Model& model) {
  const ModelConfig& c = model.config();
  const bool diff = c.attention == AttentionKind::Differential;
  auto tensors = read_safetensors_model(dir);
  std::set<std::string> used;
  for (auto& p : model.params()) {
    std::vector<float> w;
    if (ends_with(p.name, "self_attn.subln.weight")) {
      w.assign(p.value.numel(), 1.0f);  // HF's group norm has no weight
    } else {
      auto it = tensors.find(p.name);
      const std::string rule = shape_rule(p.name, c.attention);
      const std::string by_config = dir + "/config.json gives " + shape_str(p.value.shape()) +
                                    (rule.empty() ? std::string() : " = " + rule);
      if (it == tensors.end()) {
        const std::string file = weight_file_of(dir, p.name);
        throw_error(file, ends_with(file, ".json") ? " lists no tensor '" : " has no tensor '", p.name, "' (",
                    by_config, ")");
      }
      if (it->second.shape != p.value.shape())
        throw_error(weight_file_of(dir, p.name), ": tensor '", p.name, "' has shape ", shape_str(it->second.shape),
                    ", but ", by_config);
      used.insert(p.name);
      w = std::move(it->second.data);
      if (diff && ends_with(p.name, "q_proj.weight")) w = permute_blocks(w, c.n_heads, c.head_dim, c.d_model, false);
      if (diff && (ends_with(p.name, "k_proj.weight") || ends_with(p.name, "v_proj.weight")))
        w = permute_blocks(w, c.n_kv_heads, c.head_dim, c.d_model, false);
    }
    model.ops().upload(p.value, w.data());
  }
  // What the model has no place for would be dropped silently, and the logits would differ
  // from transformers'. Old exports carry RoPE's inverse frequencies (recomputed here); a
  // tied model's folder may carry lm_head.weight as a copy of the embedding.
  for (const auto& [name, t] : tensors) {
    if (used.count(name) || ends_with(name, "rotary_emb.inv_freq")) continue;
    if (c.tie_embeddings && name == "lm_head.weight") {
      const auto& e = tensors.at("model.embed_tokens.weight");
      if (t.shape == e.shape && t.data == e.data) continue;
      throw_error(dir, ": tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight");
    }
    throw_error(dir, ": tensor '", name, "' (shape ", shape_str(t.shape), ") has no counterpart in difftron's ",
                hf_model_type(c), " model; refusing to drop it");
  }
}

std::vector<std::string> export_hf_model(Model& model, const std::string& dir, const HfExportOptions& opt) {
  const ModelConfig& c = model.config();
  const bool diff = c.attention == AttentionKind::Differential;
  std::filesystem::create_directories(dir);
  auto fetch = [&](Param& p) {
    std::vector<float> w(p.value.numel());
    model.ops().download(p.value, w.data());
    return w;
  };
  std::vector<NamedTensor> out;
  for (auto& p : model.params()) {
    if (diff && ends_with(p.name, "subln.weight")) continue;  // folded into o_proj below
    std::vector<float> w = fetch(p);
    if (diff && ends_with(p.name, "q_proj.weight")) w = permute_blocks(w, c.n_heads, c.head_dim, c.d_model, true);
    if (diff && (ends_with(p.name, "k_proj.weight") || ends_with(p.name, "v_proj.weight")))
      w = permute_blocks(w, c.n_kv_heads, c.head_dim, c.d_model, true);
    if (diff && ends_with(p.name, "o_proj.weight")) {  // [d, h * 2dh]: column col scales by w_sub[col % 2dh]
      const std::string pre = p.name.substr(0, p.name.size() - std::string("o_proj.weight").size());
      const std::vector<float> wsub = fetch(model.param(pre + "subln.weight"));
      const int64_t cols = c.q_dim(), width = 2 * c.head_dim;
      for (int64_t r = 0; r < c.d_model; ++r)
        for (int64_t col = 0; col < cols; ++col) w[r * cols + col] *= wsub[col % width];
    }
    out.push_back({p.name, HostTensor{p.value.shape(), std::move(w)}});
  }
  std::vector<std::string> files = write_safetensors_model(dir, out, opt.dtype, opt.max_shard_bytes);
  const std::string cfg_path = dir + "/config.json", tmp = cfg_path + ".tmp";
  {
    std::ofstream f(tmp);
    f << hf_config_from_model(c, opt.tokens, opt.dtype).dump(2) << "\n";
    if (!f.flush()) throw_error(tmp, ": write failed");
  }
  std::filesystem::rename(tmp, cfg_path);
  files.push_back("config.json");
  return files;
}

}  // namespace difftron
