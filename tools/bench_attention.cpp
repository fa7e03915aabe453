// `difftron bench-attention`: times the fused differential flash-attention kernels
// (kernels/cuda/diff_flash.h), forward and backward, on random bf16 inputs at the issue-4
// shapes and an S sweep, and prints ms, TFLOP/s and the ratio to the goal. The main
// columns time the default path (the forward saves O2n for the backward, as the model does by
// default); one more column the memory-saving path without O2n.
// FLOPs (causal, halved): fwd = 6 B h S^2 dh (two QK^T maps of dh + two PV over 2dh = 12 dh per
// query-key pair, S^2/2 pairs); bwd counted as 2.5 x fwd (the FlashAttention convention).
// --attn_std: standard causal attention instead (std_flash_*: the baseline's and Diff V2's, on
// the same Hopper kernels; shapes B,S,H,H_kv,dh with H query heads over H_kv K/V heads), with
// fwd = 2 B H S^2 dh (QK^T and PV of dh each = 4 dh per query-key pair, S^2/2 pairs), bwd
// 2.5 x fwd, next to the deterministic backward and the cuBLAS path (attention_gemm.cu).
#include <algorithm>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include <gflags/gflags.h>

#include "base/error.h"
#include "base/rng.h"
#include "launch/command.h"

#if DIFFTRON_HAVE_CUDA
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/diff_flash.h"
#endif

DEFINE_string(attn_shapes, "",
              "bench-attention: shapes 'B,S,h,h_kv,dh;...' (default: the issue-4 shapes and an S "
              "sweep from 1k to 16k at 16k tokens per batch, dh 64 and 128)");
DEFINE_string(attn_kernels, "default",
              "bench-attention: default (Hopper kernels, fused dQ with f32 atomics), deterministic "
              "(fixed-order dQ), or mma_sync (the kernels every other GPU runs)");
DEFINE_int32(attn_reps, 20, "bench-attention: timed repetitions per kernel (median reported)");
DEFINE_bool(attn_std, false,
            "bench-attention: time standard attention (std_flash_*, shapes B,S,H,H_kv,dh; default: "
            "dh 64 and 128, no GQA and GQA 2 and 4) instead of the differential kernels");
DEFINE_int32(attn_gemm_max_s, 4096,
             "bench-attention --attn_std: also time the cuBLAS path (attention_gemm.cu) for shapes "
             "with S up to this (0: never)");
DEFINE_int32(attn_simple_max_s, 4096,
             "bench-attention: also time the simple SIMT path (diff_attention_simple.cu) for "
             "shapes with S up to this (0: never)");

namespace difftron {
namespace {

struct Shape5 {
  int64_t B, S, h, h_kv, dh;
};

std::vector<Shape5> parse_shapes(const std::string& s) {
  std::vector<Shape5> out;
  std::stringstream all(s);
  std::string item;
  while (std::getline(all, item, ';')) {
    if (item.empty()) continue;
    Shape5 x{};
    if (std::sscanf(item.c_str(), "%ld,%ld,%ld,%ld,%ld", &x.B, &x.S, &x.h, &x.h_kv, &x.dh) != 5)
      throw_error("--attn_shapes: cannot parse '", item, "' (want B,S,h,h_kv,dh)");
    out.push_back(x);
  }
  return out;
}

// The reference (PyTorch cuDNN / FlashAttention composition, fwd + bwd ms).
double reference_ms(const Shape5& s) {
  if (s.B == 4 && s.S == 4096 && s.h == 16 && s.h_kv == 16 && s.dh == 64) return 4.55;
  if (s.B == 2 && s.S == 8192 && s.h == 16 && s.h_kv == 16 && s.dh == 64) return 7.77;
  if (s.B == 4 && s.S == 4096 && s.h == 8 && s.h_kv == 8 && s.dh == 128) return 5.27;
  return 0;
}

#if DIFFTRON_HAVE_CUDA
void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw_error("bench-attention: ", what, ": ", cudaGetErrorString(e));
}

// Fills n bf16 values with N(0, sigma^2) from a 1M-value random block (repeated).
void fill_random(__nv_bfloat16* dst, size_t n, uint64_t seed, float sigma) {
  const size_t block = size_t(1) << 20;
  std::vector<__nv_bfloat16> h(block);
  Rng rng(seed);
  for (auto& x : h) x = __float2bfloat16(float(sigma * rng.normal()));
  for (size_t off = 0; off < n; off += block)
    ck(cudaMemcpy(dst + off, h.data(), std::min(block, n - off) * 2, cudaMemcpyHostToDevice),
       "upload");
}

template <typename F>
double median_ms(F&& f, int reps, cudaStream_t stream = nullptr) {
  cudaEvent_t a, b;
  ck(cudaEventCreate(&a), "event");
  ck(cudaEventCreate(&b), "event");
  for (int i = 0; i < 3; ++i) f();  // warm-up
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    ck(cudaEventRecord(a, stream), "record");
    f();
    ck(cudaEventRecord(b, stream), "record");
    ck(cudaEventSynchronize(b), "sync");
    float ms = 0;
    ck(cudaEventElapsedTime(&ms, a, b), "elapsed");
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Tensor views of device buffers (no ownership) for the Tensor-level launchers.
Tensor view(void* p, Shape sh, DType t) {
  return Tensor(std::move(sh), t, Device::CUDA, p, [](void*) {});
}

// --attn_std: standard attention on the flash kernels, default and deterministic backward, and
// the cuBLAS path it replaces.
int run_std(std::vector<Shape5> shapes) {
  if (shapes.empty())
    shapes = {{8, 2048, 16, 16, 128}, {4, 4096, 16, 16, 128}, {8, 2048, 16, 8, 128},
              {8, 2048, 16, 4, 128},  {8, 2048, 32, 32, 64},  {8, 2048, 32, 16, 64},
              {8, 2048, 32, 8, 64},   {4, 4096, 32, 16, 64}};
  cudaDeviceProp prop{};
  ck(cudaGetDeviceProperties(&prop, 0), "properties");
  std::printf("bench-attention --attn_std (standard causal attention, std_flash_*) on %s;\n"
              "FLOPs: fwd = 2 B H S^2 dh (causal), bwd = 2.5 x fwd; median of %d; det bwd: "
              "--deterministic's backward;\ncuBLAS: attention_gemm.cu fwd+bwd ms (the path taken "
              "where the flash kernels do not apply)\n",
              prop.name, FLAGS_attn_reps);
  std::printf("%-26s %9s %9s %9s %8s %8s %8s %9s %8s %10s\n", "shape B,S,H,H_kv,dh", "fwd ms",
              "bwd ms", "total ms", "fwd TF/s", "bwd TF/s", "all TF/s", "det bwd", "det TF/s",
              "cuBLAS ms");
  const cuda::FlashOptions fast{false, true}, det{true, true};
  cuda::CudaContext ctx(0);
  for (const Shape5& s : shapes) {
    const cuda::DiffFlashDims d{s.B, s.S, s.h, s.h_kv, s.dh};
    std::string why;
    if (!cuda::std_flash_supported(d, true, fast, &why)) throw_error("bench-attention --attn_std: shape: ", why);
    const size_t nq = s.B * s.S * s.h * s.dh, nk = s.B * s.S * s.h_kv * s.dh, nl = s.B * s.h * s.S;
    const size_t ws = std::max(cuda::std_flash_backward_workspace_bytes(d, fast),
                               cuda::std_flash_backward_workspace_bytes(d, det));
    __nv_bfloat16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
    float* lse;
    void* w;
    for (auto* p : {&q, &o, &dout, &dq}) ck(cudaMalloc(p, nq * 2), "cudaMalloc");
    for (auto* p : {&k, &v, &dk, &dv}) ck(cudaMalloc(p, nk * 2), "cudaMalloc");
    ck(cudaMalloc(&lse, nl * 4), "cudaMalloc");
    ck(cudaMalloc(&w, ws), "cudaMalloc");
    fill_random(q, nq, 1, 1.0f);
    fill_random(k, nk, 2, 1.0f);
    fill_random(v, nk, 3, 1.0f);
    fill_random(dout, nq, 4, 1.0f);
    const int reps = FLAGS_attn_reps;
    const double fwd = median_ms([&] { cuda::std_flash_forward(d, q, k, v, o, lse, nullptr, fast); }, reps);
    const double bwd = median_ms(
        [&] { cuda::std_flash_backward(d, q, k, v, o, lse, dout, dq, dk, dv, w, ws, nullptr, fast); },
        reps);
    const double dbwd = median_ms(
        [&] { cuda::std_flash_backward(d, q, k, v, o, lse, dout, dq, dk, dv, w, ws, nullptr, det); },
        reps);
    ck(cudaDeviceSynchronize(), "sync");
    char gemm[32] = "-";
    if (s.S <= FLAGS_attn_gemm_max_s) {
      const DType BF = DType::BF16, F = DType::F32;
      Tensor tq = view(q, {s.B, s.S, s.h, s.dh}, BF), tk = view(k, {s.B, s.S, s.h_kv, s.dh}, BF);
      Tensor tv = view(v, tk.shape(), BF), to = view(o, tq.shape(), BF);
      Tensor tl = view(lse, {s.B, s.h, s.S}, F), tdo = view(dout, tq.shape(), BF);
      Tensor tdq = view(dq, tq.shape(), BF), tdk = view(dk, tk.shape(), BF), tdv = view(dv, tk.shape(), BF);
      if (cuda::attention_gemm_supported(tq, tk)) {
        const double gf = median_ms(
            [&] { cuda::attention_gemm_forward(ctx, tq, tk, tv, to, tl); }, 5, ctx.stream());
        const double gb = median_ms(
            [&] { cuda::attention_gemm_backward(ctx, tq, tk, tv, to, tl, tdo, tdq, tdk, tdv); }, 5,
            ctx.stream());
        ck(cudaStreamSynchronize(ctx.stream()), "sync");
        std::snprintf(gemm, sizeof gemm, "%.3f", gf + gb);
      }
    }
    const double f = 2.0 * s.B * s.h * double(s.S) * s.S * s.dh;
    char name[64];
    std::snprintf(name, sizeof name, "%ld,%ld,%ld,%ld,%ld", s.B, s.S, s.h, s.h_kv, s.dh);
    std::printf("%-26s %9.3f %9.3f %9.3f %8.1f %8.1f %8.1f %9.3f %8.1f %10s\n", name, fwd, bwd,
                fwd + bwd, f / fwd * 1e-9, 2.5 * f / bwd * 1e-9, 3.5 * f / (fwd + bwd) * 1e-9,
                dbwd, 2.5 * f / dbwd * 1e-9, gemm);
    std::fflush(stdout);
    for (void* p : {(void*)q, (void*)k, (void*)v, (void*)o, (void*)dout, (void*)dq, (void*)dk,
                    (void*)dv, (void*)lse, w})
      cudaFree(p);
  }
  return 0;
}

int run(int argc, char** argv) {
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "bench-attention: no GPU visible\n");
    return 1;
  }
  if (FLAGS_attn_std) return run_std(parse_shapes(FLAGS_attn_shapes));
  std::vector<Shape5> shapes = parse_shapes(FLAGS_attn_shapes);
  if (shapes.empty()) {
    shapes = {{4, 4096, 16, 16, 64}, {2, 8192, 16, 16, 64}, {4, 4096, 8, 8, 128}};
    for (int64_t dh : {64, 128})
      for (int64_t S : {1024, 2048, 4096, 8192, 16384}) {
        const Shape5 x{16384 / S, S, dh == 64 ? 16 : 8, dh == 64 ? 16 : 8, dh};
        if (reference_ms(x) == 0) shapes.push_back(x);
      }
    shapes.push_back({4, 4096, 16, 4, 64});  // GQA 4
  }
  cudaDeviceProp prop{};
  ck(cudaGetDeviceProperties(&prop, 0), "properties");
  std::printf("kernels: %s\n", FLAGS_attn_kernels.c_str());
  std::printf("bench-attention on %s; FLOPs: fwd = 6 B h S^2 dh (causal), bwd = 2.5 x fwd; "
              "median of %d\n",
              prop.name, FLAGS_attn_reps);
  std::printf("(the forward saves O2n = A2 V for the backward, the default; no-O2n: total ms\n"
              " without it, the backward recomputing; simple: the SIMT path\n"
              " diff_attention_simple.cu, fwd+bwd ms)\n");
  std::printf("%-26s %9s %9s %9s %8s %8s %8s %8s %8s %9s %10s\n", "shape B,S,h,h_kv,dh", "fwd ms",
              "bwd ms", "total ms", "fwd TF/s", "bwd TF/s", "all TF/s", "goal ms", "/goal",
              "no-O2n ms", "simple ms");
  cuda::FlashOptions opts;
  if (FLAGS_attn_kernels == "deterministic") opts.deterministic = true;
  else if (FLAGS_attn_kernels == "mma_sync") opts.hopper_kernels = false;
  else if (FLAGS_attn_kernels != "default")
    throw_error("--attn_kernels: unknown '", FLAGS_attn_kernels, "' (default, deterministic or mma_sync)");
  cuda::CudaContext ctx(0);
  for (const Shape5& s : shapes) {
    cuda::DiffFlashDims d{s.B, s.S, s.h, s.h_kv, s.dh};
    std::string why;
    if (!cuda::diff_flash_supported(d, &why)) throw_error("bench-attention: shape: ", why);
    const size_t nq = s.B * s.S * s.h * 2 * s.dh, nk = s.B * s.S * s.h_kv * 2 * s.dh;
    const size_t nl = s.B * s.h * 2 * s.S, ws = cuda::diff_flash_backward_workspace_bytes(d, opts);
    __nv_bfloat16 *q, *k, *v, *o, *o2, *dout, *dq, *dk, *dv;
    float *lse, *lam, *dlam;
    void* w;
    for (auto* p : {&q, &o, &o2, &dout, &dq}) ck(cudaMalloc(p, nq * 2), "cudaMalloc");
    for (auto* p : {&k, &v, &dk, &dv}) ck(cudaMalloc(p, nk * 2), "cudaMalloc");
    ck(cudaMalloc(&lse, nl * 4), "cudaMalloc");
    ck(cudaMalloc(&lam, 4), "cudaMalloc");
    ck(cudaMalloc(&dlam, 4), "cudaMalloc");
    ck(cudaMalloc(&w, ws), "cudaMalloc");
    fill_random(q, nq, 1, 1.0f);
    fill_random(k, nk, 2, 1.0f);
    fill_random(v, nk, 3, 1.0f);
    fill_random(dout, nq, 4, 1.0f);
    const float lam_h = 0.6f;
    ck(cudaMemcpy(lam, &lam_h, 4, cudaMemcpyHostToDevice), "upload");

    const int reps = FLAGS_attn_reps;
    // the default path: the forward saves O2n, the backward uses it
    const double fwd = median_ms(
        [&] { cuda::diff_flash_forward(d, q, k, v, lam, o, lse, nullptr, o2, opts); }, reps);
    const double bwd = median_ms(
        [&] {
          cuda::diff_flash_backward(d, q, k, v, lam, o, lse, dout, dq, dk, dv, dlam, w, ws,
                                    nullptr, o2, opts);
        },
        reps);
    // the memory-saving path: no O2n, the backward recomputes D2'
    const double fwd2 = median_ms(
        [&] { cuda::diff_flash_forward(d, q, k, v, lam, o, lse, nullptr, nullptr, opts); }, reps);
    const double bwd2 = median_ms(
        [&] {
          cuda::diff_flash_backward(d, q, k, v, lam, o, lse, dout, dq, dk, dv, dlam, w, ws,
                                    nullptr, nullptr, opts);
        },
        reps);
    ck(cudaDeviceSynchronize(), "sync");
    const double f = 6.0 * s.B * s.h * double(s.S) * s.S * s.dh;
    const double ref = reference_ms(s);
    char name[64], goal[16] = "-", ratio[16] = "-";
    std::snprintf(name, sizeof name, "%ld,%ld,%ld,%ld,%ld", s.B, s.S, s.h, s.h_kv, s.dh);
    if (ref > 0) {
      std::snprintf(goal, sizeof goal, "%.2f", 0.6 * ref);
      std::snprintf(ratio, sizeof ratio, "%.2f", (fwd + bwd) / (0.6 * ref));
    }
    char simple[32] = "-";
    if (s.S <= FLAGS_attn_simple_max_s) {
      // the simple path on the same buffers, through its Tensor launchers (views, no ownership)
      const DType BF = DType::BF16, F = DType::F32;
      Tensor tq = view(q, {s.B, s.S, s.h, 2, s.dh}, BF), tk = view(k, {s.B, s.S, s.h_kv, 2, s.dh}, BF);
      Tensor tv = view(v, {s.B, s.S, s.h_kv, 2 * s.dh}, BF), to = view(o, {s.B, s.S, s.h, 2 * s.dh}, BF);
      Tensor tl = view(lse, {s.B, s.h, 2, s.S}, F), tlam = view(lam, {1}, F), tdl = view(dlam, {1}, F);
      Tensor tdo = view(dout, to.shape(), BF), tdq = view(dq, tq.shape(), BF);
      Tensor tdk = view(dk, tk.shape(), BF), tdv = view(dv, tv.shape(), BF);
      const double sf = median_ms(
          [&] { cuda::diff_attention_simple_forward(ctx, tq, tk, tv, tlam, to, tl); }, 3,
          ctx.stream());
      const double sb = median_ms(
          [&] {
            cuda::diff_attention_simple_backward(ctx, tq, tk, tv, tlam, tl, tdo, tdq, tdk, tdv, tdl);
          },
          3, ctx.stream());
      ck(cudaStreamSynchronize(ctx.stream()), "sync");
      std::snprintf(simple, sizeof simple, "%.1f+%.1f", sf, sb);
    }
    std::printf("%-26s %9.3f %9.3f %9.3f %8.1f %8.1f %8.1f %8s %8s %9.3f %10s\n", name, fwd, bwd,
                fwd + bwd, f / fwd * 1e-9, 2.5 * f / bwd * 1e-9, 3.5 * f / (fwd + bwd) * 1e-9, goal,
                ratio, fwd2 + bwd2, simple);
    std::fflush(stdout);
    for (void* p : {(void*)q, (void*)k, (void*)v, (void*)o, (void*)o2, (void*)dout, (void*)dq,
                    (void*)dk, (void*)dv, (void*)lse, (void*)lam, (void*)dlam, w})
      cudaFree(p);
  }
  return 0;
}
#else
int run(int, char**) {
  std::fprintf(stderr, "bench-attention: difftron was built without CUDA\n");
  return 1;
}
#endif

}  // namespace
}  // namespace difftron

DIFFTRON_COMMAND("bench-attention",
                 "time the fused differential flash-attention kernels, or with --attn_std standard "
                 "attention on them (fwd, bwd; ms, TFLOP/s)",
                 difftron::run);
