// KL penalty and KL-shaped rewards on the CPU: the `_cpu` entry points of
// rlhf_engine/kl.h (plain C++, no torch).
//
// Every op is one element-wise pass. The per-element math
// (rlhf_engine/token_math.h, shared with the CUDA kernels) is branch-free,
// with the estimator a template parameter, so each loop vectorizes. Work is
// split over threads with rlhf::parallel_for (element ranges, or whole rows
// for the shaped rewards).
#include "rlhf_engine/kl.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "parallel.h"
#include "rlhf_engine/token_math.h"

namespace {

using rlhf::kl_derivative;
using rlhf::kl_value;

constexpr int64_t kGrain = 1 << 15;  // elements per thread, at least

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
