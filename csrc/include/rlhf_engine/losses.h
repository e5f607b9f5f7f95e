// Plain C entry points of the PPO loss and pairwise reward-loss kernels (no
// torch headers).
//
// The same contract holds for the CPU (`_cpu`) and CUDA (`_cuda`) builds. All
// [B, T] arrays are contiguous float32 (mask: uint8 holding 0/1); sizes int64.
//
// Per token (policy, with d = logprobs - old_logprobs and A the advantage):
//   neg_kl = clamp(d, -20, 20), ratio = exp(neg_kl)
//   l1 = -A ratio, l2 = -A clamp(ratio, 1 - clip_low, 1 + clip_high)
//   l = l2 if l2 > l1 else l1                        ("clipped" when l2 > l1)
//   dual_clip > 0: where A < 0 and l > -A dual_clip, l = -A dual_clip ("lower")
//   dl/dlogprobs = -A ratio [-20 <= d <= 20] on the l1 branch, 0 otherwise
// Per token (value, with v the values, o the old values, R the returns):
//   v_clip = o + clamp(v - o, -clip, clip), taken as exactly v where
//   -clip <= v - o <= clip; e1 = v - R, e2 = v_clip - R
//   l = 0.5 max(e1^2, e2^2) ("clipped" when e2^2 > e1^2; NaN propagates)
//   dl/dvalues = e1 on the e1 branch, 0 on the (clipped) e2 branch
// Masked tokens (mask == 0) are not used: l = 0 and a zero gradient there.
//
// partials [B, 5] float32, per row: (sum l, number of valid tokens,
//   number clipped, sum -neg_kl (policy; 0 for value), number lower (policy
//   with dual clip; else 0)), summed over the valid tokens of the row.
// The final reduction (fixed order, deterministic) gives
//   loss [] float32: num / denom, or 0 when denom <= 0 (no valid token), with
//     agg = 0 "token-mean":          num = sum l,  denom = valid tokens
//     agg = 1 "seq-mean-token-sum":  num = sum l,  denom = rows with a valid token
//     agg = 2 "seq-mean-token-mean": num = sum over rows with a valid token of
//                                    (row's sum l / row's count), denom as agg 1
//     `normalizer` (a device float, or NULL): used as denom instead, so that
//     micro-batch losses computed with the whole batch's denom sum to its loss;
//   stats [4] float32: (clipfrac, approx_kl, clipfrac_lower, denom), the
//     first three masked means over this batch's valid tokens (0 with none).
//
// The backward writes grad [B, T] float32 = w_b * dl/dx per valid token, 0 on
// masked ones, with w_b = grad_loss / denom (/ the row's count for agg 2), 0
// when denom <= 0. `grad_loss` is a device pointer to the upstream float (so
// nothing is read on the host). It recomputes dl from the inputs, reading
// `partials` and `stats` of the forward.
//
// Pairwise reward loss, on N contiguous float32 scores `chosen`, `rejected`
// and `margin` (the margin already expanded to [N]): with
// z = chosen - rejected - margin,
//   loss [] float32 = sum softplus(-z) / N  (= mean -logsigmoid(z), formed as
//     max(-z, 0) + log1p(exp(-|z|)); NaN propagates),
//   accuracy [] float32 = (number of chosen > rejected) / N, both 0 when N = 0.
// Sums run in a fixed order: per tile of RLHF_PAIRWISE_TILE pairs into
// `partials` [ceil(N / RLHF_PAIRWISE_TILE), 2] (sum softplus(-z), number
// correct; a workspace the caller allocates), then over tiles in float64.
// The backward writes, in one pass, grad_chosen [N] = -sigmoid(-z) g / N and
// grad_rejected [N] = -grad_chosen, with g = *grad_loss (a device pointer).
//
// Every function returns 0 on success, or a nonzero error code (for CUDA the
// cudaError_t of the launches). CUDA pointers are device pointers; `stream`
// is a cudaStream_t (NULL for the legacy default stream).
#ifndef RLHF_ENGINE_LOSSES_H_
#define RLHF_ENGINE_LOSSES_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum rlhf_loss_agg { RLHF_TOKEN_MEAN = 0, RLHF_SEQ_MEAN_TOKEN_SUM = 1, RLHF_SEQ_MEAN_TOKEN_MEAN = 2 };
enum { RLHF_LOSS_PARTIALS = 5, RLHF_LOSS_STATS = 4 };
enum { RLHF_PAIRWISE_TILE = 4096 };

int rlhf_ppo_policy_loss_forward_cpu(
    const float* logprobs, const float* old_logprobs, const float* advantages,
    const uint8_t* mask, int64_t B, int64_t T, float clip_low, float clip_high,
    float dual_clip, int agg, const float* normalizer, float* partials,
    float* loss, float* stats);

int rlhf_ppo_policy_loss_backward_cpu(
    const float* grad_loss, const float* logprobs, const float* old_logprobs,
    const float* advantages, const uint8_t* mask, int64_t B, int64_t T,
    float clip_low, float clip_high, float dual_clip, int agg,
    const float* partials, const float* stats, float* grad);

int rlhf_ppo_value_loss_forward_cpu(
    const float* values, const float* old_values, const float* returns,
    const uint8_t* mask, int64_t B, int64_t T, float clip, int agg,
    const float* normalizer, float* partials, float* loss, float* stats);

int rlhf_ppo_value_loss_backward_cpu(
    const float* grad_loss, const float* values, const float* old_values,
    const float* returns, const uint8_t* mask, int64_t B, int64_t T, float clip,
    int agg, const float* partials, const float* stats, float* grad);

int rlhf_pairwise_reward_loss_forward_cpu(
    const float* chosen, const float* rejected, const float* margin, int64_t N,
    float* partials, float* loss, float* accuracy);

int rlhf_pairwise_reward_loss_backward_cpu(
    const float* grad_loss, const float* chosen, const float* rejected,
    const float* margin, int64_t N, float* grad_chosen, float* grad_rejected);

int rlhf_ppo_policy_loss_forward_cuda(
    const float* logprobs, const float* old_logprobs, const float* advantages,
    const uint8_t* mask, int64_t B, int64_t T, float clip_low, float clip_high,
    float dual_clip, int agg, const float* normalizer, float* partials,
    float* loss, float* stats, void* stream);

int rlhf_ppo_policy_loss_backward_cuda(
    const float* grad_loss, const float* logprobs, const float* old_logprobs,
    const float* advantages, const uint8_t* mask, int64_t B, int64_t T,
    float clip_low, float clip_high, float dual_clip, int agg,
    const float* partials, const float* stats, float* grad, void* stream);

int rlhf_ppo_value_loss_forward_cuda(
    const float* values, const float* old_values, const float* returns,
    const uint8_t* mask, int64_t B, int64_t T, float clip, int agg,
    const float* normalizer, float* partials, float* loss, float* stats,
    void* stream);

int rlhf_ppo_value_loss_backward_cuda(
    const float* grad_loss, const float* values, const float* old_values,
    const float* returns, const uint8_t* mask, int64_t B, int64_t T, float clip,
    int agg, const float* partials, const float* stats, float* grad,
    void* stream);

int rlhf_pairwise_reward_loss_forward_cuda(
    const float* chosen, const float* rejected, const float* margin, int64_t N,
    float* partials, float* loss, float* accuracy, void* stream);

int rlhf_pairwise_reward_loss_backward_cuda(
    const float* grad_loss, const float* chosen, const float* rejected,
    const float* margin, int64_t N, float* grad_chosen, float* grad_rejected,
    void* stream);

#ifdef __cplusplus
}
#endif

#endif  // RLHF_ENGINE_LOSSES_H_
