// Every Ops method of the CUDA backend against the CPU reference (run in f64), on fresh
// random inputs: one table of cases (op x precision x shape, ragged shapes and GQA
// included). Each case runs first on the GPU, whose inputs (after bf16 rounding) are then
// given to the CPU; outputs are poisoned (NaN) before the run, accumulated outputs start
// from random values and are compared as increments. Reports ||gpu - ref|| / ||ref|| per
// output; tolerance by the GPU output's dtype (docs/MODEL.md section 3): f32 2e-5, bf16 1e-2.
// Exits 77 (skipped) when no GPU is present. DIFFTRON_CUDA_OPS_FILTER=regex runs only the
// matching cases (e.g. under compute-sanitizer).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/rng.h"
#include "kernels/ops.h"

namespace difftron {
namespace {

// A single op on identical inputs: f32 outputs differ by the rounding of reordered sums (2^-24
// per addition, reductions of at most a few thousand terms: well under 2e-5 in relative L2);
// bf16 outputs by the rounding of the bf16 output itself (unit roundoff 2^-9 = 2e-3) plus that
// of bf16 intermediates the kernel stores: 1e-2. Cases whose math needs more (cancellation)
// set their own, with the reason.
constexpr double kTolF32 = 2e-5;
constexpr double kTolBf16 = 1e-2;

void skip_without_gpu() {
  if (!cuda_available()) {
    std::fprintf(stderr, "test_cuda_ops: no GPU visible (cuda_available() is false): skipping\n");
    std::exit(77);
  }
}

// One run of a case on one backend. The GPU pass creates inputs and records the values the
// GPU holds; the CPU pass rebuilds the same values in f64 (f32 where the reference needs it).
class Env {
 public:
  Env(Ops& ops, bool gpu, std::map<std::string, std::vector<double>>& values, uint64_t seed)
      : ops_(ops), gpu_(gpu), values_(values), rng_(seed) {}

  Ops& ops() { return ops_; }
  bool gpu() const { return gpu_; }

  // Random N(offset, scale^2) input of GPU dtype `dt`.
  // positive: |N(0, scale^2)| + offset.
  Tensor input(const std::string& name, const Shape& shape, DType dt, double scale = 1.0,
               double offset = 0.0, bool cpu_f32 = false, bool positive = false) {
    Tensor t = ops_.empty(shape, gpu_ ? dt : (cpu_f32 ? DType::F32 : DType::F64));
    const int64_t n = shape_numel(shape);
    if (gpu_) {
      std::vector<double> host(n);
      for (auto& x : host) x = offset + scale * (positive ? std::fabs(rng_.normal()) : rng_.normal());
      ops_.upload(t, host.data());
      ops_.download(t, host.data());  // exactly what the GPU holds (bf16-rounded)
      values_[name] = host;
    } else {
      ops_.upload(t, values_.at(name).data());
    }
    return t;
  }

  // i32 ids in [lo, hi); every `ignore_every`-th is -1 when ignore_every > 0.
  Tensor ids(const std::string& name, int64_t n, int64_t lo, int64_t hi, int ignore_every = 0) {
    Tensor t = ops_.empty({n}, DType::I32);
    if (gpu_) {
      std::vector<double> host(n);
      for (int64_t i = 0; i < n; ++i)
        host[i] = (ignore_every > 0 && i % ignore_every == ignore_every - 1)
                      ? -1.0
                      : double(lo + int64_t(rng_.below(uint64_t(hi - lo))));
      values_[name] = host;
    }
    std::vector<int32_t> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = int32_t(values_.at(name)[i]);
    ops_.upload(t, v.data());
    return t;
  }

  // An output, poisoned with NaN; compared after the run.
  Tensor output(const std::string& name, const Shape& shape, DType dt, bool cpu_f32 = false) {
    Tensor t = ops_.empty(shape, gpu_ ? dt : (cpu_f32 ? DType::F32 : DType::F64));
    std::vector<double> nan(shape_numel(shape), std::numeric_limits<double>::quiet_NaN());
    ops_.upload(t, nan.data());
    outs_.push_back({name, t, {}});
    return t;
  }

  // An accumulated output: random start (the same on both backends), compared as the
  // increment over that start.
  Tensor accum(const std::string& name, const Shape& shape, DType dt, double scale,
               bool cpu_f32 = false, bool positive = false) {
    Tensor t = input(name + "@start", shape, dt, scale, 0.0, cpu_f32, positive);
    outs_.push_back({name, t, values_.at(name + "@start")});
    return t;
  }

  // A tensor whose values are compared as they are (e.g. an in-place op's operand).
  void compare(const std::string& name, const Tensor& t) { outs_.push_back({name, t, {}}); }
  // A host scalar result.
  void scalar(const std::string& name, double v) { scalars_[name] = v; }

  struct Out {
    std::string name;
    Tensor t;
    std::vector<double> start;
  };
  // name -> (values as doubles, GPU-side dtype for the tolerance)
  std::map<std::string, std::pair<std::vector<double>, DType>> collect() {
    std::map<std::string, std::pair<std::vector<double>, DType>> r;
    ops_.synchronize();
    for (auto& o : outs_) {
      std::vector<double> v(o.t.numel());
      ops_.download(o.t, v.data());
      for (size_t i = 0; i < o.start.size(); ++i) v[i] -= o.start[i];
      r[o.name] = {v, o.t.dtype()};
    }
    for (auto& [n, v] : scalars_) r[n] = {{v}, DType::F32};
    return r;
  }

 private:
  Ops& ops_;
  bool gpu_;
  std::map<std::string, std::vector<double>>& values_;
  Rng rng_;
  std::vector<Out> outs_;
  std::map<std::string, double> scalars_;
};

struct Case {
  std::string name;                 // "op/precision/shape"
  std::function<void(Env&)> run;
  std::map<std::string, double> tol;  // per-output overrides
};

constexpr DType F32 = DType::F32, BF16 = DType::BF16;
const char* prec(DType t) { return t == BF16 ? "bf16" : "f32"; }

std::vector<Case> make_cases() {
  std::vector<Case> cs;
  auto add = [&](std::string name, std::function<void(Env&)> fn,
                 std::map<std::string, double> tol = {}) { cs.push_back({name, fn, tol}); };

  // ---- memory --------------------------------------------------------------------------
  for (DType t : {F32, BF16})
    add(std::string("fill_zero/") + prec(t), [t](Env& e) {
      Tensor x = e.output("x", {1000, 3}, t);
      e.ops().fill_zero(x);
    });
  for (DType s : {F32, BF16})
    for (DType d : {F32, BF16})
      for (int64_t n : {int64_t(4099), int64_t(1) << 16})
        add("copy/" + std::string(prec(s)) + "->" + prec(d) + "/n" + std::to_string(n), [=](Env& e) {
          Tensor x = e.input("x", {n}, s);
          Tensor y = e.output("y", {n}, d);
          e.ops().copy(x, y);
        });
  for (DType t : {F32, BF16})
    add(std::string("upload+download/float/") + prec(t), [t](Env& e) {
      Tensor x = e.input("x", {3001}, t);
      std::vector<float> h(3001);
      e.ops().download(x, h.data());
      Tensor y = e.output("y", {3001}, t);
      e.ops().upload(y, h.data());
    });
  // init_normal: the CPU runs in f64, so the GPU's error is its rounding to f32 / bf16 (at
  // most half a unit of the last place, bf16 via f32) plus the last bit of CUDA's double
  // log / cos: the bound is one unit of the last place, 2^-23 (f32) or 2^-7 (bf16).
  struct IN { Shape shape; int64_t full_cols, row0, col0; };
  for (DType t : {F32, BF16})
    for (IN s : {IN{{1000, 3}, 3, 0, 0}, IN{{257, 96}, 384, 1024, 192}, IN{{3, 5, 64}, 64, 7, 0},
                 IN{{4099}, 1, 12288, 0}, IN{{2, 11}, int64_t(1) << 40, (int64_t(1) << 22) - 2, 17}}) {
      const std::string name = std::string("init_normal/") + prec(t) + "/" + shape_str(s.shape) +
                               "@" + std::to_string(s.row0) + "," + std::to_string(s.col0) + "/of" +
                               std::to_string(s.full_cols);
      const double tol = t == BF16 ? 0x1p-7 : 0x1p-23;
      add(name, [t, s](Env& e) {
        Tensor x = e.output("x", s.shape, t);
        e.ops().init_normal(x, 20251201, 5, 0.02, s.full_cols, s.row0, s.col0);
        Tensor y = e.output("y_std1_other_id", s.shape, t);
        e.ops().init_normal(y, 20251201, 6, 1.0, s.full_cols, s.row0, s.col0);
      }, {{"x", tol}, {"y_std1_other_id", tol}});
    }
  add("copy/f32->bf16/misaligned", [](Env& e) {
    Tensor x = e.input("x", {1001}, F32);
    Tensor y = e.output("y", {1001}, BF16);
    Tensor dst = y.flat_slice(2, 999);  // the first and last two stay poisoned on both
    e.ops().copy(x.flat_slice(1, 999), dst);
  });

  // ---- dense ---------------------------------------------------------------------------
  struct MM { int64_t M, N, K; };
  for (MM s : {MM{37, 53, 71}, MM{128, 256, 64}})
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (auto [ab, yt, beta] : {std::tuple<DType, DType, float>{F32, F32, 0.0f},
                                    {F32, F32, 1.0f}, {BF16, BF16, 0.0f}, {BF16, BF16, 1.0f},
                                    {BF16, F32, 1.0f}}) {
          std::string name = "matmul/" + std::string(prec(ab)) + "->" + prec(yt) + "/beta" +
                             std::to_string(int(beta)) + "/" + (ta ? "T" : "N") + (tb ? "T" : "N") +
                             "/" + std::to_string(s.M) + "x" + std::to_string(s.N) + "x" +
                             std::to_string(s.K);
          add(name, [=](Env& e) {
            Tensor a = e.input("a", ta ? Shape{s.K, s.M} : Shape{s.M, s.K}, ab);
            Tensor b = e.input("b", tb ? Shape{s.N, s.K} : Shape{s.K, s.N}, ab);
            Tensor y = beta == 0.0f ? e.output("y", {s.M, s.N}, yt) : e.accum("y", {s.M, s.N}, yt, 3.0);
            e.ops().matmul(a, ta, b, tb, y, 0.75f, beta);
          });
        }
  // y = op(a) op(b) + c with c a separate tensor (cuBLASLt's C input): the residual adds
  for (DType t : {F32, BF16})
    for (int tb = 0; tb < 2; ++tb)
      add(std::string("matmul_add/") + prec(t) + (tb ? "/NT" : "/NN"), [t, tb](Env& e) {
        Tensor a = e.input("a", {67, 48}, t);
        Tensor b = e.input("b", tb ? Shape{40, 48} : Shape{48, 40}, t);
        Tensor c = e.input("c", {67, 40}, t, 3.0);
        Tensor y = e.output("y", {67, 40}, t);
        e.ops().matmul_add(a, false, b, tb, c, y);
      });
  add("matmul/bf16->bf16/misaligned", [](Env& e) {
    Tensor a = e.input("a", {40, 37}, BF16);
    Tensor b = e.input("b", {29, 37}, BF16);
    Tensor y = e.output("y", {40, 29}, BF16);  // row 0 stays poisoned on both backends
    Tensor y_rows = y.slice_rows(1, 40);
    e.ops().matmul(a.slice_rows(1, 40), false, b, true, y_rows, 1.0f, 0.0f);
  });
  for (DType t : {F32, BF16}) {
    add(std::string("sum_squares/") + prec(t), [t](Env& e) {
      Tensor x = e.input("x", {100003}, t);
      e.scalar("ss", e.ops().sum_squares(x));
      e.scalar("ss_misaligned", e.ops().sum_squares(x.flat_slice(1, 70001)));
    });
    add(std::string("sum_squares_each/") + prec(t), [t](Env& e) {
      Tensor x = e.input("x", {100003}, t);
      Tensor w = e.input("w", {7}, t);
      const std::vector<double> s = e.ops().sum_squares_each({x, x.flat_slice(1, 70001), w});
      ASSERT_EQ(s.size(), 3u);
      e.scalar("each0", s[0]);
      e.scalar("each1_misaligned", s[1]);
      e.scalar("each2_small", s[2]);
    });
    add(std::string("scale/") + prec(t), [t](Env& e) {
      Tensor x = e.accum("x", {50001}, t, 1.0);
      e.ops().scale(x, -0.375f);
    });
    for (DType yt : {F32, BF16})
      add(std::string("axpy/") + prec(t) + "->" + prec(yt), [t, yt](Env& e) {
        Tensor x = e.input("x", {50001}, t);
        Tensor y = e.accum("y", {50001}, yt, 1.0);
        e.ops().axpy(0.625f, x, y);
      });
  }

  // ---- embedding ---------------------------------------------------------------------
  for (DType t : {F32, BF16})
    for (int64_t d : {int64_t(64), int64_t(37)}) {
      const std::string sh = "/d" + std::to_string(d);
      add(std::string("embedding_forward/") + prec(t) + sh, [=](Env& e) {
        Tensor tok = e.ids("tok", 600, 0, 50);
        Tensor table = e.input("table", {50, d}, t);
        Tensor out = e.output("out", {600, d}, t);
        e.ops().embedding_forward(tok, table, out);
      });
      add(std::string("embedding_backward/") + prec(t) + "->f32" + sh, [=](Env& e) {
        Tensor tok = e.ids("tok", 600, 0, 50);
        Tensor dout = e.input("dout", {600, d}, t);
        Tensor dtable = e.accum("dtable", {50, d}, F32, 2.0);
        e.ops().embedding_backward(tok, dout, dtable);
      });
    }

  // ---- RMSNorm -----------------------------------------------------------------------
  struct RN { int64_t rows, cols; };
  for (DType t : {F32, BF16})
    // (the warp kernels take 16 / 8 lanes per row at <= 128 / 64 columns: 2 / 4 rows a warp,
    // row counts that leave a warp's last group empty)
    for (RN s : {RN{300, 100}, RN{2500, 2048}, RN{4100, 256}, RN{700, 1000}, RN{20000, 264}, RN{40000, 64},
                 RN{5001, 128}, RN{3003, 40}, RN{777, 96}}) {
      const std::string sh = "/" + std::to_string(s.rows) + "x" + std::to_string(s.cols);
      add(std::string("rmsnorm_forward/") + prec(t) + sh, [=](Env& e) {
        Tensor x = e.input("x", {s.rows, s.cols}, t, 2.0, 0.3);
        Tensor w = e.input("w", {s.cols}, t, 0.2, 1.0);
        Tensor y = e.output("y", {s.rows, s.cols}, t);
        Tensor rstd = e.output("rstd", {s.rows}, F32);
        e.ops().rmsnorm_forward(x, w, 1e-5, 0.6f, y, rstd);
      });
      add(std::string("rmsnorm_backward/") + prec(t) + sh, [=](Env& e) {
        Tensor x = e.input("x", {s.rows, s.cols}, t, 2.0, 0.3);
        Tensor w = e.input("w", {s.cols}, t, 0.2, 1.0);
        Tensor y = e.output("y_unused", {s.rows, s.cols}, t);
        Tensor rstd = e.output("rstd", {s.rows}, F32);
        e.ops().rmsnorm_forward(x, w, 1e-5, 0.6f, y, rstd);
        Tensor dy = e.input("dy", {s.rows, s.cols}, t);
        Tensor dx = e.accum("dx", {s.rows, s.cols}, t, 0.3);
        Tensor dw = e.accum("dw", {s.cols}, F32, 10.0);
        e.ops().rmsnorm_backward(x, w, rstd, 0.6f, dy, dx, dw);
      });
    }

  // ---- RoPE --------------------------------------------------------------------------
  for (DType t : {F32, BF16})
    for (int64_t dh : {int64_t(16), int64_t(20), int64_t(128)})
      for (bool inv : {false, true})
        add(std::string("rope/") + prec(t) + "/dh" + std::to_string(dh) + (inv ? "/inverse" : ""),
            [=](Env& e) {
              Tensor x = e.input("x", {2, 37, 3, dh}, t);
              e.ops().rope(x, 10000.0, inv);
              e.compare("x", x);
            });

  // ---- differential lambda ----------------------------------------------------------------
  for (DType t : {F32, BF16}) {
    add(std::string("diff_lambda_forward/") + prec(t), [t](Env& e) {
      Tensor a = e.input("lq1", {64}, t, 0.1), b = e.input("lk1", {64}, t, 0.1);
      Tensor c = e.input("lq2", {64}, t, 0.1), d = e.input("lk2", {64}, t, 0.1);
      Tensor lam = e.output("lambda", {1}, F32);
      e.ops().diff_lambda_forward(a, b, c, d, 0.35, lam);
    });
    add(std::string("diff_lambda_backward/") + prec(t) + "->f32", [t](Env& e) {
      Tensor a = e.input("lq1", {64}, t, 0.1), b = e.input("lk1", {64}, t, 0.1);
      Tensor c = e.input("lq2", {64}, t, 0.1), d = e.input("lk2", {64}, t, 0.1);
      Tensor dl = e.input("dlambda", {1}, F32, 1.0, 0.5);
      Tensor ga = e.accum("dlq1", {64}, F32, 1.0), gb = e.accum("dlk1", {64}, F32, 1.0);
      Tensor gc = e.accum("dlq2", {64}, F32, 1.0), gd = e.accum("dlk2", {64}, F32, 1.0);
      e.ops().diff_lambda_backward(a, b, c, d, dl, ga, gb, gc, gd);
    });
  }

  // ---- attention (differential and standard), forward then backward ------------------------
  struct AS { int64_t B, S, h, hkv, dh; };
  auto shape_name = [](AS s) {
    return "/B" + std::to_string(s.B) + "S" + std::to_string(s.S) + "h" + std::to_string(s.h) +
           "kv" + std::to_string(s.hkv) + "dh" + std::to_string(s.dh);
  };
  // with_saved: the backend keeps its saved state (the fused kernels' O2n) for the backward;
  // without: the backward recomputes it. Both must match the reference.
  for (DType t : {F32, BF16})
    for (bool with_saved : {true, false})
      for (AS s : {AS{2, 45, 4, 2, 16}, AS{1, 70, 2, 1, 24}, AS{1, 33, 2, 2, 64}, AS{2, 77, 4, 2, 64},
                   AS{1, 40, 2, 1, 128}, AS{1, 1, 2, 1, 32}}) {
        // dlambda (f32) is a sum with cancellation: 1e-4 for bf16 inputs (2.5e-5 measured on the
        // simple path), with or without the kept O2n: the fused kernels sum P_2 o dP from
        // recomputed f32 values in both cases (from the bf16 O2n it had been 2e-3 to 5.3e-2).
        const std::map<std::string, double> tol =
            t == BF16 ? std::map<std::string, double>{{"dlambda", 1e-4}}
                      : std::map<std::string, double>{};
        add(std::string("diff_attention/") + prec(t) + (with_saved ? "/saved" : "") + shape_name(s), [=](Env& e) {
          Tensor q = e.input("q", {s.B, s.S, s.h, 2, s.dh}, t);
          Tensor k = e.input("k", {s.B, s.S, s.hkv, 2, s.dh}, t);
          Tensor v = e.input("v", {s.B, s.S, s.hkv, 2 * s.dh}, t);
          Tensor lam = e.input("lambda", {1}, F32, 0.1, 0.55);
          Tensor out = e.output("out", {s.B, s.S, s.h, 2 * s.dh}, t);
          Tensor lse = e.output("lse", {s.B, s.h, 2, s.S}, F32);
          const int64_t n_saved = e.ops().diff_attention_saved_numel(q);
          Tensor saved = with_saved && n_saved > 0 ? e.ops().empty({n_saved}, BF16) : Tensor();
          e.ops().diff_attention_forward(q, k, v, lam, out, lse, saved);
          Tensor dout = e.input("dout", {s.B, s.S, s.h, 2 * s.dh}, t);
          Tensor dq = e.output("dq", q.shape(), t), dk = e.output("dk", k.shape(), t);
          Tensor dv = e.output("dv", v.shape(), t), dlam = e.output("dlambda", {1}, F32);
          e.ops().diff_attention_backward(q, k, v, lam, out, lse, saved, dout, dq, dk, dv, dlam);
        }, tol);
      }
  for (DType t : {F32, BF16})
    // no GQA, even H, dh 64 / 128: the Hopper flash kernels (heads in pairs) where available
    for (AS s : {AS{2, 45, 4, 2, 32}, AS{1, 70, 3, 1, 40}, AS{2, 77, 8, 2, 64}, AS{1, 50, 2, 2, 128},
                 AS{1, 35, 2, 1, 256}, AS{1, 1, 2, 2, 16}, AS{2, 77, 8, 8, 64},
                 AS{1, 200, 4, 4, 64}, AS{1, 130, 2, 2, 128}})
      add(std::string("attention/") + prec(t) + shape_name(s), [=](Env& e) {
        Tensor q = e.input("q", {s.B, s.S, s.h, s.dh}, t);
        Tensor k = e.input("k", {s.B, s.S, s.hkv, s.dh}, t);
        Tensor v = e.input("v", {s.B, s.S, s.hkv, s.dh}, t);
        Tensor out = e.output("out", q.shape(), t);
        Tensor lse = e.output("lse", {s.B, s.h, s.S}, F32);
        e.ops().attention_forward(q, k, v, out, lse);
        Tensor dout = e.input("dout", q.shape(), t);
        Tensor dq = e.output("dq", q.shape(), t), dk = e.output("dk", k.shape(), t);
        Tensor dv = e.output("dv", v.shape(), t);
        e.ops().attention_backward(q, k, v, out, lse, dout, dq, dk, dv);
      });

  // ---- SwiGLU ------------------------------------------------------------------------
  for (DType t : {F32, BF16})
    for (int64_t n : {int64_t(4099), int64_t(3) * 5632}) {
      const std::string sh = "/n" + std::to_string(n);
      add(std::string("swiglu_forward/") + prec(t) + sh, [=](Env& e) {
        Tensor g = e.input("gate", {n}, t, 2.0), u = e.input("up", {n}, t);
        Tensor o = e.output("out", {n}, t);
        e.ops().swiglu_forward(g, u, o);
      });
      add(std::string("swiglu_backward/") + prec(t) + sh, [=](Env& e) {
        Tensor g = e.input("gate", {n}, t, 2.0), u = e.input("up", {n}, t);
        Tensor d = e.input("dout", {n}, t);
        Tensor dg = e.output("dgate", {n}, t), du = e.output("dup", {n}, t);
        e.ops().swiglu_backward(g, u, d, dg, du);
      });
    }

  // ---- Differential Transformer V2: the pairwise subtraction ----------------------------
  // att [B,S,2H,dh], z [B*S,H]; dh 64 and 128 take the 8-wide path, dh 6 the scalar one.
  struct V2S { int64_t B, S, H, dh; };
  for (DType t : {F32, BF16})
    for (V2S s : {V2S{2, 37, 4, 64}, V2S{1, 129, 8, 128}, V2S{3, 5, 3, 6}}) {
      const std::string sh = "/B" + std::to_string(s.B) + "S" + std::to_string(s.S) + "H" + std::to_string(s.H) +
                             "dh" + std::to_string(s.dh);
      add(std::string("diff_v2_combine_forward/") + prec(t) + sh, [=](Env& e) {
        Tensor att = e.input("att", {s.B, s.S, 2 * s.H, s.dh}, t);
        Tensor z = e.input("z", {s.B * s.S, s.H}, t, 2.0);
        Tensor out = e.output("out", {s.B, s.S, s.H, s.dh}, t);
        e.ops().diff_v2_combine_forward(att, z, out);
      });
      add(std::string("diff_v2_combine_backward/") + prec(t) + sh, [=](Env& e) {
        Tensor att = e.input("att", {s.B, s.S, 2 * s.H, s.dh}, t);
        Tensor z = e.input("z", {s.B * s.S, s.H}, t, 2.0);
        Tensor dout = e.input("dout", {s.B, s.S, s.H, s.dh}, t);
        Tensor datt = e.output("datt", att.shape(), t), dz = e.output("dz", z.shape(), t);
        e.ops().diff_v2_combine_backward(att, z, dout, datt, dz);
      });
    }

  // ---- cross-entropy ---------------------------------------------------------------------
  for (DType t : {F32, BF16})
    for (int64_t V : {int64_t(1000), int64_t(1001), int64_t(32000)})
      for (bool in_place : {false, true}) {
        const std::string name = std::string("cross_entropy/") + prec(t) + "/V" + std::to_string(V) +
                                 (in_place ? "/in-place" : "");
        add(name, [=](Env& e) {
          const int64_t rows = 37;
          Tensor logits = e.input("logits", {rows, V}, t, 3.0);
          Tensor tg = e.ids("targets", rows, 0, V, 5);
          Tensor losses = e.output("losses", {rows}, F32), lse = e.output("lse", {rows}, F32);
          e.ops().cross_entropy_forward(logits, tg, losses, lse);
          if (in_place) {
            e.ops().cross_entropy_backward(logits, tg, lse, 0.04f, logits);
            e.compare("dlogits", logits);
          } else {
            Tensor d = e.output("dlogits", {rows, V}, t);
            e.ops().cross_entropy_backward(logits, tg, lse, 0.04f, d);
          }
        });
      }

  // ---- AdamW -------------------------------------------------------------------------
  for (DType g : {F32, BF16})
    add(std::string("adamw_step/f32+grad_") + prec(g), [g](Env& e) {
      const int64_t n = 10007;
      Tensor p = e.accum("param", {n}, F32, 0.05);
      Tensor grad = e.input("grad", {n}, g, 0.01);
      Tensor m = e.accum("m", {n}, F32, 0.003, true);
      Tensor v = e.accum("v", {n}, F32, 1e-5, true, /*positive=*/true);
      AdamWParams hp;
      hp.lr = 2e-3f;
      hp.weight_decay = 0.1f;
      hp.step = 3;
      hp.grad_scale = 0.5f;
      e.ops().adamw_step(p, grad, m, v, hp);
    });
  // several tensors in one call, bf16 working copies (and one without), per-item hyper-parameters
  for (DType g : {F32, BF16})
    add(std::string("adamw_step_each/f32+grad_") + prec(g), [g](Env& e) {
      std::vector<AdamWTensors> items;
      const int64_t sizes[] = {10007, 1, 9, 8192 * 2 + 5, 300};
      for (int i = 0; i < 5; ++i) {
        const std::string k = std::to_string(i);
        const int64_t n = sizes[i];
        AdamWTensors t;
        t.param = e.accum("param" + k, {n}, F32, 0.05);
        t.grad = e.input("grad" + k, {n}, g, 0.01);
        t.m = e.accum("m" + k, {n}, F32, 0.003, true);
        t.v = e.accum("v" + k, {n}, F32, 1e-5, true, /*positive=*/true);
        t.hp.lr = 1e-3f * float(i + 1);
        t.hp.weight_decay = i % 2 ? 0.0f : 0.1f;
        t.hp.step = 1 + i;
        t.hp.grad_scale = i == 3 ? 0.5f : 1.0f;
        if (i != 2) t.working = e.output("working" + k, {n}, BF16);
        items.push_back(t);
      }
      e.ops().adamw_step_each(items);
    });
  return cs;
}

double rel_err(const std::vector<double>& g, const std::vector<double>& c, bool* finite) {
  double num = 0, den = 0;
  *finite = true;
  for (size_t i = 0; i < g.size(); ++i) {
    if (std::isnan(c[i]) && std::isnan(g[i])) continue;  // untouched on both (poison)
    if (!std::isfinite(g[i])) *finite = false;
    num += (g[i] - c[i]) * (g[i] - c[i]);
    den += c[i] * c[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

TEST(CudaOps, EveryOpMatchesTheCpuReference) {
  skip_without_gpu();
  auto gpu = make_cuda_ops(0);
  auto cpu = make_cpu_ops();
  std::printf("GPU backend: %s\n", gpu->name().c_str());
  std::printf("%-58s %-10s %12s %10s\n", "case", "output", "rel err", "tol");
  int n_checked = 0;
  uint64_t seed = 1;
  const char* filter = std::getenv("DIFFTRON_CUDA_OPS_FILTER");
  const std::regex only(filter ? filter : "");
  for (const Case& c : make_cases()) {
    if (filter && !std::regex_search(c.name, only)) continue;
    std::map<std::string, std::vector<double>> values;
    std::map<std::string, std::pair<std::vector<double>, DType>> got, ref;
    try {
      Env eg(*gpu, true, values, seed);
      c.run(eg);
      got = eg.collect();
      Env ec(*cpu, false, values, seed);
      c.run(ec);
      ref = ec.collect();
    } catch (const Error& err) {
      ADD_FAILURE() << c.name << ": threw: " << err.what();
      continue;
    }
    ++seed;
    ASSERT_EQ(got.size(), ref.size()) << c.name;
    for (auto& [name, gv] : got) {
      const auto& rv = ref.at(name).first;
      ASSERT_EQ(gv.first.size(), rv.size()) << c.name << " " << name;
      bool finite = true;
      const double err = rel_err(gv.first, rv, &finite);
      double tol = gv.second == BF16 ? kTolBf16 : kTolF32;
      if (c.tol.count(name)) tol = c.tol.at(name);
      const bool ok = finite && err <= tol;
      std::printf("%-58s %-10s %12.3e %10.1e %s\n", c.name.c_str(), name.c_str(), err, tol,
                  ok ? "" : (finite ? "FAIL" : "FAIL (non-finite)"));
      EXPECT_TRUE(finite) << c.name << " " << name << ": non-finite GPU values (poison left?)";
      EXPECT_LE(err, tol) << c.name << " " << name;
      ++n_checked;
    }
  }
  std::printf("%d outputs checked\n", n_checked);
}

// Bad arguments raise difftron::Error naming the op and the offending tensor or value.
// The gradient norm's one-synchronisation form gives each tensor's sum_squares bit for bit.
TEST(CudaOps, SumSquaresEachIsSumSquaresOfEach) {
  skip_without_gpu();
  auto gpu = make_cuda_ops(0);
  Rng rng(5);
  std::vector<Tensor> xs;
  for (int64_t n : {100003, 1, 4096, 0, 777}) {
    std::vector<float> h(static_cast<size_t>(n));
    for (auto& v : h) v = float(rng.normal());
    Tensor t = gpu->empty({n}, DType::BF16);
    if (n > 0) gpu->upload(t, h.data());
    xs.push_back(t);
  }
  xs.push_back(xs[0].flat_slice(3, 50000));  // misaligned
  const std::vector<double> each = gpu->sum_squares_each(xs);
  ASSERT_EQ(each.size(), xs.size());
  for (size_t i = 0; i < xs.size(); ++i) EXPECT_EQ(each[i], gpu->sum_squares(xs[i])) << "tensor " << i;
  EXPECT_EQ(each[3], 0.0);
  EXPECT_GT(each[0], 0.0);
}

// adamw_step_each gives, bit for bit, adamw_step then copy of each item: fresh random state,
// f32 and bf16 gradients, sizes that are not multiples of 8 (and one of several blocks),
// items misaligned in one tensor each, many small items, an empty one, working copies
// bf16, f32 and none.
TEST(CudaOps, AdamWStepEachIsAdamWStepThenCopy) {
  skip_without_gpu();
  auto gpu = make_cuda_ops(0);
  Ops& o = *gpu;
  Rng rng(17);
  struct Spec {
    int64_t n;
    DType grad, working;  // working I32: none
    int misaligned;       // -1 none, else which tensor starts 1-3 elements into its buffer:
                          // 0 param, 1 grad, 2 m, 3 v, 4 working
  };
  std::vector<Spec> specs = {{100003, F32, BF16, -1}, {1, BF16, BF16, -1},      {9, F32, DType::I32, -1},
                             {16389, BF16, BF16, 4},  {777, F32, BF16, 0},      {4099, BF16, DType::I32, 1},
                             {0, F32, BF16, -1},      {64, F32, F32, -1},       {1000, F32, BF16, 2},
                             {8200, BF16, BF16, 3},   {8192, F32, BF16, -1}};
  for (int i = 0; i < 40; ++i) specs.push_back({3 + i, i % 2 ? BF16 : F32, i % 3 ? BF16 : DType::I32, -1});
  // a random tensor of n elements, `shift` elements into a fresh buffer
  auto random = [&](int64_t n, DType dt, double scale, bool positive, int shift) {
    std::vector<float> h(size_t(n + shift));
    for (auto& x : h) x = float(positive ? scale * (0.1 + std::fabs(rng.normal())) : scale * rng.normal());
    Tensor t = o.empty({n + shift}, dt);
    if (!h.empty()) o.upload(t, h.data());
    return t.flat_slice(shift, n);
  };
  auto clone = [&](const Tensor& t) {
    Tensor c = o.empty({t.numel()}, t.dtype());
    o.copy(t, c);
    return c;
  };
  std::vector<AdamWTensors> fused, each;
  for (size_t i = 0; i < specs.size(); ++i) {
    const Spec& sp = specs[i];
    auto shift = [&](int which) { return sp.misaligned == which ? 1 + int(i % 3) : 0; };
    AdamWTensors t;
    t.param = random(sp.n, F32, 0.05, false, shift(0));
    t.grad = random(sp.n, sp.grad, 0.01, false, shift(1));
    t.m = random(sp.n, F32, 0.003, false, shift(2));
    t.v = random(sp.n, F32, 1e-5, true, shift(3));
    t.hp.lr = 1e-3f * float(1 + i % 3);
    t.hp.weight_decay = i % 2 ? 0.1f : 0.0f;
    t.hp.step = int64_t(1 + i % 5);
    t.hp.grad_scale = i % 4 == 1 ? 0.7f : 1.0f;
    AdamWTensors u = t;  // the same values in separate buffers, for the per-tensor path
    u.param = clone(t.param);
    u.m = clone(t.m);
    u.v = clone(t.v);
    if (sp.working != DType::I32) {
      // poisoned (NaN) in the fused path: an element it does not write cannot match
      const std::vector<float> nan(size_t(sp.n + shift(4)), std::numeric_limits<float>::quiet_NaN());
      Tensor w = o.empty({sp.n + shift(4)}, sp.working);
      if (!nan.empty()) o.upload(w, nan.data());
      t.working = w.flat_slice(shift(4), sp.n);
      u.working = o.empty({sp.n}, sp.working);
    }
    fused.push_back(t);
    each.push_back(u);
  }
  o.adamw_step_each(fused);
  for (AdamWTensors& u : each) {
    o.adamw_step(u.param, u.grad, u.m, u.v, u.hp);
    if (u.working.defined()) o.copy(u.param, u.working);
  }
  auto bytes = [&](const Tensor& t) {
    std::vector<unsigned char> b(t.nbytes());
    if (!b.empty()) o.download_bytes(t, b.data());
    return b;
  };
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(bytes(fused[i].param), bytes(each[i].param)) << "item " << i << " param";
    EXPECT_EQ(bytes(fused[i].m), bytes(each[i].m)) << "item " << i << " m";
    EXPECT_EQ(bytes(fused[i].v), bytes(each[i].v)) << "item " << i << " v";
    if (fused[i].working.defined())
      EXPECT_EQ(bytes(fused[i].working), bytes(each[i].working)) << "item " << i << " working";
  }
  // the working copy holds the updated weights (rounded), not its poison
  std::vector<float> p(100003), w(100003);
  o.download(fused[0].param, p.data());
  o.download(fused[0].working, w.data());
  for (size_t k = 0; k < p.size(); ++k) ASSERT_NEAR(w[k], p[k], std::fabs(p[k]) * 4e-3) << "element " << k;
}

TEST(CudaOps, BadArgumentsRaiseErrorsNamingTheOp) {
  skip_without_gpu();
  auto gpu = make_cuda_ops(0);
  Ops& o = *gpu;
  auto expect_error = [](const std::function<void()>& f, const std::vector<std::string>& parts) {
    try {
      f();
      ADD_FAILURE() << "no error raised (expected one mentioning '" << parts[0] << "')";
    } catch (const Error& e) {
      const std::string msg = e.what();
      for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    }
  };
  Tensor a = o.empty({4, 5}, DType::BF16), b = o.empty({6, 7}, DType::BF16), y = o.empty({4, 7}, DType::BF16);
  expect_error([&] { o.matmul(a, false, b, false, y); }, {"cuda matmul", "inner dims", "bf16[4, 5]"});
  Tensor y64 = o.empty({4, 7}, DType::F32);
  Tensor af = o.empty({4, 5}, DType::F32), bf = o.empty({5, 7}, DType::F32);
  Tensor ybf = o.empty({4, 7}, DType::BF16);
  expect_error([&] { o.matmul(af, false, bf, false, ybf); }, {"cuda matmul", "y is bf16[4, 7]"});
  expect_error([&] { o.empty({3}, DType::F64); }, {"cuda empty", "f64"});
  Tensor x = o.empty({3, 8}, DType::BF16), w = o.empty({8}, DType::BF16), rs = o.empty({3}, DType::BF16);
  expect_error([&] { o.rmsnorm_forward(x, w, 1e-5, 1.0f, x, rs); }, {"cuda rmsnorm_forward", "rstd", "bf16[3]"});
  auto cpu = make_cpu_ops();
  Tensor xc = cpu->empty({3, 8}, DType::F32);
  Tensor rstd = o.empty({3}, DType::F32);
  expect_error([&] { o.rmsnorm_forward(xc, w, 1e-5, 1.0f, x, rstd); }, {"cuda rmsnorm_forward", "on cpu"});
  // token ids outside the vocabulary: found on the device, reported with position and value
  Tensor tok = o.empty({4}, DType::I32), table = o.empty({10, 8}, DType::F32), out = o.empty({4, 8}, DType::F32);
  const int32_t bad[4] = {1, 2, 10, 3};
  o.upload(tok, bad);
  expect_error([&] { o.embedding_forward(tok, table, out); }, {"embedding_forward", "token id 10", "position 2"});
  Tensor dtab = o.empty({10, 8}, DType::F32);
  expect_error([&] { o.embedding_backward(tok, out, dtab); }, {"embedding_backward", "token id 10"});
  Tensor logits = o.empty({4, 10}, DType::F32), losses = o.empty({4}, DType::F32), lse = o.empty({4}, DType::F32);
  o.fill_zero(logits);
  expect_error([&] { o.cross_entropy_forward(logits, tok, losses, lse); }, {"cross_entropy_forward", "target id 10", "row 2"});
  Tensor q = o.empty({1, 4, 3, 2, 8}, DType::BF16), k = o.empty({1, 4, 2, 2, 8}, DType::BF16);
  Tensor v = o.empty({1, 4, 2, 16}, DType::BF16), lam = o.empty({1}, DType::F32);
  Tensor att = o.empty({1, 4, 3, 16}, DType::BF16), alse = o.empty({1, 3, 2, 4}, DType::F32);
  Tensor none;
  expect_error([&] { o.diff_attention_forward(q, k, v, lam, att, alse, none); }, {"diff_attention_forward", "multiple"});
  Tensor q2 = o.empty({1, 4, 2, 2, 256}, DType::BF16), k2 = o.empty({1, 4, 2, 2, 256}, DType::BF16);
  Tensor v2 = o.empty({1, 4, 2, 512}, DType::BF16), att2 = o.empty({1, 4, 2, 512}, DType::BF16);
  Tensor lse2 = o.empty({1, 2, 2, 4}, DType::F32);
  expect_error([&] { o.diff_attention_forward(q2, k2, v2, lam, att2, lse2, none); }, {"diff_attention_forward", "head_dim 256"});
  Tensor p16 = o.empty({8}, DType::BF16), g = o.empty({8}, DType::F32), m = o.empty({8}, DType::F32);
  expect_error([&] { o.adamw_step(p16, g, m, m, AdamWParams{}); }, {"adamw_step", "param", "bf16[8]"});
  Tensor p32 = o.empty({8}, DType::F32), v32 = o.empty({8}, DType::F32), w7 = o.empty({7}, DType::BF16);
  expect_error([&] { o.adamw_step_each({{p32, g, m, v32, AdamWParams{}, Tensor()}, {p16, g, m, v32, AdamWParams{}, Tensor()}}); },
               {"adamw_step_each item 1", "param", "bf16[8]"});
  expect_error([&] { o.adamw_step_each({{p32, g, m, v32, AdamWParams{}, w7}}); },
               {"adamw_step_each item 0", "working", "bf16[7]"});
}

}  // namespace
}  // namespace difftron
