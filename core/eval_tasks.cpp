// Evaluation tasks (core/eval_tasks.h, docs/EVAL.md): host-side statistics and simulated
// quantisation through the model's forward probe, and the multi-needle task.
#include "core/eval_tasks.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>

#include "base/rng.h"

namespace difftron {

// ---- host threads ----------------------------------------------------------------------

namespace {
std::atomic<int> g_host_threads{0};
}

int host_threads() {
  const int n = g_host_threads.load();
  if (n > 0) return n;
  const unsigned hw = std::thread::hardware_concurrency();
  return int(std::min(32u, std::max(1u, hw)));
}

void set_host_threads(int n) {
  if (n < 0) throw_error("host threads (", n, ") must be >= 0 (0: the machine's cores, at most 32)");
  g_host_threads = n;
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(host_threads(), n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next = n;  // stop handing out work
      }
    }
  };
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

namespace {
// Rows of a head's causal attention per parallel piece: enough pieces for the threads, few
// enough that each amortises its scheduling.
constexpr int64_t kRowsPerPiece = 32;
int64_t row_pieces(int64_t S) { return (S + kRowsPerPiece - 1) / kRowsPerPiece; }
}  // namespace

void fake_quantize_rows(float* x, int64_t rows, int64_t cols, int bits) {
  if (bits < 2 || bits > 16) throw_error("quantisation bits (", bits, ") must be in [2, 16]");
  const double levels = double((int64_t(1) << (bits - 1)) - 1);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * cols;
    double m = 0;
    for (int64_t c = 0; c < cols; ++c) m = std::max(m, std::fabs(double(row[c])));
    if (m == 0 || !std::isfinite(m)) continue;
    const double step = m / levels;
    for (int64_t c = 0; c < cols; ++c) row[c] = float(std::round(double(row[c]) / step) * step);
  }
}

double kurtosis(const float* x, int64_t n) {
  if (n <= 0) return 0;
  double mean = 0;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= double(n);
  double m2 = 0, m4 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = x[i] - mean, d2 = d * d;
    m2 += d2;
    m4 += d2 * d2;
  }
  m2 /= double(n);
  m4 /= double(n);
  return m2 > 0 ? m4 / (m2 * m2) : 0.0;
}

// ---- host attention ---------------------------------------------------------------------

HostAttention::HostAttention(Ops& ops, const Tensor& q_t, const Tensor& k_t) {
  differential = q_t.ndim() == 5;
  B = q_t.dim(0);
  S = q_t.dim(1);
  dh = q_t.dim(-1);
  H = q_t.numel() / (B * S * dh);
  H_kv = k_t.numel() / (B * S * dh);
  q.resize(q_t.numel());
  k.resize(k_t.numel());
  ops.download(q_t, q.data());
  ops.download(k_t, k.data());
}

int64_t HostAttention::kv_head(int64_t a) const {
  if (differential) {  // map j of diff head i reads map j of K group i / (h / h_kv)
    const int64_t h = H / 2, h_kv = H_kv / 2;
    return 2 * ((a / 2) / (h / h_kv)) + a % 2;
  }
  return a / (H / H_kv);
}

void HostAttention::scores(int64_t b, int64_t a, int64_t t, float* out) const {
  const float* qr = &q[((b * S + t) * H + a) * dh];
  const int64_t g = kv_head(a);
  const double scale = 1.0 / std::sqrt(double(dh));
  for (int64_t j = 0; j <= t; ++j) {
    const float* kr = &k[((b * S + j) * H_kv + g) * dh];
    double dot = 0;
    for (int64_t c = 0; c < dh; ++c) dot += double(qr[c]) * double(kr[c]);
    out[j] = float(dot * scale);
  }
}

void HostAttention::probabilities(int64_t b, int64_t a, int64_t t, double* p) const {
  std::vector<float> s(t + 1);
  scores(b, a, t, s.data());
  double mx = -INFINITY, sum = 0;
  for (int64_t j = 0; j <= t; ++j) mx = std::max(mx, double(s[j]));
  for (int64_t j = 0; j <= t; ++j) sum += p[j] = std::exp(double(s[j]) - mx);
  for (int64_t j = 0; j <= t; ++j) p[j] /= sum;
}

// ---- activation statistics -------------------------------------------------------------------

ActivationStatsProbe::ActivationStatsProbe(Ops& ops, int64_t n_layers) : ops_(ops), stats_(n_layers) {
  for (auto& s : stats_) s.max_attn_logit = -std::numeric_limits<double>::infinity();
}

bool ActivationStatsProbe::attention(int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& lambda, Tensor& out) {
  const HostAttention att(ops_, q, k);
  // pieces: (sequence, head, block of query rows), each its own maximum; the maximum of those
  const int64_t pieces = row_pieces(att.S), n = att.B * att.H * pieces;
  std::vector<double> tops(n, -std::numeric_limits<double>::infinity());
  parallel_for(n, [&](int64_t i) {
    const int64_t b = i / (att.H * pieces), a = (i / pieces) % att.H, t0 = (i % pieces) * kRowsPerPiece;
    std::vector<float> row(att.S);
    double top = tops[i];
    for (int64_t t = t0; t < std::min(att.S, t0 + kRowsPerPiece); ++t) {
      att.scores(b, a, t, row.data());
      for (int64_t j = 0; j <= t; ++j) top = std::max(top, double(row[j]));
    }
    tops[i] = top;
  });
  double top = stats_.at(layer).max_attn_logit;
  for (double x : tops) top = std::max(top, x);
  stats_[layer].max_attn_logit = top;
  return false;  // the model computes the attention itself
}

void ActivationStatsProbe::layer_output(int64_t layer, const Tensor& x) {
  const int64_t n = x.rows(), d = x.cols();
  std::vector<float> host(x.numel());
  ops_.download(x, host.data());
  LayerActivationStats& s = stats_.at(layer);
  // each row's maximum and kurtosis apart, then summed in row order (as one thread would)
  std::vector<double> kurt(n), top(n, 0.0);
  const int64_t rows_per_piece = 256, pieces = (n + rows_per_piece - 1) / rows_per_piece;
  parallel_for(pieces, [&](int64_t p) {
    for (int64_t r = p * rows_per_piece; r < std::min(n, (p + 1) * rows_per_piece); ++r) {
      const float* row = &host[r * d];
      for (int64_t c = 0; c < d; ++c) top[r] = std::max(top[r], std::fabs(double(row[c])));
      kurt[r] = kurtosis(row, d);
    }
  });
  for (int64_t r = 0; r < n; ++r) {
    s.hidden_max = std::max(s.hidden_max, top[r]);
    s.hidden_kurtosis += kurt[r];
  }
  s.tokens += n;
}

std::vector<LayerActivationStats> ActivationStatsProbe::stats() const {
  std::vector<LayerActivationStats> out = stats_;
  for (auto& s : out)
    if (s.tokens > 0) s.hidden_kurtosis /= double(s.tokens);
  return out;
}

// ---- simulated quantisation -------------------------------------------------------------------

QuantizeProbe::QuantizeProbe(Ops& ops, int act_bits, int logit_bits)
    : ops_(ops), act_bits_(act_bits), logit_bits_(logit_bits) {
  if (act_bits != 0 && (act_bits < 2 || act_bits > 16)) throw_error("activation bits (", act_bits, ") must be 0 or in [2, 16]");
  if (logit_bits != 0 && (logit_bits < 2 || logit_bits > 16))
    throw_error("attention logit bits (", logit_bits, ") must be 0 or in [2, 16]");
}

void QuantizeProbe::linear_input(int64_t layer, LinearInput site, Tensor& x) {
  if (act_bits_ == 0) return;
  std::vector<float> host(x.numel());
  ops_.download(x, host.data());
  const int64_t rows = x.rows(), cols = x.cols(), rows_per_piece = 256;
  parallel_for((rows + rows_per_piece - 1) / rows_per_piece, [&](int64_t p) {  // rows are independent
    const int64_t r0 = p * rows_per_piece;
    fake_quantize_rows(host.data() + r0 * cols, std::min(rows_per_piece, rows - r0), cols, act_bits_);
  });
  ops_.upload(x, host.data());
}

bool QuantizeProbe::attention(int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v_t,
                              const Tensor& lambda_t, Tensor& out_t) {
  if (logit_bits_ == 0) return false;
  const HostAttention att(ops_, q, k);
  const int64_t B = att.B, S = att.S, H = att.H, dh = att.dh;
  // V1: V rows of 2dh per K group, the two maps of a diff head subtracted with lambda.
  const int64_t vw = att.differential ? 2 * dh : dh, v_heads = v_t.numel() / (B * S * vw);
  std::vector<float> v(v_t.numel()), out(out_t.numel(), 0.0f);
  ops_.download(v_t, v.data());
  double lambda = 0;
  if (att.differential) ops_.download(lambda_t, &lambda);
  const int64_t out_heads = att.differential ? H / 2 : H, maps = att.differential ? 2 : 1;
  // pieces: (sequence, output head, block of query rows); each output row is written by one
  // piece only, V1's two maps in order (map 1's term, then map 2's), as one thread would
  const int64_t pieces = row_pieces(S);
  parallel_for(B * out_heads * pieces, [&](int64_t i) {
    const int64_t b = i / (out_heads * pieces), oh = (i / pieces) % out_heads, t0 = (i % pieces) * kRowsPerPiece;
    std::vector<float> p(S);
    std::vector<double> o(vw);
    for (int64_t t = t0; t < std::min(S, t0 + kRowsPerPiece); ++t)
      for (int64_t m = 0; m < maps; ++m) {
        const int64_t a = oh * maps + m;
        const int64_t vh = att.differential ? att.kv_head(a) / 2 : att.kv_head(a);
        const double sign = m == 1 ? -lambda : 1.0;
        att.scores(b, a, t, p.data());
        fake_quantize_rows(p.data(), 1, t + 1, logit_bits_);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= t; ++j) mx = std::max(mx, double(p[j]));
        std::fill(o.begin(), o.end(), 0.0);
        for (int64_t j = 0; j <= t; ++j) {
          const double e = std::exp(double(p[j]) - mx);
          sum += e;
          const float* vr = &v[((b * S + j) * v_heads + vh) * vw];
          for (int64_t c = 0; c < vw; ++c) o[c] += e * vr[c];
        }
        float* orow = &out[((b * S + t) * out_heads + oh) * vw];
        for (int64_t c = 0; c < vw; ++c) orow[c] += float(sign * o[c] / sum);
      }
  });
  ops_.upload(out_t, out.data());
  return true;
}

// ---- attention noise ---------------------------------------------------------------------

AttentionNoiseProbe::AttentionNoiseProbe(Model& model)
    : model_(model), kind_(model.config().attention), sums_(model.config().n_layers),
      last_rows_(model.config().n_layers) {
  if (model.tp_size() != 1) throw_error("the attention noise probe needs the whole model (TP 1), not TP ", model.tp_size());
  if (kind_ == AttentionKind::DifferentialV2) {
    w_lambda_.resize(model.config().n_layers);
    for (int64_t l = 0; l < model.config().n_layers; ++l) {
      const Tensor& w = model.param("model.layers." + std::to_string(l) + ".self_attn.lambda_proj.weight").value;
      w_lambda_[l].resize(w.numel());
      model.ops().download(w, w_lambda_[l].data());
    }
  }
}

void AttentionNoiseProbe::set_query(int64_t t, int64_t span_begin, int64_t span_end) {
  if (t < 0 || span_begin < 0 || span_begin >= span_end || span_end > t + 1)
    throw_error("attention noise: the answer span [", span_begin, ", ", span_end, ") must be a non-empty range within the "
                "query position's keys 0..", t);
  t_ = t;
  span_begin_ = span_begin;
  span_end_ = span_end;
}

void AttentionNoiseProbe::linear_input(int64_t layer, LinearInput site, Tensor& x) {
  if (kind_ != AttentionKind::DifferentialV2 || site != LinearInput::AttnNorm) return;
  if (t_ < 0 || t_ >= x.rows()) throw_error("attention noise: query position ", t_, " is not a token of this pass (",
                                            x.rows(), " tokens; call set_query first)");
  std::vector<float> row(x.cols());
  model_.ops().download(x.slice_rows(t_, t_ + 1), row.data());
  ln1_row_.assign(row.begin(), row.end());
}

bool AttentionNoiseProbe::attention(int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& lambda_t, Tensor& out) {
  const HostAttention att(model_.ops(), q, k);
  if (att.B != 1) throw_error("attention noise: one sequence per forward pass, not ", att.B);
  if (t_ < 0 || t_ >= att.S) throw_error("attention noise: query position ", t_, " is not a token of this pass (",
                                         att.S, " tokens; call set_query first)");
  const int64_t t = t_, maps = kind_ == AttentionKind::Standard ? 1 : 2, out_heads = att.H / maps;
  double lambda = 0;
  if (kind_ == AttentionKind::Differential) model_.ops().download(lambda_t, &lambda);
  std::vector<double> weight(out_heads, lambda);  // what the second map is multiplied by
  if (kind_ == AttentionKind::DifferentialV2) {
    const int64_t d = int64_t(ln1_row_.size());
    const std::vector<float>& w = w_lambda_.at(layer);
    if (int64_t(w.size()) != out_heads * d) throw_error("attention noise: lambda_proj of layer ", layer, " has ", w.size(),
                                                        " values, not ", out_heads, " x ", d);
    for (int64_t i = 0; i < out_heads; ++i) {
      double z = 0;
      for (int64_t c = 0; c < d; ++c) z += ln1_row_[c] * double(w[i * d + c]);
      weight[i] = 1.0 / (1.0 + std::exp(-z));
    }
  }
  std::vector<std::vector<double>>& rows = last_rows_.at(layer);
  rows.assign(out_heads, std::vector<double>(t + 1, 0.0));
  parallel_for(out_heads, [&](int64_t i) {
    std::vector<double> p(t + 1);
    for (int64_t m = 0; m < maps; ++m) {
      att.probabilities(0, i * maps + m, t, p.data());
      const double f = m == 0 ? 1.0 : -weight[i];
      for (int64_t j = 0; j <= t; ++j) rows[i][j] += f * p[j];
    }
  });
  LayerNoiseStats& s = sums_.at(layer);
  for (int64_t i = 0; i < out_heads; ++i) {
    double answer = 0, noise = 0, noise_abs = 0;
    for (int64_t j = 0; j <= t; ++j) {
      const double e = rows[i][j];
      if (j >= span_begin_ && j < span_end_) {
        answer += e;
      } else {
        noise += e;
        noise_abs += std::fabs(e);
      }
    }
    s.answer += answer;
    s.noise += noise;
    s.noise_abs += noise_abs;
    s.row_sum += answer + noise;
    s.rows += 1;
  }
  return false;  // the model computes the attention itself
}

std::vector<LayerNoiseStats> AttentionNoiseProbe::stats() const {
  std::vector<LayerNoiseStats> out = sums_;
  for (auto& s : out)
    if (s.rows > 0) {
      const double n = double(s.rows);
      s.answer /= n;
      s.noise /= n;
      s.noise_abs /= n;
      s.row_sum /= n;
    }
  return out;
}

std::vector<int64_t> token_byte_offsets(const std::function<std::string(int32_t)>& decode_one,
                                        const std::vector<int32_t>& ids, const std::string& text) {
  std::vector<int64_t> offsets(ids.size() + 1, 0);
  std::string joined;
  for (size_t i = 0; i < ids.size(); ++i) {
    joined += decode_one(ids[i]);
    offsets[i + 1] = int64_t(joined.size());
  }
  if (joined != text)
    throw_error("the tokens do not decode, one by one, to the text they were encoded from (", joined.size(), " bytes from ",
                text.size(), "): the answer span cannot be located in tokens");
  return offsets;
}

std::pair<int64_t, int64_t> tokens_covering(const std::vector<int64_t>& offsets, int64_t begin, int64_t end) {
  if (offsets.size() < 2 || begin < 0 || begin >= end || end > offsets.back())
    throw_error("byte range [", begin, ", ", end, ") is not a non-empty range of the ",
                offsets.empty() ? 0 : offsets.back(), " bytes");
  // token i holds bytes [offsets[i], offsets[i + 1]); tokens of no bytes overlap nothing
  const int64_t n = int64_t(offsets.size()) - 1;
  int64_t first = 0;
  while (first < n && offsets[first + 1] <= begin) ++first;
  int64_t last = first;
  while (last < n && offsets[last] < end) ++last;
  return {first, last};
}

std::string needle_span_text(const std::string& city, const std::string& number) {
  return "The magic number of " + city + " is " + number + ".";
}

std::pair<int64_t, int64_t> find_needle_span(const std::string& prompt, const std::string& city, const std::string& number) {
  const std::string text = needle_span_text(city, number);
  const size_t at = prompt.find(text);
  if (at == std::string::npos) throw_error("the needle '", text, "' is not in the prompt");
  if (prompt.find(text, at + 1) != std::string::npos) throw_error("the needle '", text, "' is in the prompt more than once");
  return {int64_t(at), int64_t(at + text.size())};
}

// ---- multi-needle retrieval ---------------------------------------------------------------

namespace {

const char* const kCities[] = {
    "Amsterdam", "Athens",   "Bangkok",  "Barcelona", "Berlin",    "Bogota",    "Boston",     "Brussels",
    "Budapest",  "Cairo",    "Chicago",  "Copenhagen", "Dublin",   "Edinburgh", "Florence",   "Geneva",
    "Hamburg",   "Helsinki", "Istanbul", "Jakarta",   "Kyoto",     "Lagos",     "Lima",       "Lisbon",
    "London",    "Madrid",   "Manila",   "Melbourne", "Milan",     "Montreal",  "Moscow",     "Mumbai",
    "Munich",    "Nairobi",  "Naples",   "Oslo",      "Paris",     "Prague",    "Quito",      "Riga",
    "Rome",      "Santiago", "Seoul",    "Seville",   "Shanghai",  "Stockholm", "Sydney",     "Tallinn",
    "Tokyo",     "Toronto",  "Valencia", "Venice",    "Vienna",    "Warsaw",    "Zurich",     "Lyon",
};

// Filler: plain statements with no numbers and no cities, so that only the needles carry them.
const char* const kFiller[] = {
    "The grass is green and the sky is blue.",
    "A river runs slowly through the quiet valley.",
    "Most people enjoy a warm meal after a long day.",
    "The old library keeps its doors open until late in the evening.",
    "Birds gather on the wires when the weather turns cold.",
    "A good map makes a long journey feel shorter.",
    "The baker starts work long before the sun comes up.",
    "Children like to play in the park after school.",
    "The wind moved the leaves across the empty road.",
    "Fresh bread smells best in the early morning.",
    "The train was late again because of the heavy snow.",
    "A small boat drifted along the edge of the lake.",
    "Music filled the hall as the audience took their seats.",
    "The garden needs water every day during the summer.",
    "An open window lets the cool air into the room.",
    "The cat slept on the chair next to the fireplace.",
    "Clouds gathered over the hills in the afternoon.",
    "The market was busy with people buying fruit and vegetables.",
    "She read the letter twice before putting it away.",
    "The path climbs gently through the pine forest.",
};

std::string random_number(Rng& rng, int digits) {
  std::string s(1, char('1' + rng.below(9)));
  for (int i = 1; i < digits; ++i) s += char('0' + rng.below(10));
  return s;
}

}  // namespace

std::string needle_question(const std::string& city) {
  return "\nWhat is the magic number of " + city + "?\nThe magic number of " + city + " is";
}

NeedleSample make_needle_sample(const NeedleOptions& o, const std::function<int64_t(const std::string&)>& count_tokens) {
  const int64_t n_cities = int64_t(sizeof(kCities) / sizeof(kCities[0]));
  if (o.needles < 1 || o.needles > n_cities) throw_error("needles (", o.needles, ") must be in [1, ", n_cities, "]");
  if (o.queries < 1 || o.queries > o.needles) throw_error("queries (", o.queries, ") must be in [1, needles=", o.needles, "]");
  if (o.depth < 0 || o.depth > 1) throw_error("depth (", o.depth, ") must be in [0, 1]");
  if (o.digits < 1 || o.digits > 18) throw_error("digits (", o.digits, ") must be in [1, 18]");
  Rng rng(o.seed);
  NeedleSample s;
  s.options = o;
  // distinct cities and numbers
  std::vector<int64_t> order(n_cities);
  for (int64_t i = 0; i < n_cities; ++i) order[i] = i;
  for (int64_t i = n_cities - 1; i > 0; --i) std::swap(order[i], order[rng.below(uint64_t(i + 1))]);
  std::vector<Needle> needles(o.needles);
  for (int64_t i = 0; i < o.needles; ++i) {
    Needle& n = needles[i];
    n.city = kCities[order[i]];
    for (bool fresh = false; !fresh;) {
      n.number = random_number(rng, o.digits);
      fresh = std::none_of(needles.begin(), needles.begin() + i, [&](const Needle& m) { return m.number == n.number; });
    }
    n.sentence = "The magic number of " + n.city + " is " + n.number + ". ";
    n.queried = i < o.queries;
  }
  // filler sentences up to the budget left by the needles and the longest question
  int64_t budget = o.context_tokens;
  int64_t longest_question = 0;
  for (const Needle& n : needles) {
    budget -= count_tokens(n.sentence);
    if (n.queried) longest_question = std::max(longest_question, count_tokens(needle_question(n.city)));
  }
  budget -= longest_question;
  const int64_t n_filler = int64_t(sizeof(kFiller) / sizeof(kFiller[0]));
  std::vector<std::string> filler;
  for (int64_t used = 0;;) {
    std::string sentence = std::string(kFiller[rng.below(uint64_t(n_filler))]) + " ";
    const int64_t t = count_tokens(sentence);
    if (used + t > budget) break;
    used += t;
    filler.push_back(std::move(sentence));
  }
  // boundaries: slot i stands before filler sentence i (slot filler.size(): at the end)
  const int64_t n_slots = int64_t(filler.size()) + 1;
  std::vector<int64_t> slot(o.needles);
  for (int64_t i = 0; i < o.needles; ++i)
    slot[i] = needles[i].queried ? int64_t(std::llround(o.depth * double(filler.size())))
                                 : int64_t(rng.below(uint64_t(n_slots)));
  // assemble: at each slot, the queried needles first (in order), then the others
  for (int64_t k = 0; k < n_slots; ++k) {
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t i = 0; i < o.needles; ++i)
        if (slot[i] == k && needles[i].queried == (pass == 0)) {
          Needle n = needles[i];
          n.offset = int64_t(s.context.size());
          n.depth = filler.empty() ? 0.0 : double(k) / double(filler.size());
          s.context += n.sentence;
          s.needles.push_back(n);
        }
    if (k < int64_t(filler.size())) s.context += filler[k];
  }
  for (const Needle& n : needles)
    if (n.queried) {
      s.prompts.push_back(s.context + needle_question(n.city));
      s.answers.push_back(n.number);
      s.queried_cities.push_back(n.city);
      for (const Needle& m : s.needles)
        if (m.city == n.city) s.spans.push_back({m.offset, m.offset + int64_t(needle_span_text(m.city, m.number).size())});
    }
  return s;
}

bool needle_answer_correct(const std::string& generated, const std::string& number) {
  size_t i = 0;
  while (i < generated.size() && generated[i] == ' ') ++i;
  if (number.empty() || generated.compare(i, number.size(), number) != 0) return false;
  const size_t end = i + number.size();
  return end == generated.size() || !std::isdigit(static_cast<unsigned char>(generated[end]));
}

}  // namespace difftron
