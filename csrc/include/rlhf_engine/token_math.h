// Per-token math of the KL and loss kernels, written once for the CPU (g++)
// and CUDA (nvcc) builds: every function is __host__ __device__ under nvcc
// and a plain inline function elsewhere. C++17; no torch headers. The math is
// specified in kl.h and losses.h; this is its one implementation.
//
// NaN rule (every backend, as the float64 torch reference has it): a NaN in
// an input that a token uses gives NaN in that token's value and in its
// derivative, whichever branch it takes. Clamps pass NaN through
// (comparisons, never fminf/fmaxf or std::min/max with NaN in the second
// argument); a derivative that a branch would make a constant (k1, abs, a k3
// clamp that binds) is NaN where its argument is NaN (nan_guard); branch
// selections are written so that NaN selects the branch that carries it.
// Masked tokens are never evaluated into results, NaN or not.
//
// What differs between the two builds is only how exp and log1p are
// evaluated, each to about float32 precision:
//   host    exp: Cephes' polynomial with branch-free range reduction, and
//           log1p(e) on [0, 1] by a series, so that loops over them vectorize
//           (libm's calls do not without -ffast-math);
//   device  exp: exp2f(t) * (1 + r ln 2), t = x log2(e) and r its exact
//           residual (accurate under --use_fast_math); log1pf.
#ifndef RLHF_ENGINE_TOKEN_MATH_H_
#define RLHF_ENGINE_TOKEN_MATH_H_

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "rlhf_engine/kl.h"

#if defined(__CUDACC__)
#define RLHF_HD __host__ __device__ __forceinline__
#else
#define RLHF_HD inline
#endif

namespace rlhf {

// ---- scalar helpers -----------------------------------------------------------

// clamp that passes NaN through.
RLHF_HD float clamp(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// `value`, or NaN where `arg` is NaN.
RLHF_HD float nan_guard(float arg, float value) { return arg != arg ? arg : value; }

// a * b + c: one fused rounding on the device; on the host as the compiler
// contracts it (std::fma is a libm call without FMA instructions).
RLHF_HD float mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// a / b correctly rounded (--use_fast_math would approximate it).
RLHF_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// The argument range of exp_f32: exp(-87) and exp(87) are finite and normal
// in float32; callers clamp to it where an argument may exceed it.
constexpr float kExpBound = 87.0f;

// exp(x) for x in [-kExpBound, kExpBound] (or NaN), within about 1 ulp.
RLHF_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  const float log2e = 1.4426950408889634f;
  const float t = x * log2e;
  return exp2f(t) * (1.0f + fmaf(x, log2e, -t) * 0.6931471805599453f);
#else
  // n = round(x log2 e) by the 1.5 * 2^23 trick: adds only (floorf does not
  // vectorize when the compiler makes the call conditional).
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
  memcpy(&scale, &bits, sizeof(scale));
  return x == x ? y * scale : x;
#endif
}

// log(1 + e) for e in [0, 1].
RLHF_HD float log1p_unit(float e) {
#if defined(__CUDA_ARCH__)
  return log1pf(e);
#else
  // 2 atanh(q), q = e / (2 + e) <= 1/3, by its odd series to q^15
  // (truncation < 1e-9 relative).
  const float q = e / (2.0f + e);
  const float q2 = q * q;
  float p = 1.0f / 15.0f;
  p = p * q2 + 1.0f / 13.0f;
  p = p * q2 + 1.0f / 11.0f;
  p = p * q2 + 1.0f / 9.0f;
  p = p * q2 + 1.0f / 7.0f;
  p = p * q2 + 1.0f / 5.0f;
  p = p * q2 + 1.0f / 3.0f;
  p = p * q2 + 1.0f;
  return 2.0f * q * p;
#endif
}

// ---- KL (kl.h) ----------------------------------------------------------------

constexpr float kK3Ratio = 20.0f;  // clamp of r = -d
constexpr float kK3Value = 10.0f;  // clamp of the k3 value

// exp(r) - 1 - r for |r| <= 20 without cancellation: the Taylor series
// r^2 (1/2! + r/3! + ... + r^10/12!) for |r| < 1 (truncation < 2e-10
// relative), exp(r) - 1 - r beyond. Both are computed and one is selected,
// so that loops vectorize.
RLHF_HD float exp_m1_m_id(float r) {
  float p = 1.0f / 479001600.0f;
  p = mul_add(p, r, 1.0f / 39916800.0f);
  p = mul_add(p, r, 1.0f / 3628800.0f);
  p = mul_add(p, r, 1.0f / 362880.0f);
  p = mul_add(p, r, 1.0f / 40320.0f);
  p = mul_add(p, r, 1.0f / 5040.0f);
  p = mul_add(p, r, 1.0f / 720.0f);
  p = mul_add(p, r, 1.0f / 120.0f);
  p = mul_add(p, r, 1.0f / 24.0f);
  p = mul_add(p, r, 1.0f / 6.0f);
  p = mul_add(p, r, 0.5f);
  const float series = r * r * p;
  const float direct = (exp_f32(r) - 1.0f) - r;
  return (r < 1.0f && r > -1.0f) ? series : direct;
}

// kl(d) of the estimator E (enum rlhf_kl_estimator).
template <int E>
RLHF_HD float kl_value(float d) {
  if constexpr (E == RLHF_KL_K1) {
    return d;
  } else if constexpr (E == RLHF_KL_ABS) {
    return d < 0.0f ? -d : d;
  } else if constexpr (E == RLHF_KL_K2) {
    return 0.5f * d * d;
  } else {
    return clamp(exp_m1_m_id(clamp(-d, -kK3Ratio, kK3Ratio)), -kK3Value, kK3Value);
  }
}

// dkl/dd of the estimator E: 0 where a k3 clamp binds (strictly outside its
// bounds), sign(d) for abs (0 at 0), NaN where d is NaN.
template <int E>
RLHF_HD float kl_derivative(float d) {
  float out;
  if constexpr (E == RLHF_KL_K1) {
    out = 1.0f;
  } else if constexpr (E == RLHF_KL_ABS) {
    out = d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f);
  } else if constexpr (E == RLHF_KL_K2) {
    out = d;
  } else {
    const float r = clamp(-d, -kK3Ratio, kK3Ratio);
    const float v = exp_m1_m_id(r);
    const bool binds = d < -kK3Ratio || d > kK3Ratio || v < -kK3Value || v > kK3Value;
    out = binds ? 0.0f : -(v + r);  // d/dd (e^r - r - 1) = -(e^r - 1)
  }
  return nan_guard(d, out);
}

// ---- PPO losses (losses.h) ------------------------------------------------------

constexpr float kNegKlBound = 20.0f;

// One token's loss l, derivative dl, and statistics (clipped, -neg_kl, lower).
struct Token {
  float l, dl, clipped, kl, lower;
};

struct PolicyLoss {
  const float* logprobs;
  const float* old_logprobs;
  const float* advantages;
  float lo, hi, dual;  // ratio bounds 1 - clip_low, 1 + clip_high; dual clip (0: off)

  RLHF_HD Token operator()(int64_t i) const {
    const float d = logprobs[i] - old_logprobs[i];
    const float neg_kl = clamp(d, -kNegKlBound, kNegKlBound);
    const float ratio = exp_f32(neg_kl);
    const float a = advantages[i];
    const float l1 = -a * ratio;
    const float l2 = -a * clamp(ratio, lo, hi);
    const bool clipped = l2 > l1;
    const float pass = (d >= -kNegKlBound && d <= kNegKlBound) ? 1.0f : 0.0f;
    float l = clipped ? l2 : l1;
    float dl = clipped ? 0.0f : l1 * pass;  // NaN in l1 is never clipped: it stays
    const float bound = -a * dual;
    const bool lower = dual > 0.0f && a < 0.0f && l > bound;
    l = lower ? bound : l;
    dl = lower ? 0.0f : dl;
    return {l, dl, clipped ? 1.0f : 0.0f, -neg_kl, lower ? 1.0f : 0.0f};
  }
};

struct ValueLoss {
  const float* values;
  const float* old_values;
  const float* returns;
  float clip;

  RLHF_HD Token operator()(int64_t i) const {
    const float v = values[i], old = old_values[i], ret = returns[i];
    const float delta = v - old;
    const bool inside = delta >= -clip && delta <= clip;
    const float e1 = v - ret;
    // v_clip is exactly v inside the clip range (no rounding noise in the flag)
    const float e2 = inside ? e1 : old + clamp(delta, -clip, clip) - ret;
    const float s1 = e1 * e1, s2 = e2 * e2;
    const bool on_e2 = !(s2 <= s1);  // NaN in e2 selects it: NaN propagates
    return {0.5f * (on_e2 ? s2 : s1), on_e2 ? e2 * 0.0f : e1, s2 > s1 ? 1.0f : 0.0f, 0.0f, 0.0f};
  }
};

// ---- pairwise reward loss (losses.h) --------------------------------------------

// z = chosen - rejected - margin of pair i.
struct Pairs {
  const float* chosen;
  const float* rejected;
  const float* margin;

  RLHF_HD float z(int64_t i) const { return chosen[i] - rejected[i] - margin[i]; }
  RLHF_HD float correct(int64_t i) const { return chosen[i] > rejected[i] ? 1.0f : 0.0f; }
};

// softplus(-z) = -logsigmoid(z) = max(-z, 0) + log(1 + exp(-|z|)), stable for
// any z; NaN propagates.
RLHF_HD float softplus_neg(float z) {
  const float a = clamp(z, -kExpBound, kExpBound);
  return (z > 0.0f ? 0.0f : -z) + log1p_unit(exp_f32(a < 0.0f ? a : -a));
}

// d softplus(-z) / dz * w = -sigmoid(-z) w; NaN propagates.
RLHF_HD float softplus_neg_grad(float z, float w) {
  return div_rn(-w, 1.0f + exp_f32(clamp(z, -kExpBound, kExpBound)));
}

}  // namespace rlhf

#endif  // RLHF_ENGINE_TOKEN_MATH_H_
