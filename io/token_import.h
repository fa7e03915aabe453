// Already-tokenised inputs for `difftron prepare`: llm.c .bin shards (256 x int32 header,
// magic 20240520 = uint16 GPT-2 tokens, 20240801 = uint32 Llama-3 tokens), Megatron
// .bin/.idx pairs (MMIDIDX index), NumPy .npy arrays of integers and raw little-endian
// uint16/uint32 files. Every header and size is checked against the file before reading.
#pragma once
#include <cstdint>
#include <string>

namespace difftron {

enum class TokenFileFormat { Llmc, Megatron, Npy, Raw16, Raw32 };

const char* token_format_name(TokenFileFormat f);
// "llmc" | "megatron" | "npy" | "raw16" | "raw32"; false when the name is none of them.
bool parse_token_format(const std::string& name, TokenFileFormat* out);

struct TokenFileInfo {
  TokenFileFormat format = TokenFileFormat::Raw16;
  std::string path;            // the file (Megatron: the .bin; its .idx sits beside it)
  int64_t num_tokens = 0;
  int64_t num_documents = -1;  // known from the file (Megatron), else -1
  int64_t default_vocab = 0;   // implied by the format (llm.c GPT-2: 50257), else 0
  int64_t default_eos = -2;    // implied by the format (llm.c GPT-2: 50256), else -2
  int64_t file_bytes = 0;
};

// Guesses the format of an explicitly named file: .npy, a Megatron pair (x.bin + x.idx, or
// the prefix x, or x.idx), an llm.c .bin by its magic. Returns false when it cannot tell.
bool detect_token_format(const std::string& path, TokenFileFormat* out);

// Reads and checks the header/index; throws Error naming the file and what is wrong.
TokenFileInfo probe_token_file(const std::string& path, TokenFileFormat format);

// Receives documents: begin_document() before each document's first token.
class TokenSink {
 public:
  virtual ~TokenSink() = default;
  virtual void begin_document() = 0;
  virtual void append(const uint32_t* tokens, int64_t n) = 0;
};

// Streams the file's tokens to the sink. Documents are the Megatron index's documents, or
// (other formats) runs ending with eos_id (eos_id < 0: the whole file is one document).
// Every id must be < vocab_size, else Error naming the file and the token's position.
void import_token_file(const TokenFileInfo& info, int64_t vocab_size, int64_t eos_id, TokenSink& sink);

}  // namespace difftron
