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
