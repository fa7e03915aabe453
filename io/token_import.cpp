// Importers for already-tokenised files: see token_import.h. Files are mapped read-only
// and converted in blocks, so inputs larger than memory stream through.
#include "io/token_import.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <vector>

#include "base/error.h"

namespace difftron {
namespace {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_error("cannot open ", path, ": ", std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      throw_error("cannot stat ", path, ": ", std::strerror(errno));
    }
    size_ = size_t(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw_error("cannot map ", path, ": ", std::strerror(errno));
      }
      data_ = static_cast<const uint8_t*>(p);
      ::madvise(p, size_, MADV_SEQUENTIAL);
    }
    ::close(fd);
  }
  ~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

int64_t file_size(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw_error("cannot open ", path, ": ", std::strerror(errno));
  return int64_t(st.st_size);
}

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Element types the importers convert from.
enum class Elem { U8, I8, U16, I16, U32, I32, U64, I64 };
int elem_size(Elem e) {
  switch (e) {
    case Elem::U8: case Elem::I8: return 1;
    case Elem::U16: case Elem::I16: return 2;
    case Elem::U32: case Elem::I32: return 4;
    default: return 8;
  }
}

int64_t elem_at(const uint8_t* p, Elem e) {
  switch (e) {
    case Elem::U8: return p[0];
    case Elem::I8: return int8_t(p[0]);
    case Elem::U16: return load<uint16_t>(p);
    case Elem::I16: return load<int16_t>(p);
    case Elem::U32: return load<uint32_t>(p);
    case Elem::I32: return load<int32_t>(p);
    case Elem::U64: return int64_t(std::min<uint64_t>(load<uint64_t>(p), uint64_t(INT64_MAX)));
    default: return load<int64_t>(p);
  }
}

// Converts n elements at p (file position first_token) to uint32 in `out`, checking range.
void convert(const uint8_t* p, Elem e, int64_t n, int64_t vocab, const std::string& path, int64_t first_token,
             std::vector<uint32_t>& out) {
  out.resize(size_t(n));
  const int w = elem_size(e);
  if (e == Elem::U16) {
    uint16_t mx = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t v = load<uint16_t>(p + 2 * i);
      out[i] = v;
      mx = std::max(mx, v);
    }
    if (int64_t(mx) < vocab) return;
  } else if (e == Elem::U32) {
    uint32_t mx = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t v = load<uint32_t>(p + 4 * i);
      out[i] = v;
      mx = std::max(mx, v);
    }
    if (int64_t(mx) < vocab) return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = elem_at(p + w * i, e);
    if (v < 0 || v >= vocab)
      throw_error(path, ": token ", first_token + i, " has id ", v, ", outside [0, vocab_size ", vocab,
                  ")", v < 0 ? "" : " (set --import_vocab_size or check --input_format)");
    out[i] = uint32_t(v);
  }
}

// Streams a flat array of tokens, cutting documents after each EOS.
void stream_flat(const std::string& path, const uint8_t* p, Elem e, int64_t n, int64_t vocab, int64_t eos,
                 TokenSink& sink) {
  const int64_t block = 1 << 20;
  std::vector<uint32_t> buf;
  bool at_start = true;
  const int w = elem_size(e);
  for (int64_t b = 0; b < n; b += block) {
    const int64_t m = std::min(block, n - b);
    convert(p + b * w, e, m, vocab, path, b, buf);
    int64_t s = 0;
    for (int64_t i = 0; i < m; ++i) {
      if (eos >= 0 && buf[i] == uint32_t(eos)) {
        if (at_start) sink.begin_document();
        sink.append(buf.data() + s, i + 1 - s);
        s = i + 1;
        at_start = true;
      }
    }
    if (s < m) {
      if (at_start) sink.begin_document();
      sink.append(buf.data() + s, m - s);
      at_start = false;
    }
  }
}

struct NpyHeader {
  Elem elem = Elem::U16;
  int64_t count = 0;
  size_t data_offset = 0;
};

NpyHeader parse_npy(const std::string& path, const uint8_t* p, size_t size) {
  if (size < 10 || std::memcmp(p, "\x93NUMPY", 6) != 0) throw_error(path, ": not a .npy file (bad magic)");
  const int major = p[6];
  size_t hlen, hstart;
  if (major == 1) {
    hlen = load<uint16_t>(p + 8);
    hstart = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) throw_error(path, ": truncated .npy header");
    hlen = load<uint32_t>(p + 8);
    hstart = 12;
  } else {
    throw_error(path, ": .npy version ", major, " is not supported");
  }
  if (hstart + hlen > size) throw_error(path, ": truncated .npy header");
  const std::string h(reinterpret_cast<const char*>(p + hstart), hlen);
  auto value_after = [&](const std::string& key) -> std::string {
    size_t k = h.find("'" + key + "'");
    if (k == std::string::npos) throw_error(path, ": .npy header lacks '", key, "': ", h);
    k = h.find(':', k);
    if (k == std::string::npos) throw_error(path, ": malformed .npy header: ", h);
    return h.substr(k + 1);
  };
  std::string d = value_after("descr");
  size_t q1 = d.find('\''), q2 = d.find('\'', q1 + 1);
  if (q1 == std::string::npos || q2 == std::string::npos) throw_error(path, ": malformed .npy descr: ", h);
  const std::string descr = d.substr(q1 + 1, q2 - q1 - 1);
  NpyHeader out;
  static const struct {
    const char* name;
    Elem e;
  } kTypes[] = {{"u1", Elem::U8}, {"i1", Elem::I8}, {"u2", Elem::U16}, {"i2", Elem::I16},
                {"u4", Elem::U32}, {"i4", Elem::I32}, {"u8", Elem::U64}, {"i8", Elem::I64}};
  bool found = false;
  if (descr.size() == 3 && (descr[0] == '<' || descr[0] == '|' || descr[0] == '='))
    for (const auto& t : kTypes)
      if (descr.substr(1) == t.name) {
        out.elem = t.e;
        found = true;
      }
  if (!found)
    throw_error(path, ": .npy dtype '", descr, "' is not supported (little-endian integers: <u2, <u4, <i4, <i8, ...)");
  const std::string fo = value_after("fortran_order");
  const bool fortran = fo.find("True") < fo.find(',');
  std::string sh = value_after("shape");
  const size_t o = sh.find('('), c = sh.find(')');
  if (o == std::string::npos || c == std::string::npos) throw_error(path, ": malformed .npy shape: ", h);
  sh = sh.substr(o + 1, c - o - 1);
  int64_t count = 1;
  int dims = 0;
  for (size_t i = 0; i < sh.size();) {
    while (i < sh.size() && (sh[i] == ' ' || sh[i] == ',')) ++i;
    if (i >= sh.size()) break;
    size_t j = i;
    while (j < sh.size() && std::isdigit(static_cast<unsigned char>(sh[j]))) ++j;
    if (j == i) throw_error(path, ": malformed .npy shape: ", h);
    count *= std::stoll(sh.substr(i, j - i));
    ++dims;
    i = j;
  }
  if (fortran && dims > 1) throw_error(path, ": Fortran-ordered .npy arrays with ", dims, " dimensions are not supported");
  out.count = count;
  out.data_offset = hstart + hlen;
  const size_t need = out.data_offset + size_t(count) * elem_size(out.elem);
  if (size < need)
    throw_error(path, ": truncated: the .npy header promises ", count, " elements (", need, " bytes) but the file has ",
                size, " bytes");
  return out;
}

struct MegatronIndex {
  Elem elem = Elem::U16;
  std::vector<int32_t> sizes;
  std::vector<int64_t> pointers;
  std::vector<int64_t> doc_idx;
};

std::string megatron_prefix(const std::string& path) {
  for (const char* ext : {".bin", ".idx"})
    if (path.size() > 4 && path.compare(path.size() - 4, 4, ext) == 0) return path.substr(0, path.size() - 4);
  return path;
}

MegatronIndex read_megatron_index(const std::string& idx_path, int64_t bin_bytes) {
  MappedFile f(idx_path);
  const uint8_t* p = f.data();
  const size_t n = f.size();
  const size_t head = 9 + 8 + 1 + 8 + 8;
  if (n < head || std::memcmp(p, "MMIDIDX\x00\x00", 9) != 0)
    throw_error(idx_path, ": not a Megatron index (no MMIDIDX header)");
  const uint64_t version = load<uint64_t>(p + 9);
  if (version != 1) throw_error(idx_path, ": Megatron index version ", version, " is not supported (1 is)");
  const int code = p[17];
  MegatronIndex ix;
  switch (code) {
    case 1: ix.elem = Elem::U8; break;
    case 2: ix.elem = Elem::I8; break;
    case 3: ix.elem = Elem::I16; break;
    case 4: ix.elem = Elem::I32; break;
    case 5: ix.elem = Elem::I64; break;
    case 8: ix.elem = Elem::U16; break;
    default: throw_error(idx_path, ": Megatron dtype code ", code, " is not an integer type");
  }
  const uint64_t seqs = load<uint64_t>(p + 18), docs = load<uint64_t>(p + 26);
  const uint64_t need = head + seqs * 4 + seqs * 8 + docs * 8;
  if (seqs > (uint64_t(1) << 40) || docs > (uint64_t(1) << 40) || n < need)
    throw_error(idx_path, ": truncated: the index declares ", seqs, " sequences and ", docs,
                " document boundaries (", need, " bytes) but has ", n, " bytes");
  ix.sizes.resize(seqs);
  ix.pointers.resize(seqs);
  ix.doc_idx.resize(docs);
  std::memcpy(ix.sizes.data(), p + head, seqs * 4);
  std::memcpy(ix.pointers.data(), p + head + seqs * 4, seqs * 8);
  std::memcpy(ix.doc_idx.data(), p + head + seqs * 12, docs * 8);
  const int w = elem_size(ix.elem);
  for (uint64_t i = 0; i < seqs; ++i)
    if (ix.sizes[i] < 0 || ix.pointers[i] < 0 || ix.pointers[i] + int64_t(ix.sizes[i]) * w > bin_bytes)
      throw_error(idx_path, ": sequence ", i, " (", ix.sizes[i], " tokens at byte ", ix.pointers[i],
                  ") lies outside the .bin file (", bin_bytes, " bytes): truncated or mismatched pair");
  for (uint64_t i = 0; i < docs; ++i)
    if (ix.doc_idx[i] < 0 || uint64_t(ix.doc_idx[i]) > seqs || (i > 0 && ix.doc_idx[i] < ix.doc_idx[i - 1]))
      throw_error(idx_path, ": document index ", i, " (", ix.doc_idx[i], ") is out of order or out of range");
  return ix;
}

}  // namespace

const char* token_format_name(TokenFileFormat f) {
  switch (f) {
    case TokenFileFormat::Llmc: return "llmc";
    case TokenFileFormat::Megatron: return "megatron";
    case TokenFileFormat::Npy: return "npy";
    case TokenFileFormat::Raw16: return "raw16";
    default: return "raw32";
  }
}

bool parse_token_format(const std::string& name, TokenFileFormat* out) {
  for (TokenFileFormat f : {TokenFileFormat::Llmc, TokenFileFormat::Megatron, TokenFileFormat::Npy,
                            TokenFileFormat::Raw16, TokenFileFormat::Raw32})
    if (name == token_format_name(f)) {
      *out = f;
      return true;
    }
  return false;
}

bool detect_token_format(const std::string& path, TokenFileFormat* out) {
  namespace fs = std::filesystem;
  std::error_code ec;
  auto ends = [&](const char* ext) {
    const size_t n = std::strlen(ext);
    return path.size() > n && path.compare(path.size() - n, n, ext) == 0;
  };
  if (ends(".npy")) {
    *out = TokenFileFormat::Npy;
    return true;
  }
  const std::string prefix = megatron_prefix(path);
  if (fs::is_regular_file(prefix + ".bin", ec) && fs::is_regular_file(prefix + ".idx", ec) &&
      (ends(".bin") || ends(".idx") || prefix == path)) {
    *out = TokenFileFormat::Megatron;
    return true;
  }
  if (ends(".bin") && fs::is_regular_file(path, ec) && fs::file_size(path, ec) >= 1024) {
    FILE* f = std::fopen(path.c_str(), "rb");
    int32_t magic = 0;
    if (f) {
      if (std::fread(&magic, 4, 1, f) != 1) magic = 0;
      std::fclose(f);
    }
    if (magic == 20240520 || magic == 20240801) {
      *out = TokenFileFormat::Llmc;
      return true;
    }
  }
  return false;
}

TokenFileInfo probe_token_file(const std::string& path, TokenFileFormat format) {
  TokenFileInfo info;
  info.format = format;
  info.path = path;
  switch (format) {
    case TokenFileFormat::Llmc: {
      MappedFile f(path);
      if (f.size() < 1024) throw_error(path, ": too short for an llm.c token file (", f.size(), " bytes < 1024-byte header)");
      const int32_t magic = load<int32_t>(f.data()), ntok = load<int32_t>(f.data() + 8);
      int width;
      if (magic == 20240520) {
        width = 2;
        info.default_vocab = 50257;  // GPT-2
        info.default_eos = 50256;    // <|endoftext|>
      } else if (magic == 20240801) {
        width = 4;
      } else {
        throw_error(path, ": llm.c magic number is ", magic, " (expected 20240520 or 20240801)");
      }
      if (ntok < 0) throw_error(path, ": llm.c header declares ", ntok, " tokens");
      const int64_t need = 1024 + int64_t(ntok) * width;
      if (int64_t(f.size()) != need)
        throw_error(path, ": the llm.c header declares ", ntok, " tokens (", need, " bytes) but the file has ", f.size(),
                    " bytes", int64_t(f.size()) < need ? " (truncated)" : "");
      info.num_tokens = ntok;
      info.file_bytes = int64_t(f.size());
      break;
    }
    case TokenFileFormat::Npy: {
      MappedFile f(path);
      NpyHeader h = parse_npy(path, f.data(), f.size());
      info.num_tokens = h.count;
      info.file_bytes = int64_t(f.size());
      break;
    }
    case TokenFileFormat::Raw16:
    case TokenFileFormat::Raw32: {
      const int w = format == TokenFileFormat::Raw16 ? 2 : 4;
      const int64_t n = file_size(path);
      if (n % w != 0)
        throw_error(path, ": size ", n, " bytes is not a multiple of ", w, " (", token_format_name(format),
                    "): truncated or another format");
      info.num_tokens = n / w;
      info.file_bytes = n;
      break;
    }
    case TokenFileFormat::Megatron: {
      const std::string prefix = megatron_prefix(path);
      info.path = prefix + ".bin";
      const int64_t bin = file_size(info.path);
      MegatronIndex ix = read_megatron_index(prefix + ".idx", bin);
      int64_t total = 0;
      for (int32_t s : ix.sizes) total += s;
      info.num_tokens = total;
      info.num_documents = ix.doc_idx.empty() ? 0 : int64_t(ix.doc_idx.size()) - 1;
      info.file_bytes = bin;
      break;
    }
  }
  return info;
}

void import_token_file(const TokenFileInfo& info, int64_t vocab, int64_t eos, TokenSink& sink) {
  switch (info.format) {
    case TokenFileFormat::Llmc: {
      MappedFile f(info.path);
      const int32_t magic = load<int32_t>(f.data());
      stream_flat(info.path, f.data() + 1024, magic == 20240520 ? Elem::U16 : Elem::U32, info.num_tokens, vocab, eos,
                  sink);
      break;
    }
    case TokenFileFormat::Npy: {
      MappedFile f(info.path);
      NpyHeader h = parse_npy(info.path, f.data(), f.size());
      stream_flat(info.path, f.data() + h.data_offset, h.elem, h.count, vocab, eos, sink);
      break;
    }
    case TokenFileFormat::Raw16:
    case TokenFileFormat::Raw32: {
      MappedFile f(info.path);
      stream_flat(info.path, f.data(), info.format == TokenFileFormat::Raw16 ? Elem::U16 : Elem::U32,
                  info.num_tokens, vocab, eos, sink);
      break;
    }
    case TokenFileFormat::Megatron: {
      const std::string prefix = megatron_prefix(info.path);
      MappedFile bin(info.path);
      MegatronIndex ix = read_megatron_index(prefix + ".idx", int64_t(bin.size()));
      const int w = elem_size(ix.elem);
      std::vector<uint32_t> buf;
      int64_t position = 0;
      for (size_t d = 0; d + 1 < ix.doc_idx.size(); ++d) {
        sink.begin_document();
        for (int64_t s = ix.doc_idx[d]; s < ix.doc_idx[d + 1]; ++s) {
          const uint8_t* p = bin.data() + ix.pointers[size_t(s)];
          const int64_t n = ix.sizes[size_t(s)];
          for (int64_t b = 0; b < n; b += (1 << 20)) {
            const int64_t m = std::min<int64_t>(1 << 20, n - b);
            convert(p + b * w, ix.elem, m, vocab, info.path, position + b, buf);
            sink.append(buf.data(), m);
          }
          position += n;
        }
      }
      break;
    }
  }
}

}  // namespace difftron
