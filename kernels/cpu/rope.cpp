// Rotary position embedding, rotate-half (NeoX / Hugging Face Llama) convention:
// for c < dh/2, (x_c, x_{c+dh/2}) is rotated by angle pos * theta^(-2c/dh).
#include <cmath>

#include "kernels/cpu/reference.h"

namespace difftron::cpu {

template <typename T>
void rope(T* x, int64_t B, int64_t S, int64_t H, int64_t dh, double theta, bool inverse) {
  const int64_t half = dh / 2;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t c = 0; c < half; ++c) {
      // angle computed in double on every backend's reference for a precise baseline
      double inv_freq = std::pow(theta, -2.0 * double(c) / double(dh));
      double ang = double(s) * inv_freq;
      T cs = T(std::cos(ang)), sn = T(inverse ? -std::sin(ang) : std::sin(ang));
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t hh = 0; hh < H; ++hh) {
          T* p = x + ((b * S + s) * H + hh) * dh;
          T a = p[c], bb = p[c + half];
          p[c] = a * cs - bb * sn;
          p[c + half] = bb * cs + a * sn;
        }
      }
    }
  }
}

template void rope<float>(float*, int64_t, int64_t, int64_t, int64_t, double, bool);
template void rope<double>(double*, int64_t, int64_t, int64_t, int64_t, double, bool);

}  // namespace difftron::cpu
