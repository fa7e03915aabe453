// The fused differential flash-attention kernels (kernels/cuda/diff_flash.h) against the CPU
// reference (kernels/cpu/diff_attention.cpp, in double on the same bf16-rounded inputs), on
// fresh random inputs: ragged S, GQA and not, dh 64 and 128; outputs poisoned before each run.
// Also standard attention on the same kernels (std_flash_*, vs kernels/cpu/attention.cpp):
// GQA groups 1, 2, 4, 6, dh 64 and 128, both Hopper backward modes.
// Exits 77 (ctest SKIP) when no GPU is present.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "base/error.h"
#include "base/rng.h"
#include "kernels/cpu/reference.h"

#if DIFFTRON_HAVE_CUDA
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/diff_flash.h"
#endif

namespace difftron {
namespace {

#if DIFFTRON_HAVE_CUDA
void require_gpu() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::fprintf(stderr, "test_cuda_diff_flash: no GPU, skipping\n");
    std::exit(77);
  }
}

#define CUDA_OK(x)                                                                   \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    ASSERT_EQ(e_, cudaSuccess) << #x << ": " << cudaGetErrorString(e_);              \
  } while (0)

using cuda::DiffFlashDims;

// Host data rounded to bf16, kept both as bf16 (for the GPU) and double (for the reference).
struct Bf16Data {
  std::vector<__nv_bfloat16> bf;
  std::vector<double> d;
};
Bf16Data random_bf16(size_t n, uint64_t seed, double sigma) {
  Rng rng(seed);
  Bf16Data r;
  r.bf.resize(n);
  r.d.resize(n);
  for (size_t i = 0; i < n; ++i) {
    r.bf[i] = __float2bfloat16(float(sigma * rng.normal()));
    r.d[i] = double(__bfloat162float(r.bf[i]));
  }
  return r;
}

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    if (cudaMalloc(&p, count * sizeof(T) + 16) != cudaSuccess) throw_error("cudaMalloc failed");
    cudaMemset(p, 0xFF, count * sizeof(T));  // poison: NaN in both bf16 and f32
  }
  DevBuf(const std::vector<T>& h) : DevBuf(h.size()) {
    cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~DevBuf() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
};

std::vector<double> to_double(const std::vector<__nv_bfloat16>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = double(__bfloat162float(v[i]));
  return r;
}
std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

double l2(const std::vector<double>& a) {
  double s = 0;
  for (double x : a) s += x * x;
  return std::sqrt(s);
}
// ||a - ref|| / ||ref||, or / `scale` where ref is exactly zero (dQ, dK at S = 1, where each
// softmax is the constant 1). NaN (unwritten or poisoned) makes it NaN, failing any bound.
double rel_l2(const std::vector<double>& a, const std::vector<double>& ref, double scale = 0) {
  double num = 0;
  for (size_t i = 0; i < ref.size(); ++i) num += (a[i] - ref[i]) * (a[i] - ref[i]);
  const double den = l2(ref);
  return std::sqrt(num) / (den > 0 ? den : scale);
}
bool all_finite(const std::vector<double>& a) {
  for (double x : a)
    if (!std::isfinite(x)) return false;
  return true;
}

struct Case {
  int64_t B, S, h, h_kv, dh;
  double lambda, q_sigma;
};
std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return "B" + std::to_string(c.B) + "_S" + std::to_string(c.S) + "_h" + std::to_string(c.h) +
         "_hkv" + std::to_string(c.h_kv) + "_dh" + std::to_string(c.dh) + "_" +
         std::to_string(info.index);
}

class DiffFlash : public ::testing::TestWithParam<Case> {};

void check_case(const Case& c, const cuda::FlashOptions& opts) {
  const DiffFlashDims d{c.B, c.S, c.h, c.h_kv, c.dh};
  ASSERT_TRUE(cuda::diff_flash_supported(d));
  const size_t nq = c.B * c.S * c.h * 2 * c.dh, nk = c.B * c.S * c.h_kv * 2 * c.dh;
  const size_t nl = c.B * c.h * 2 * c.S;
  const uint64_t seed = 1000 + uint64_t(c.S) * 7 + uint64_t(c.dh) + uint64_t(c.h_kv) * 13;
  Bf16Data q = random_bf16(nq, seed, c.q_sigma), k = random_bf16(nk, seed + 1, 1.0);
  Bf16Data v = random_bf16(nk, seed + 2, 1.0), dout = random_bf16(nq, seed + 3, 1.0);
  const float lam = float(c.lambda);

  DevBuf<__nv_bfloat16> dq_(q.bf), dk_(k.bf), dv_(v.bf), ddo(dout.bf);
  DevBuf<__nv_bfloat16> dout_o(nq), dgq(nq), dgk(nk), dgv(nk);
  DevBuf<float> dlse(nl), dlam(std::vector<float>{lam}), dglam(1);
  const size_t ws = cuda::diff_flash_backward_workspace_bytes(d, opts);
  DevBuf<uint8_t> dws(ws);

  cuda::diff_flash_forward(d, dq_.p, dk_.p, dv_.p, dlam.p, dout_o.p, dlse.p, nullptr, nullptr, opts);
  cuda::diff_flash_backward(d, dq_.p, dk_.p, dv_.p, dlam.p, dout_o.p, dlse.p, ddo.p, dgq.p, dgk.p,
                            dgv.p, dglam.p, dws.p, ws, nullptr, nullptr, opts);
  CUDA_OK(cudaDeviceSynchronize());

  // reference in double on the same rounded inputs (lambda rounded to f32 like the device's)
  std::vector<double> ro(nq), rl(nl), rdq(nq), rdk(nk), rdv(nk);
  double rdlam = 0;
  cpu::diff_attention_forward(q.d.data(), k.d.data(), v.d.data(), double(lam), ro.data(),
                              rl.data(), c.B, c.S, c.h, c.h_kv, c.dh);
  cpu::diff_attention_backward(q.d.data(), k.d.data(), v.d.data(), double(lam), rl.data(),
                               dout.d.data(), rdq.data(), rdk.data(), rdv.data(), &rdlam, c.B, c.S,
                               c.h, c.h_kv, c.dh);

  const std::vector<double> go = to_double(dout_o.get()), gl = to_double(dlse.get());
  const std::vector<double> gq = to_double(dgq.get()), gk = to_double(dgk.get());
  const std::vector<double> gv = to_double(dgv.get());
  const double glam = double(dglam.get()[0]);
  for (auto* t : {&go, &gl, &gq, &gk, &gv}) ASSERT_TRUE(all_finite(*t)) << "unwritten or NaN output";

  const double e_out = rel_l2(go, ro), e_lse = rel_l2(gl, rl);
  const double e_dv = rel_l2(gv, rdv);
  const double e_dq = rel_l2(gq, rdq, l2(rdv)), e_dk = rel_l2(gk, rdk, l2(rdv));
  const double e_lam = std::fabs(glam - rdlam) / std::max(std::fabs(rdlam), 1e-3);
  std::printf("  out %.2e  lse %.2e  dq %.2e  dk %.2e  dv %.2e  dlambda %.2e (%.5g vs %.5g)\n",
              e_out, e_lse, e_dq, e_dk, e_dv, e_lam, glam, rdlam);
  EXPECT_LT(e_out, 1e-2);
  EXPECT_LT(e_lse, 1e-4);
  EXPECT_LT(e_dq, 1e-2);
  EXPECT_LT(e_dk, 1e-2);
  EXPECT_LT(e_dv, 1e-2);
  EXPECT_LT(e_lam, 1e-2);

  // the optional saved-O2n path (the model's default): O2n = O(lambda = 0) - O(lambda = 1) by
  // the reference, and the backward given it must reach the same gradients
  float glam_o2 = 0.f;
  {
    std::vector<double> o_l0(nq), o_l1(nq), scratch(nl);
    cpu::diff_attention_forward(q.d.data(), k.d.data(), v.d.data(), 0.0, o_l0.data(),
                                scratch.data(), c.B, c.S, c.h, c.h_kv, c.dh);
    cpu::diff_attention_forward(q.d.data(), k.d.data(), v.d.data(), 1.0, o_l1.data(),
                                scratch.data(), c.B, c.S, c.h, c.h_kv, c.dh);
    std::vector<double> ro2(nq);
    for (size_t i = 0; i < nq; ++i) ro2[i] = o_l0[i] - o_l1[i];
    DevBuf<__nv_bfloat16> do2(nq), dgq2(nq), dgk2(nk), dgv2(nk);
    DevBuf<float> dglam2(1);
    cuda::diff_flash_forward(d, dq_.p, dk_.p, dv_.p, dlam.p, dout_o.p, dlse.p, nullptr, do2.p, opts);
    cuda::diff_flash_backward(d, dq_.p, dk_.p, dv_.p, dlam.p, dout_o.p, dlse.p, ddo.p, dgq2.p,
                              dgk2.p, dgv2.p, dglam2.p, dws.p, ws, nullptr, do2.p, opts);
    CUDA_OK(cudaDeviceSynchronize());
    const double e_o2 = rel_l2(to_double(do2.get()), ro2);
    const double f_dq = rel_l2(to_double(dgq2.get()), rdq, l2(rdv));
    const double f_dk = rel_l2(to_double(dgk2.get()), rdk, l2(rdv));
    const double f_dv = rel_l2(to_double(dgv2.get()), rdv);
    const double f_lam = std::fabs(double(dglam2.get()[0]) - rdlam) / std::max(std::fabs(rdlam), 1e-3);
    std::printf("  with saved O2n: o2 %.2e  dq %.2e  dk %.2e  dv %.2e  dlambda %.2e\n", e_o2, f_dq,
                f_dk, f_dv, f_lam);
    EXPECT_LT(e_o2, 1e-2);
    EXPECT_LT(f_dq, 1e-2);
    EXPECT_LT(f_dk, 1e-2);
    EXPECT_LT(f_dv, 1e-2);
    EXPECT_LT(f_lam, 1e-2);
    glam_o2 = dglam2.get()[0];
    // asked for determinism, the saved-O2n backward repeats to the bit as well
    if (opts.deterministic) {
      const std::vector<double> q1 = to_double(dgq2.get()), k1 = to_double(dgk2.get());
      const std::vector<double> v1 = to_double(dgv2.get());
      cuda::diff_flash_backward(d, dq_.p, dk_.p, dv_.p, dlam.p, dout_o.p, dlse.p, ddo.p, dgq2.p,
                                dgk2.p, dgv2.p, dglam2.p, dws.p, ws, nullptr, do2.p, opts);
      CUDA_OK(cudaDeviceSynchronize());
      EXPECT_EQ(to_double(dgq2.get()), q1);
      EXPECT_EQ(to_double(dgk2.get()), k1);
      EXPECT_EQ(to_double(dgv2.get()), v1);
      EXPECT_EQ(dglam2.get()[0], glam_o2);
    }
  }

  // deterministic: a second backward gives the same bits
  cuda::diff_flash_backward(d, dq_.p, dk_.p, dv_.p, dlam.p, dout_o.p, dlse.p, ddo.p, dgq.p, dgk.p,
                            dgv.p, dglam.p, dws.p, ws, nullptr, nullptr, opts);
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(to_double(dgq.get()), gq);
  EXPECT_EQ(to_double(dgk.get()), gk);
  EXPECT_EQ(to_double(dgv.get()), gv);
  EXPECT_EQ(double(dglam.get()[0]), glam);
  // dlambda does not depend on O2n (the dK/dV kernel sums P_2 o dP from recomputed f32 values):
  // with and without it on the same forward outputs, the same bits
  EXPECT_EQ(dglam.get()[0], glam_o2) << "dlambda depends on whether O2n was given";
}

// Every kernel path: on sm_90 builds and GPUs the wgmma kernels (the default; with the saved
// O2n at dh 64 that is the fused-dQ backward with float atomics), the same deterministic
// (wgmma dK/dV + the dQ kernel), and the mma.sync kernels (hopper_kernels off, every other GPU).
TEST_P(DiffFlash, ForwardAndBackwardMatchCpuReference) {
  require_gpu();
  struct Mode {
    const char* name;
    cuda::FlashOptions opts;
  };
  for (const Mode& m : {Mode{"default", {false, true}}, Mode{"deterministic", {true, true}},
                        Mode{"mma.sync", {true, false}}}) {
    std::printf(" %s kernels\n", m.name);
    SCOPED_TRACE(std::string("kernels: ") + m.name);
    check_case(GetParam(), m.opts);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DiffFlash,
    ::testing::Values(Case{1, 64, 2, 2, 64, 0.55, 1.0},    // one tile, aligned
                      Case{2, 100, 4, 2, 64, 0.31, 1.0},   // ragged, GQA 2
                      Case{1, 1, 2, 1, 64, 0.8, 1.0},      // a single position
                      Case{1, 257, 4, 1, 64, -0.2, 2.5},   // ragged past 4 tiles, GQA 4, peaky
                      Case{2, 70, 2, 2, 128, 0.62, 1.0},   // dh 128, ragged
                      Case{1, 200, 4, 2, 128, 0.45, 2.0},  // dh 128, GQA, several tiles
                      Case{1, 33, 3, 3, 128, 0.2, 1.0},    // odd head count, S just past a tile
                      Case{1, 515, 2, 1, 64, 0.7, 1.5},    // longer, many tiles, GQA
                      Case{1, 389, 2, 2, 128, 0.5, 1.5}),  // longer, dh 128
    case_name);

TEST(DiffFlashApi, RejectsUnsupportedShapes) {
  std::string why;
  EXPECT_FALSE(cuda::diff_flash_supported({1, 16, 2, 2, 96}, &why));
  EXPECT_NE(why.find("96"), std::string::npos) << why;
  EXPECT_FALSE(cuda::diff_flash_supported({1, 16, 3, 2, 64}, &why));
  EXPECT_NE(why.find("h_kv"), std::string::npos) << why;
  EXPECT_FALSE(cuda::diff_flash_supported({0, 16, 2, 2, 64}, &why));
  EXPECT_THROW(cuda::diff_flash_forward({1, 16, 2, 2, 96}, nullptr, nullptr, nullptr, nullptr,
                                        nullptr, nullptr, nullptr),
               Error);
}

// ---- standard attention on the flash kernels (std_flash_*, the baseline's and Diff V2's) -------
// Against cpu::attention_* in double on the same bf16-rounded inputs. Tolerances as above: the
// outputs are rounded to bf16 (relative L2 ~1e-3 from that alone) and the kernels round P and
// dS to bf16 for the MMAs (a few 1e-3 more), so 1e-2 relative L2 for out, dq, dk, dv; lse is
// f32 throughout (1e-4).
struct StdCase {
  int64_t B, S, H, H_kv, dh;
  double q_sigma;
};
std::string std_case_name(const ::testing::TestParamInfo<StdCase>& info) {
  const StdCase& c = info.param;
  return "B" + std::to_string(c.B) + "_S" + std::to_string(c.S) + "_H" + std::to_string(c.H) +
         "_Hkv" + std::to_string(c.H_kv) + "_dh" + std::to_string(c.dh) + "_" +
         std::to_string(info.index);
}

class StdFlash : public ::testing::TestWithParam<StdCase> {};

void check_std_case(const StdCase& c, const cuda::FlashOptions& opts) {
  const DiffFlashDims d{c.B, c.S, c.H, c.H_kv, c.dh};
  std::string why;
  ASSERT_TRUE(cuda::std_flash_supported(d, false, opts, &why)) << why;
  ASSERT_TRUE(cuda::std_flash_supported(d, true, opts, &why)) << why;
  const size_t nq = c.B * c.S * c.H * c.dh, nk = c.B * c.S * c.H_kv * c.dh;
  const size_t nl = c.B * c.H * c.S;
  const uint64_t seed = 5000 + uint64_t(c.S) * 11 + uint64_t(c.dh) + uint64_t(c.H_kv) * 17;
  Bf16Data q = random_bf16(nq, seed, c.q_sigma), k = random_bf16(nk, seed + 1, 1.0);
  Bf16Data v = random_bf16(nk, seed + 2, 1.0), dout = random_bf16(nq, seed + 3, 1.0);

  DevBuf<__nv_bfloat16> dq_(q.bf), dk_(k.bf), dv_(v.bf), ddo(dout.bf);
  DevBuf<__nv_bfloat16> dout_o(nq), dgq(nq), dgk(nk), dgv(nk);
  DevBuf<float> dlse(nl);
  const size_t ws = cuda::std_flash_backward_workspace_bytes(d, opts);
  DevBuf<uint8_t> dws(ws);

  cuda::std_flash_forward(d, dq_.p, dk_.p, dv_.p, dout_o.p, dlse.p, nullptr, opts);
  cuda::std_flash_backward(d, dq_.p, dk_.p, dv_.p, dout_o.p, dlse.p, ddo.p, dgq.p, dgk.p, dgv.p,
                           dws.p, ws, nullptr, opts);
  CUDA_OK(cudaDeviceSynchronize());

  std::vector<double> ro(nq), rl(nl), rdq(nq), rdk(nk), rdv(nk);
  cpu::attention_forward(q.d.data(), k.d.data(), v.d.data(), ro.data(), rl.data(), c.B, c.S, c.H,
                         c.H_kv, c.dh);
  cpu::attention_backward(q.d.data(), k.d.data(), v.d.data(), ro.data(), rl.data(), dout.d.data(),
                          rdq.data(), rdk.data(), rdv.data(), c.B, c.S, c.H, c.H_kv, c.dh);

  const std::vector<double> go = to_double(dout_o.get()), gl = to_double(dlse.get());
  const std::vector<double> gq = to_double(dgq.get()), gk = to_double(dgk.get());
  const std::vector<double> gv = to_double(dgv.get());
  for (auto* t : {&go, &gl, &gq, &gk, &gv}) ASSERT_TRUE(all_finite(*t)) << "unwritten or NaN output";
  const double e_out = rel_l2(go, ro), e_lse = rel_l2(gl, rl), e_dv = rel_l2(gv, rdv);
  const double e_dq = rel_l2(gq, rdq, l2(rdv)), e_dk = rel_l2(gk, rdk, l2(rdv));
  std::printf("  out %.2e  lse %.2e  dq %.2e  dk %.2e  dv %.2e\n", e_out, e_lse, e_dq, e_dk, e_dv);
  EXPECT_LT(e_out, 1e-2);
  EXPECT_LT(e_lse, 1e-4);
  EXPECT_LT(e_dq, 1e-2);
  EXPECT_LT(e_dk, 1e-2);
  EXPECT_LT(e_dv, 1e-2);

  // a second forward and backward on the same inputs (outputs poisoned in between): dK, dV (fixed
  // order in every mode: a K/V head's sums over its heads run in registers) and the forward
  // repeat to the bit; dQ too when deterministic (else it is summed with f32 atomics)
  for (auto* b : {&dout_o, &dgq, &dgk, &dgv})
    CUDA_OK(cudaMemset(b->p, 0xFF, b->n * sizeof(__nv_bfloat16)));
  CUDA_OK(cudaMemset(dlse.p, 0xFF, nl * sizeof(float)));
  cuda::std_flash_forward(d, dq_.p, dk_.p, dv_.p, dout_o.p, dlse.p, nullptr, opts);
  cuda::std_flash_backward(d, dq_.p, dk_.p, dv_.p, dout_o.p, dlse.p, ddo.p, dgq.p, dgk.p, dgv.p,
                           dws.p, ws, nullptr, opts);
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(to_double(dout_o.get()), go);
  EXPECT_EQ(to_double(dlse.get()), gl);
  EXPECT_EQ(to_double(dgk.get()), gk);
  EXPECT_EQ(to_double(dgv.get()), gv);
  const std::vector<double> gq2 = to_double(dgq.get());
  if (opts.deterministic) {
    EXPECT_EQ(gq2, gq);
  } else {
    ASSERT_TRUE(all_finite(gq2));
    EXPECT_LT(rel_l2(gq2, gq, 1.0), 1e-2);
  }
}

// Both Hopper paths: the default (fused dQ with f32 atomics) and deterministic (the mma.sync dQ
// kernel, fixed order). Needs the sm_90a kernels and a compute capability 9.x GPU (else skipped:
// the CUDA backend takes cuBLAS there).
TEST_P(StdFlash, ForwardAndBackwardMatchCpuReference) {
  require_gpu();
  if (!cuda::std_flash_supported({1, 64, 2, 2, 64}, true)) GTEST_SKIP() << "no Hopper flash kernels";
  struct Mode {
    const char* name;
    cuda::FlashOptions opts;
  };
  for (const Mode& m : {Mode{"default", {false, true}}, Mode{"deterministic", {true, true}}}) {
    std::printf(" %s kernels\n", m.name);
    SCOPED_TRACE(std::string("kernels: ") + m.name);
    check_std_case(GetParam(), m.opts);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, StdFlash,
    ::testing::Values(StdCase{2, 200, 8, 4, 64, 1.0},    // GQA 2 (Diff V2's layout), ragged
                      StdCase{2, 200, 8, 2, 64, 1.5},    // GQA 4
                      StdCase{2, 200, 8, 4, 128, 1.0},   // dh 128, GQA 2
                      StdCase{2, 200, 8, 2, 128, 2.0},   // dh 128, GQA 4, peaky
                      StdCase{2, 1000, 4, 2, 64, 1.0},   // long, GQA 2
                      StdCase{2, 1000, 8, 2, 64, 1.0},   // long, GQA 4
                      StdCase{2, 1000, 4, 2, 128, 1.5},  // long, dh 128, GQA 2
                      StdCase{2, 1000, 8, 2, 128, 1.0},  // long, dh 128, GQA 4
                      StdCase{1, 300, 12, 2, 128, 1.0},  // GQA 6: 3 head pairs per K/V head
                      StdCase{2, 200, 4, 4, 64, 1.0},    // no GQA (the baseline's layout)
                      StdCase{2, 1000, 4, 4, 128, 1.0},  // no GQA, dh 128 (backward new)
                      StdCase{1, 1, 4, 2, 64, 1.0}),     // a single position
    std_case_name);

TEST(StdFlashApi, SupportedShapes) {
  require_gpu();
  if (!cuda::std_flash_supported({1, 64, 2, 2, 64}, true)) GTEST_SKIP() << "no Hopper flash kernels";
  const cuda::FlashOptions det{true, true};
  std::string why;
  EXPECT_TRUE(cuda::std_flash_supported({2, 1000, 8, 4, 128}, true, det, &why)) << why;
  EXPECT_TRUE(cuda::std_flash_supported({2, 1000, 8, 2, 64}, true, {}, &why)) << why;
  EXPECT_TRUE(cuda::std_flash_supported({2, 1000, 16, 16, 128}, true, det, &why)) << why;
  EXPECT_FALSE(cuda::std_flash_supported({1, 16, 6, 2, 64}, true, {}, &why));  // group 3
  EXPECT_NE(why.find("group"), std::string::npos) << why;
  EXPECT_FALSE(cuda::std_flash_supported({1, 16, 3, 3, 64}, false, {}, &why));  // odd H
  EXPECT_FALSE(cuda::std_flash_supported({1, 16, 4, 4, 96}, false, {}, &why));
  EXPECT_FALSE(cuda::std_flash_supported({1, 16, 4, 4, 64}, false, {false, false}, &why));
  EXPECT_THROW(cuda::std_flash_forward({1, 16, 6, 2, 64}, nullptr, nullptr, nullptr, nullptr,
                                       nullptr, nullptr),
               Error);
}

#else
TEST(DiffFlash, NeedsCuda) {
  std::fprintf(stderr, "test_cuda_diff_flash: built without CUDA, skipping\n");
  std::exit(77);
}
#endif

}  // namespace
}  // namespace difftron
