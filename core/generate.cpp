// Sampling loop: see generate.h.
#include "core/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "base/rng.h"

namespace difftron {

std::vector<int32_t> sample(Model& model, const std::vector<int32_t>& prompt, const SampleOptions& o) {
  if (prompt.empty()) throw_error("sample: the prompt is empty (give at least one token)");
  std::vector<int32_t> ids = prompt;
  Rng rng(o.seed);
  for (int64_t n = 0; n < o.max_new_tokens; ++n) {
    int64_t ctx = std::min<int64_t>(ids.size(), model.max_seq());
    std::vector<float> logits = model.last_logits(ids.data() + ids.size() - ctx, ctx);
    int32_t next;
    if (o.temperature <= 0) {
      next = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    } else {
      std::vector<int32_t> idx(logits.size());
      std::iota(idx.begin(), idx.end(), 0);
      int64_t k = o.top_k > 0 ? std::min<int64_t>(o.top_k, logits.size()) : logits.size();
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                        [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
      double mx = logits[idx[0]], sum = 0;
      std::vector<double> p(k);
      for (int64_t i = 0; i < k; ++i) sum += p[i] = std::exp((logits[idx[i]] - mx) / o.temperature);
      double r = rng.uniform() * sum;
      int64_t i = 0;
      while (i + 1 < k && (r -= p[i]) > 0) ++i;
      next = idx[i];
    }
    ids.push_back(next);
    if (next == o.stop_token) break;
  }
  return ids;
}

}  // namespace difftron
