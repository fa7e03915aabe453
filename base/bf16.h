// bf16 on the host: the bits of a bfloat16 (the upper half of an IEEE f32) to and from
// float, rounding to nearest even as the GPU's __float2bfloat16_rn does; NaN stays NaN.
#pragma once
#include <cstdint>
#include <cstring>

namespace difftron {

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace difftron
