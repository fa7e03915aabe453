// `difftron bench`: times every CUDA op at the sizes of the 1.3B model (d 2048, L 24, h 8, dh 128, ffn 5632)
// (d 2048, ffn 5632, vocab 32000, 16k tokens per batch, h 8 x dh 128) with CUDA events on
// the backend's stream, and whole training steps of a small and a ~350M model. Per op it
// prints ms (median), achieved GB/s (bytes read + written) or TFLOP/s, and the percentage of
// the two ceilings measured in the same run: device copy (cudaMemcpy D2D) and bf16 GEMM
// 8192^3. Counts are stated per row; attention FLOPs as in bench-attention (causal: fwd
// 6 B h S^2 dh for differential, 4 B H S^2 dh for standard; bwd 2.5 x fwd). Steps report
// tokens/s and MFU = tokens/s x ModelConfig::flops_per_token(S) / 989 TFLOP/s.
#include <gflags/gflags.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "core/config.h"
#include "base/error.h"
#include "core/model.h"
#include "core/optimizer.h"
#include "base/rng.h"
#include "kernels/ops.h"
#include "launch/command.h"

#if DIFFTRON_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/cuda_ops.h"
#endif

DEFINE_int32(bench_device, 0, "bench: GPU index");
DEFINE_int32(bench_reps, 10, "bench: timed repetitions per op (the median is reported)");
DEFINE_string(bench_only, "", "bench: only ops whose name contains this text (e.g. rmsnorm)");
DEFINE_bool(bench_steps, true, "bench: also time whole training steps (small and ~350M models)");
DEFINE_bool(bench_ops, true, "bench: time the individual ops");
DEFINE_int32(bench_step_count, 3, "bench: timed training steps per model (after one warm-up)");

namespace difftron {
namespace {

#if DIFFTRON_HAVE_CUDA

constexpr double kPeakMfu = 989e12;  // dense bf16 per H100/H200 (docs/MODEL.md section 4)

struct Ceilings {
  double copy_gbs = 0;      // GB/s of a device copy
  double gemm_tflops = 0;   // bf16 GEMM 8192^3
};

class Bench {
 public:
  Bench(Ops& ops, cuda::CudaContext& ctx) : ops_(ops), ctx_(ctx), rng_(42) {
    DT_CUDA(cudaEventCreate(&start_));
    DT_CUDA(cudaEventCreate(&stop_));
  }
  ~Bench() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }

  bool selected(const std::string& name) const {
    return FLAGS_bench_only.empty() || name.find(FLAGS_bench_only) != std::string::npos;
  }

  // Median ms of `reps` runs of fn (after one warm-up), between events on the op stream.
  double time_ms(const std::function<void()>& fn, int reps) {
    fn();
    std::vector<float> t;
    for (int r = 0; r < reps; ++r) {
      DT_CUDA(cudaEventRecord(start_, ctx_.stream()));
      fn();
      DT_CUDA(cudaEventRecord(stop_, ctx_.stream()));
      DT_CUDA(cudaEventSynchronize(stop_));
      float ms = 0;
      DT_CUDA(cudaEventElapsedTime(&ms, start_, stop_));
      t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }

  // Random N(0, scale^2) values (a 1M-value random block tiled over the tensor).
  Tensor random(const Shape& shape, DType dt, double scale = 1.0) {
    Tensor t = ops_.empty(shape, dt);
    const int64_t n = t.numel(), block = std::min<int64_t>(n, int64_t(1) << 20);
    std::vector<float> host(block);
    for (auto& x : host) x = float(scale * rng_.normal());
    Tensor src = ops_.empty({block}, dt);
    ops_.upload(src, host.data());
    for (int64_t off = 0; off < n; off += block) {
      Tensor dst = t.flat_slice(off, std::min(block, n - off));
      ops_.copy(src.flat_slice(0, dst.numel()), dst);
    }
    return t;
  }
  Tensor ids(int64_t n, int64_t hi) {
    std::vector<int32_t> host(n);
    for (auto& x : host) x = int32_t(rng_.below(uint64_t(hi)));
    Tensor t = ops_.empty({n}, DType::I32);
    ops_.upload(t, host.data());
    return t;
  }

  // One table row: memory-bound rows give bytes, compute rows flops (the other 0).
  void row(const std::string& name, const std::string& shape, double ms, double bytes,
           double flops) {
    char line[320];
    if (flops > 0) {
      const double tf = flops / (ms * 1e-3) / 1e12;
      std::snprintf(line, sizeof line, "%-30s %-30s %9.3f %9s %7s %9.1f %6.1f%%", name.c_str(),
                    shape.c_str(), ms, "", "", tf,
                    ceil_.gemm_tflops > 0 ? 100.0 * tf / ceil_.gemm_tflops : 0.0);
    } else {
      const double gbs = bytes / (ms * 1e-3) / 1e9;
      std::snprintf(line, sizeof line, "%-30s %-30s %9.3f %9.0f %6.1f%%", name.c_str(),
                    shape.c_str(), ms, gbs, ceil_.copy_gbs > 0 ? 100.0 * gbs / ceil_.copy_gbs : 0.0);
    }
    std::printf("%s\n", line);
    std::fflush(stdout);
  }

  void measure_ceilings() {
    {  // device copy, 2 GiB each way
      const int64_t n = int64_t(1) << 29;
      Tensor a = ops_.empty({n}, DType::F32), b = ops_.empty({n}, DType::F32);
      ops_.fill_zero(a);
      const double ms = time_ms([&] { ops_.copy(a, b); }, FLAGS_bench_reps);
      ceil_.copy_gbs = 2.0 * 4 * n / (ms * 1e-3) / 1e9;
      row("ceiling: device copy", "f32 2 GiB (D2D memcpy)", ms, 2.0 * 4 * n, 0);
    }
    {
      const int64_t m = 8192;
      Tensor a = random({m, m}, DType::BF16), b = random({m, m}, DType::BF16);
      Tensor y = ops_.empty({m, m}, DType::BF16);
      const double ms = time_ms([&] { ops_.matmul(a, false, b, true, y); }, FLAGS_bench_reps);
      ceil_.gemm_tflops = 2.0 * m * m * m / (ms * 1e-3) / 1e12;
      row("ceiling: bf16 GEMM", "8192^3 (NT)", ms, 0, 2.0 * m * m * m);
    }
  }

  // Runs one bench section; an error is printed and the bench goes on.
  void guarded(const std::string& what, const std::function<void()>& fn) {
    try {
      fn();
    } catch (const Error& e) {
      std::printf("%-30s ERROR: %s\n", what.c_str(), e.what());
      std::fflush(stdout);
    }
  }

  void ops_1p3b() {
    const int64_t N = 16384, d = 2048, F = 5632, V = 32000, B = 8, S = 2048, h = 8, dh = 128;
    const int reps = FLAGS_bench_reps;
    const DType bf = DType::BF16, f32 = DType::F32;
    auto gemm = [&](const std::string& name, int64_t M, int64_t Nn, int64_t K, bool ta, bool tb,
                    DType yt, float beta) {
      if (!selected(name)) return;
      Tensor a = random(ta ? Shape{K, M} : Shape{M, K}, bf), b = random(tb ? Shape{Nn, K} : Shape{K, Nn}, bf);
      Tensor y = ops_.empty({M, Nn}, yt);
      ops_.fill_zero(y);
      const double ms = time_ms([&] { ops_.matmul(a, ta, b, tb, y, 1.0f, beta); }, reps);
      char shape[64];
      std::snprintf(shape, sizeof shape, "%lldx%lldx%lld %s%s->%s", (long long)M, (long long)Nn,
                    (long long)K, ta ? "T" : "N", tb ? "T" : "N", dtype_name(yt));
      row(name, shape, ms, 0, 2.0 * M * Nn * K);
    };
    gemm("matmul q/k/v/o fwd", N, d, d, false, true, bf, 0.0f);
    gemm("matmul ffn gate/up fwd", N, F, d, false, true, bf, 0.0f);
    gemm("matmul ffn down fwd +res", N, d, F, false, true, bf, 1.0f);
    gemm("matmul ffn dgrad", N, d, F, false, false, bf, 0.0f);
    gemm("matmul ffn wgrad f32+=", F, d, N, true, false, f32, 1.0f);
    gemm("matmul lm head 131 rows", 131, V, d, false, true, bf, 0.0f);
    gemm("matmul lm head 4096 rows", 4096, V, d, false, true, bf, 0.0f);

    if (selected("rmsnorm")) {
      // the 1.3B and 350M models' shapes: the block norms (d 2048 / 1024) and the sub-norms
      // (rows of 2dh: 256 / 128, h rows per token)
      auto norm = [&](int64_t rows, int64_t cols, float scale, const char* what) {
        Tensor x = random({rows, cols}, bf), w = random({cols}, bf, 0.1), y = ops_.empty({rows, cols}, bf);
        Tensor rstd = ops_.empty({rows}, f32), dy = random({rows, cols}, bf), dx = random({rows, cols}, bf);
        Tensor dw = ops_.empty({cols}, f32);
        ops_.fill_zero(dw);
        const std::string shape = std::to_string(rows) + "x" + std::to_string(cols) + " bf16";
        double ms = time_ms([&] { ops_.rmsnorm_forward(x, w, 1e-5, scale, y, rstd); }, reps);
        row(std::string("rmsnorm_forward") + what, shape, ms, 2.0 * rows * cols * 2 + 4.0 * rows, 0);
        ms = time_ms([&] { ops_.rmsnorm_backward(x, w, rstd, scale, dy, dx, dw); }, reps);
        row(std::string("rmsnorm_backward") + what, shape + ", dw f32", ms,
            2.0 * rows * cols * 4 + 4.0 * rows, 0);
      };
      norm(N, d, 1.0f, "");
      norm(N, d / 2, 1.0f, "");
      norm(N * h, 2 * dh, 0.5f, " (sub-norm)");
      norm(N * h, dh, 0.5f, " (sub-norm)");
    }
    if (selected("rope")) {
      Tensor q = random({B, S, 2 * h, dh}, bf);
      const double ms = time_ms([&] { ops_.rope(q, 10000.0, false); }, reps);
      row("rope (in place)", "q 8x2048x16x128 bf16", ms, 2.0 * q.nbytes(), 0);
    }
    if (selected("swiglu")) {
      Tensor g = random({N, F}, bf), u = random({N, F}, bf), o = ops_.empty({N, F}, bf);
      Tensor dg = ops_.empty({N, F}, bf), du = ops_.empty({N, F}, bf);
      double ms = time_ms([&] { ops_.swiglu_forward(g, u, o); }, reps);
      row("swiglu_forward", "16384x5632 bf16", ms, 3.0 * 2 * N * F, 0);
      ms = time_ms([&] { ops_.swiglu_backward(g, u, o, dg, du); }, reps);
      row("swiglu_backward", "16384x5632 bf16", ms, 5.0 * 2 * N * F, 0);
    }
    if (selected("embedding")) {
      Tensor tok = ids(N, V), table = random({V, d}, bf), out = ops_.empty({N, d}, bf);
      Tensor dtable = ops_.empty({V, d}, f32);
      ops_.fill_zero(dtable);
      double ms = time_ms([&] { ops_.embedding_forward(tok, table, out); }, reps);
      row("embedding_forward", "16384 tokens x 2048 bf16", ms, 2.0 * 2 * N * d + 4.0 * N, 0);
      ms = time_ms([&] { ops_.embedding_backward(tok, out, dtable); }, reps);
      // dout read + touched dtable rows read and written (f32)
      row("embedding_backward", "16384 tokens -> f32 table", ms, 2.0 * N * d + 2.0 * 4 * N * d, 0);
    }
    if (selected("cross_entropy")) {
      for (int64_t rows : {int64_t(131), int64_t(4096)}) {
        Tensor logits = random({rows, V}, bf, 2.0), tg = ids(rows, V);
        Tensor losses = ops_.empty({rows}, f32), lse = ops_.empty({rows}, f32);
        const std::string shape = std::to_string(rows) + "x32000 bf16";
        double ms = time_ms([&] { ops_.cross_entropy_forward(logits, tg, losses, lse); }, reps);
        row("cross_entropy_forward", shape, ms, 2.0 * rows * V, 0);
        Tensor d = ops_.empty({rows, V}, bf);
        ms = time_ms([&] { ops_.cross_entropy_backward(logits, tg, lse, 1e-4f, d); }, reps);
        row("cross_entropy_backward", shape, ms, 2.0 * 2 * rows * V, 0);
      }
    }
    const int64_t P = int64_t(1) << 28;  // 268M parameters
    if (selected("adamw") || selected("copy") || selected("sum_squares") || selected("axpy") ||
        selected("scale")) {
      Tensor p = random({P}, f32, 0.02), g = random({P}, f32, 1e-3), m = ops_.empty({P}, f32);
      Tensor v = ops_.empty({P}, f32);
      ops_.fill_zero(m);
      ops_.fill_zero(v);
      AdamWParams hp;
      hp.weight_decay = 0.05f;
      double ms;
      if (selected("adamw")) {
        ms = time_ms([&] { ops_.adamw_step(p, g, m, v, hp); }, reps);
        row("adamw_step", "268M f32 (grad f32)", ms, 28.0 * P, 0);
        Tensor gb = ops_.empty({P}, DType::BF16);
        ops_.copy(g, gb);
        ms = time_ms([&] { ops_.adamw_step(p, gb, m, v, hp); }, reps);
        row("adamw_step", "268M f32 (grad bf16)", ms, 26.0 * P, 0);
        // the training step's form: the update and the bf16 working copy in one pass, over the
        // 1.3B baseline's tensor sizes per layer (9 tensors) repeated to 268M
        Tensor pb = ops_.empty({P}, DType::BF16);
        const int64_t d = 2048, F = 5632;
        const std::vector<int64_t> sizes = {d, d * d, d * d, d * d, d * d, d, F * d, F * d, d * F};
        std::vector<AdamWTensors> items;
        for (int64_t off = 0, i = 0; off < P; ++i) {
          const int64_t n = std::min(sizes[size_t(i) % sizes.size()], P - off);
          items.push_back({p.flat_slice(off, n), g.flat_slice(off, n), m.flat_slice(off, n),
                           v.flat_slice(off, n), hp, pb.flat_slice(off, n)});
          off += n;
        }
        ms = time_ms([&] { ops_.adamw_step_each(items); }, reps);
        row("adamw_step_each + bf16 copy", "268M f32 in " + std::to_string(items.size()) + " tensors", ms,
            30.0 * P, 0);
      }
      if (selected("copy")) {
        Tensor pb = ops_.empty({P}, DType::BF16);
        ms = time_ms([&] { ops_.copy(p, pb); }, reps);
        row("copy f32->bf16", "268M", ms, 6.0 * P, 0);
      }
      if (selected("sum_squares")) {
        ms = time_ms([&] { ops_.sum_squares(g); }, reps);
        row("sum_squares (+sync)", "268M f32", ms, 4.0 * P, 0);
      }
      if (selected("axpy")) {
        ms = time_ms([&] { ops_.axpy(0.5f, g, m); }, reps);
        row("axpy", "268M f32", ms, 12.0 * P, 0);
      }
      if (selected("scale")) {
        ms = time_ms([&] { ops_.scale(m, 0.5f); }, reps);
        row("scale", "268M f32", ms, 8.0 * P, 0);
      }
    }
    const int attn_reps = std::min(reps, 3);
    if (selected("diff_attention")) {
      Tensor q = random({B, S, h, 2, dh}, bf), k = random({B, S, h, 2, dh}, bf);
      Tensor vv = random({B, S, h, 2 * dh}, bf), lam = ops_.empty({1}, f32);
      const float l = 0.5f;
      ops_.upload(lam, &l);
      Tensor out = ops_.empty({B, S, h, 2 * dh}, bf), lse = ops_.empty({B, h, 2, S}, f32);
      Tensor dout = random({B, S, h, 2 * dh}, bf), dq = ops_.empty(q.shape(), bf);
      Tensor dk = ops_.empty(k.shape(), bf), dv = ops_.empty(vv.shape(), bf), dl = ops_.empty({1}, f32);
      const double fwd = 6.0 * B * h * double(S) * S * dh;
      // through Ops (the fused flash kernels where they apply) with the backend's saved state
      // (the model's default, Model::keep_attention_state), then without it (train
      // --keep_attention_state=false), then the simple SIMT path
      Tensor none, saved = ops_.empty({std::max<int64_t>(ops_.diff_attention_saved_numel(q), 1)}, bf);
      double ms = time_ms([&] { ops_.diff_attention_forward(q, k, vv, lam, out, lse, saved); }, attn_reps);
      row("diff_attention_forward", "B8 S2048 h8 kv8 dh128 (Ops)", ms, 0, fwd);
      ms = time_ms([&] {
        ops_.diff_attention_backward(q, k, vv, lam, out, lse, saved, dout, dq, dk, dv, dl);
      }, attn_reps);
      row("diff_attention_backward", "B8 S2048 h8 kv8 dh128 (Ops)", ms, 0, 2.5 * fwd);
      ms = time_ms([&] { ops_.diff_attention_forward(q, k, vv, lam, out, lse, none); }, attn_reps);
      row("diff_attention_forward", "same, keeping no O2n", ms, 0, fwd);
      ms = time_ms([&] {
        ops_.diff_attention_backward(q, k, vv, lam, out, lse, none, dout, dq, dk, dv, dl);
      }, attn_reps);
      row("diff_attention_backward", "same, recomputing (no O2n)", ms, 0, 2.5 * fwd);
      ms = time_ms([&] { cuda::diff_attention_simple_forward(ctx_, q, k, vv, lam, out, lse); }, attn_reps);
      row("diff_attention_forward", "same, simple SIMT kernel", ms, 0, fwd);
      ms = time_ms([&] {
        cuda::diff_attention_simple_backward(ctx_, q, k, vv, lam, lse, dout, dq, dk, dv, dl);
      }, attn_reps);
      row("diff_attention_backward", "same, simple SIMT kernel", ms, 0, 2.5 * fwd);
    }
    if (selected("attention")) {
      const int64_t H = 16, hd = 128;
      Tensor q = random({B, S, H, hd}, bf), k = random({B, S, H, hd}, bf), vv = random({B, S, H, hd}, bf);
      Tensor out = ops_.empty(q.shape(), bf), lse = ops_.empty({B, H, S}, f32);
      Tensor dout = random(q.shape(), bf), dq = ops_.empty(q.shape(), bf);
      Tensor dk = ops_.empty(k.shape(), bf), dv = ops_.empty(vv.shape(), bf);
      const double fwd = 4.0 * B * H * double(S) * S * hd / 2.0;
      double ms = time_ms([&] { ops_.attention_forward(q, k, vv, out, lse); }, attn_reps);
      row("attention_forward (std)", "B8 S2048 H16 kv16 dh128", ms, 0, fwd);
      ms = time_ms([&] { ops_.attention_backward(q, k, vv, out, lse, dout, dq, dk, dv); }, attn_reps);
      row("attention_backward (std)", "B8 S2048 H16 kv16 dh128", ms, 0, 2.5 * fwd);
      // through Ops above (cuBLAS GEMMs for bf16); the simple SIMT path for comparison
      ms = time_ms([&] { cuda::attention_simple_forward(ctx_, q, k, vv, out, lse); }, attn_reps);
      row("attention_forward (std)", "same, simple SIMT kernel", ms, 0, fwd);
      ms = time_ms([&] { cuda::attention_simple_backward(ctx_, q, k, vv, lse, dout, dq, dk, dv); }, attn_reps);
      row("attention_backward (std)", "same, simple SIMT kernel", ms, 0, 2.5 * fwd);
    }
  }

  // Whole training steps (forward + backward + AdamW with f32 masters), random tokens; the
  // model's defaults (attention state kept, as `train` does by default).
  void training_step(const std::string& name, ModelConfig cfg, int64_t B, int64_t S) {
    cfg.max_seq_len = S;
    Model model(cfg, ops_, ModelPrecision::cuda_mixed(), B, S);
    model.init_weights(1);
    OptimizerConfig oc;
    oc.warmup_steps = 0;
    oc.total_steps = 1000;
    AdamW opt(oc, model);
    std::vector<int32_t> tok(B * S), tgt(B * S);
    for (int64_t i = 0; i < B * S; ++i) {
      tok[i] = int32_t(rng_.below(uint64_t(cfg.vocab_size)));
      tgt[i] = int32_t(rng_.below(uint64_t(cfg.vocab_size)));
    }
    using clock = std::chrono::steady_clock;
    double fb_ms = 0, opt_ms = 0, loss = 0;
    for (int step = 0; step <= FLAGS_bench_step_count; ++step) {
      ops_.synchronize();
      auto t0 = clock::now();
      model.zero_grads();
      loss = model.forward_backward(tok.data(), tgt.data(), B, S);
      ops_.synchronize();
      auto t1 = clock::now();
      opt.step(step);
      ops_.synchronize();
      auto t2 = clock::now();
      if (step == 0) continue;  // warm-up: allocations, cuBLASLt plans
      fb_ms += std::chrono::duration<double, std::milli>(t1 - t0).count();
      opt_ms += std::chrono::duration<double, std::milli>(t2 - t1).count();
    }
    fb_ms /= FLAGS_bench_step_count;
    opt_ms /= FLAGS_bench_step_count;
    const double step_ms = fb_ms + opt_ms, tps = B * S / (step_ms * 1e-3);
    const double fpt = model.config().flops_per_token(S);
    std::printf("step %-12s B %lld x S %lld: fwd+bwd %8.1f ms, adamw %6.1f ms, %9.0f tok/s, MFU %5.1f%% "
                "(loss %.3f)\n",
                name.c_str(), (long long)B, (long long)S, fb_ms, opt_ms, tps,
                100.0 * tps * fpt / kPeakMfu, loss);
    std::printf("     %s: %s; %.4g FLOP/token (ModelConfig::flops_per_token)\n", name.c_str(),
                model.config().summary().c_str(), fpt);
    std::fflush(stdout);
  }

 private:
  Ops& ops_;
  cuda::CudaContext& ctx_;
  Rng rng_;
  Ceilings ceil_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

int bench_main(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (!cuda_available()) {
    std::fprintf(stderr, "difftron bench: no GPU visible: nothing to time\n");
    return 1;
  }
  auto ops = make_cuda_ops(FLAGS_bench_device);
  cuda::CudaContext* ctx = cuda::context_of(*ops);
  DT_CHECK(ctx != nullptr, "make_cuda_ops returned a non-CUDA backend");
  std::printf("difftron bench on %s (%d SMs), %d reps per op (median)\n", ops->name().c_str(),
              ctx->num_sms(), FLAGS_bench_reps);
  std::printf("%-30s %-30s %9s %9s %7s %9s %7s\n", "op", "shape", "ms", "GB/s", "%copy", "TFLOP/s",
              "%gemm");
  Bench bench(*ops, *ctx);
  bench.measure_ceilings();
  if (FLAGS_bench_ops) bench.guarded("ops", [&] { bench.ops_1p3b(); });
  if (FLAGS_bench_steps) {
    ModelConfig small;
    small.vocab_size = 32000;
    small.d_model = 512;
    small.n_layers = 8;
    small.n_heads = 4;
    small.n_kv_heads = 4;
    bench.guarded("step small", [&] { bench.training_step("small", small, 8, 1024); });
    ModelConfig m350;
    m350.vocab_size = 32000;
    m350.d_model = 1024;
    m350.n_layers = 24;
    m350.n_heads = 8;
    m350.n_kv_heads = 8;
    m350.ffn_dim = 2816;
    bench.guarded("step diff-350M", [&] { bench.training_step("diff-350M", m350, 8, 2048); });
    ModelConfig std350 = m350;  // the baseline of the same size (PyTorch: 195k tokens/s, docs/PERFORMANCE.md)
    std350.attention = AttentionKind::Standard;
    bench.guarded("step std-350M", [&] { bench.training_step("std-350M", std350, 8, 2048); });
  }
  return 0;
}

#else

int bench_main(int, char**) {
  std::fprintf(stderr, "difftron bench: this build has no CUDA backend: nothing to time\n");
  return 1;
}

#endif

}  // namespace
}  // namespace difftron

static int bench_command(int argc, char** argv) { return difftron::bench_main(argc, argv); }
DIFFTRON_COMMAND("bench", "time every CUDA op and whole training steps (GB/s, TFLOP/s, MFU)",
                 bench_command);
