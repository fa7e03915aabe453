// The streaming token loader and the dataset entry points of io/dataset.h: see loader.h.
// One reader thread per loader builds whole [B, S] batches into a ring of slots; the
// trainer's next_batch() only copies a finished slot out (or waits, which stats() counts).
#include "io/loader.h"

#include <glob.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "base/error.h"

namespace difftron {
namespace fs = std::filesystem;

// ---- shard lists and datasets ---------------------------------------------------------

std::vector<std::string> list_dataset_shards(const std::string& path) {
  if (path.empty()) throw_error("dataset path is empty");
  std::vector<std::string> out;
  std::error_code ec;
  if (path.find_first_of("*?[") != std::string::npos && !fs::exists(path, ec)) {
    glob_t g;
    int rc = ::glob(path.c_str(), 0, nullptr, &g);
    if (rc == 0)
      for (size_t i = 0; i < g.gl_pathc; ++i) out.push_back(g.gl_pathv[i]);
    globfree(&g);
    if (out.empty()) throw_error("dataset '", path, "': the pattern matches no file");
    std::sort(out.begin(), out.end());
    return out;
  }
  if (!fs::exists(path, ec)) throw_error("dataset '", path, "': no such file or directory");
  if (!fs::is_directory(path, ec)) return {path};
  bool has_train = false, has_val = false;
  for (const auto& e : fs::directory_iterator(path, ec)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory(ec)) {
      has_train |= name == "train";
      has_val |= name == "val";
      continue;
    }
    if (name.size() > 3 && name.compare(name.size() - 3, 3, ".h5") == 0) out.push_back(e.path().string());
  }
  if (ec) throw_error("dataset '", path, "': cannot list the directory: ", ec.message());
  if (out.empty()) {
    if (has_train || has_val)
      throw_error("dataset '", path, "' has no shards (*.h5) itself; it holds train/ and val/: pass '",
                  (fs::path(path) / "train").string(), "' (or val/)");
    throw_error("dataset '", path, "': no shards (*.h5) in the directory");
  }
  std::sort(out.begin(), out.end());
  return out;
}

TokenDataset::TokenDataset(const std::string& path, bool verify, int threads) : path_(path) {
  std::vector<std::string> files = list_dataset_shards(path);
  std::error_code ec;
  const bool is_dir = fs::is_directory(path, ec);
  // Opening (HDF5 calls, cheap) happens here, one shard after the other: HDF5 may be built
  // without thread safety. Verification reads the mapped tokens only, so it runs in parallel.
  for (const auto& f : files) shards_.push_back(std::make_unique<TokenShardReader>(f));
  if (verify) {
    int nt = threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
    nt = std::min<int>(nt, int(files.size()));
    std::atomic<size_t> next{0};
    std::vector<std::exception_ptr> errors(files.size());
    auto work = [&]() {
      for (size_t i; (i = next.fetch_add(1)) < files.size();) {
        try {
          shards_[i]->verify();
        } catch (...) {
          errors[i] = std::current_exception();
        }
      }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < nt; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
  }

  // Consistency: one vocabulary, tokenizer and EOS for the whole dataset.
  const ShardMeta& m0 = shards_[0]->meta();
  for (size_t i = 1; i < shards_.size(); ++i) {
    const ShardMeta& m = shards_[i]->meta();
    if (m.vocab_size != m0.vocab_size)
      throw_error("dataset '", path, "': vocab mismatch between shards: ", files[0], " has vocab_size ",
                  m0.vocab_size, ", ", files[i], " has ", m.vocab_size);
    if (m.eos_id != m0.eos_id)
      throw_error("dataset '", path, "': eos_id mismatch between shards: ", files[0], " has ", m0.eos_id,
                  ", ", files[i], " has ", m.eos_id);
    if (m.tokenizer != m0.tokenizer)
      throw_error("dataset '", path, "': tokenizer mismatch between shards ", files[0], " and ", files[i]);
  }
  // Completeness (directories): shards carry their index and the dataset's shard count.
  if (is_dir) {
    int64_t declared = 0;
    for (auto& s : shards_) declared = std::max(declared, s->meta().num_shards);
    if (declared > 0) {
      std::map<int64_t, size_t> by_index;
      for (size_t i = 0; i < shards_.size(); ++i) {
        const ShardMeta& m = shards_[i]->meta();
        if (m.num_shards != declared)
          throw_error("dataset '", path, "': ", files[i], " says the dataset has ", m.num_shards,
                      " shards, others say ", declared);
        if (m.shard_index < 0 || m.shard_index >= declared)
          throw_error("dataset '", path, "': ", files[i], " has shard_index ", m.shard_index,
                      " outside [0, ", declared, ")");
        if (!by_index.emplace(m.shard_index, i).second)
          throw_error("dataset '", path, "': shard_index ", m.shard_index, " appears twice (",
                      files[by_index[m.shard_index]], " and ", files[i], ")");
      }
      if (int64_t(by_index.size()) != declared) {
        int64_t missing = 0;
        while (by_index.count(missing)) ++missing;
        throw_error("dataset '", path, "' is incomplete: ", by_index.size(), " of ", declared,
                    " shards present (shard_index ", missing, " is missing)");
      }
      std::vector<std::unique_ptr<TokenShardReader>> ordered;
      for (auto& [idx, i] : by_index) ordered.push_back(std::move(shards_[i]));
      shards_ = std::move(ordered);
    }
  }
  vocab_ = m0.vocab_size;
  eos_ = m0.eos_id;
  tokenizer_ = m0.tokenizer;
  for (auto& s : shards_) {
    starts_.push_back(total_);
    total_ += s->num_tokens();
    documents_ += s->meta().num_documents;
  }
  if (total_ == 0) throw_error("dataset '", path, "' is empty (", shards_.size(), " shards, 0 tokens)");
}

void TokenDataset::read(int64_t start, int64_t n, int32_t* out) const {
  DT_CHECK(start >= 0 && n >= 0 && start + n <= total_, "read [", start, ", ", start + n, ") outside ",
           total_, " tokens");
  size_t k = size_t(std::upper_bound(starts_.begin(), starts_.end(), start) - starts_.begin()) - 1;
  while (n > 0) {
    const int64_t in = start - starts_[k];
    const int64_t m = std::min(n, shards_[k]->num_tokens() - in);
    if (m > 0) shards_[k]->read(in, m, out);
    out += m;
    start += m;
    n -= m;
    ++k;
  }
}

// ---- the permutation -------------------------------------------------------------------

static uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

IndexPermutation::IndexPermutation(uint64_t n, uint64_t seed, uint64_t epoch) : n_(n), epoch_(epoch) {
  int bits = 2;
  while (bits < 64 && (uint64_t(1) << bits) < n) ++bits;
  if (bits % 2) ++bits;
  half_bits_ = bits / 2;
  mask_ = (uint64_t(1) << half_bits_) - 1;
  uint64_t k = mix64(seed ^ 0x6A09E667F3BCC908ull) ^ mix64(epoch + 0x3C6EF372FE94F82Bull);
  for (uint64_t& key : keys_) key = k = mix64(k + 0x9E3779B97F4A7C15ull);
}

uint64_t IndexPermutation::encrypt(uint64_t x) const {
  uint64_t l = x >> half_bits_, r = x & mask_;
  for (uint64_t key : keys_) {
    const uint64_t f = mix64(r ^ key) & mask_;
    const uint64_t nl = r;
    r = l ^ f;
    l = nl;
  }
  return (l << half_bits_) | r;
}

uint64_t IndexPermutation::operator()(uint64_t i) const {
  DT_CHECK(i < n_, "permutation index ", i, " >= ", n_);
  uint64_t x = encrypt(i);
  while (x >= n_) x = encrypt(x);  // cycle walking: stays a bijection on [0, n)
  return x;
}

// ---- the loader ------------------------------------------------------------------------

TokenLoader::TokenLoader(std::shared_ptr<const TokenDataset> dataset, const DatasetOptions& options)
    : ds_(std::move(dataset)), o_(options) {
  if (o_.dp_size < 1 || o_.dp_rank < 0 || o_.dp_rank >= o_.dp_size)
    throw_error("data-parallel rank ", o_.dp_rank, " of ", o_.dp_size, " is invalid");
  if (o_.prefetch_batches < 1) throw_error("prefetch_batches ", o_.prefetch_batches, " must be >= 1");
  if (o_.cycle_batches < 0) throw_error("cycle_batches ", o_.cycle_batches, " must be >= 0");
  if (o_.vocab_size > 0 && ds_->vocab_size() > o_.vocab_size)
    throw_error("dataset '", ds_->path(), "' has vocab_size ", ds_->vocab_size(),
                " but the model's vocab_size is ", o_.vocab_size,
                " (the model needs at least the shards' vocabulary)");
}

TokenLoader::~TokenLoader() { stop_reader(); }

void TokenLoader::stop_reader() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lk(mu_);
  running_ = false;
  stop_ = false;
  filled_.clear();
  free_.clear();
}

void TokenLoader::start_reader(int64_t B, int64_t S) {
  // The reader restarts from the consumer's position: prefetched batches are dropped.
  const int64_t T = ds_->num_tokens();
  if (T - 1 < S)
    throw_error("dataset '", ds_->path(), "' has ", T, " tokens; sequence length ", S,
                " needs at least ", S + 1);
  B_ = B;
  S_ = S;
  samples_per_epoch_ = (T - 1) / S;
  r_samples_ = samples_;
  r_cycle_ = cycle_;
  slots_.assign(size_t(o_.prefetch_batches), Slot{});
  free_.clear();
  filled_.clear();
  for (int i = 0; i < o_.prefetch_batches; ++i) free_.push_back(i);
  stop_ = false;
  running_ = true;
  thread_ = std::thread([this] { reader_loop(); });
}

void TokenLoader::fill(Slot& slot, int64_t samples, int64_t B, int64_t S, std::vector<int32_t>& scratch,
                       std::unique_ptr<IndexPermutation>& perm) {
  slot.tokens.resize(size_t(B * S));
  slot.targets.resize(size_t(B * S));
  scratch.resize(size_t(S + 1));
  const int64_t N = samples_per_epoch_;
  const int64_t base = samples + int64_t(o_.dp_rank) * B;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t g = base + b;
    const int64_t epoch = g / N, k = g % N;
    int64_t p = k;
    if (o_.shuffle) {
      if (!perm || perm->size() != uint64_t(N) || perm->epoch() != uint64_t(epoch))
        perm = std::make_unique<IndexPermutation>(uint64_t(N), o_.seed, uint64_t(epoch));
      p = int64_t((*perm)(uint64_t(k)));
    }
    ds_->read(p * S, S + 1, scratch.data());
    std::memcpy(slot.tokens.data() + b * S, scratch.data(), size_t(S) * sizeof(int32_t));
    std::memcpy(slot.targets.data() + b * S, scratch.data() + 1, size_t(S) * sizeof(int32_t));
  }
}

void TokenLoader::reader_loop() {
  using clock = std::chrono::steady_clock;
  std::vector<int32_t> scratch;
  std::unique_ptr<IndexPermutation> perm;
  for (;;) {
    int idx;
    int64_t samples, cycle, B, S;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !free_.empty(); });
      if (stop_) return;
      idx = free_.front();
      free_.erase(free_.begin());
      samples = r_samples_;
      cycle = r_cycle_;
      B = B_;
      S = S_;
    }
    Slot& slot = slots_[size_t(idx)];
    auto t0 = clock::now();
    slot.error = nullptr;
    try {
      fill(slot, samples, B, S, scratch, perm);
    } catch (...) {
      slot.error = std::current_exception();
    }
    int64_t next = samples + B * o_.dp_size, next_cycle = o_.cycle_batches > 0 ? cycle + 1 : 0;
    if (o_.cycle_batches > 0 && next_cycle == o_.cycle_batches) next = next_cycle = 0;
    slot.next_samples = next;
    slot.next_cycle = next_cycle;
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    {
      std::lock_guard<std::mutex> lk(mu_);
      stats_.read_seconds += dt;
      filled_.push_back(idx);
      r_samples_ = next;
      r_cycle_ = next_cycle;
      if (slot.error) {  // deliver the error, then stop producing
        cv_.notify_all();
        return;
      }
    }
    cv_.notify_all();
  }
}

void TokenLoader::next_batch(int64_t B, int64_t S, int32_t* tokens, int32_t* targets) {
  using clock = std::chrono::steady_clock;
  if (B <= 0 || S <= 0) throw_error("next_batch: batch ", B, " and seq ", S, " must be positive");
  if (seq_ != 0 && S != seq_ && (samples_ != 0 || cycle_ != 0))
    throw_error("dataset '", ds_->path(), "': the position was reached with sequence length ", seq_,
                "; asked for ", S, " (samples are defined by the sequence length)");
  bool restart;
  {
    std::lock_guard<std::mutex> lk(mu_);
    restart = !running_ || B != B_ || S != S_;
  }
  if (restart) {
    stop_reader();
    std::lock_guard<std::mutex> lk(mu_);
    start_reader(B, S);
  }
  seq_ = S;
  auto t0 = clock::now();
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return !filled_.empty(); });
  stats_.wait_seconds += std::chrono::duration<double>(clock::now() - t0).count();
  const int idx = filled_.front();
  Slot& slot = slots_[size_t(idx)];
  if (slot.error) {
    std::exception_ptr e = slot.error;
    lk.unlock();
    stop_reader();  // the next call restarts at the same position (and fails the same way)
    std::rethrow_exception(e);
  }
  filled_.erase(filled_.begin());
  std::memcpy(tokens, slot.tokens.data(), size_t(B * S) * sizeof(int32_t));
  std::memcpy(targets, slot.targets.data(), size_t(B * S) * sizeof(int32_t));
  samples_ = slot.next_samples;
  cycle_ = slot.next_cycle;
  stats_.batches += 1;
  stats_.tokens += B * S;
  free_.push_back(idx);
  lk.unlock();
  cv_.notify_all();
}

std::string TokenLoader::describe() const {
  std::ostringstream os;
  std::lock_guard<std::mutex> lk(mu_);
  os << "token dataset " << ds_->path() << ": " << ds_->num_shards() << " shard(s), " << ds_->num_tokens()
     << " tokens, " << ds_->num_documents() << " documents, vocab " << ds_->vocab_size();
  if (o_.shuffle) os << ", shuffled (seed " << o_.seed << ")";
  else os << ", sequential";
  if (o_.dp_size > 1) os << ", dp rank " << o_.dp_rank << "/" << o_.dp_size;
  if (S_ > 0 && samples_per_epoch_ > 0)
    os << ", " << samples_per_epoch_ << " samples/epoch of seq " << S_ << ", at epoch "
       << double(samples_) / double(samples_per_epoch_);
  return os.str();
}

std::string TokenLoader::position() const {
  std::lock_guard<std::mutex> lk(mu_);
  nlohmann::json j;
  j["kind"] = "token_dataset";
  j["samples"] = samples_;
  j["cycle"] = cycle_;
  j["seq"] = seq_;
  j["seed"] = o_.seed;
  j["shuffle"] = o_.shuffle;
  j["dataset_tokens"] = ds_->num_tokens();
  return j.dump();
}

void TokenLoader::restore_position(const std::string& position) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(position);
  } catch (const std::exception& e) {
    throw_error("data-loader position is not valid JSON (", e.what(), "): ", position);
  }
  if (j.value("kind", "") != "token_dataset")
    throw_error("data-loader position is not a token-dataset position: ", position);
  try {
    const int64_t tokens = j.at("dataset_tokens").get<int64_t>();
    if (tokens != ds_->num_tokens())
      throw_error("dataset '", ds_->path(), "' has ", ds_->num_tokens(), " tokens but the saved position is for a dataset of ",
                  tokens, " tokens: it changed since, so the run cannot continue exactly");
    if (j.at("seed").get<uint64_t>() != o_.seed || j.at("shuffle").get<bool>() != o_.shuffle)
      throw_error("dataset '", ds_->path(), "': the saved position used seed ", j.at("seed").get<uint64_t>(),
                  " shuffle ", j.at("shuffle").get<bool>(), "; this loader uses seed ", o_.seed, " shuffle ",
                  o_.shuffle);
    const int64_t samples = j.at("samples").get<int64_t>(), cycle = j.at("cycle").get<int64_t>();
    const int64_t seq = j.at("seq").get<int64_t>();
    if (samples < 0 || cycle < 0 || seq < 0) throw_error("data-loader position has negative fields: ", position);
    stop_reader();
    std::lock_guard<std::mutex> lk(mu_);
    samples_ = samples;
    cycle_ = cycle;
    seq_ = seq;
  } catch (const nlohmann::json::exception& e) {
    throw_error("data-loader position lacks a field (", e.what(), "): ", position);
  }
}

LoaderStats TokenLoader::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

std::unique_ptr<TokenLoader> open_token_loader(const DatasetOptions& options) {
  auto ds = std::make_shared<const TokenDataset>(options.path, options.verify_checksums);
  return std::make_unique<TokenLoader>(std::move(ds), options);
}

// ---- io/dataset.h ----------------------------------------------------------------------

std::unique_ptr<BatchSource> open_token_dataset(const DatasetOptions& options) {
  return open_token_loader(options);
}

std::string dataset_tokenizer_spec(const std::string& path) {
  return TokenDataset(path, /*verify=*/false).tokenizer();
}

int64_t dataset_vocab_size(const std::string& path) {
  return TokenDataset(path, /*verify=*/false).vocab_size();
}

}  // namespace difftron
