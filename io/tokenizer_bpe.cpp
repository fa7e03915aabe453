// Byte-level BPE read from a Hugging Face tokenizer.json, and load_tokenizer (io/tokenizer.h).
#include "core/error.h"
#include "io/tokenizer.h"

namespace difftron {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec) {
  if (spec == "bytes") return make_byte_tokenizer();
  throw_error("BPE tokenizers: not implemented yet (asked for '", spec.substr(0, 80), "')");
}

}  // namespace difftron
