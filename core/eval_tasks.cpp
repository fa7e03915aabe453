// Evaluation tasks (core/eval_tasks.h, docs/EVAL.md): host-side statistics and simulated
// quantisation through the model's forward probe, and the multi-needle task.
#include "core/eval_tasks.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>

#include "base/rng.h"

namespace difftron {

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

// ---- activation statistics -------------------------------------------------------------------

ActivationStatsProbe::ActivationStatsProbe(Ops& ops, int64_t n_layers) : ops_(ops), stats_(n_layers) {
  for (auto& s : stats_) s.max_attn_logit = -std::numeric_limits<double>::infinity();
}

bool ActivationStatsProbe::attention(int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& lambda, Tensor& out) {
  const HostAttention att(ops_, q, k);
  std::vector<float> row(att.S);
  double top = stats_.at(layer).max_attn_logit;
  for (int64_t b = 0; b < att.B; ++b)
    for (int64_t a = 0; a < att.H; ++a)
      for (int64_t t = 0; t < att.S; ++t) {
        att.scores(b, a, t, row.data());
        for (int64_t j = 0; j <= t; ++j) top = std::max(top, double(row[j]));
      }
  stats_[layer].max_attn_logit = top;
  return false;  // the model computes the attention itself
}

void ActivationStatsProbe::layer_output(int64_t layer, const Tensor& x) {
  const int64_t n = x.rows(), d = x.cols();
  std::vector<float> host(x.numel());
  ops_.download(x, host.data());
  LayerActivationStats& s = stats_.at(layer);
  for (int64_t r = 0; r < n; ++r) {
    const float* row = &host[r * d];
    for (int64_t c = 0; c < d; ++c) s.hidden_max = std::max(s.hidden_max, std::fabs(double(row[c])));
    s.hidden_kurtosis += kurtosis(row, d);
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
  fake_quantize_rows(host.data(), x.rows(), x.cols(), act_bits_);
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
  const int64_t out_heads = att.differential ? H / 2 : H;
  std::vector<float> p(S);
  std::vector<double> o(vw);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t a = 0; a < H; ++a) {
      const int64_t vh = att.differential ? att.kv_head(a) / 2 : att.kv_head(a);
      const double sign = att.differential && a % 2 == 1 ? -lambda : 1.0;
      for (int64_t t = 0; t < S; ++t) {
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
        float* orow = &out[((b * S + t) * out_heads + (att.differential ? a / 2 : a)) * vw];
        for (int64_t c = 0; c < vw; ++c) orow[c] += float(sign * o[c] / sum);
      }
    }
  ops_.upload(out_t, out.data());
  return true;
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
