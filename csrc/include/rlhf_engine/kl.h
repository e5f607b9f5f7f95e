// Plain C entry points of the KL-penalty kernels (no torch headers).
//
// The same contract holds for the CPU (`_cpu`) and CUDA (`_cuda`) builds, so a
// C/C++ framework can link either without PyTorch. All tensors are float32
// (masks uint8 holding 0/1) and contiguous; all sizes are int64.
//
// With d = logprobs - ref_logprobs, the per-token penalty kl(d) is
//
//   RLHF_KL_K1    d
//   RLHF_KL_ABS   |d|
//   RLHF_KL_K2    0.5 * d^2
//   RLHF_KL_K3    r = clamp(-d, -20, 20); clamp(exp(r) - r - 1, -10, 10)
//
// k3's exp(r) - r - 1 is evaluated without cancellation (a series for
// |r| < 1), so small d keep float32 relative precision. A clamp passes NaN
// through. Its derivative dkl/dd is
//
//   K1 1;  ABS sign(d) (0 at d == 0);  K2 d;
//   K3 1 - exp(-d) where neither clamp binds (torch's convention: a value on
//      a bound is inside), else 0
//
// and NaN wherever d is NaN.
//
//   kl_penalty_forward    out[i] = kl(d[i]), i < n.
//   kl_penalty_backward   one pass writing both gradients, i < n:
//                           g = mask[i] ? scale * grad[i] * dkl/dd(d[i]) : 0
//                           grad_logprobs[i] = g, grad_ref_logprobs[i] = -g
//                         `mask` may be NULL (every position valid).
//   kl_shaped_rewards     rewards [n_rows, n_cols] and last [n_rows]: per row
//                         b, last[b] = the largest t with mask[b, t] != 0
//                         (-1 when there is none), and
//                           rewards[b, t] = mask[b, t] ? -kl_coef * kl(d[b, t])
//                                           + (t == last[b] ? scores[b] : 0) : 0
//                         (every element written; one pass per row).
//
// Every function returns 0 on success, or a nonzero error code (nothing is
// written): 1 for an unknown estimator, 2 for negative sizes; for CUDA the
// cudaError_t of the launch.
#ifndef RLHF_ENGINE_KL_H_
#define RLHF_ENGINE_KL_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum rlhf_kl_estimator { RLHF_KL_K1 = 0, RLHF_KL_ABS = 1, RLHF_KL_K2 = 2, RLHF_KL_K3 = 3 };

int rlhf_kl_penalty_forward_cpu(const float* logprobs, const float* ref_logprobs, int64_t n, int estimator,
                                float* out);

int rlhf_kl_penalty_backward_cpu(const float* grad, const float* logprobs, const float* ref_logprobs,
                                 const uint8_t* mask, float scale, int64_t n, int estimator, float* grad_logprobs,
                                 float* grad_ref_logprobs);

int rlhf_kl_shaped_rewards_cpu(const float* scores, const float* logprobs, const float* ref_logprobs,
                               const uint8_t* mask, int64_t n_rows, int64_t n_cols, float kl_coef, int estimator,
                               float* rewards, int64_t* last);

// CUDA: pointers are device pointers; `stream` is a cudaStream_t (NULL for
// the legacy default stream). Launches are asynchronous.
int rlhf_kl_penalty_forward_cuda(const float* logprobs, const float* ref_logprobs, int64_t n, int estimator,
                                 float* out, void* stream);

int rlhf_kl_penalty_backward_cuda(const float* grad, const float* logprobs, const float* ref_logprobs,
                                  const uint8_t* mask, float scale, int64_t n, int estimator, float* grad_logprobs,
                                  float* grad_ref_logprobs, void* stream);

int rlhf_kl_shaped_rewards_cuda(const float* scores, const float* logprobs, const float* ref_logprobs,
                                const uint8_t* mask, int64_t n_rows, int64_t n_cols, float kl_coef, int estimator,
                                float* rewards, int64_t* last, void* stream);

#ifdef __cplusplus
}
#endif

#endif  // RLHF_ENGINE_KL_H_
