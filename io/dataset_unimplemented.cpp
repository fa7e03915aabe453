// TEMPORARY placeholder so the program links before the token-shard loader lands.
// The data engineer (issue 6) deletes this file when io/loader.cpp and
// io/tokenizer_bpe.cpp define these functions.
#include "core/error.h"
#include "io/dataset.h"
#include "io/tokenizer.h"

namespace difftron {

std::unique_ptr<BatchSource> open_token_dataset(const DatasetOptions& o) {
  throw_error("token datasets are not supported by this build yet (asked for '", o.path, "')");
}
std::string dataset_tokenizer_spec(const std::string& path) {
  throw_error("token datasets are not supported by this build yet (asked for '", path, "')");
}
int64_t dataset_vocab_size(const std::string& path) {
  throw_error("token datasets are not supported by this build yet (asked for '", path, "')");
}
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec) {
  if (spec == "bytes") return make_byte_tokenizer();
  throw_error("only the byte tokenizer is supported by this build yet");
}

}  // namespace difftron
