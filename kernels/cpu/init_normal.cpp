// init_normal: the CPU reference of the counter-based N(0, std^2) generator whose formula
// kernels/ops.h (Ops::init_normal) states; kernels/cuda/init_normal.cu implements the same.
// Also the default Ops::init_normal (for backends that do not override it): the values are
// computed here on the host in double and handed to the backend's upload.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "base/bf16.h"
#include "base/error.h"
#include "kernels/ops.h"

namespace difftron {
namespace cpu {
namespace {

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t stream_key(uint64_t seed, uint64_t tensor_id) {
  return mix64(mix64(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) ^
               (tensor_id * 0xD1B54A32D192ED03ull + 0x8CB92BA72F3D8DD7ull));
}

// std * N(0, 1) of element g, in double (the contract in kernels/ops.h).
inline double normal_at(uint64_t key, uint64_t g, double std) {
  const uint64_t h1 = mix64(key + (2 * g + 1) * 0x9E3779B97F4A7C15ull);
  const uint64_t h2 = mix64(key + (2 * g + 2) * 0x9E3779B97F4A7C15ull);
  const double u1 = double((h1 >> 11) + 1) * (1.0 / 9007199254740992.0);  // (0, 1]
  const double u2 = double(h2 >> 11) * (1.0 / 9007199254740992.0);        // [0, 1)
  return std * (std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

template <typename Store>
void generate(int64_t rows, int64_t cols, uint64_t seed, uint64_t tensor_id, double std,
              int64_t full_cols, int64_t row0, int64_t col0, Store store) {
  const uint64_t key = stream_key(seed, tensor_id);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t g0 = uint64_t(row0 + r) * uint64_t(full_cols) + uint64_t(col0);
    for (int64_t c = 0; c < cols; ++c) store(r * cols + c, normal_at(key, g0 + uint64_t(c), std));
  }
}

}  // namespace

// Checks the arguments (errors name `backend` init_normal and the bad value) and returns
// out's [rows, cols] view.
void init_normal_check(const char* backend, const Tensor& out, double std, int64_t full_cols,
                       int64_t row0, int64_t col0, int64_t* rows, int64_t* cols) {
  auto fail = [&](const std::string& what) { throw_error(backend, " init_normal: ", what); };
  if (!out.defined()) fail("out is an undefined tensor");
  if (out.dtype() != DType::F32 && out.dtype() != DType::F64 && out.dtype() != DType::BF16)
    fail("out is " + out.str() + " (expected f32, f64 or bf16)");
  const int64_t n = out.numel();
  *cols = out.ndim() >= 2 ? out.cols() : 1;
  *rows = *cols > 0 ? n / *cols : 0;
  if (!std::isfinite(std) || std < 0) fail("std (" + std::to_string(std) + ") must be finite and >= 0");
  if (full_cols < 1) fail("full_cols (" + std::to_string(full_cols) + ") must be >= 1");
  if (row0 < 0) fail("row0 (" + std::to_string(row0) + ") must be >= 0");
  if (col0 < 0 || col0 > full_cols - *cols)
    fail("col0 (" + std::to_string(col0) + ") + out's " + std::to_string(*cols) +
         " columns must lie in [0, full_cols=" + std::to_string(full_cols) + "] (out is " + out.str() + ")");
  // The last counter 2g + 2 must not wrap: g < 2^62.
  constexpr int64_t kMaxElements = int64_t(1) << 62;
  if (n > 0 && (row0 > kMaxElements / full_cols - *rows))
    fail("row0 (" + std::to_string(row0) + ") + " + std::to_string(*rows) + " rows of " +
         std::to_string(full_cols) + " columns exceed 2^62 elements");
}

void init_normal(Tensor& out, uint64_t seed, uint64_t tensor_id, double std, int64_t full_cols,
                 int64_t row0, int64_t col0) {
  int64_t rows = 0, cols = 0;
  if (out.defined() && out.device() != Device::CPU)
    throw_error("cpu init_normal: out is ", out.str(), " (expected a tensor on cpu)");
  init_normal_check("cpu", out, std, full_cols, row0, col0, &rows, &cols);
  if (out.numel() == 0) return;
  switch (out.dtype()) {
    case DType::F64: {
      double* p = out.data<double>();
      generate(rows, cols, seed, tensor_id, std, full_cols, row0, col0, [p](int64_t i, double v) { p[i] = v; });
      break;
    }
    case DType::F32: {
      float* p = out.data<float>();
      generate(rows, cols, seed, tensor_id, std, full_cols, row0, col0, [p](int64_t i, double v) { p[i] = float(v); });
      break;
    }
    default: {  // BF16 (checked above)
      uint16_t* p = out.data<uint16_t>();
      generate(rows, cols, seed, tensor_id, std, full_cols, row0, col0,
               [p](int64_t i, double v) { p[i] = float_to_bf16(float(v)); });
      break;
    }
  }
}

}  // namespace cpu

// The default for backends without their own kernel: the reference on the host (in double),
// then one upload (which rounds to out's dtype as the contract says: f32, then bf16).
void Ops::init_normal(Tensor& out, uint64_t seed, uint64_t tensor_id, double std,
                      int64_t full_cols, int64_t row0, int64_t col0) {
  int64_t rows = 0, cols = 0;
  cpu::init_normal_check(name().c_str(), out, std, full_cols, row0, col0, &rows, &cols);
  if (out.numel() == 0) return;
  std::vector<double> host(out.numel());
  const uint64_t key = cpu::stream_key(seed, tensor_id);
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t g0 = uint64_t(row0 + r) * uint64_t(full_cols) + uint64_t(col0);
    for (int64_t c = 0; c < cols; ++c) host[r * cols + c] = cpu::normal_at(key, g0 + uint64_t(c), std);
  }
  upload(out, host.data());
}

}  // namespace difftron
