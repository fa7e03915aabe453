// A complete Hugging Face model folder from a difftron model and its tokenizer: the weights and
// config.json (io/hf_diffllama.h), generation_config.json, and the tokenizer files that
// transformers' AutoTokenizer loads (tokenizer.json, tokenizer_config.json,
// special_tokens_map.json), with the special-token ids right for the tokenizer the model was
// trained with. docs/EXPORT.md describes the folder.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/hf_diffllama.h"

namespace difftron {

// The Hugging Face form of a tokenizer spec (what a checkpoint's meta.json records: "bytes",
// or tokenizer.json text; io/tokenizer.h).
struct HfTokenizerFiles {
  std::string tokenizer_json;           // tokenizer.json text
  nlohmann::json tokenizer_config;      // tokenizer_config.json
  nlohmann::json special_tokens_map;    // special_tokens_map.json
  HfSpecialTokens ids;                  // difftron adds no BOS: bos = -1; pad = eos
};

// The byte tokenizer (bytes 0..255 -> ids 0..255, EOS 256 "<|eos|>") as a byte-level BPE
// tokenizer.json without merges, which encodes every text to the same ids.
std::string hf_byte_tokenizer_json();
// `eos_token`: the EOS named at prepare time (--eos_token) when not a conventional one; "" =
// the tokenizer's default. A BPE tokenizer.json is copied, except that a post-processor that
// would add tokens difftron's encoding never added (e.g. a BOS template) is removed.
// model_max_length: the model's context. Throws difftron::Error when the tokenizer has no EOS
// or more tokens than vocab_size.
HfTokenizerFiles hf_tokenizer_files(const std::string& spec, const std::string& eos_token, int64_t model_max_length,
                                    int64_t vocab_size);
nlohmann::json hf_generation_config(const HfSpecialTokens& ids);

// The README.md of a Differential Transformer V2 folder (no transformers class loads it): what
// the variant is, config.json's fields, the tensor table with this model's shapes, the math,
// the pairing of query heads and the RoPE permutation the authors' reference module needs.
// It starts with kHfDiffV2ReadmeTitle (how convert recognises a README it wrote).
inline constexpr const char* kHfDiffV2ReadmeTitle = "# Differential Transformer V2 (written by difftron)";
std::string hf_diff_v2_readme(const ModelConfig& c, StoreDType dtype, bool has_tokenizer);

// Writes the whole folder into dir (created): the model (export_hf_model) and, when
// tokenizer_spec is not empty, the tokenizer files; generation_config.json always (without
// token ids when there is no tokenizer); README.md for diff_v2 (hf_diff_v2_readme). opt.tokens
// is set from the tokenizer. Returns the names of the files written.
std::vector<std::string> export_hf_folder(Model& model, const std::string& tokenizer_spec, const std::string& eos_token,
                                          HfExportOptions opt, const std::string& dir);

// The tokenizer spec of a Hugging Face folder, for a checkpoint imported from it: "bytes" when
// its tokenizer.json is the byte tokenizer's, the tokenizer.json text when difftron's BPE reads
// it, "" when there is none or difftron cannot read it (*why says which).
std::string tokenizer_spec_from_hf(const std::string& dir, std::string* why);

}  // namespace difftron
