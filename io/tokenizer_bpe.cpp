// Byte-level BPE read from a Hugging Face tokenizer.json (GPT-2 / Llama-3 style), and
// load_tokenizer (io/tokenizer.h). Encoding follows HF `tokenizers`: added tokens are split
// out first (leftmost, longest), the rest is pre-tokenized by the GPT-2 or Llama-3 regex
// (hand-written scanners; other patterns are refused), bytes are mapped to the byte-level
// alphabet and merged lowest rank first. tests/test_io_tokenizer_bpe.cpp compares with HF.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <fstream>
#include <queue>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "io/tokenizer.h"

namespace difftron {
namespace {

#include "io/unicode_tables.inc"

// ---- Unicode classes --------------------------------------------------------------------

enum class CharClass : uint8_t { Letter, Number, Space, Other };

template <size_t N>
bool in_ranges(const uint32_t (&r)[N][2], uint32_t cp) {
  size_t lo = 0, hi = N;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (cp < r[mid][0]) hi = mid;
    else if (cp > r[mid][1]) lo = mid + 1;
    else return true;
  }
  return false;
}

// Unicode White_Space (what \s matches in the regex engines HF uses).
bool is_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

CharClass classify(uint32_t c) {
  if (c < 0x80) {
    if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return CharClass::Letter;
    if (c >= '0' && c <= '9') return CharClass::Number;
    return is_space(c) ? CharClass::Space : CharClass::Other;
  }
  if (is_space(c)) return CharClass::Space;
  if (in_ranges(kLetterRanges, c)) return CharClass::Letter;
  if (in_ranges(kNumberRanges, c)) return CharClass::Number;
  return CharClass::Other;
}

// One decoded code point: value, byte offset, class. Invalid UTF-8 bytes become one
// "Other" code point each (their bytes are kept as they are).
struct Cp {
  uint32_t c;
  uint32_t pos;
  CharClass cls;
};

std::vector<Cp> decode_utf8(const std::string& s, size_t begin, size_t end) {
  std::vector<Cp> out;
  out.reserve(end - begin);
  size_t i = begin;
  while (i < end) {
    const unsigned char b = static_cast<unsigned char>(s[i]);
    uint32_t c = 0xFFFD;
    size_t len = 1;
    if (b < 0x80) {
      c = b;
    } else {
      size_t need = (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
      if (need && i + need <= end) {
        uint32_t v = b & (0x7F >> need);
        bool ok = true;
        for (size_t k = 1; k < need; ++k) {
          const unsigned char cb = static_cast<unsigned char>(s[i + k]);
          if ((cb & 0xC0) != 0x80) ok = false;
          v = (v << 6) | (cb & 0x3F);
        }
        const uint32_t minv = need == 2 ? 0x80 : need == 3 ? 0x800 : 0x10000;
        if (ok && v >= minv && v <= 0x10FFFF && !(v >= 0xD800 && v <= 0xDFFF)) {
          c = v;
          len = need;
        }
      }
    }
    out.push_back({c, uint32_t(i), len == 1 && b >= 0x80 ? CharClass::Other : classify(c)});
    i += len;
  }
  return out;
}

void append_utf8(std::string& s, uint32_t c) {
  if (c < 0x80) {
    s.push_back(char(c));
  } else if (c < 0x800) {
    s.push_back(char(0xC0 | (c >> 6)));
    s.push_back(char(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    s.push_back(char(0xE0 | (c >> 12)));
    s.push_back(char(0x80 | ((c >> 6) & 0x3F)));
    s.push_back(char(0x80 | (c & 0x3F)));
  } else {
    s.push_back(char(0xF0 | (c >> 18)));
    s.push_back(char(0x80 | ((c >> 12) & 0x3F)));
    s.push_back(char(0x80 | ((c >> 6) & 0x3F)));
    s.push_back(char(0x80 | (c & 0x3F)));
  }
}

// ---- pre-tokenizer scanners -------------------------------------------------------------

enum class PreTok { Gpt2, Llama3, None };

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Length (in code points) of a contraction 's 't 're 've 'm 'll 'd at i, or 0.
size_t contraction(const std::vector<Cp>& cp, size_t i, bool any_case) {
  const size_t n = cp.size();
  if (cp[i].c != '\'' || i + 1 >= n) return 0;
  auto ch = [&](size_t k) -> uint32_t {
    if (k >= n) return 0;
    uint32_t c = cp[k].c;
    return any_case && c >= 'A' && c <= 'Z' ? c + 32 : c;
  };
  const uint32_t a = ch(i + 1), b = ch(i + 2);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

size_t run_of(const std::vector<Cp>& cp, size_t i, CharClass cls) {
  while (i < cp.size() && cp[i].cls == cls) ++i;
  return i;
}

// \s+(?!\S) then \s+, from a whitespace code point at i: end of the match.
size_t space_match(const std::vector<Cp>& cp, size_t i) {
  const size_t k = run_of(cp, i, CharClass::Space);
  if (k == cp.size() || k - i == 1) return k;
  return k - 1;  // leave the last space to the next piece
}

// End (code point index) of the match starting at i.
size_t match_gpt2(const std::vector<Cp>& cp, size_t i) {
  const size_t n = cp.size();
  if (size_t c = contraction(cp, i, false)) return i + c;
  const bool sp = cp[i].c == ' ' && i + 1 < n;
  for (CharClass cls : {CharClass::Letter, CharClass::Number, CharClass::Other}) {
    if (cp[i].cls == cls) return run_of(cp, i, cls);
    if (sp && cp[i + 1].cls == cls) return run_of(cp, i + 1, cls);
  }
  return space_match(cp, i);
}

size_t match_llama3(const std::vector<Cp>& cp, size_t i) {
  const size_t n = cp.size();
  auto crlf = [&](size_t k) { return cp[k].c == '\r' || cp[k].c == '\n'; };
  if (size_t c = contraction(cp, i, true)) return i + c;
  const CharClass ci = cp[i].cls;
  if (ci == CharClass::Letter) return run_of(cp, i, CharClass::Letter);
  if (ci != CharClass::Number && !crlf(i) && i + 1 < n && cp[i + 1].cls == CharClass::Letter)
    return run_of(cp, i + 1, CharClass::Letter);
  if (ci == CharClass::Number) return std::min(run_of(cp, i, CharClass::Number), i + 3);
  size_t j = i;
  if (cp[i].c == ' ' && i + 1 < n && cp[i + 1].cls == CharClass::Other) j = i + 1;
  if (cp[j].cls == CharClass::Other) {
    size_t k = run_of(cp, j, CharClass::Other);
    while (k < n && crlf(k)) ++k;
    return k;
  }
  // whitespace: \s*[\r\n]+ ends after the run's last CR/LF; else \s+(?!\S) | \s+
  const size_t k = run_of(cp, i, CharClass::Space);
  for (size_t m = k; m > i; --m)
    if (crlf(m - 1)) return m;
  return space_match(cp, i);
}

// ---- the tokenizer ------------------------------------------------------------------------

struct AddedToken {
  std::string content;
  int32_t id;
  bool special;
};

std::atomic<uint64_t> g_instance_counter{1};

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(const std::string& json_text, const std::string& source, const std::string& eos_token);

  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  int32_t eos_id() const override { return eos_; }
  std::string spec() const override { return json_; }

 private:
  void encode_segment(const std::string& text, size_t begin, size_t end, std::vector<int32_t>& out) const;
  void encode_word(const std::string& text, size_t begin, size_t end, std::vector<int32_t>& out) const;
  void bpe(const std::string& word, std::vector<int32_t>& out) const;

  std::string json_, source_;
  uint64_t instance_ = g_instance_counter.fetch_add(1);
  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a,b) -> (rank, merged id)
  std::vector<AddedToken> added_;
  std::vector<int8_t> added_first_byte_;  // 1 when some added token starts with this byte
  std::unordered_map<int32_t, size_t> added_by_id_;
  PreTok pre_ = PreTok::Gpt2;
  bool add_prefix_space_ = false, ignore_merges_ = false;
  int32_t unk_ = -1;
  int32_t byte_token_[256];
  uint32_t byte_char_[256];                       // byte -> byte-level code point
  std::unordered_map<uint32_t, uint8_t> char_byte_;  // and back
  int64_t vocab_size_ = 0;
  int32_t eos_ = -1;
};

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

BpeTokenizer::BpeTokenizer(const std::string& json_text, const std::string& source,
                           const std::string& eos_token)
    : json_(json_text), source_(source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(json_text);
  } catch (const std::exception& e) {
    throw_error("tokenizer ", source, ": not valid JSON (", e.what(), ")");
  }
  auto fail = [&](const std::string& what) { throw_error("tokenizer ", source, ": ", what); };
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
    fail("not a Hugging Face tokenizer.json (no \"model\" object)");
  const auto& m = j["model"];
  const std::string type = m.value("type", "BPE");
  if (type != "BPE") fail("model type '" + type + "' is not supported (only byte-level BPE)");
  if (j.contains("normalizer") && !j["normalizer"].is_null())
    fail("normalizer '" + j["normalizer"].value("type", std::string("?")) +
         "' is not supported (byte-level BPE tokenizers have none)");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(k) && !m[k].is_null() && m[k] != "") fail(std::string(k) + " is not supported");
  if (m.value("byte_fallback", false)) fail("byte_fallback BPE (SentencePiece style) is not supported");
  if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() > 0)
    fail("BPE dropout is not supported for data preparation");
  ignore_merges_ = m.value("ignore_merges", false);

  // vocabulary
  if (!m.contains("vocab") || !m["vocab"].is_object()) fail("model.vocab is missing");
  int64_t max_id = -1;
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id >= (int64_t(1) << 31)) fail("vocab id out of range for '" + it.key() + "'");
    vocab_[it.key()] = int32_t(id);
    max_id = std::max(max_id, id);
  }
  // added tokens
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const auto& a : j["added_tokens"]) {
      AddedToken t{a.at("content").get<std::string>(), a.at("id").get<int32_t>(), a.value("special", false)};
      if (t.content.empty()) continue;
      max_id = std::max<int64_t>(max_id, t.id);
      added_by_id_[t.id] = added_.size();
      added_.push_back(t);
    }
  }
  added_first_byte_.assign(256, 0);
  for (const auto& a : added_) added_first_byte_[static_cast<unsigned char>(a.content[0])] = 1;
  vocab_size_ = max_id + 1;
  id_to_token_.assign(size_t(vocab_size_), std::string());
  for (const auto& [tok, id] : vocab_) id_to_token_[size_t(id)] = tok;
  if (m.contains("unk_token") && m["unk_token"].is_string()) {
    auto it = vocab_.find(m["unk_token"].get<std::string>());
    if (it != vocab_.end()) unk_ = it->second;
  }

  // merges: ["a b", ...] or [["a", "b"], ...]
  if (m.contains("merges") && m["merges"].is_array()) {
    int32_t rank = 0;
    for (const auto& e : m["merges"]) {
      std::string a, b;
      if (e.is_string()) {
        const std::string s = e.get<std::string>();
        const size_t sp = s.find(' ', 1);
        if (sp == std::string::npos) fail("merge '" + s + "' is not two tokens");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (e.is_array() && e.size() == 2) {
        a = e[0].get<std::string>();
        b = e[1].get<std::string>();
      } else {
        fail("a merge entry is neither \"a b\" nor [\"a\", \"b\"]");
      }
      auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end())
        fail("merge '" + a + " " + b + "' uses a token that is not in the vocabulary");
      merges_.emplace(pair_key(ia->second, ib->second), std::make_pair(rank, iab->second));
      ++rank;
    }
  }

  // pre-tokenizer: ByteLevel(use_regex) or Sequence[Split(pattern), ByteLevel(no regex)]
  bool byte_level = false;
  pre_ = PreTok::None;
  std::function<void(const nlohmann::json&)> visit = [&](const nlohmann::json& p) {
    if (p.is_null()) return;
    const std::string t = p.value("type", "");
    if (t == "Sequence") {
      for (const auto& q : p.at("pretokenizers")) visit(q);
    } else if (t == "ByteLevel") {
      byte_level = true;
      add_prefix_space_ = p.value("add_prefix_space", false);
      if (p.value("use_regex", true)) {
        if (pre_ != PreTok::None) fail("two splitting pre-tokenizers are not supported");
        pre_ = PreTok::Gpt2;
      }
    } else if (t == "Split") {
      std::string pat;
      if (p.contains("pattern") && p["pattern"].contains("Regex")) pat = p["pattern"]["Regex"].get<std::string>();
      if (p.value("behavior", "") != "Isolated" || p.value("invert", false))
        fail("Split pre-tokenizer: only behavior Isolated without invert is supported");
      if (pre_ != PreTok::None) fail("two splitting pre-tokenizers are not supported");
      if (pat == kGpt2Pattern) pre_ = PreTok::Gpt2;
      else if (pat == kLlama3Pattern) pre_ = PreTok::Llama3;
      else fail("Split pattern is not one this build implements (GPT-2 or Llama-3): " + pat);
    } else {
      fail("pre-tokenizer '" + t + "' is not supported (byte-level BPE needs ByteLevel)");
    }
  };
  visit(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : nlohmann::json());
  if (!byte_level) fail("not a byte-level BPE (no ByteLevel pre-tokenizer)");

  // the byte-level alphabet: printable Latin-1 bytes stand for themselves, the others are
  // shifted to 256, 257, ... in byte order
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    byte_char_[b] = printable ? uint32_t(b) : next++;
    char_byte_[byte_char_[b]] = uint8_t(b);
    std::string s;
    append_utf8(s, byte_char_[b]);
    auto it = vocab_.find(s);
    byte_token_[b] = it == vocab_.end() ? -1 : it->second;
  }

  // EOS: named, or the first special added token with a conventional name
  if (!eos_token.empty()) {
    for (const auto& a : added_)
      if (a.content == eos_token) eos_ = a.id;
    if (eos_ < 0) {
      auto it = vocab_.find(eos_token);
      if (it == vocab_.end()) fail("EOS token '" + eos_token + "' is not in the vocabulary");
      eos_ = it->second;
    }
  } else {
    for (const char* name : {"<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>"}) {
      for (const auto& a : added_)
        if (a.special && a.content == name && eos_ < 0) eos_ = a.id;
    }
  }
}

std::vector<int32_t> BpeTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  // Split out added tokens: at the leftmost position where one matches, the longest.
  size_t seg = 0, i = 0;
  while (i < text.size()) {
    if (added_first_byte_[static_cast<unsigned char>(text[i])]) {
      const AddedToken* best = nullptr;
      for (const auto& a : added_)
        if (text.compare(i, a.content.size(), a.content) == 0 &&
            (!best || a.content.size() > best->content.size()))
          best = &a;
      if (best) {
        encode_segment(text, seg, i, out);
        out.push_back(best->id);
        i += best->content.size();
        seg = i;
        continue;
      }
    }
    ++i;
  }
  encode_segment(text, seg, text.size(), out);
  return out;
}

void BpeTokenizer::encode_segment(const std::string& text, size_t begin, size_t end,
                                  std::vector<int32_t>& out) const {
  if (begin >= end) return;
  if (add_prefix_space_ && text[begin] != ' ') {  // HF: per segment between added tokens
    const std::string t = " " + text.substr(begin, end - begin);
    encode_segment(t, 0, t.size(), out);
    return;
  }
  std::vector<Cp> cp = decode_utf8(text, begin, end);
  size_t i = 0;
  while (i < cp.size()) {
    const size_t j = pre_ == PreTok::Llama3 ? match_llama3(cp, i)
                     : pre_ == PreTok::Gpt2 ? match_gpt2(cp, i)
                                            : cp.size();
    encode_word(text, cp[i].pos, j < cp.size() ? cp[j].pos : end, out);
    i = j;
  }
}

// Per-thread cache of word -> ids, for the tokenizer instance that used it last.
struct WordCache {
  uint64_t owner = 0;
  std::unordered_map<std::string, std::vector<int32_t>> map;
};

void BpeTokenizer::encode_word(const std::string& text, size_t begin, size_t end,
                               std::vector<int32_t>& out) const {
  thread_local WordCache cache;
  if (cache.owner != instance_ || cache.map.size() > (1u << 20)) {
    cache.map.clear();
    cache.owner = instance_;
  }
  std::string word = text.substr(begin, end - begin);
  auto it = cache.map.find(word);
  if (it != cache.map.end()) {
    out.insert(out.end(), it->second.begin(), it->second.end());
    return;
  }
  std::vector<int32_t> ids;
  bpe(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (word.size() <= 256) cache.map.emplace(std::move(word), std::move(ids));
}

void BpeTokenizer::bpe(const std::string& word, std::vector<int32_t>& out) const {
  if (ignore_merges_) {
    std::string mapped;
    for (unsigned char b : word) append_utf8(mapped, byte_char_[b]);
    auto it = vocab_.find(mapped);
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // Symbols as a linked list; a heap of candidate merges ordered by (rank, position).
  struct Sym {
    int32_t id;
    int prev, next;
    bool alive;
  };
  std::vector<Sym> sym;
  sym.reserve(word.size());
  for (unsigned char b : word) {
    int32_t id = byte_token_[b];
    if (id < 0) {
      if (unk_ < 0) continue;  // HF drops characters it cannot map when there is no unk
      id = unk_;
    }
    const int k = int(sym.size());
    sym.push_back({id, k - 1, k + 1, true});
  }
  if (sym.empty()) return;
  sym.back().next = -1;
  struct Cand {
    int32_t rank;
    int pos;
    int32_t new_id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int pos) {
    if (pos < 0 || sym[size_t(pos)].next < 0) return;
    auto it = merges_.find(pair_key(sym[size_t(pos)].id, sym[size_t(sym[size_t(pos)].next)].id));
    if (it != merges_.end()) heap.push({it->second.first, pos, it->second.second});
  };
  for (int k = 0; k + 1 < int(sym.size()); ++k) push(k);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& a = sym[size_t(c.pos)];
    if (!a.alive || a.next < 0) continue;
    Sym& b = sym[size_t(a.next)];
    auto it = merges_.find(pair_key(a.id, b.id));
    if (it == merges_.end() || it->second.second != c.new_id) continue;  // stale candidate
    a.id = c.new_id;
    b.alive = false;
    a.next = b.next;
    if (b.next >= 0) sym[size_t(b.next)].prev = c.pos;
    push(a.prev);
    push(c.pos);
  }
  for (int k = 0; k >= 0; k = sym[size_t(k)].next) out.push_back(sym[size_t(k)].id);
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string s;
  for (int32_t id : ids) {
    auto a = added_by_id_.find(id);
    if (a != added_by_id_.end()) {
      s += added_[a->second].content;
      continue;
    }
    if (id < 0 || id >= vocab_size_) continue;
    const std::string& tok = id_to_token_[size_t(id)];
    for (const Cp& c : decode_utf8(tok, 0, tok.size())) {
      auto it = char_byte_.find(c.c);
      if (it != char_byte_.end()) s.push_back(char(it->second));
      else append_utf8(s, c.c);
    }
  }
  return s;
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_error("tokenizer file '", path, "' cannot be read (", std::strerror(errno), ")");
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec_or_path, const std::string& eos_token) {
  if (spec_or_path == "bytes") {
    if (!eos_token.empty()) throw_error("the byte tokenizer has a fixed EOS (256); got EOS token '", eos_token, "'");
    return make_byte_tokenizer();
  }
  if (spec_or_path.empty() || spec_or_path == "none")
    throw_error("no tokenizer: the spec is '", spec_or_path, "' (expected \"bytes\", tokenizer.json text or a path)");
  const size_t first = spec_or_path.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && spec_or_path[first] == '{')
    return std::make_unique<BpeTokenizer>(spec_or_path, "(JSON text)", eos_token);
  return std::make_unique<BpeTokenizer>(read_text_file(spec_or_path), spec_or_path, eos_token);
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec_or_path) {
  return load_tokenizer(spec_or_path, "");
}

}  // namespace difftron
