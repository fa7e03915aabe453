// AdamW: one update against a scalar re-derivation, the weight-decay groups, and global-norm
// clipping (the applied scale and its effect on the update).
#include <cmath>
#include <cstring>
#include <iterator>
#include <vector>

#include <gtest/gtest.h>

#include "base/rng.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "tests/grad_check.h"

namespace difftron {
namespace {

ModelConfig small() {
  ModelConfig c;
  c.vocab_size = 10;
  c.d_model = 8;
  c.n_layers = 1;
  c.n_heads = 1;
  c.n_kv_heads = 1;
  c.ffn_dim = 16;
  c.max_seq_len = 4;
  return c;
}

// Independent AdamW for one scalar over several steps (PyTorch semantics).
double adamw_scalar(double p, const std::vector<double>& grads, double lr, double b1, double b2,
                    double eps, double wd) {
  double m = 0, v = 0;
  for (size_t t = 1; t <= grads.size(); ++t) {
    double g = grads[t - 1];
    p -= lr * wd * p;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    p -= lr * (m / (1 - std::pow(b1, t))) / (std::sqrt(v / (1 - std::pow(b2, t))) + eps);
  }
  return p;
}

TEST(AdamW, MatchesScalarDerivationAndDecayGroups) {
  auto ops = make_cpu_ops();
  Model model(small(), *ops, ModelPrecision::uniform(DType::F32), 1, 4);
  model.init_weights(3);
  OptimizerConfig oc;
  oc.lr = 0.01;
  oc.schedule = LrSchedule::Constant;
  oc.weight_decay = 0.1;
  oc.grad_clip = 0;
  AdamW opt(oc, model);

  std::vector<std::vector<float>> before;
  for (auto& p : model.params()) {
    std::vector<float> w(p.value.numel());
    ops->download(p.value, w.data());
    before.push_back(w);
  }
  const int steps = 3;
  std::vector<std::vector<double>> g0(model.params().size());  // element 0 of each grad, per step
  for (int s = 0; s < steps; ++s) {
    for (size_t i = 0; i < model.params().size(); ++i) {
      auto& p = model.params()[i];
      auto g = testing::randn(p.grad.numel(), 100 * s + i, 0.5);
      std::vector<float> gf(g.begin(), g.end());
      ops->upload(p.grad, gf.data());
      g0[i].push_back(gf[0]);
    }
    opt.step(s);
  }
  for (size_t i = 0; i < model.params().size(); ++i) {
    auto& p = model.params()[i];
    std::vector<float> w(p.value.numel());
    ops->download(p.value, w.data());
    bool decays = p.is_matrix && !p.is_embedding;
    EXPECT_EQ(opt.decays(p), decays) << p.name;
    double expect = adamw_scalar(before[i][0], g0[i], 0.01, 0.9, 0.98, 1e-8, decays ? 0.1 : 0.0);
    EXPECT_NEAR(w[0], expect, 2e-6) << p.name;
  }
}

TEST(AdamW, ClipsTheGlobalNorm) {
  auto ops = make_cpu_ops();
  Model model(small(), *ops, ModelPrecision::uniform(DType::F32), 1, 4);
  model.init_weights(4);
  OptimizerConfig oc;
  oc.grad_clip = 0.5;
  AdamW opt(oc, model);
  double ss = 0;
  for (size_t i = 0; i < model.params().size(); ++i) {
    auto& p = model.params()[i];
    auto g = testing::randn(p.grad.numel(), 7 + i, 1.0);
    std::vector<float> gf(g.begin(), g.end());
    for (float x : gf) ss += double(x) * x;
    ops->upload(p.grad, gf.data());
  }
  StepStats st = opt.step(0);
  EXPECT_NEAR(st.grad_norm, std::sqrt(ss), 1e-6 * std::sqrt(ss));
  EXPECT_NEAR(st.clip_scale, 0.5 / std::sqrt(ss), 1e-9);
  // Adam's first step is scale invariant (m/sqrt(v) = sign), so check the moment instead:
  // m = (1 - beta1) * clip_scale * g
  auto& p = model.params()[0];
  std::vector<float> g(p.grad.numel()), m(p.grad.numel());
  ops->download(p.grad, g.data());
  ops->download(opt.state()[0].m, m.data());
  EXPECT_NEAR(m[3], (1 - 0.9) * st.clip_scale * g[3], 1e-7);
}

// Ops::adamw_step_each is adamw_step then copy per item, bit for bit: several tensors of odd
// sizes (one a misaligned slice), f32 and f64, decay on and off, per-item hyper-parameters,
// working copies of another dtype, of the same dtype, and none.
TEST(AdamW, StepEachIsAdamWStepThenCopyPerItem) {
  auto ops = make_cpu_ops();
  struct Spec {
    int64_t n;
    DType param, working;  // working F32/F64, or I32 for none
    float wd;
  };
  const Spec specs[] = {{1003, DType::F32, DType::F64, 0.1f}, {1, DType::F32, DType::I32, 0.0f},
                        {77, DType::F64, DType::I32, 0.1f},   {4099, DType::F32, DType::F32, 0.0f},
                        {500, DType::F32, DType::F64, 0.05f}, {0, DType::F32, DType::F64, 0.1f}};
  Rng rng(11);
  auto random = [&](DType dt, int64_t n, double scale, bool positive = false) {
    std::vector<double> h(static_cast<size_t>(n));
    for (auto& x : h) x = positive ? scale * std::fabs(rng.normal()) : scale * rng.normal();
    Tensor t = ops->empty({n}, dt);
    ops->upload(t, h.data());
    return t;
  };
  auto clone = [&](const Tensor& t) {
    Tensor c = ops->empty(t.shape(), t.dtype());
    ops->copy(t, c);
    return c;
  };
  std::vector<AdamWTensors> fused, each;
  std::vector<Tensor> keep;  // the big tensor behind the misaligned slice
  for (size_t i = 0; i < std::size(specs); ++i) {
    const Spec& sp = specs[i];
    AdamWTensors t;
    if (i == 4) {  // a slice at an odd offset of a larger tensor
      keep.push_back(random(sp.param, sp.n + 3, 0.05));
      t.param = keep.back().flat_slice(3, sp.n);
    } else {
      t.param = random(sp.param, sp.n, 0.05);
    }
    t.grad = random(sp.param, sp.n, 0.01);
    t.m = random(DType::F32, sp.n, 0.003);
    t.v = random(DType::F32, sp.n, 1e-5, /*positive=*/true);
    t.hp.lr = float(1e-3 * (i + 1));
    t.hp.weight_decay = sp.wd;
    t.hp.step = int64_t(i) + 2;
    t.hp.grad_scale = i % 2 ? 0.5f : 1.0f;
    if (sp.working != DType::I32) t.working = random(sp.working, sp.n, 1.0);  // overwritten
    AdamWTensors u = t;
    u.param = clone(t.param);
    u.m = clone(t.m);
    u.v = clone(t.v);
    if (t.working.defined()) u.working = clone(t.working);
    fused.push_back(t);
    each.push_back(u);
  }
  std::vector<float> before(size_t(specs[0].n)), after(before.size());
  ops->download(fused[0].param, before.data());
  ops->adamw_step_each(fused);
  for (AdamWTensors& u : each) {
    ops->adamw_step(u.param, u.grad, u.m, u.v, u.hp);
    if (u.working.defined()) ops->copy(u.param, u.working);
  }
  auto same_bits = [](const Tensor& a, const Tensor& b) {
    return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
  };
  for (size_t i = 0; i < fused.size(); ++i) {
    EXPECT_TRUE(same_bits(fused[i].param, each[i].param)) << "item " << i;
    EXPECT_TRUE(same_bits(fused[i].m, each[i].m)) << "item " << i;
    EXPECT_TRUE(same_bits(fused[i].v, each[i].v)) << "item " << i;
    if (fused[i].working.defined()) EXPECT_TRUE(same_bits(fused[i].working, each[i].working)) << "item " << i;
  }
  // and it is an update: every element of the first item moved
  ops->download(fused[0].param, after.data());
  int64_t unchanged = 0;
  for (size_t k = 0; k < after.size(); ++k) unchanged += after[k] == before[k];
  EXPECT_EQ(unchanged, 0);
}

TEST(AdamW, DivergedGradientsFailLoudly) {
  auto ops = make_cpu_ops();
  Model model(small(), *ops, ModelPrecision::uniform(DType::F32), 1, 4);
  OptimizerConfig oc;
  AdamW opt(oc, model);
  std::vector<float> g(model.params()[0].grad.numel(), NAN);
  ops->upload(model.params()[0].grad, g.data());
  EXPECT_THROW(opt.step(0), Error);
}

}  // namespace
}  // namespace difftron
