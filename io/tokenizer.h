// Tokenizers: text <-> token ids. The byte-level tokenizer is built in (vocab 256 + EOS);
// a byte-level BPE read from a Hugging Face tokenizer.json is the other kind (io/tokenizer_bpe.cpp).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace difftron {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int32_t eos_id() const = 0;  // -1 when the tokenizer has none
  // What a token shard's `tokenizer` attribute stores so the tokenizer can be rebuilt:
  // "bytes" for the byte tokenizer, the tokenizer.json text for BPE.
  virtual std::string spec() const = 0;
};

// Bytes 0..255 are tokens 0..255; EOS is 256; vocab 257.
std::unique_ptr<Tokenizer> make_byte_tokenizer();
// From a shard's `tokenizer` attribute ("bytes" or tokenizer.json text) or a path to a
// tokenizer.json file; throws difftron::Error naming the source when it cannot be read.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec_or_path);
// The same, with the EOS token named explicitly (a tokenizer.json whose EOS is not one of
// <|endoftext|>, <|end_of_text|>, </s>, <eos>, <|eos|>, <|im_end|>); "" = that default.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec_or_path, const std::string& eos_token);

}  // namespace difftron
