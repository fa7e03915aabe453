// cached_attention: the CPU reference of attention of new tokens against a K/V cache
// (kernels/ops.h, Ops::cached_attention), differential and standard, with GQA. It rotates
// as kernels/cpu/rope.cpp does and attends as kernels/cpu/diff_attention.cpp and
// attention.cpp do (double accumulation), so that decoding token by token reproduces the
// full forward pass to float rounding. Also the default Ops::cached_attention, which serves
// host tensors (the CPU backend).
#include <cmath>
#include <initializer_list>
#include <string>
#include <vector>

#include "base/error.h"
#include "kernels/cpu/causal_softmax_row.h"
#include "kernels/ops.h"

namespace difftron {
namespace cpu {
namespace {

// The shapes of one call: B sequences of T new tokens, caches of C rows; `heads` query heads
// (differential heads for the differential variant) over `kv_heads` groups; M maps of width
// dh per head (2 differential, 1 standard), V rows M * dh wide.
struct CachedDims {
  int64_t B, T, C, heads, kv_heads, dh, M;
  int64_t q_row() const { return heads * M * dh; }
  int64_t kv_row() const { return kv_heads * M * dh; }
};

// x[0..dh) rotated by position `pos`, as rope() rotates row `pos`.
template <typename T>
void rotate(const T* x, T* y, int64_t dh, int64_t pos, double theta) {
  const int64_t half = dh / 2;
  for (int64_t c = 0; c < half; ++c) {
    const double ang = double(pos) * std::pow(theta, -2.0 * double(c) / double(dh));
    const T cs = T(std::cos(ang)), sn = T(std::sin(ang));
    const T a = x[c], b = x[c + half];
    y[c] = a * cs - b * sn;
    y[c + half] = b * cs + a * sn;
  }
}

template <typename T>
void cached_attention(const T* q, const T* k, const T* v, const int32_t* start, double lambda, double theta,
                      T* k_cache, T* v_cache, T* out, const CachedDims& d) {
  const int64_t qr = d.q_row(), kvr = d.kv_row(), W = d.M * d.dh, group = d.heads / d.kv_heads;
  // 1. the new tokens' rotated keys and values into the cache
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t t = 0; t < d.T; ++t) {
      const int64_t pos = start[b] + t;
      const T* kt = k + (b * d.T + t) * kvr;
      const T* vt = v + (b * d.T + t) * kvr;
      T* kc = k_cache + (b * d.C + pos) * kvr;
      T* vc = v_cache + (b * d.C + pos) * kvr;
      for (int64_t m = 0; m < d.kv_heads * d.M; ++m) rotate(kt + m * d.dh, kc + m * d.dh, d.dh, pos, theta);
      for (int64_t c = 0; c < kvr; ++c) vc[c] = vt[c];
    }
  // 2. every new query against its sequence's cache rows [0, pos]
  const double scale = 1.0 / std::sqrt(double(d.dh));
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t t = 0; t < d.T; ++t)
      for (int64_t i = 0; i < d.heads; ++i) {
        const int64_t pos = start[b] + t, g = i / group;
        std::vector<T> qrot(d.dh);
        std::vector<double> p(pos + 1), acc(W, 0.0);
        for (int64_t j = 0; j < d.M; ++j) {
          rotate(q + (b * d.T + t) * qr + (i * d.M + j) * d.dh, qrot.data(), d.dh, pos, theta);
          detail::causal_softmax_row(qrot.data(), k_cache + b * d.C * kvr + (g * d.M + j) * d.dh, kvr, pos, d.dh,
                                     scale, p.data());
          const double w = j == 0 ? 1.0 : -lambda;  // A1 - lambda A2
          for (int64_t u = 0; u <= pos; ++u) {
            const T* vu = v_cache + (b * d.C + u) * kvr + g * W;
            for (int64_t c = 0; c < W; ++c) acc[c] += w * p[u] * double(vu[c]);
          }
        }
        T* o = out + (b * d.T + t) * d.heads * W + i * W;
        for (int64_t c = 0; c < W; ++c) o[c] = T(acc[c]);
      }
}

}  // namespace
}  // namespace cpu

void Ops::cached_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& start,
                           const Tensor& lambda, double rope_theta, Tensor& k_cache, Tensor& v_cache,
                           Tensor& out) {
  auto fail = [](const std::string& what) { throw_error("cpu cached_attention: ", what); };
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &v, &start, &k_cache, &v_cache, &out})
    if (!t->defined() || t->device() != Device::CPU)
      fail("expects tensors on cpu, got " + (t->defined() ? t->str() : std::string("an undefined tensor")));
  if (q.dtype() != DType::F32 && q.dtype() != DType::F64) fail("q is " + q.str() + " (expected f32 or f64)");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&k, &v, &k_cache, &v_cache, &out})
    if (t->dtype() != q.dtype()) fail(t->str() + " does not have the dtype of q " + q.str());
  if (start.dtype() != DType::I32) fail("start is " + start.str() + " (expected i32)");
  const bool diff = q.ndim() == 5;
  if (diff ? (q.dim(3) != 2 || k.ndim() != 5 || k.dim(3) != 2) : (q.ndim() != 4 || k.ndim() != 4))
    fail("q " + q.str() + " and k " + k.str() + " must be [B,T,h,2,dh] and [B,T,h_kv,2,dh] (differential) or "
         "[B,T,H,dh] and [B,T,H_kv,dh] (standard)");
  cpu::CachedDims d{q.dim(0), q.dim(1), k_cache.ndim() > 1 ? k_cache.dim(1) : 0, q.dim(2), k.dim(2),
               q.dim(q.ndim() - 1), diff ? 2 : 1};
  if (k.dim(0) != d.B || k.dim(1) != d.T || k.dim(k.ndim() - 1) != d.dh)
    fail("k " + k.str() + " does not match q " + q.str());
  if (d.kv_heads <= 0 || d.heads % d.kv_heads != 0)
    fail("heads of q " + q.str() + " must be a multiple of the heads of k " + k.str());
  if (d.dh % 2 != 0) fail("head dim of q " + q.str() + " must be even");
  if (v.numel() != k.numel()) fail("v " + v.str() + " should hold as many elements as k " + k.str());
  if (out.numel() != q.numel()) fail("out " + out.str() + " should hold as many elements as q " + q.str());
  if (k_cache.ndim() < 2 || k_cache.dim(0) != d.B || k_cache.numel() != d.B * d.C * d.kv_row() ||
      v_cache.numel() != k_cache.numel())
    fail("caches " + k_cache.str() + ", " + v_cache.str() + " should be [B, C, ...] with rows like k " + k.str());
  if (start.numel() != d.B) fail("start " + start.str() + " should hold B = " + std::to_string(d.B) + " positions");
  const int32_t* st = start.data<int32_t>();
  for (int64_t b = 0; b < d.B; ++b)
    if (st[b] < 0 || st[b] + d.T > d.C)
      fail("sequence " + std::to_string(b) + ": positions [" + std::to_string(st[b]) + ", " +
           std::to_string(st[b] + d.T) + ") do not fit a cache of " + std::to_string(d.C) + " rows");
  double lam = 0.0;
  if (diff) {
    if (!lambda.defined() || lambda.numel() != 1 || lambda.device() != Device::CPU)
      fail("the differential variant needs lambda [1] on cpu");
    lam = lambda.dtype() == DType::F64 ? lambda.data<double>()[0] : double(lambda.data<float>()[0]);
  }
  if (q.dtype() == DType::F64)
    cpu::cached_attention<double>(q.data<double>(), k.data<double>(), v.data<double>(), st, lam, rope_theta,
                                  k_cache.data<double>(), v_cache.data<double>(), out.data<double>(), d);
  else
    cpu::cached_attention<float>(q.data<float>(), k.data<float>(), v.data<float>(), st, lam, rope_theta,
                                 k_cache.data<float>(), v_cache.data<float>(), out.data<float>(), d);
}

}  // namespace difftron
