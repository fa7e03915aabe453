// Shard descriptors of a model and its optimizer: see checkpoint_state.h.
#include "core/checkpoint_state.h"

#include <algorithm>

#include "core/model.h"
#include "core/optimizer.h"
#include "core/zero.h"

namespace difftron {
namespace {

ShardPiece describe(const Param& p, int64_t e0, int64_t e1) {
  ShardPiece s;
  s.name = p.name;
  s.global_shape = p.full_shape.empty() ? p.value.shape() : p.full_shape;
  s.local_shape = p.value.shape();
  s.shard_dim = p.shard_dim;
  s.shard_begin = std::max<int64_t>(p.shard_begin, 0);
  s.e0 = e0;
  s.e1 = e1;
  return s;
}

// ZeRO: the optimizer state of segment k's elements that this DP rank holds.
void add_zero_pieces(Model& model, ZeroOptimizer& z, int k, bool with_working_weights, std::vector<ShardPiece>& out) {
  const Param& p = model.params()[k];
  for (const auto& zp : z.pieces()) {
    if (zp.segment != k) continue;
    const int64_t e0 = zp.flat - p.flat_offset;
    ShardPiece s = describe(p, e0, e0 + zp.numel);
    if (z.shard_master().defined()) s.arrays.push_back({"w", z.shard_master().flat_slice(zp.shard, zp.numel)});
    else if (with_working_weights) s.arrays.push_back({"w", model.flat_values().flat_slice(zp.flat, zp.numel)});
    s.arrays.push_back({"m", z.shard_m().flat_slice(zp.shard, zp.numel)});
    s.arrays.push_back({"v", z.shard_v().flat_slice(zp.shard, zp.numel)});
    out.push_back(std::move(s));
  }
}

}  // namespace

std::vector<ShardPiece> pieces_to_save(Model& model, AdamW* opt, int dp_rank) {
  std::vector<ShardPiece> out;
  auto& params = model.params();
  const bool tp_lead = model.tp_rank() == 0;
  for (int k = 0; k < int(params.size()); ++k) {
    const Param& p = params[k];
    if (p.shard_dim < 0 && !tp_lead) continue;  // replicated over TP: TP rank 0 saves it
    if (opt && opt->zero()) {
      add_zero_pieces(model, *opt->zero(), k, true, out);
      continue;
    }
    if (dp_rank != 0) continue;  // without ZeRO the DP replicas are identical: DP rank 0 saves
    const int64_t n = p.value.numel();
    ShardPiece s = describe(p, 0, n);
    if (opt) {
      auto& st = opt->state()[k];
      s.arrays = {{"w", st.master.view({n})}, {"m", st.m.view({n})}, {"v", st.v.view({n})}};
    } else {
      s.arrays = {{"w", p.value.view({n})}};
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<ShardPiece> pieces_to_load(Model& model, AdamW* opt) {
  std::vector<ShardPiece> out;
  auto& params = model.params();
  for (int k = 0; k < int(params.size()); ++k) {
    const Param& p = params[k];
    const int64_t n = p.value.numel();
    ShardPiece s = describe(p, 0, n);
    s.arrays.push_back({"w", p.value.view({n})});
    if (opt && !opt->zero()) {
      auto& st = opt->state()[k];
      if (st.master.raw() != p.value.raw()) s.arrays.push_back({"w", st.master.view({n})});
      s.arrays.push_back({"m", st.m.view({n})});
      s.arrays.push_back({"v", st.v.view({n})});
    }
    out.push_back(std::move(s));
    if (opt && opt->zero()) add_zero_pieces(model, *opt->zero(), k, false, out);
  }
  return out;
}

}  // namespace difftron
