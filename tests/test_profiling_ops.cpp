// ProfilingOps (kernels/profiling_ops.h, `train --profile_ops`): it changes no result, its
// matmul accounting is 2 M N K per call of the shape its key names, and the CLI writes the
// profile; sum_squares_each (the gradient norm's one-synchronisation form) is sum_squares of
// each tensor bit for bit; the optimizer's step is one adamw_step_each call.
#include <cmath>
#include <cstdio>
#include <regex>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/model.h"
#include "core/optimizer.h"
#include "kernels/profiling_ops.h"
#include "tests/run_command.h"

namespace difftron {
namespace {

ModelConfig small_config(AttentionKind kind) {
  ModelConfig c;
  c.vocab_size = 13;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 4;
  c.ffn_dim = 24;
  c.max_seq_len = 8;
  c.attention = kind;
  return c;
}

// loss and flat gradients of two micro-batches on `ops`
std::pair<double, std::vector<float>> run_model(Ops& ops, const ModelConfig& cfg) {
  const int64_t B = 2, S = 8;
  std::vector<int32_t> tok(B * S), tgt(B * S);
  for (int64_t i = 0; i < B * S; ++i) {
    tok[i] = int32_t((i * 7 + 3) % cfg.vocab_size);
    tgt[i] = int32_t((i * 5 + 1) % cfg.vocab_size);
  }
  Model model(cfg, ops, ModelPrecision::uniform(DType::F32), B, S);
  model.init_weights(3);
  model.zero_grads();
  model.forward_backward(tok.data(), tgt.data(), B, S, 0.5f);
  const double loss = model.forward_backward(tgt.data(), tok.data(), B, S, 0.5f);
  std::vector<float> g(model.flat_grads().numel());
  ops.download(model.flat_grads(), g.data());
  return {loss, g};
}

TEST(ProfilingOps, ChangesNoResultAndCountsMatmulFlopsOfItsShape) {
  for (auto kind : {AttentionKind::Differential, AttentionKind::Standard, AttentionKind::DifferentialV2}) {
    SCOPED_TRACE(attention_kind_name(kind));
    const ModelConfig cfg = small_config(kind);
    auto plain = make_cpu_ops();
    const auto want = run_model(*plain, cfg);

    ProfilingOps idle(make_cpu_ops());
    const auto got_idle = run_model(idle, cfg);
    EXPECT_TRUE(idle.rows().empty());  // inactive: nothing measured

    ProfilingOps prof(make_cpu_ops());
    prof.set_active(true);
    const auto got = run_model(prof, cfg);
    for (const auto* g : {&got_idle, &got}) {
      EXPECT_EQ(g->first, want.first);
      EXPECT_EQ(g->second, want.second);
    }

    const std::vector<OpProfileRow> rows = prof.rows();
    ASSERT_FALSE(rows.empty());
    const std::regex mm(R"(matmul (\d+)x(\d+)x(\d+)( tA)?( tB)?( \+=| \+ c)?)");  // += y, or + c (matmul_add)
    int64_t matmul_calls = 0, fwd_attention = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      const OpProfileRow& r = rows[i];
      EXPECT_GT(r.calls, 0) << r.op;
      EXPECT_GE(r.seconds, 0.0) << r.op;
      if (i > 0) EXPECT_LE(r.seconds, rows[i - 1].seconds) << "rows are not sorted by time";
      std::smatch m;
      if (std::regex_match(r.op, m, mm)) {
        const double M = std::stod(m[1]), N = std::stod(m[2]), K = std::stod(m[3]);
        EXPECT_EQ(r.flops, double(r.calls) * 2 * M * N * K) << r.op;
        EXPECT_GT(r.bytes, 0.0) << r.op;
        matmul_calls += r.calls;
      } else {
        EXPECT_EQ(r.flops, 0.0) << r.op;
        EXPECT_EQ(r.op.find("matmul"), std::string::npos) << r.op;
      }
      if (r.op == "attention_forward" || r.op == "diff_attention_forward") fwd_attention += r.calls;
    }
    // every layer's attention once per forward, two micro-batches
    EXPECT_EQ(fwd_attention, 2 * cfg.n_layers);
    EXPECT_GT(matmul_calls, 0);
    const std::string table = format_op_profile(rows, 2, 1.0);
    EXPECT_NE(table.find("ops total"), std::string::npos) << table;
  }
}

TEST(ProfilingOps, SumSquaresEachIsSumSquaresOfEachAndTheGradNormUsesIt) {
  auto ops = make_cpu_ops();
  const ModelConfig cfg = small_config(AttentionKind::Differential);
  const int64_t B = 2, S = 8;
  Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), B, S);
  model.init_weights(9);
  model.zero_grads();
  std::vector<int32_t> tok(B * S), tgt(B * S);
  for (int64_t i = 0; i < B * S; ++i) tok[i] = tgt[(i + 1) % (B * S)] = int32_t((i * 3 + 1) % cfg.vocab_size);
  model.forward_backward(tok.data(), tgt.data(), B, S, 1.0f);
  std::vector<Tensor> grads;
  for (auto& p : model.params()) grads.push_back(p.grad);
  const std::vector<double> each = ops->sum_squares_each(grads);
  ASSERT_EQ(each.size(), grads.size());
  double want = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_EQ(each[i], ops->sum_squares(grads[i])) << model.params()[i].name;
    // independently: the host sum of the downloaded gradient
    std::vector<double> h(size_t(grads[i].numel()));
    ops->download(grads[i], h.data());
    double s = 0;
    for (double v : h) s += v * v;
    EXPECT_EQ(each[i], s) << model.params()[i].name;
    want += s;
  }
  OptimizerConfig oc;
  AdamW opt(oc, model);
  EXPECT_EQ(opt.grad_norm(), std::sqrt(want));
}

// adamw_step_each through ProfilingOps: the same weights, one call counted with the bytes of
// every tensor (param, m, v read and written, grad read: 28 bytes an f32 element).
TEST(ProfilingOps, AdamWStepEachIsTimedAsOneCall) {
  const ModelConfig cfg = small_config(AttentionKind::Differential);
  auto plain = make_cpu_ops();
  ProfilingOps prof(make_cpu_ops());
  std::vector<std::vector<float>> weights;
  for (Ops* ops : {static_cast<Ops*>(plain.get()), static_cast<Ops*>(&prof)}) {
    Model model(cfg, *ops, ModelPrecision::uniform(DType::F32), 2, 8);
    model.init_weights(5);
    OptimizerConfig oc;
    AdamW opt(oc, model);
    std::vector<float> g(size_t(model.flat_grads().numel()));
    for (size_t i = 0; i < g.size(); ++i) g[i] = 0.01f * float(std::sin(0.1 * double(i)));
    Tensor grads = model.flat_grads();
    ops->upload(grads, g.data());
    prof.set_active(ops == &prof);
    opt.step(0);
    prof.set_active(false);
    weights.emplace_back(size_t(model.flat_values().numel()));
    ops->download(model.flat_values(), weights.back().data());
    if (ops != &prof) continue;
    double bytes = 0;
    for (const auto& p : model.params()) bytes += 28.0 * double(p.value.numel());
    bool found = false;
    for (const OpProfileRow& r : prof.rows()) {
      EXPECT_NE(r.op, "adamw_step");
      if (r.op != "adamw_step_each") continue;
      found = true;
      EXPECT_EQ(r.calls, 1);
      EXPECT_EQ(r.bytes, bytes);
    }
    EXPECT_TRUE(found);
  }
  EXPECT_EQ(weights[0], weights[1]);
}

TEST(ProfilingOps, TrainProfileOpsWritesTheTableAndARecord) {
  using testing::run_difftron;
  const std::filesystem::path dir = testing::fresh_dir("difftron_profile_ops", "");
  auto r = run_difftron("train --device=cpu --data=synthetic:copy --vocab_size=29 --d_model=16 --n_layers=2 "
                        "--n_heads=2 --head_dim=4 --ffn_dim=24 --seq=16 --batch=2 --steps=5 --log_every=5 "
                        "--profile_ops=2 --ckpt_dir=" + (dir / "run").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("op profile of 2 step(s)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("ops total"), std::string::npos) << r.output;
  nlohmann::json prof;
  std::stringstream ss(testing::read_text_file(dir / "run" / "metrics.jsonl"));
  for (std::string line; std::getline(ss, line);) {
    auto j = nlohmann::json::parse(line);
    if (j["event"] == "profile") prof = j;
  }
  ASSERT_FALSE(prof.is_null()) << "no profile record in metrics.jsonl";
  EXPECT_EQ(prof["steps"], 2);
  EXPECT_GT(prof["wall_s_per_step"].get<double>(), 0.0);
  int64_t norms = -1, adamw = -1;
  for (const auto& o : prof["ops"]) {
    if (o["op"] == "sum_squares_each") norms = o["calls"];
    if (o["op"] == "adamw_step_each") adamw = o["calls"];
    EXPECT_NE(o["op"], "adamw_step") << "the optimizer updates every parameter in one call";
  }
  EXPECT_EQ(norms, 2) << "one gradient-norm call (one synchronisation) a step";
  EXPECT_EQ(adamw, 2) << "one optimizer call a step";

  r = run_difftron("train --device=cpu --data=synthetic:copy --steps=1 --profile_ops=-1");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--profile_ops (-1)"), std::string::npos) << r.output;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace difftron
