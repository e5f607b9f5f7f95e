// Scalar float math for the plain CPU kernels, written so that loops over it
// vectorize (libm's expf does not without -ffast-math) and NaN propagates.
#ifndef RLHF_ENGINE_CPU_SCALAR_MATH_H_
#define RLHF_ENGINE_CPU_SCALAR_MATH_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace rlhf {

// exp(x) for x in [-87, 87] (or NaN), within about 1 ulp: Cephes' expf
// polynomial with branch-free range reduction, so that loops over it
// vectorize (libm's expf does not without -ffast-math). n = round(x log2 e)
// by the 1.5 * 2^23 trick: adds only (floorf does not vectorize when the
// compiler makes the call conditional).
inline float exp_bounded(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float fx = (x * 1.44269504088896341f + kRound) - kRound;
  const float n = fx == fx ? fx : 0.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) * (1 << 23);
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x == x ? y * scale : x;
}

// clamp that keeps NaN (std::max/std::min return their first argument then).
inline float clamp(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }

}  // namespace rlhf

#endif  // RLHF_ENGINE_CPU_SCALAR_MATH_H_
