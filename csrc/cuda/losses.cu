// PPO policy and value losses and the pairwise reward loss on CUDA: the
// `_cuda` entry points of rlhf_engine/losses.h (the math and layouts are
// specified there).
//
// Three kernels, no atomics, so results are bit-identical run to run:
// * rows: one block per row; each thread strides over the row's tokens (one
//   read of the four inputs, coalesced), then a fixed shared-memory tree
//   reduces the block's five sums into the row's partials;
// * finalize: one block reduces the partials over rows (thread i takes rows
//   i, i + blockDim, ... in float64, then a fixed tree) to the 0-d loss and
//   the stats;
// * backward: a grid-stride loop over the [B, T] tokens recomputes each
//   token's derivative and writes grad_loss * w_row * dl/dx. The upstream
//   gradient and the denominator are read from device memory: the whole
//   forward + backward has no host synchronisation and can be captured in a
//   CUDA graph.
// Pairwise: one block per tile of RLHF_PAIRWISE_TILE pairs writes the tile's
// partials (fixed tree), one block reduces them in float64 in a fixed order;
// the backward is one grid-stride element-wise pass.
// The per-token math (PolicyLoss, ValueLoss, Pairs: exp as exp2(t) * (1 + r
// ln 2), accurate under --use_fast_math; NaN propagated) is
// rlhf_engine/token_math.h, shared with the CPU kernels. Offsets are int64.
#include <cuda_runtime.h>

#include <cstdint>

#include "rlhf_engine/losses.h"
#include "rlhf_engine/token_math.h"

namespace {

constexpr int kThreads = 256;

using rlhf::Pairs;
using rlhf::PolicyLoss;
using rlhf::Token;
using rlhf::ValueLoss;

// Fixed-order tree sum of `s[k][0..kThreads)` for every k, into s[k][0].
template <typename F, int K>
__device__ __forceinline__ void block_tree_sum(F (*s)[kThreads]) {
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (threadIdx.x < stride) {
#pragma unroll
      for (int k = 0; k < K; ++k) s[k][threadIdx.x] += s[k][threadIdx.x + stride];
    }
  }
  __syncthreads();
}

template <class Loss>
__global__ void __launch_bounds__(kThreads) rows_kernel(Loss loss, const uint8_t* __restrict__ mask, int64_t T,
                                                        float* __restrict__ partials) {
  __shared__ float s[RLHF_LOSS_PARTIALS][kThreads];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * T;
  float acc[RLHF_LOSS_PARTIALS] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t t = threadIdx.x; t < T; t += kThreads) {
    if (!mask[base + t]) continue;
    const Token tok = loss(base + t);
    acc[0] += tok.l;
    acc[1] += 1.0f;
    acc[2] += tok.clipped;
    acc[3] += tok.kl;
    acc[4] += tok.lower;
  }
#pragma unroll
  for (int k = 0; k < RLHF_LOSS_PARTIALS; ++k) s[k][threadIdx.x] = acc[k];
  block_tree_sum<float, RLHF_LOSS_PARTIALS>(s);
  if (threadIdx.x < RLHF_LOSS_PARTIALS) {
    partials[static_cast<int64_t>(blockIdx.x) * RLHF_LOSS_PARTIALS + threadIdx.x] = s[threadIdx.x][0];
  }
}

// Sums: (l, count, clipped, kl, lower, rows with a valid token, row means).
constexpr int kFinalSums = 7;

__global__ void __launch_bounds__(kThreads) finalize_kernel(const float* __restrict__ partials, int64_t B, int agg,
                                                            const float* __restrict__ normalizer,
                                                            float* __restrict__ loss, float* __restrict__ stats) {
  __shared__ double s[kFinalSums][kThreads];
  double acc[kFinalSums] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    const float* p = partials + b * RLHF_LOSS_PARTIALS;
#pragma unroll
    for (int k = 0; k < RLHF_LOSS_PARTIALS; ++k) acc[k] += p[k];
    if (p[1] > 0.0f) {
      acc[5] += 1.0;
      acc[6] += static_cast<double>(p[0]) / p[1];
    }
  }
#pragma unroll
  for (int k = 0; k < kFinalSums; ++k) s[k][threadIdx.x] = acc[k];
  block_tree_sum<double, kFinalSums>(s);
  if (threadIdx.x == 0) {
    const double count = s[1][0];
    const double num = agg == RLHF_SEQ_MEAN_TOKEN_MEAN ? s[6][0] : s[0][0];
    const double denom = normalizer ? static_cast<double>(*normalizer) : agg == RLHF_TOKEN_MEAN ? count : s[5][0];
    *loss = denom > 0.0 ? static_cast<float>(num / denom) : 0.0f;
    for (int k = 0; k < 3; ++k) stats[k] = count > 0.0 ? static_cast<float>(s[2 + k][0] / count) : 0.0f;
    stats[3] = static_cast<float>(denom);
  }
}

template <class Loss>
__global__ void __launch_bounds__(kThreads) backward_kernel(Loss loss, const float* __restrict__ grad_loss,
                                                            const uint8_t* __restrict__ mask, int64_t B, int64_t T,
                                                            int agg, const float* __restrict__ partials,
                                                            const float* __restrict__ stats,
                                                            float* __restrict__ grad) {
  const float denom = stats[3];
  const float w_all = denom > 0.0f ? __fdiv_rn(*grad_loss, denom) : 0.0f;
  const int64_t n = B * T;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    float w = w_all;
    if (agg == RLHF_SEQ_MEAN_TOKEN_MEAN) {
      const float count = partials[(i / T) * RLHF_LOSS_PARTIALS + 1];
      w = count > 0.0f ? __fdiv_rn(w_all, count) : 0.0f;
    }
    grad[i] = mask[i] ? w * loss(i).dl : 0.0f;
  }
}

__global__ void __launch_bounds__(kThreads) pairwise_tiles_kernel(Pairs p, int64_t N, float* __restrict__ partials) {
  __shared__ float s[2][kThreads];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * RLHF_PAIRWISE_TILE;
  const int64_t hi = lo + RLHF_PAIRWISE_TILE < N ? lo + RLHF_PAIRWISE_TILE : N;
  float loss = 0.0f, correct = 0.0f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    loss += rlhf::softplus_neg(p.z(i));
    correct += p.correct(i);
  }
  s[0][threadIdx.x] = loss;
  s[1][threadIdx.x] = correct;
  block_tree_sum<float, 2>(s);
  if (threadIdx.x < 2) partials[2 * static_cast<int64_t>(blockIdx.x) + threadIdx.x] = s[threadIdx.x][0];
}

__global__ void __launch_bounds__(kThreads) pairwise_finalize_kernel(const float* __restrict__ partials, int64_t tiles,
                                                                     int64_t N, float* __restrict__ loss,
                                                                     float* __restrict__ accuracy) {
  __shared__ double s[2][kThreads];
  double acc[2] = {0.0, 0.0};
  for (int64_t k = threadIdx.x; k < tiles; k += kThreads) {
    acc[0] += partials[2 * k];
    acc[1] += partials[2 * k + 1];
  }
  s[0][threadIdx.x] = acc[0];
  s[1][threadIdx.x] = acc[1];
  block_tree_sum<double, 2>(s);
  if (threadIdx.x == 0) {
    const double n = N > 0 ? static_cast<double>(N) : 1.0;
    *loss = static_cast<float>(s[0][0] / n);
    *accuracy = static_cast<float>(s[1][0] / n);
  }
}

__global__ void __launch_bounds__(kThreads) pairwise_backward_kernel(Pairs p, const float* __restrict__ grad_loss,
                                                                     int64_t N, float* __restrict__ grad_chosen,
                                                                     float* __restrict__ grad_rejected) {
  const float w = __fdiv_rn(*grad_loss, static_cast<float>(N));
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += step) {
    const float g = rlhf::softplus_neg_grad(p.z(i), w);  // -sigmoid(-z) g / N
    grad_chosen[i] = g;
    grad_rejected[i] = -g;
  }
}

int check_args(int64_t B, int64_t T, int agg) {
  const bool ok = B >= 0 && T >= 0 && B < (int64_t(1) << 31) && agg >= RLHF_TOKEN_MEAN &&
                  agg <= RLHF_SEQ_MEAN_TOKEN_MEAN;
  return ok ? 0 : static_cast<int>(cudaErrorInvalidValue);
}

template <class Loss>
int forward(const Loss& loss, const uint8_t* mask, int64_t B, int64_t T, int agg, const float* normalizer,
            float* partials, float* out_loss, float* stats, void* stream) {
  if (const int bad = check_args(B, T, agg)) return bad;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (B > 0) rows_kernel<<<static_cast<unsigned>(B), kThreads, 0, s>>>(loss, mask, T, partials);
  finalize_kernel<<<1, kThreads, 0, s>>>(partials, B, agg, normalizer, out_loss, stats);
  return static_cast<int>(cudaGetLastError());
}

template <class Loss>
int backward(const Loss& loss, const float* grad_loss, const uint8_t* mask, int64_t B, int64_t T, int agg,
             const float* partials, const float* stats, float* grad, void* stream) {
  if (const int bad = check_args(B, T, agg)) return bad;
  const int64_t n = B * T;
  if (n == 0) return 0;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 * 8 ? blocks : 65536 * 8);
  backward_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(loss, grad_loss, mask, B, T, agg,
                                                                            partials, stats, grad);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int rlhf_ppo_policy_loss_forward_cuda(const float* logprobs, const float* old_logprobs, const float* advantages,
                                      const uint8_t* mask, int64_t B, int64_t T, float clip_low, float clip_high,
                                      float dual_clip, int agg, const float* normalizer, float* partials,
                                      float* loss, float* stats, void* stream) {
  const PolicyLoss f{logprobs, old_logprobs, advantages, 1.0f - clip_low, 1.0f + clip_high, dual_clip};
  return forward(f, mask, B, T, agg, normalizer, partials, loss, stats, stream);
}

int rlhf_ppo_policy_loss_backward_cuda(const float* grad_loss, const float* logprobs, const float* old_logprobs,
                                       const float* advantages, const uint8_t* mask, int64_t B, int64_t T,
                                       float clip_low, float clip_high, float dual_clip, int agg,
                                       const float* partials, const float* stats, float* grad, void* stream) {
  const PolicyLoss f{logprobs, old_logprobs, advantages, 1.0f - clip_low, 1.0f + clip_high, dual_clip};
  return backward(f, grad_loss, mask, B, T, agg, partials, stats, grad, stream);
}

int rlhf_ppo_value_loss_forward_cuda(const float* values, const float* old_values, const float* returns,
                                     const uint8_t* mask, int64_t B, int64_t T, float clip, int agg,
                                     const float* normalizer, float* partials, float* loss, float* stats,
                                     void* stream) {
  const ValueLoss f{values, old_values, returns, clip};
  return forward(f, mask, B, T, agg, normalizer, partials, loss, stats, stream);
}

int rlhf_ppo_value_loss_backward_cuda(const float* grad_loss, const float* values, const float* old_values,
                                      const float* returns, const uint8_t* mask, int64_t B, int64_t T, float clip,
                                      int agg, const float* partials, const float* stats, float* grad,
                                      void* stream) {
  const ValueLoss f{values, old_values, returns, clip};
  return backward(f, grad_loss, mask, B, T, agg, partials, stats, grad, stream);
}

int rlhf_pairwise_reward_loss_forward_cuda(const float* chosen, const float* rejected, const float* margin,
                                           int64_t N, float* partials, float* loss, float* accuracy, void* stream) {
  const int64_t tiles = (N + RLHF_PAIRWISE_TILE - 1) / RLHF_PAIRWISE_TILE;
  if (N < 0 || tiles >= (int64_t(1) << 31)) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const Pairs p{chosen, rejected, margin};
  if (tiles > 0) pairwise_tiles_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, s>>>(p, N, partials);
  pairwise_finalize_kernel<<<1, kThreads, 0, s>>>(partials, tiles, N, loss, accuracy);
  return static_cast<int>(cudaGetLastError());
}

int rlhf_pairwise_reward_loss_backward_cuda(const float* grad_loss, const float* chosen, const float* rejected,
                                            const float* margin, int64_t N, float* grad_chosen,
                                            float* grad_rejected, void* stream) {
  if (N < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (N == 0) return 0;
  const int64_t blocks = (N + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 * 8 ? blocks : 65536 * 8);
  pairwise_backward_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      Pairs{chosen, rejected, margin}, grad_loss, N, grad_chosen, grad_rejected);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
