// PPO policy and value losses and the pairwise reward loss on the CPU: the
// `_cpu` entry points of rlhf_engine/losses.h (the math and layouts are
// specified there).
//
// Forward: one pass over each row. The row is walked in tiles of kTile
// tokens; a branch-free loop (which the compiler vectorizes) evaluates each
// token into small stack buffers, and a second loop adds the buffers into
// kLanes float32 lanes per statistic (16 terms each), added once per tile
// into float64 lane accumulators. A row's lanes are summed in
// a fixed order into its float32 partials; then one thread reduces the
// partials over rows in float64, in row order. So results do not depend on
// the number of threads, and are bit-identical run to run.
// Backward: one pass, recomputing each token's derivative and writing
// upstream * weight_row * dl/dx (no other [B, T] buffer is touched).
// Rows are spread over threads with rlhf::parallel_for. The per-token math
// (PolicyLoss, ValueLoss, Pairs) is rlhf_engine/token_math.h, shared with the
// CUDA kernels.
// Pairwise: tiles of RLHF_PAIRWISE_TILE pairs are spread over threads, each
// summed in float64 into its partials; the partials are then summed in tile
// order in float64. The backward is one element-wise pass.
#include "rlhf_engine/losses.h"

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "rlhf_engine/token_math.h"

namespace {

constexpr int64_t kTile = 256;   // tokens per tile (multiple of kLanes)
constexpr int64_t kLanes = 16;   // float64 accumulators per statistic
constexpr int64_t kGrainTokens = 1 << 15;  // tokens per thread at least

using rlhf::Pairs;
using rlhf::PolicyLoss;
using rlhf::Token;
using rlhf::ValueLoss;

int64_t row_grain(int64_t T) { return std::max<int64_t>(1, kGrainTokens / std::max<int64_t>(T, 1)); }

// partials[0..5) of one row (losses.h): masked sums over its T tokens.
template <class Loss>
void row_partials(const Loss loss, const uint8_t* mask, int64_t row, int64_t T, float* out) {
  double acc[RLHF_LOSS_PARTIALS][kLanes] = {};
  float buf[RLHF_LOSS_PARTIALS][kTile];
  const int64_t base = row * T;
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int64_t n = std::min(kTile, T - t0);
    for (int64_t j = 0; j < n; ++j) {
      const Token tok = loss(base + t0 + j);
      const bool m = mask[base + t0 + j] != 0;
      buf[0][j] = m ? tok.l : 0.0f;
      buf[1][j] = m ? 1.0f : 0.0f;
      buf[2][j] = m ? tok.clipped : 0.0f;
      buf[3][j] = m ? tok.kl : 0.0f;
      buf[4][j] = m ? tok.lower : 0.0f;
    }
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    for (int k = 0; k < RLHF_LOSS_PARTIALS; ++k) {
      std::fill(buf[k] + n, buf[k] + padded, 0.0f);
      float tile[kLanes] = {};  // at most kTile / kLanes terms per lane in float32
      for (int64_t j = 0; j < padded; j += kLanes)
        for (int64_t q = 0; q < kLanes; ++q) tile[q] += buf[k][j + q];
      for (int64_t q = 0; q < kLanes; ++q) acc[k][q] += tile[q];
    }
  }
  for (int k = 0; k < RLHF_LOSS_PARTIALS; ++k) {
    double sum = 0.0;
    for (int64_t q = 0; q < kLanes; ++q) sum += acc[k][q];
    out[k] = static_cast<float>(sum);
  }
}

// The fixed-order reduction of partials [B, 5] to loss and stats (losses.h).
void finalize(const float* partials, int64_t B, int agg, const float* normalizer, float* loss, float* stats) {
  double sum_l = 0.0, count = 0.0, rows = 0.0, row_means = 0.0;
  double sums[3] = {0.0, 0.0, 0.0};
  for (int64_t b = 0; b < B; ++b) {
    const float* p = partials + b * RLHF_LOSS_PARTIALS;
    sum_l += p[0];
    count += p[1];
    for (int k = 0; k < 3; ++k) sums[k] += p[2 + k];
    if (p[1] > 0.0f) {
      rows += 1.0;
      row_means += static_cast<double>(p[0]) / p[1];
    }
  }
  const double num = agg == RLHF_SEQ_MEAN_TOKEN_MEAN ? row_means : sum_l;
  const double denom = normalizer ? static_cast<double>(*normalizer) : agg == RLHF_TOKEN_MEAN ? count : rows;
  *loss = denom > 0.0 ? static_cast<float>(num / denom) : 0.0f;
  for (int k = 0; k < 3; ++k) stats[k] = count > 0.0 ? static_cast<float>(sums[k] / count) : 0.0f;
  stats[3] = static_cast<float>(denom);
}

template <class Loss>
int forward(const Loss& loss, const uint8_t* mask, int64_t B, int64_t T, int agg, const float* normalizer,
            float* partials, float* out_loss, float* stats) {
  if (agg < RLHF_TOKEN_MEAN || agg > RLHF_SEQ_MEAN_TOKEN_MEAN || B < 0 || T < 0) return 1;
  try {
    rlhf::parallel_for(0, B, row_grain(T), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) row_partials(loss, mask, b, T, partials + b * RLHF_LOSS_PARTIALS);
    });
  } catch (...) {
    return 2;
  }
  finalize(partials, B, agg, normalizer, out_loss, stats);
  return 0;
}

template <class Loss>
int backward(const Loss& loss, const float* grad_loss, const uint8_t* mask, int64_t B, int64_t T, int agg,
             const float* partials, const float* stats, float* grad) {
  if (agg < RLHF_TOKEN_MEAN || agg > RLHF_SEQ_MEAN_TOKEN_MEAN || B < 0 || T < 0) return 1;
  const float denom = stats[3];
  const float w_all = denom > 0.0f ? *grad_loss / denom : 0.0f;
  try {
    rlhf::parallel_for(0, B, row_grain(T), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const float count = partials[b * RLHF_LOSS_PARTIALS + 1];
        const float w = agg != RLHF_SEQ_MEAN_TOKEN_MEAN ? w_all : count > 0.0f ? w_all / count : 0.0f;
        const int64_t base = b * T;
        for (int64_t t = 0; t < T; ++t) {
          const float dl = loss(base + t).dl;
          grad[base + t] = mask[base + t] ? w * dl : 0.0f;
        }
      }
    });
  } catch (...) {
    return 2;
  }
  return 0;
}

// partials[0..2) of the pairs [lo, hi): (sum softplus(-z), number correct).
// Blocks of kTile pairs are evaluated by a vectorizable loop into kLanes
// float32 lanes, added once per block into float64.
void pairwise_tile(const Pairs& p, int64_t lo, int64_t hi, float* out) {
  double loss = 0.0, correct = 0.0;
  for (int64_t start = lo; start < hi; start += kTile) {
    const int64_t n = std::min(kTile, hi - start);
    float losses[kTile], corrects[kTile];
    for (int64_t i = 0; i < n; ++i) {
      losses[i] = rlhf::softplus_neg(p.z(start + i));
      corrects[i] = p.correct(start + i);
    }
    float loss_lanes[kLanes] = {}, correct_lanes[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) {
      loss_lanes[i % kLanes] += losses[i];
      correct_lanes[i % kLanes] += corrects[i];
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      loss += loss_lanes[l];
      correct += correct_lanes[l];
    }
  }
  out[0] = static_cast<float>(loss);
  out[1] = static_cast<float>(correct);
}

int pairwise_forward(const Pairs& p, int64_t N, float* partials, float* loss, float* accuracy) {
  if (N < 0) return 1;
  const int64_t tiles = (N + RLHF_PAIRWISE_TILE - 1) / RLHF_PAIRWISE_TILE;
  const int64_t grain = std::max<int64_t>(1, kGrainTokens / RLHF_PAIRWISE_TILE);
  try {
    rlhf::parallel_for(0, tiles, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k)
        pairwise_tile(p, k * RLHF_PAIRWISE_TILE, std::min(N, (k + 1) * RLHF_PAIRWISE_TILE), partials + 2 * k);
    });
  } catch (...) {
    return 2;
  }
  double sum = 0.0, correct = 0.0;
  for (int64_t k = 0; k < tiles; ++k) {
    sum += partials[2 * k];
    correct += partials[2 * k + 1];
  }
  const double n = static_cast<double>(std::max<int64_t>(N, 1));
  *loss = static_cast<float>(sum / n);
  *accuracy = static_cast<float>(correct / n);
  return 0;
}

int pairwise_backward(const Pairs& p, const float* grad_loss, int64_t N, float* grad_chosen, float* grad_rejected) {
  if (N < 0) return 1;
  const float w = *grad_loss / static_cast<float>(std::max<int64_t>(N, 1));
  try {
    rlhf::parallel_for(0, N, kGrainTokens, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const float g = rlhf::softplus_neg_grad(p.z(i), w);  // -sigmoid(-z) g / N
        grad_chosen[i] = g;
        grad_rejected[i] = -g;
      }
    });
  } catch (...) {
    return 2;
  }
  return 0;
}

}  // namespace

extern "C" {

int rlhf_ppo_policy_loss_forward_cpu(const float* logprobs, const float* old_logprobs, const float* advantages,
                                     const uint8_t* mask, int64_t B, int64_t T, float clip_low, float clip_high,
                                     float dual_clip, int agg, const float* normalizer, float* partials,
                                     float* loss, float* stats) {
  const PolicyLoss f{logprobs, old_logprobs, advantages, 1.0f - clip_low, 1.0f + clip_high, dual_clip};
  return forward(f, mask, B, T, agg, normalizer, partials, loss, stats);
}

int rlhf_ppo_policy_loss_backward_cpu(const float* grad_loss, const float* logprobs, const float* old_logprobs,
                                      const float* advantages, const uint8_t* mask, int64_t B, int64_t T,
                                      float clip_low, float clip_high, float dual_clip, int agg,
                                      const float* partials, const float* stats, float* grad) {
  const PolicyLoss f{logprobs, old_logprobs, advantages, 1.0f - clip_low, 1.0f + clip_high, dual_clip};
  return backward(f, grad_loss, mask, B, T, agg, partials, stats, grad);
}

int rlhf_ppo_value_loss_forward_cpu(const float* values, const float* old_values, const float* returns,
                                    const uint8_t* mask, int64_t B, int64_t T, float clip, int agg,
                                    const float* normalizer, float* partials, float* loss, float* stats) {
  const ValueLoss f{values, old_values, returns, clip};
  return forward(f, mask, B, T, agg, normalizer, partials, loss, stats);
}

int rlhf_ppo_value_loss_backward_cpu(const float* grad_loss, const float* values, const float* old_values,
                                     const float* returns, const uint8_t* mask, int64_t B, int64_t T, float clip,
                                     int agg, const float* partials, const float* stats, float* grad) {
  const ValueLoss f{values, old_values, returns, clip};
  return backward(f, grad_loss, mask, B, T, agg, partials, stats, grad);
}

int rlhf_pairwise_reward_loss_forward_cpu(const float* chosen, const float* rejected, const float* margin, int64_t N,
                                          float* partials, float* loss, float* accuracy) {
  return pairwise_forward(Pairs{chosen, rejected, margin}, N, partials, loss, accuracy);
}

int rlhf_pairwise_reward_loss_backward_cpu(const float* grad_loss, const float* chosen, const float* rejected,
                                           const float* margin, int64_t N, float* grad_chosen,
                                           float* grad_rejected) {
  return pairwise_backward(Pairs{chosen, rejected, margin}, grad_loss, N, grad_chosen, grad_rejected);
}

}  // extern "C"
