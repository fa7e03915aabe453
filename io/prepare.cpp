// `difftron prepare` as a library function: see prepare.h. Text files are read and
// tokenised by a pool of threads; the calling thread takes their results strictly in input
// order (so the output does not depend on timing), drops duplicates, routes each document
// to train or val and streams it into shards of a fixed size.
#include "io/prepare.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <mutex>
#include <sstream>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>
#include <zlib.h>

#include "base/error.h"
#include "io/token_import.h"
#include "io/tokenizer.h"

namespace difftron {
namespace fs = std::filesystem;

std::string read_text_input(const std::string& path) {
  const bool gz = path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
  if (!gz) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw_error("cannot read ", path, ": ", std::strerror(errno));
    std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) throw_error("error reading ", path);
    return s;
  }
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw_error("cannot read ", path, ": ", std::strerror(errno));
  gzbuffer(f, 1 << 17);
  std::string s;
  std::vector<char> buf(1 << 17);
  for (;;) {
    const int n = gzread(f, buf.data(), unsigned(buf.size()));
    if (n < 0) {
      int code = 0;
      std::string msg = gzerror(f, &code);
      gzclose(f);
      throw_error(path, ": gzip data is damaged (", msg, ")");
    }
    if (n == 0) break;
    s.append(buf.data(), size_t(n));
  }
  int code = 0;
  const char* msg = gzerror(f, &code);
  if (code != Z_OK && code != Z_BUF_ERROR) {
    std::string m = msg;
    gzclose(f);
    throw_error(path, ": gzip data is damaged (", m, ")");
  }
  if (gzclose(f) != Z_OK) throw_error(path, ": gzip data is damaged or truncated");
  return s;
}

namespace {

// ---- output: shards of one split ------------------------------------------------------

class SplitWriter {
 public:
  SplitWriter(std::string dir, std::string split, ShardMeta base, int64_t shard_tokens, int64_t chunk_tokens)
      : dir_(std::move(dir)), split_(std::move(split)), base_(std::move(base)), shard_tokens_(shard_tokens),
        chunk_tokens_(chunk_tokens) {
    base_.split = split_;
  }
  void begin_document() {
    pending_doc_ = true;
    ++report_.documents;
  }
  void append(const uint32_t* t, int64_t n) {
    while (n > 0) {
      if (!w_ || w_->num_tokens() == shard_tokens_) open_next();
      if (pending_doc_) {
        w_->begin_document();
        pending_doc_ = false;
      }
      const int64_t m = std::min(n, shard_tokens_ - w_->num_tokens());
      w_->append(t, m);
      report_.tokens += m;
      t += m;
      n -= m;
    }
  }
  // Closes the last shard and stamps every shard with its index and the shard count.
  SplitReport finish() {
    if (w_) w_->finish();
    w_.reset();
    for (size_t i = 0; i < paths_.size(); ++i) set_shard_position(paths_[i], int64_t(i), int64_t(paths_.size()));
    report_.shards = int64_t(paths_.size());
    return report_;
  }
  const SplitReport& report() const { return report_; }

 private:
  void open_next() {
    if (w_) w_->finish();
    char name[32];
    std::snprintf(name, sizeof name, "shard_%05zu.h5", paths_.size());
    paths_.push_back(dir_ + "/" + name);
    ShardMeta m = base_;
    m.shard_index = int64_t(paths_.size()) - 1;
    w_ = std::make_unique<TokenShardWriter>(paths_.back(), m, chunk_tokens_);
  }
  std::string dir_, split_;
  ShardMeta base_;
  int64_t shard_tokens_, chunk_tokens_;
  std::unique_ptr<TokenShardWriter> w_;
  std::vector<std::string> paths_;
  bool pending_doc_ = false;
  SplitReport report_;
};

// Sends document d to val when floor((d+1) f) > floor(d f): evenly spread, exactly
// floor(N f) of N documents.
class DocRouter final : public TokenSink {
 public:
  DocRouter(SplitWriter& train, SplitWriter* val, double f) : train_(train), val_(val), f_(f) {}
  void begin_document() override {
    const bool to_val = val_ && f_ > 0 &&
                        std::floor(double(docs_ + 1) * f_) > std::floor(double(docs_) * f_);
    cur_ = to_val ? val_ : &train_;
    cur_->begin_document();
    ++docs_;
  }
  void append(const uint32_t* t, int64_t n) override {
    DT_CHECK(cur_, "append before begin_document");
    cur_->append(t, n);
    tokens_ += n;
  }
  int64_t documents() const { return docs_; }
  int64_t tokens() const { return tokens_; }

 private:
  SplitWriter& train_;
  SplitWriter* val_;
  double f_;
  SplitWriter* cur_ = nullptr;
  int64_t docs_ = 0, tokens_ = 0;
};

// ---- inputs ---------------------------------------------------------------------------

struct TextInput {
  std::string path;  // "-" = stdin
  int64_t bytes = 0;
};

bool has_extension(const std::string& name, const std::vector<std::string>& exts) {
  std::string n = name;
  if (n.size() > 3 && n.compare(n.size() - 3, 3, ".gz") == 0) n.resize(n.size() - 3);
  for (const auto& e : exts) {
    const std::string dot = "." + e;
    if (n.size() > dot.size() && n.compare(n.size() - dot.size(), dot.size(), dot) == 0) return true;
  }
  return false;
}

std::vector<std::string> walk(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  fs::recursive_directory_iterator it(dir, fs::directory_options::none, ec), end;
  if (ec) throw_error("input folder ", dir, ": ", ec.message());
  for (; it != end; it.increment(ec)) {
    if (ec) throw_error("input folder ", dir, ": ", ec.message());
    std::error_code ec2;
    if (it->is_regular_file(ec2)) out.push_back(it->path().string());
  }
  if (ec) throw_error("input folder ", dir, ": ", ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

int64_t size_of(const std::string& path) {
  std::error_code ec;
  const auto n = fs::file_size(path, ec);
  return ec ? 0 : int64_t(n);
}

// ---- parallel, ordered tokenisation of text inputs ----------------------------------------

struct TextResult {
  bool done = false;
  bool binary = false;
  bool duplicate_hint = false;  // an earlier input has the same content (not tokenised)
  uint64_t hash = 0;
  int64_t bytes = 0, text_bytes = 0;
  int64_t empty_docs = 0;
  std::vector<std::vector<uint32_t>> docs;  // tokens of each document, EOS appended
  std::exception_ptr error;
};

uint64_t content_hash(const std::string& s) {
  return std::hash<std::string_view>()(std::string_view(s)) ^ (uint64_t(s.size()) * 0x9E3779B97F4A7C15ull);
}

class TextPipeline {
 public:
  TextPipeline(const std::vector<TextInput>& inputs, const Tokenizer& tok, const PrepareOptions& o)
      : inputs_(inputs), tok_(tok), o_(o), results_(inputs.size()) {
    threads_ = o.threads > 0 ? o.threads : int(std::max(1u, std::thread::hardware_concurrency()));
    window_ = size_t(4 * threads_ + 8);
    for (int t = 0; t < threads_; ++t) pool_.emplace_back([this] { work(); });
  }
  ~TextPipeline() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : pool_) t.join();
  }
  // Waits (up to `timeout`) for input i; returns nullptr on timeout.
  TextResult* wait_for(size_t i, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lk(mu_);
    if (!cv_.wait_for(lk, timeout, [&] { return results_[i].done; })) return nullptr;
    return &results_[i];
  }
  // Frees input i's memory and lets the workers move on.
  void consumed(size_t i) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      results_[i].docs.clear();
      results_[i].docs.shrink_to_fit();
      consumed_ = i + 1;
    }
    cv_.notify_all();
  }

 private:
  void work() {
    for (;;) {
      size_t i;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || next_ >= inputs_.size() || next_ < consumed_ + window_; });
        if (stop_ || next_ >= inputs_.size()) return;
        i = next_++;
      }
      TextResult r;
      try {
        process(i, r);
      } catch (...) {
        r.error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lk(mu_);
        r.done = true;
        results_[i] = std::move(r);
      }
      cv_.notify_all();
    }
  }

  void process(size_t i, TextResult& r) {
    const TextInput& in = inputs_[i];
    std::string text;
    if (in.path == "-") {
      text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
      r.bytes = int64_t(text.size());
    } else {
      text = read_text_input(in.path);
      r.bytes = in.bytes;
    }
    r.text_bytes = int64_t(text.size());
    if (std::memchr(text.data(), 0, text.size())) {
      r.binary = true;
      return;
    }
    r.hash = content_hash(text);
    if (o_.dedup) {
      // Skip the work when an earlier input has the same content: the ordered consumer will
      // see that earlier input first and drop this one, whatever the timing.
      std::lock_guard<std::mutex> lk(claim_mu_);
      auto [it, fresh] = first_with_hash_.emplace(r.hash, i);
      if (!fresh) {
        if (it->second < i) {
          r.duplicate_hint = true;
          return;
        }
        it->second = i;
      }
    }
    const uint32_t eos = uint32_t(tok_.eos_id());
    auto add_doc = [&](std::string_view doc) {
      if (doc.empty()) {
        ++r.empty_docs;
        return;
      }
      std::vector<int32_t> ids = tok_.encode(std::string(doc));
      std::vector<uint32_t> u(ids.size() + 1);
      for (size_t k = 0; k < ids.size(); ++k) u[k] = uint32_t(ids[k]);
      u.back() = eos;
      r.docs.push_back(std::move(u));
    };
    const std::string& sep = o_.doc_separator;
    if (sep.empty()) {
      add_doc(text);
    } else {
      size_t s = 0;
      for (;;) {
        const size_t e = text.find(sep, s);
        add_doc(std::string_view(text).substr(s, e == std::string::npos ? std::string::npos : e - s));
        if (e == std::string::npos) break;
        s = e + sep.size();
      }
    }
  }

  const std::vector<TextInput>& inputs_;
  const Tokenizer& tok_;
  const PrepareOptions& o_;
  std::vector<TextResult> results_;
  std::vector<std::thread> pool_;
  int threads_ = 1;
  size_t window_ = 8;
  std::mutex mu_;
  std::condition_variable cv_;
  size_t next_ = 0, consumed_ = 0;
  bool stop_ = false;
  std::mutex claim_mu_;
  std::unordered_map<uint64_t, size_t> first_with_hash_;
};

// ---- the output folder ------------------------------------------------------------------

// `path` made absolute and normal, without a trailing separator (so OUT + ".tmp-PID" is a
// sibling of OUT, never inside it).
fs::path absolute_path(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::absolute(path, ec).lexically_normal();
  if (!p.has_filename() && p != p.root_path()) p = p.parent_path();
  return p;
}

// The same with symlinks resolved as far as the path exists: for containment checks.
fs::path resolved_path(const std::string& path) {
  std::error_code ec;
  const fs::path p = absolute_path(path);
  fs::path c = fs::weakly_canonical(p, ec);
  return ec ? p : c;
}

// `inner` is `outer` or lies below it (whole components: /a/bc is not below /a/b).
bool is_within(const fs::path& inner, const fs::path& outer) {
  return std::mismatch(outer.begin(), outer.end(), inner.begin(), inner.end()).first == outer.end();
}

// "" when `dir` holds a dataset prepare wrote and nothing else: prepare.json (its
// metadata, the marker), train/ and val/ holding only shard_*.h5. Else what is unexpected:
// --overwrite deletes the old OUT, so it must not be able to delete anything else.
std::string foreign_content(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "it is not a folder";
  bool marker = false;
  auto is_shard = [](const fs::directory_entry& e) {
    const std::string n = e.path().filename().string();
    std::error_code ec2;
    return e.is_regular_file(ec2) && !e.is_symlink(ec2) && n.size() > 9 && n.compare(0, 6, "shard_") == 0 &&
           n.compare(n.size() - 3, 3, ".h5") == 0;
  };
  fs::directory_iterator it(dir, ec), end;
  if (ec) return "it cannot be listed (" + ec.message() + ")";
  for (; it != end; it.increment(ec)) {
    const fs::directory_entry& e = *it;
    const std::string name = e.path().filename().string();
    std::error_code ec2;
    if (name == "prepare.json" && e.is_regular_file(ec2) && !e.is_symlink(ec2)) {
      std::ifstream f(e.path());
      const nlohmann::json j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
      marker = j.is_object() && j.contains("format") && j.contains("train") && j.contains("inputs");
      if (!marker) return "its prepare.json is not one prepare wrote";
      continue;
    }
    if ((name == "train" || name == "val") && e.is_directory(ec2) && !e.is_symlink(ec2)) {
      fs::directory_iterator sub(e.path(), ec2);
      if (ec2) return e.path().string() + " cannot be listed (" + ec2.message() + ")";
      for (; sub != end; sub.increment(ec2))
        if (!is_shard(*sub)) return "it holds " + sub->path().string() + ", which prepare does not write";
      if (ec2) return e.path().string() + " cannot be listed (" + ec2.message() + ")";
      continue;
    }
    return "it holds " + e.path().string() + ", which prepare does not write";
  }
  if (ec) return "it cannot be listed (" + ec.message() + ")";
  if (!marker) return "it has no prepare.json (the file prepare writes into every dataset)";
  return "";
}

// Refuses an --out that a mistake would make destructive: /, $HOME or a folder above it,
// an input or a folder holding one; an existing folder without --overwrite, or with it
// when the folder is not a dataset prepare wrote.
void check_output_folder(const PrepareOptions& o, const fs::path& out) {
  const fs::path real = resolved_path(o.out);
  if (real == real.root_path()) throw_error("--out=", o.out, ": refusing to write the dataset over the root folder");
  // (HOME=/ in some containers: then only / itself, refused above, is the home folder.)
  if (const char* home = std::getenv("HOME"); home && *home) {
    const fs::path h = resolved_path(home);
    if (h != h.root_path() && is_within(h, real))
      throw_error("--out=", o.out, ": refusing to write the dataset over the home folder ", home,
                  real == h ? "" : " (or a folder holding it)");
  }
  for (const auto& in : o.inputs) {
    if (in == "-") continue;
    if (is_within(resolved_path(in), real))
      throw_error("--out=", o.out, " is the input ", in, " or a folder holding it: choose an output folder apart from the inputs");
  }
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(out, ec))) return;
  if (!o.overwrite) throw_error("output folder ", o.out, " already exists (pass --overwrite to replace it)");
  const std::string why = foreign_content(out);
  if (!why.empty())
    throw_error("--overwrite: ", o.out, " is not a dataset written by difftron prepare (", why,
                "); refusing to replace it: choose another --out or remove it yourself");
}

// Removes the temporary output folder unless release() was called.
struct TempDirGuard {
  std::string path;
  bool keep = false;
  ~TempDirGuard() {
    if (!keep && !path.empty()) {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  }
};

}  // namespace

// ---- the steps of prepare_dataset --------------------------------------------------------

void check_options(const PrepareOptions& o) {
  if (o.inputs.empty()) throw_error("--input: no input given (files, folders or - for stdin)");
  if (o.out.empty()) throw_error("--out: no output folder given");
  if (o.shard_tokens <= 0) throw_error("--shard_tokens (", o.shard_tokens, ") must be positive");
  if (o.chunk_tokens <= 0) throw_error("--chunk_tokens (", o.chunk_tokens, ") must be positive");
  if (o.shard_tokens > kMaxShardTokens)
    throw_error("--shard_tokens (", o.shard_tokens, ") must be in [1, 2^40] (the most a shard may hold)");
  if (o.chunk_tokens > kMaxChunkTokens)
    throw_error("--chunk_tokens (", o.chunk_tokens, ") must be in [1, 2^28] (HDF5 chunks stay below 4 GiB)");
  if (!(o.val_fraction >= 0 && o.val_fraction < 1))
    throw_error("--val_fraction (", o.val_fraction, ") must be in [0, 1)");
  if (o.threads < 0 || o.threads > kMaxThreads)
    throw_error("--jobs (", o.threads, ") must be in [0, ", kMaxThreads, "] (0 = all cores)");
  if (o.import_vocab_size < 0 || o.import_vocab_size > (int64_t(1) << 32))
    throw_error("--import_vocab_size (", o.import_vocab_size, ") must be in [0, 2^32] (0 = from the format)");
  if (o.import_eos_id < -2 || o.import_eos_id >= (int64_t(1) << 32))
    throw_error("--import_eos_id (", o.import_eos_id, ") must be in [-2, 2^32)");
}

// The inputs: text files (by extension from folders) or token files of one format, not both.
struct Inputs {
  std::vector<TextInput> texts;
  std::vector<TokenFileInfo> tokens;
};

Inputs gather_inputs(const PrepareOptions& o, bool forced_tokens, TokenFileFormat forced, PrepareReport& rep) {
  Inputs in_files;
  std::vector<TextInput>& texts = in_files.texts;
  std::vector<TokenFileInfo>& tokens = in_files.tokens;
  for (const std::string& in : o.inputs) {
    if (in == "-") {
      if (forced_tokens) throw_error("--input=-: stdin is read as text; token formats need files");
      texts.push_back({"-", 0});
      continue;
    }
    std::error_code ec;
    if (!fs::exists(in, ec)) {
      // a Megatron dataset is named by its prefix: PREFIX.bin + PREFIX.idx
      if ((o.format == "auto" || o.format == "megatron") && fs::is_regular_file(in + ".bin", ec) &&
          fs::is_regular_file(in + ".idx", ec)) {
        tokens.push_back(probe_token_file(in, TokenFileFormat::Megatron));
        continue;
      }
      throw_error("input '", in, "': no such file or directory");
    }
    if (fs::is_directory(in, ec)) {
      for (const std::string& f : walk(in)) {
        if (forced_tokens) {
          const std::string name = fs::path(f).filename().string();
          auto ends = [&](const char* e) {
            return name.size() > std::strlen(e) && name.compare(name.size() - std::strlen(e), std::strlen(e), e) == 0;
          };
          const bool take = forced == TokenFileFormat::Llmc       ? ends(".bin")
                            : forced == TokenFileFormat::Megatron ? ends(".idx")
                            : forced == TokenFileFormat::Npy      ? ends(".npy")
                                                                  : true;
          if (take) tokens.push_back(probe_token_file(f, forced));
          else ++rep.skipped_extension;
        } else if (has_extension(fs::path(f).filename().string(), o.extensions)) {
          texts.push_back({f, size_of(f)});
        } else {
          ++rep.skipped_extension;
        }
      }
      continue;
    }
    TokenFileFormat f;
    if (forced_tokens) tokens.push_back(probe_token_file(in, forced));
    else if (o.format == "auto" && detect_token_format(in, &f)) tokens.push_back(probe_token_file(in, f));
    else texts.push_back({in, size_of(in)});
  }
  if (!texts.empty() && !tokens.empty())
    throw_error("inputs mix text (", texts[0].path, ") and token files (", tokens[0].path,
                "); prepare them separately");
  if (texts.empty() && tokens.empty())
    throw_error("no input files found in ", o.inputs[0], (o.inputs.size() > 1 ? " ..." : ""),
                " (text files are taken from folders by extension: --extensions)");

  return in_files;
}

// The dataset's vocabulary, EOS and tokenizer spec: the tokenizer's for text; for token files
// the format's defaults, a --tokenizer's, or --import_vocab_size / --import_eos_id.
ShardMeta shard_meta(const PrepareOptions& o, const Inputs& in, std::unique_ptr<Tokenizer>& tok, PrepareReport& rep) {
  const std::vector<TextInput>& texts = in.texts;
  const std::vector<TokenFileInfo>& tokens = in.tokens;
  ShardMeta base;
  if (!texts.empty()) {
    rep.format = "text";
    tok = load_tokenizer(o.tokenizer.empty() ? "bytes" : o.tokenizer, o.eos_token);
    if (tok->eos_id() < 0)
      throw_error("tokenizer ", o.tokenizer, " has no EOS token I recognise; name one with --eos_token");
    base.vocab_size = tok->vocab_size();
    base.eos_id = tok->eos_id();
    base.tokenizer = tok->spec();
  } else {
    rep.format = token_format_name(tokens[0].format);
    int64_t vocab = tokens[0].default_vocab, eos = tokens[0].default_eos;
    for (const auto& t : tokens)
      if (t.default_vocab != vocab || t.default_eos != eos || t.format != tokens[0].format)
        throw_error("token files ", tokens[0].path, " and ", t.path, " differ in format or vocabulary");
    base.tokenizer = "none";
    if (!o.tokenizer.empty()) {
      tok = load_tokenizer(o.tokenizer, o.eos_token);
      vocab = tok->vocab_size();
      eos = tok->eos_id();
      base.tokenizer = tok->spec();
    }
    if (o.import_vocab_size > 0) vocab = o.import_vocab_size;
    if (o.import_eos_id != -2) eos = o.import_eos_id;
    if (vocab <= 0)
      throw_error("the vocabulary of ", tokens[0].path, " is unknown: pass --import_vocab_size (or --tokenizer)");
    if (eos == -2) eos = -1;  // no EOS known: each file is one document
    if (eos < -1 || eos >= vocab)
      throw_error("--import_eos_id ", eos, " is outside [-1, vocabulary size ", vocab, ")");
    base.vocab_size = vocab;
    base.eos_id = eos;
  }
  rep.vocab_size = base.vocab_size;
  rep.eos_id = base.eos_id;
  {
    std::ostringstream src;
    src << "difftron prepare: " << rep.format << " from";
    for (size_t i = 0; i < o.inputs.size() && i < 8; ++i) src << " " << o.inputs[i];
    if (o.inputs.size() > 8) src << " ...";
    base.source = src.str();
  }

  return base;
}

// prepare.json: what was read, skipped and written (also the marker --overwrite looks for).
void write_manifest(const PrepareOptions& o, const PrepareReport& rep, const std::string& dir) {
  nlohmann::json j;
  j["written_by"] = "difftron prepare";
  j["format"] = rep.format;
  j["inputs"] = o.inputs;
  j["vocab_size"] = rep.vocab_size;
  j["eos_id"] = rep.eos_id;
  j["files_read"] = rep.files_read;
  j["bytes_read"] = rep.bytes_read;
  j["skipped"] = {{"extension", rep.skipped_extension}, {"binary", rep.skipped_binary},
                  {"duplicate", rep.skipped_duplicate}, {"empty_documents", rep.skipped_empty}};
  j["train"] = {{"documents", rep.train.documents}, {"tokens", rep.train.tokens}, {"shards", rep.train.shards}};
  j["val"] = {{"documents", rep.val.documents}, {"tokens", rep.val.tokens}, {"shards", rep.val.shards}};
  j["val_fraction"] = o.val_fraction;
  j["shard_tokens"] = o.shard_tokens;
  std::ofstream f(dir + "/prepare.json");
  f << j.dump(2) << "\n";
  if (!f) throw_error("cannot write ", dir, "/prepare.json");
}

// Renames the finished temporary folder to OUT, replacing an old OUT (checked again: it may
// have changed during the run) only once the new one is complete.
void publish(const PrepareOptions& o, const fs::path& out_path, TempDirGuard& tmp) {
  std::error_code ec;
  const std::string out = out_path.string();
  check_output_folder(o, out_path);  // again: OUT may have changed during the run
  if (fs::exists(fs::symlink_status(out, ec))) {
    const std::string old = out + ".old-" + std::to_string(::getpid());
    fs::rename(out, old, ec);
    if (ec) throw_error("cannot move the existing ", out, " aside: ", ec.message());
    fs::rename(tmp.path, out, ec);
    if (ec) {
      std::error_code ec2;
      fs::rename(old, out, ec2);
      throw_error("cannot rename ", tmp.path, " to ", out, ": ", ec.message());
    }
    fs::remove_all(old, ec);
  } else {
    fs::rename(tmp.path, out, ec);
    if (ec) throw_error("cannot rename ", tmp.path, " to ", out, ": ", ec.message());
  }
  tmp.keep = true;
}

PrepareReport prepare_dataset(const PrepareOptions& o) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  PrepareReport rep;
  check_options(o);
  TokenFileFormat forced{};
  const bool forced_tokens = parse_token_format(o.format, &forced);
  if (!forced_tokens && o.format != "auto" && o.format != "text")
    throw_error("--input_format: unknown format '", o.format,
                "' (expected auto, text, llmc, megatron, npy, raw16 or raw32)");
  const fs::path out_path = absolute_path(o.out);
  check_output_folder(o, out_path);  // before any work: a refused --out costs nothing

  const Inputs in = gather_inputs(o, forced_tokens, forced, rep);
  const std::vector<TextInput>& texts = in.texts;
  const std::vector<TokenFileInfo>& tokens = in.tokens;
  std::unique_ptr<Tokenizer> tok;
  const ShardMeta base = shard_meta(o, in, tok, rep);

  // ---- output folder, built under a temporary name
  std::error_code ec;
  const std::string out = out_path.string();
  TempDirGuard tmp{out + ".tmp-" + std::to_string(::getpid())};  // a sibling: renamed into place at the end
  fs::remove_all(tmp.path, ec);
  fs::create_directories(tmp.path + "/train", ec);
  if (ec) throw_error("cannot create ", tmp.path, "/train: ", ec.message());
  const bool want_val = o.val_fraction > 0;
  if (want_val) fs::create_directories(tmp.path + "/val", ec);
  if (ec) throw_error("cannot create ", tmp.path, "/val: ", ec.message());
  SplitWriter train(tmp.path + "/train", "train", base, o.shard_tokens, o.chunk_tokens);
  std::unique_ptr<SplitWriter> val;
  if (want_val) val = std::make_unique<SplitWriter>(tmp.path + "/val", "val", base, o.shard_tokens, o.chunk_tokens);
  DocRouter router(train, val.get(), o.val_fraction);

  PrepareProgress prog;
  auto last_report = clock::now();
  auto report = [&](bool force) {
    const auto now = clock::now();
    if (!o.on_progress || (!force && now - last_report < std::chrono::milliseconds(500))) return;
    last_report = now;
    prog.tokens = router.tokens();
    prog.seconds = std::chrono::duration<double>(now - t0).count();
    o.on_progress(prog);
  };

  if (!texts.empty()) {
    prog.files_total = int64_t(texts.size());
    for (const auto& t : texts) prog.bytes_total += t.bytes;
    if (std::any_of(texts.begin(), texts.end(), [](const TextInput& t) { return t.path == "-"; }))
      prog.bytes_total = 0;
    TextPipeline pipe(texts, *tok, o);
    std::unordered_set<uint64_t> seen;
    for (size_t i = 0; i < texts.size(); ++i) {
      TextResult* r;
      while (!(r = pipe.wait_for(i, std::chrono::milliseconds(250)))) report(false);
      if (r->error) std::rethrow_exception(r->error);
      prog.files_done = int64_t(i + 1);
      prog.bytes_done += r->bytes;
      prog.text_bytes += r->text_bytes;
      rep.bytes_read += r->text_bytes;
      if (r->binary) {
        ++rep.skipped_binary;
      } else if (o.dedup && !seen.insert(r->hash).second) {
        ++rep.skipped_duplicate;
      } else {
        DT_CHECK(!r->duplicate_hint, "input ", texts[i].path, " was skipped as a duplicate of nothing seen");
        ++rep.files_read;
        rep.skipped_empty += r->empty_docs;
        for (const auto& d : r->docs) {
          router.begin_document();
          router.append(d.data(), int64_t(d.size()));
        }
      }
      pipe.consumed(i);
      report(false);
    }
  } else {
    prog.files_total = int64_t(tokens.size());
    for (const auto& t : tokens) prog.bytes_total += t.file_bytes;
    struct ProgressSink final : TokenSink {
      DocRouter& r;
      std::function<void()> tick;
      int64_t since = 0;
      ProgressSink(DocRouter& rr, std::function<void()> t) : r(rr), tick(std::move(t)) {}
      void begin_document() override { r.begin_document(); }
      void append(const uint32_t* t, int64_t n) override {
        r.append(t, n);
        if ((since += n) > (1 << 22)) {
          since = 0;
          tick();
        }
      }
    } sink(router, [&] { report(false); });
    for (const auto& t : tokens) {
      import_token_file(t, base.vocab_size, base.eos_id, sink);
      ++rep.files_read;
      ++prog.files_done;
      prog.bytes_done += t.file_bytes;
      prog.text_bytes += t.file_bytes;
      rep.bytes_read += t.file_bytes;
      report(false);
    }
  }

  rep.train = train.finish();
  if (val) rep.val = val->finish();
  if (rep.train.tokens == 0)
    throw_error("no tokens were produced from ", o.inputs[0], (o.inputs.size() > 1 ? " ..." : ""), " (",
                rep.files_read, " files read, ", rep.skipped_binary, " binary, ", rep.skipped_duplicate,
                " duplicates, ", rep.skipped_extension, " skipped by extension)");
  if (want_val && rep.val.documents == 0)
    throw_error("no document went to the validation split: ", router.documents(), " document(s) with --val_fraction ",
                o.val_fraction, " (use more documents, a larger fraction, --doc_separator, or --val_fraction=0)");
  rep.seconds = std::chrono::duration<double>(clock::now() - t0).count();

  write_manifest(o, rep, tmp.path);
  publish(o, out_path, tmp);
  report(true);
  return rep;
}

}  // namespace difftron
