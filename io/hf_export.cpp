// The Hugging Face folder around the weights: see hf_export.h.
#include "io/hf_export.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "base/error.h"
#include "io/tokenizer.h"

namespace difftron {
namespace {

// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the others are
// numbered 256, 257, ... in byte order. Returns the UTF-8 of byte b's character.
std::string byte_level_char(int b) {
  int next = 256;
  uint32_t cp = 0;
  for (int x = 0; x < 256; ++x) {
    const bool printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF);
    const uint32_t c = printable ? uint32_t(x) : uint32_t(next++);
    if (x == b) cp = c;
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(char(cp));
  } else {  // every code point here is < 0x800: two bytes
    s.push_back(char(0xC0 | (cp >> 6)));
    s.push_back(char(0x80 | (cp & 0x3F)));
  }
  return s;
}

nlohmann::json added_token(int64_t id, const std::string& content) {
  return {{"id", id},           {"content", content}, {"single_word", false}, {"lstrip", false},
          {"rstrip", false},    {"normalized", false}, {"special", true}};
}

// The text of token `id` in a tokenizer.json: an added token's content, else its vocab entry.
std::string token_content(const nlohmann::json& tj, int64_t id) {
  if (tj.contains("added_tokens"))
    for (const auto& a : tj.at("added_tokens"))
      if (a.value("id", int64_t(-1)) == id) return a.at("content").get<std::string>();
  for (auto it = tj.at("model").at("vocab").begin(); it != tj.at("model").at("vocab").end(); ++it)
    if (it.value().get<int64_t>() == id) return it.key();
  throw_error("tokenizer.json has no token with id ", id);
}

void write_text(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << text;
    if (!f.flush()) throw_error(tmp, ": write failed (disk full?)");
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace

std::string hf_byte_tokenizer_json() {
  auto bytes = make_byte_tokenizer();
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_level_char(b)] = b;
  const nlohmann::json byte_level = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  nlohmann::json j = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", {added_token(bytes->eos_id(), "<|eos|>")}},
      {"normalizer", nullptr},
      {"pre_tokenizer", byte_level},  // bytes -> characters, no splitting
      {"post_processor", nullptr},
      {"decoder", byte_level},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
  return j.dump(2) + "\n";
}

HfTokenizerFiles hf_tokenizer_files(const std::string& spec, const std::string& eos_token, int64_t model_max_length,
                                    int64_t vocab_size) {
  HfTokenizerFiles out;
  const bool bytes = spec == "bytes";
  std::unique_ptr<Tokenizer> tok = load_tokenizer(spec, bytes ? "" : eos_token);
  if (tok->eos_id() < 0) throw_error("the tokenizer has no EOS token; name it with --eos_token");
  if (tok->vocab_size() > vocab_size)
    throw_error("the tokenizer has ", tok->vocab_size(), " tokens, more than the model's vocab_size (", vocab_size, ")");
  nlohmann::json tj = nlohmann::json::parse(bytes ? hf_byte_tokenizer_json() : spec);
  if (!bytes && tj.contains("post_processor") && !tj.at("post_processor").is_null() &&
      tj.at("post_processor").value("type", std::string()) != "ByteLevel") {
    // difftron's encoding (what the training data holds) applies no post-processor: a BOS
    // template here would make AutoTokenizer's ids differ from the ones the model learnt.
    tj["post_processor"] = nullptr;
  }
  out.tokenizer_json = bytes ? hf_byte_tokenizer_json() : tj.dump(2) + "\n";
  const std::string eos = token_content(tj, tok->eos_id());
  out.ids.eos = out.ids.pad = tok->eos_id();
  out.special_tokens_map = {{"eos_token", eos}, {"pad_token", eos}};
  out.tokenizer_config = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                          {"eos_token", eos},
                          {"pad_token", eos},
                          {"bos_token", nullptr},
                          {"unk_token", nullptr},
                          {"add_bos_token", false},
                          {"add_eos_token", false},
                          {"clean_up_tokenization_spaces", false},
                          {"model_max_length", model_max_length}};
  return out;
}

nlohmann::json hf_generation_config(const HfSpecialTokens& ids) {
  nlohmann::json j = nlohmann::json::object();
  if (ids.bos >= 0) j["bos_token_id"] = ids.bos;
  if (ids.eos >= 0) j["eos_token_id"] = ids.eos;
  if (ids.pad >= 0) j["pad_token_id"] = ids.pad;
  return j;
}

std::string hf_diff_v2_readme(const ModelConfig& c, StoreDType dtype, bool has_tokenizer) {
  const int64_t d = c.d_model, H = 2 * c.n_heads, Q = 4 * c.n_heads, Hkv = 2 * c.n_kv_heads, dh = c.head_dim;
  const int64_t F = c.ffn_dim, V = c.vocab_size;
  auto sh = [](std::initializer_list<int64_t> dims) {
    std::string s = "[";
    for (int64_t x : dims) s += (s.size() > 1 ? ", " : "") + std::to_string(x);
    return s + "]";
  };
  std::ostringstream o;
  o << kHfDiffV2ReadmeTitle << "\n\n"
    << "A Differential Transformer V2 language model (Ye, Dong, Sun, Wei, 2026), trained with difftron\n"
    << "(`--attention=diff_v2`) and written by `difftron convert --to_hf`.\n\n"
    << "**No Hugging Face transformers class implements V2.** `AutoModelForCausalLM` cannot load this\n"
    << "folder: its config.json names the model_type `" << kHfDiffV2ModelType << "` and the architecture\n`"
    << kHfDiffV2Architecture << "`, which no transformers class claims. (transformers' DiffLlama is\n"
    << "V1, another computation: do not relabel the folder as `diffllama` or `llama`.) The tokenizer is\n"
    << "an ordinary one.\n\n"
    << "## Loading it\n\n"
    << "- difftron: `difftron generate --from_hf=THIS_FOLDER --prompt=...`, `difftron eval --from_hf=THIS_FOLDER ...`,\n"
    << "  `difftron train --init_from=THIS_FOLDER ...` (fine-tuning), or `difftron convert --from_hf=THIS_FOLDER\n"
    << "  --to_checkpoint=ROOT` back to a checkpoint.\n"
    << "- Elsewhere: read the weights with any safetensors reader (in Python `safetensors.torch.load_file`,\n"
    << "  each shard in turn when model.safetensors.index.json lists shards) and compute the forward pass\n"
    << "  below, or load the attention weights into the authors' reference module (last section).\n";
  if (has_tokenizer)
    o << "- The tokenizer: `transformers.AutoTokenizer.from_pretrained(THIS_FOLDER)` (tokenizer.json,\n"
      << "  tokenizer_config.json, special_tokens_map.json); EOS = pad, no BOS, as in training.\n";
  else
    o << "- There is no tokenizer: the model was trained on synthetic data (token ids only).\n";
  o << "\n## config.json\n\n"
    << "| field | value | meaning |\n|---|---|---|\n"
    << "| hidden_size | " << d << " | d, the residual width |\n"
    << "| num_hidden_layers | " << c.n_layers << " | L |\n"
    << "| num_attention_heads | " << H << " | H, output heads of width head_dim (the reference's num_heads) |\n"
    << "| num_query_heads | " << Q << " | 2H query heads of q_proj, in pairs |\n"
    << "| num_key_value_heads | " << Hkv << " | H_kv K/V heads (GQA; both heads of a pair read the same one) |\n"
    << "| head_dim | " << dh << " | dh |\n"
    << "| intermediate_size | " << F << " | F, the SwiGLU width |\n"
    << "| vocab_size | " << V << " | |\n"
    << "| rms_norm_eps | " << nlohmann::json(c.norm_eps).dump() << " | |\n"
    << "| rope_theta | " << nlohmann::json(c.rope_theta).dump() << " | RoPE base |\n"
    << "| rope_convention | \"rotate_half\" | RoPE pairs feature c with c + dh/2 (NeoX / Llama style) |\n"
    << "| max_position_embeddings | " << c.max_seq_len << " | the context the model was trained for |\n"
    << "| tie_word_embeddings | " << (c.tie_embeddings ? "true" : "false")
    << " | true: no lm_head.weight, the embedding is the LM head |\n"
    << "| torch_dtype, dtype | \"" << (dtype == StoreDType::BF16 ? "bfloat16" : "float32")
    << "\" | how the weights are stored |\n\n"
    << "## Tensors\n\n"
    << "Linear weights are [out, in] (y = x W^T, as torch.nn.Linear); no biases. N = 0 .. " << c.n_layers - 1
    << ".\n\n"
    << "| tensor | shape | from config.json | role |\n|---|---|---|---|\n"
    << "| model.embed_tokens.weight | " << sh({V, d}) << " | [vocab_size, hidden_size] | token embedding |\n"
    << "| model.layers.N.input_layernorm.weight | " << sh({d}) << " | [hidden_size] | RMSNorm before attention |\n"
    << "| model.layers.N.self_attn.q_proj.weight | " << sh({Q * dh, d})
    << " | [num_query_heads x head_dim, hidden_size] | Wq: 2H query heads, head j = rows j dh .. (j+1) dh - 1 |\n"
    << "| model.layers.N.self_attn.k_proj.weight | " << sh({Hkv * dh, d})
    << " | [num_key_value_heads x head_dim, hidden_size] | Wk |\n"
    << "| model.layers.N.self_attn.v_proj.weight | " << sh({Hkv * dh, d})
    << " | [num_key_value_heads x head_dim, hidden_size] | Wv |\n"
    << "| model.layers.N.self_attn.lambda_proj.weight | " << sh({H, d})
    << " | [num_attention_heads, hidden_size] | W_lambda: one lambda logit per token and output head |\n"
    << "| model.layers.N.self_attn.o_proj.weight | " << sh({d, H * dh})
    << " | [hidden_size, num_attention_heads x head_dim] | Wo |\n"
    << "| model.layers.N.post_attention_layernorm.weight | " << sh({d}) << " | [hidden_size] | RMSNorm before the MLP |\n"
    << "| model.layers.N.mlp.gate_proj.weight | " << sh({F, d}) << " | [intermediate_size, hidden_size] | W1 |\n"
    << "| model.layers.N.mlp.up_proj.weight | " << sh({F, d}) << " | [intermediate_size, hidden_size] | W3 |\n"
    << "| model.layers.N.mlp.down_proj.weight | " << sh({d, F}) << " | [hidden_size, intermediate_size] | W2 |\n"
    << "| model.norm.weight | " << sh({d}) << " | [hidden_size] | final RMSNorm |\n";
  if (!c.tie_embeddings)
    o << "| lm_head.weight | " << sh({V, d}) << " | [vocab_size, hidden_size] | LM head |\n";
  o << "\n## The computation\n\n"
    << "Decoder-only, pre-norm; RMSNorm(x) w = x / sqrt(mean(x^2) + rms_norm_eps) * w.\n\n"
    << "    x = embed_tokens[tokens]\n"
    << "    for each layer:\n"
    << "        h = RMSNorm(x) input_layernorm\n"
    << "        x = x + Attn(h)\n"
    << "        h = RMSNorm(x) post_attention_layernorm\n"
    << "        x = x + down_proj(silu(gate_proj(h)) * up_proj(h))\n"
    << "    logits = lm_head(RMSNorm(x) norm)          (embed_tokens when tie_word_embeddings)\n\n"
    << "    Attn(h), per token position p:\n"
    << "        Q = h Wq^T: 2H heads of dh;  K = h Wk^T, V = h Wv^T: H_kv heads of dh\n"
    << "        RoPE on every head of Q and K: for c < dh/2, a = p rope_theta^(-2c/dh),\n"
    << "            q'[c] = q[c] cos a - q[c + dh/2] sin a,  q'[c + dh/2] = q[c + dh/2] cos a + q[c] sin a\n"
    << "        A_j = causal softmax(Q_j K_g^T / sqrt(dh)) V_g   for query head j < 2H, K/V head g = j / (2H / H_kv)\n"
    << "        z = h W_lambda^T                           (H values per token)\n"
    << "        O_i = A_(2i) - sigmoid(z_i) A_(2i+1)       for output head i < H\n"
    << "        out = concat(O_0, ..., O_(H-1)) Wo^T\n\n"
    << "**Pairing.** Query head 2i + j is map j of output head i (j = 0 is subtracted from, j = 1 is\n"
    << "subtracted): the two heads of a pair are adjacent, as the reference's `attn[..., 0::2]` and\n"
    << "`attn[..., 1::2]`. Both read the same K/V head (H_kv divides H). Unlike V1 (DiffLlama) there is\n"
    << "no per-head norm, no lambda_init, and V is dh wide like the baseline's; lambda = sigmoid(z) is\n"
    << "per token and head.\n\n"
    << "## The authors' reference module (interleaved RoPE)\n\n"
    << "The authors' reference attention (microsoft/unilm, Diff-Transformer/Diff-Transformer-V2,\n"
    << "`MultiheadFlashDiffV2` with use_diff_v2=True, d_model=" << d << ", num_heads=" << H
    << ", num_kv_heads=" << Hkv << ", head_dim=" << dh << ")\n"
    << "has q_proj, k_proj, v_proj, lambda_proj and o_proj of the shapes above and the same pairing,\n"
    << "but applies RoPE interleaved (GPT-J style: features 2c and 2c + 1 rotate together). Before\n"
    << "loading q_proj and k_proj into it, permute the rows of every dh-wide head: interleaved row 2c\n"
    << "= this folder's row c, interleaved row 2c + 1 = this folder's row c + dh/2 (c < dh/2). In\n"
    << "PyTorch, for W = q_proj or k_proj of shape [n dh, d]:\n\n"
    << "    W.view(-1, 2, dh // 2, d).transpose(1, 2).reshape(-1, d)\n\n"
    << "v_proj, lambda_proj and o_proj are taken as they are; the attention scores, and so the\n"
    << "outputs, are then the same. (difftron implements the math above; the reference module was not\n"
    << "run on this folder by difftron.)\n";
  return o.str();
}

std::vector<std::string> export_hf_folder(Model& model, const std::string& tokenizer_spec, const std::string& eos_token,
                                          HfExportOptions opt, const std::string& dir) {
  const ModelConfig& c = model.config();
  HfTokenizerFiles tf;
  const bool has_tok = !tokenizer_spec.empty();
  if (has_tok) {  // before the (slow) weights: a bad tokenizer fails the export early
    tf = hf_tokenizer_files(tokenizer_spec, eos_token, c.max_seq_len, c.vocab_size);
    opt.tokens = tf.ids;
  }
  std::vector<std::string> files = export_hf_model(model, dir, opt);
  write_text(dir + "/generation_config.json", hf_generation_config(opt.tokens).dump(2) + "\n");
  files.push_back("generation_config.json");
  if (c.attention == AttentionKind::DifferentialV2) {  // no transformers class: say what the folder is
    write_text(dir + "/README.md", hf_diff_v2_readme(c, opt.dtype, has_tok));
    files.push_back("README.md");
  }
  if (has_tok) {
    write_text(dir + "/tokenizer.json", tf.tokenizer_json);
    write_text(dir + "/tokenizer_config.json", tf.tokenizer_config.dump(2) + "\n");
    write_text(dir + "/special_tokens_map.json", tf.special_tokens_map.dump(2) + "\n");
    files.insert(files.end(), {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"});
  }
  return files;
}

std::string tokenizer_spec_from_hf(const std::string& dir, std::string* why) {
  std::ifstream f(dir + "/tokenizer.json", std::ios::binary);
  if (!f) {
    *why = "the folder has no tokenizer.json";
    return "";
  }
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  try {
    if (nlohmann::json::parse(text) == nlohmann::json::parse(hf_byte_tokenizer_json())) return "bytes";
    load_tokenizer(text);  // throws when difftron's BPE cannot read it
  } catch (const std::exception& e) {
    *why = std::string("difftron cannot read its tokenizer.json: ") + e.what();
    return "";
  }
  return text;
}

}  // namespace difftron
