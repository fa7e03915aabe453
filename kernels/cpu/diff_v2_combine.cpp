// Differential Transformer V2's pairwise subtraction, the CPU reference (kernels/ops.h,
// Ops::diff_v2_combine_forward / _backward; docs/MODEL.md section 5): the two query heads
// of pair i attended with standard attention, combined with a per-token, per-pair
// lambda = sigmoid(z). Also the default Ops methods, which serve host tensors.
#include "kernels/cpu/diff_v2_combine.h"

#include <cmath>
#include <initializer_list>
#include <string>

#include "base/error.h"
#include "kernels/ops.h"

namespace difftron {
namespace cpu {

template <typename T>
void diff_v2_combine_forward(const T* att, const T* z, T* out, int64_t rows, int64_t H, int64_t dh) {
  for (int64_t r = 0; r < rows * H; ++r) {  // r = token * H + pair
    const T s = T(1) / (T(1) + std::exp(-z[r]));
    const T* a1 = att + (2 * r) * dh;  // query head 2i of the token: (token * 2H + 2i) = 2r
    const T* a2 = a1 + dh;
    T* o = out + r * dh;
    for (int64_t c = 0; c < dh; ++c) o[c] = a1[c] - s * a2[c];
  }
}

// dL/ds = -<dout, a2>; ds/dz = s (1 - s).
template <typename T>
void diff_v2_combine_backward(const T* att, const T* z, const T* dout, T* datt, T* dz, int64_t rows,
                              int64_t H, int64_t dh) {
  for (int64_t r = 0; r < rows * H; ++r) {
    const T s = T(1) / (T(1) + std::exp(-z[r]));
    const T* a2 = att + (2 * r + 1) * dh;
    const T* d = dout + r * dh;
    T* d1 = datt + (2 * r) * dh;
    T* d2 = d1 + dh;
    double dot = 0;
    for (int64_t c = 0; c < dh; ++c) {
      d1[c] = d[c];
      d2[c] = -s * d[c];
      dot += double(d[c]) * double(a2[c]);
    }
    dz[r] = T(-dot * double(s) * (1.0 - double(s)));
  }
}

#define INSTANTIATE(T)                                                                              \
  template void diff_v2_combine_forward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t);      \
  template void diff_v2_combine_backward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, \
                                            int64_t);
INSTANTIATE(float)
INSTANTIATE(double)

namespace {

struct CombineDims {
  int64_t rows, H, dh;
};

// Checks the tensors of either direction (host memory, one float dtype, the shapes of
// kernels/ops.h) and returns the dimensions.
CombineDims check_combine(const char* op, const Tensor& att, const Tensor& z,
                          std::initializer_list<std::pair<const Tensor*, const char*>> others) {
  auto fail = [&](const std::string& what) { throw_error("cpu ", op, ": ", what); };
  for (auto [t, name] : others)
    if (!t->defined() || t->device() != Device::CPU)
      fail(std::string(name) + " must be a tensor on cpu, got " + (t->defined() ? t->str() : "an undefined tensor"));
  if (att.dtype() != DType::F32 && att.dtype() != DType::F64) fail("att is " + att.str() + " (expected f32 or f64)");
  for (auto [t, name] : others)
    if (t->dtype() != att.dtype()) fail(std::string(name) + " " + t->str() + " does not have the dtype of att " + att.str());
  if (att.ndim() != 4 || att.dim(2) % 2 != 0)
    fail("att " + att.str() + " must be [B, S, 2H, dh] (an even number of query heads: pairs)");
  const CombineDims d{att.dim(0) * att.dim(1), att.dim(2) / 2, att.dim(3)};
  if (z.numel() != d.rows * d.H)
    fail("z " + z.str() + " should hold B*S*H = " + std::to_string(d.rows * d.H) + " lambda logits");
  return d;
}

}  // namespace
}  // namespace cpu

void Ops::diff_v2_combine_forward(const Tensor& att, const Tensor& z, Tensor& out) {
  const char* op = "diff_v2_combine_forward";
  const auto d = cpu::check_combine(op, att, z, {{&att, "att"}, {&z, "z"}, {&out, "out"}});
  if (out.numel() != d.rows * d.H * d.dh)
    throw_error("cpu ", op, ": out ", out.str(), " should hold B*S*H*dh = ", d.rows * d.H * d.dh, " elements");
  if (att.dtype() == DType::F64)
    cpu::diff_v2_combine_forward(att.data<double>(), z.data<double>(), out.data<double>(), d.rows, d.H, d.dh);
  else
    cpu::diff_v2_combine_forward(att.data<float>(), z.data<float>(), out.data<float>(), d.rows, d.H, d.dh);
}

void Ops::diff_v2_combine_backward(const Tensor& att, const Tensor& z, const Tensor& dout, Tensor& datt,
                                   Tensor& dz) {
  const char* op = "diff_v2_combine_backward";
  const auto d = cpu::check_combine(op, att, z,
                                    {{&att, "att"}, {&z, "z"}, {&dout, "dout"}, {&datt, "datt"}, {&dz, "dz"}});
  if (dout.numel() != d.rows * d.H * d.dh)
    throw_error("cpu ", op, ": dout ", dout.str(), " should hold B*S*H*dh = ", d.rows * d.H * d.dh, " elements");
  if (datt.numel() != att.numel())
    throw_error("cpu ", op, ": datt ", datt.str(), " should have the shape of att ", att.str());
  if (dz.numel() != z.numel()) throw_error("cpu ", op, ": dz ", dz.str(), " should have the shape of z ", z.str());
  if (att.dtype() == DType::F64)
    cpu::diff_v2_combine_backward(att.data<double>(), z.data<double>(), dout.data<double>(), datt.data<double>(),
                                  dz.data<double>(), d.rows, d.H, d.dh);
  else
    cpu::diff_v2_combine_backward(att.data<float>(), z.data<float>(), dout.data<float>(), datt.data<float>(),
                                  dz.data<float>(), d.rows, d.H, d.dh);
}

}  // namespace difftron
