// The built-in byte-level tokenizer: one token per byte, EOS = 256.
#include "io/tokenizer.h"

#include "base/error.h"

namespace difftron {
namespace {

class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    for (int32_t id : ids) {
      if (id >= 0 && id < 256) s.push_back(static_cast<char>(id));
      else if (id == 256) s += "\n<|eos|>\n";
    }
    return s;
  }
  int64_t vocab_size() const override { return 257; }
  int32_t eos_id() const override { return 256; }
  std::string spec() const override { return "bytes"; }
};

}  // namespace

std::unique_ptr<Tokenizer> make_byte_tokenizer() { return std::make_unique<ByteTokenizer>(); }

}  // namespace difftron
