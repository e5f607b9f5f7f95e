// KL penalty and KL-shaped rewards on the CPU: the `_cpu` entry points of
// rlhf_engine/kl.h (plain C++, no torch).
//
// Every op is one element-wise pass. The per-element math is branch-free
// (both k3 branches are computed and selected), with the estimator a template
// parameter, so each loop vectorizes; exp is rlhf::exp_bounded
// (scalar_math.h) rather than a libm call for the same reason. Work is split over
// threads with rlhf::parallel_for (element ranges, or whole rows for the
// shaped rewards).
#include "rlhf_engine/kl.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "parallel.h"
#include "scalar_math.h"

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per thread, at least

// ---- scalar math ----------------------------------------------------------

// exp(r) - 1 - r without cancellation: the Taylor series r^2 (1/2! + r/3! +
// ... + r^10/12!) for |r| < 1 (truncation < 2e-10 relative), exp(r) - 1 - r
// beyond. |r| <= 20.
inline float exp_m1_m_id(float r) {
  float p = 1.f / 479001600.f;
  p = p * r + 1.f / 39916800.f;
  p = p * r + 1.f / 3628800.f;
  p = p * r + 1.f / 362880.f;
  p = p * r + 1.f / 40320.f;
  p = p * r + 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  const float series = r * r * p;
  const float direct = (rlhf::exp_bounded(r) - 1.f) - r;
  return (r < 1.f && r > -1.f) ? series : direct;
}

constexpr float kK3Ratio = 20.f;  // clamp of r = -d
constexpr float kK3Value = 10.f;  // clamp of the value

// kl(d) of the estimator E (rlhf_kl_estimator).
template <int E>
inline float kl_value(float d) {
  if constexpr (E == RLHF_KL_K1) {
    return d;
  } else if constexpr (E == RLHF_KL_ABS) {
    return d < 0.f ? -d : d;
  } else if constexpr (E == RLHF_KL_K2) {
    return 0.5f * d * d;
  } else {
    const float r = rlhf::clamp(-d, -kK3Ratio, kK3Ratio);
    return rlhf::clamp(exp_m1_m_id(r), -kK3Value, kK3Value);
  }
}

// dkl/dd of the estimator E; NaN where d is NaN.
template <int E>
inline float kl_derivative(float d) {
  const float nan_or_zero = d - d;  // NaN for NaN (and inf) d, else 0
  const bool is_nan = d != d;
  if constexpr (E == RLHF_KL_K1) {
    return is_nan ? nan_or_zero : 1.f;
  } else if constexpr (E == RLHF_KL_ABS) {
    return is_nan ? nan_or_zero : static_cast<float>((d > 0.f) - (d < 0.f));
  } else if constexpr (E == RLHF_KL_K2) {
    return d;
  } else {
    const float r_raw = -d;
    const float r = rlhf::clamp(r_raw, -kK3Ratio, kK3Ratio);
    const float v = exp_m1_m_id(r);
    const bool binds = r_raw < -kK3Ratio || r_raw > kK3Ratio || v < -kK3Value || v > kK3Value;
    return binds ? 0.f : -(v + r);  // d/dd (e^r - r - 1) = -(e^r - 1)
  }
}

// ---- element-wise loops -----------------------------------------------------

template <int E>
void forward_range(const float* lp, const float* ref, float* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) out[i] = kl_value<E>(lp[i] - ref[i]);
}

template <int E>
void backward_range(const float* grad, const float* lp, const float* ref, const uint8_t* mask, float scale,
                    float* g_lp, float* g_ref, int64_t begin, int64_t end) {
  if (mask == nullptr) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = scale * grad[i] * kl_derivative<E>(lp[i] - ref[i]);
      g_lp[i] = g;
      g_ref[i] = -g;
    }
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const float g = mask[i] ? scale * grad[i] * kl_derivative<E>(lp[i] - ref[i]) : 0.f;
    g_lp[i] = g;
    g_ref[i] = -g;
  }
}

// One row of the shaped rewards: the last valid index (a backward scan that
// stops at the first valid token from the end), then the row.
template <int E>
int64_t shaped_row(float score, const float* lp, const float* ref, const uint8_t* mask, int64_t n_cols,
                   float neg_coef, float* out) {
  int64_t last = n_cols - 1;
  while (last >= 0 && !mask[last]) --last;
  for (int64_t t = 0; t < n_cols; ++t) out[t] = mask[t] ? neg_coef * kl_value<E>(lp[t] - ref[t]) : 0.f;
  if (last >= 0) out[last] += score;
  return last;
}

template <int E>
using Estimator = std::integral_constant<int, E>;

// fn(Estimator<E>{}) for the estimator code; false (fn not called) if unknown.
template <typename Fn>
bool with_estimator(int estimator, const Fn& fn) {
  switch (estimator) {
    case RLHF_KL_K1: fn(Estimator<RLHF_KL_K1>{}); return true;
    case RLHF_KL_ABS: fn(Estimator<RLHF_KL_ABS>{}); return true;
    case RLHF_KL_K2: fn(Estimator<RLHF_KL_K2>{}); return true;
    case RLHF_KL_K3: fn(Estimator<RLHF_KL_K3>{}); return true;
    default: return false;
  }
}

}  // namespace

extern "C" int rlhf_kl_penalty_forward_cpu(const float* logprobs, const float* ref_logprobs, int64_t n,
                                           int estimator, float* out) {
  if (n < 0) return 2;
  const bool known = with_estimator(estimator, [&](auto est) {
    constexpr int E = decltype(est)::value;
    rlhf::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { forward_range<E>(logprobs, ref_logprobs, out, b, e); });
  });
  return known ? 0 : 1;
}

extern "C" int rlhf_kl_penalty_backward_cpu(const float* grad, const float* logprobs, const float* ref_logprobs,
                                            const uint8_t* mask, float scale, int64_t n, int estimator,
                                            float* grad_logprobs, float* grad_ref_logprobs) {
  if (n < 0) return 2;
  const bool known = with_estimator(estimator, [&](auto est) {
    constexpr int E = decltype(est)::value;
    rlhf::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      backward_range<E>(grad, logprobs, ref_logprobs, mask, scale, grad_logprobs, grad_ref_logprobs, b, e);
    });
  });
  return known ? 0 : 1;
}

extern "C" int rlhf_kl_shaped_rewards_cpu(const float* scores, const float* logprobs, const float* ref_logprobs,
                                          const uint8_t* mask, int64_t n_rows, int64_t n_cols, float kl_coef,
                                          int estimator, float* rewards, int64_t* last) {
  if (n_rows < 0 || n_cols < 0) return 2;
  const int64_t row_grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(n_cols, 1));
  const bool known = with_estimator(estimator, [&](auto est) {
    constexpr int E = decltype(est)::value;
    rlhf::parallel_for(0, n_rows, row_grain, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t off = r * n_cols;
        last[r] = shaped_row<E>(scores[r], logprobs + off, ref_logprobs + off, mask + off, n_cols, -kl_coef,
                                rewards + off);
      }
    });
  });
  return known ? 0 : 1;
}
