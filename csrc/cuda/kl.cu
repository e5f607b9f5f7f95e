// CUDA kernels of the KL contract in rlhf_engine/kl.h (no torch headers).
//
//   kl_penalty_forward    grid-stride element-wise pass: 2 reads, 1 write.
//   kl_penalty_backward   grid-stride element-wise pass writing both
//                         gradients: 3 reads (+ the mask), 2 writes.
//   kl_shaped_rewards     one thread block per row (grid-stride over rows):
//                         every thread takes the max valid index of its
//                         strided slice of the mask, a warp-shuffle + shared
//                         memory reduction gives the row's last valid index,
//                         then the block writes the row. One launch, no host
//                         synchronisation; the mask (1 byte a token) is read
//                         twice, the second time from cache.
//
// The estimator is a template parameter. The per-element math (kl_value,
// kl_derivative: k3's exp(r) - r - 1 without cancellation at small d, NaN
// passed through) is rlhf_engine/token_math.h, shared with the CPU kernels.
// All indices are int64.
#include "rlhf_engine/kl.h"

#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "rlhf_engine/token_math.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

using rlhf::kl_derivative;
using rlhf::kl_value;

template <int E>
__global__ void forward_kernel(const float* __restrict__ lp, const float* __restrict__ ref, int64_t n,
                               float* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = kl_value<E>(lp[i] - ref[i]);
}

template <int E>
__global__ void backward_kernel(const float* __restrict__ grad, const float* __restrict__ lp,
                                const float* __restrict__ ref, const uint8_t* __restrict__ mask, float scale,
                                int64_t n, float* __restrict__ g_lp, float* __restrict__ g_ref) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const bool valid = mask == nullptr || mask[i] != 0;
    const float g = valid ? scale * grad[i] * kl_derivative<E>(lp[i] - ref[i]) : 0.f;
    g_lp[i] = g;
    g_ref[i] = -g;
  }
}

// Max over the block of `v` (every thread gets the result).
__device__ __forceinline__ int64_t block_max(int64_t v) {
  __shared__ int64_t partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int64_t other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = partial[0];
  for (int w = 1; w < kThreads / 32; ++w) v = partial[w] > v ? partial[w] : v;
  __syncthreads();  // partial may be reused by the next row
  return v;
}

template <int E>
__global__ void __launch_bounds__(kThreads) shaped_kernel(const float* __restrict__ scores,
                                                          const float* __restrict__ lp,
                                                          const float* __restrict__ ref,
                                                          const uint8_t* __restrict__ mask, int64_t n_rows,
                                                          int64_t n_cols, float neg_coef,
                                                          float* __restrict__ rewards, int64_t* __restrict__ last) {
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const int64_t base = row * n_cols;
    int64_t mine = -1;
    for (int64_t t = threadIdx.x; t < n_cols; t += kThreads)
      if (mask[base + t]) mine = t;  // increasing t: the slice's last
    const int64_t row_last = block_max(mine);
    const float score = scores[row];
    for (int64_t t = threadIdx.x; t < n_cols; t += kThreads) {
      const int64_t i = base + t;
      float r = mask[i] ? neg_coef * kl_value<E>(lp[i] - ref[i]) : 0.f;
      if (t == row_last) r += score;
      rewards[i] = r;
    }
    if (threadIdx.x == 0) last[row] = row_last;
  }
}

unsigned blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename Fn>
int with_estimator(int estimator, const Fn& fn) {
  switch (estimator) {
    case RLHF_KL_K1: fn(std::integral_constant<int, RLHF_KL_K1>{}); break;
    case RLHF_KL_ABS: fn(std::integral_constant<int, RLHF_KL_ABS>{}); break;
    case RLHF_KL_K2: fn(std::integral_constant<int, RLHF_KL_K2>{}); break;
    case RLHF_KL_K3: fn(std::integral_constant<int, RLHF_KL_K3>{}); break;
    default: return 1;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int rlhf_kl_penalty_forward_cuda(const float* logprobs, const float* ref_logprobs, int64_t n,
                                            int estimator, float* out, void* stream) {
  if (n < 0) return 2;
  if (estimator < RLHF_KL_K1 || estimator > RLHF_KL_K3) return 1;
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return with_estimator(estimator, [&](auto est) {
    forward_kernel<decltype(est)::value><<<blocks_for(n), kThreads, 0, s>>>(logprobs, ref_logprobs, n, out);
  });
}

extern "C" int rlhf_kl_penalty_backward_cuda(const float* grad, const float* logprobs, const float* ref_logprobs,
                                             const uint8_t* mask, float scale, int64_t n, int estimator,
                                             float* grad_logprobs, float* grad_ref_logprobs, void* stream) {
  if (n < 0) return 2;
  if (estimator < RLHF_KL_K1 || estimator > RLHF_KL_K3) return 1;
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return with_estimator(estimator, [&](auto est) {
    backward_kernel<decltype(est)::value><<<blocks_for(n), kThreads, 0, s>>>(
        grad, logprobs, ref_logprobs, mask, scale, n, grad_logprobs, grad_ref_logprobs);
  });
}

extern "C" int rlhf_kl_shaped_rewards_cuda(const float* scores, const float* logprobs, const float* ref_logprobs,
                                           const uint8_t* mask, int64_t n_rows, int64_t n_cols, float kl_coef,
                                           int estimator, float* rewards, int64_t* last, void* stream) {
  if (n_rows < 0 || n_cols < 0) return 2;
  if (estimator < RLHF_KL_K1 || estimator > RLHF_KL_K3) return 1;
  if (n_rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(n_rows < kMaxBlocks ? n_rows : kMaxBlocks);
  return with_estimator(estimator, [&](auto est) {
    shaped_kernel<decltype(est)::value><<<grid, kThreads, 0, s>>>(scores, logprobs, ref_logprobs, mask, n_rows,
                                                                  n_cols, -kl_coef, rewards, last);
  });
}
