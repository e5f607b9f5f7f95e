// CUDA kernels of the advantage contract in rlhf_engine/advantages.h (no
// torch headers).
//
//   gae               one thread block per row (grid-stride over rows). The
//                     recursion, masked skips included, is a composition of
//                     affine maps of the state (next_v, A) (see Map), so the
//                     block walks the row from the right in tiles of
//                     kThreads x kItems positions: each thread composes the
//                     maps of its kItems positions, a block-wide exclusive
//                     scan of those (warp shuffles, then the warp totals in
//                     shared memory) gives the state entering each thread
//                     from the tile's carry, and each thread replays its
//                     positions writing both outputs. A row costs
//                     ceil(T / 1024) dependent tile steps, not T serial
//                     ones. Maps and states are double (a float32 scan drifts
//                     past 1e-6 relative over long undiscounted rows).
//                     Traffic: inputs read once, outputs written once.
//   masked_whiten     per-row (count, sum) in double by one block per row, a
//                     one-block fixed-order sum over rows (the mean), the
//                     same for the sum of squared deviations around the mean
//                     (the variance), then an element-wise pass. Fixed
//                     thread-to-element assignment and fixed reduction trees,
//                     no atomics: bit-identical run to run.
//   group_advantages  one thread per group, double statistics.
//
// Masked positions enter every computation through selects, never through a
// multiplication by 0, so whatever they hold (NaN too) is never used. All
// indices are int64. Every launch is asynchronous on the given stream.
#include "rlhf_engine/advantages.h"

#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kItems;
constexpr int64_t kMaxBlocks = 1 << 16;
constexpr unsigned kFull = 0xffffffffu;

int grid_for(int64_t work) { return static_cast<int>(work < kMaxBlocks ? work : kMaxBlocks); }

// ---- GAE -----------------------------------------------------------------------

// (next_v, A) -> (p next_v + bv, q next_v + s A + ba). A valid position is
// (p, q, s, bv, ba) = (0, gamma, gamma lam, v, r - v); a masked one the identity.
struct Map {
  double p, q, s, bv, ba;
};

__device__ __forceinline__ Map identity_map() { return Map{1.0, 0.0, 1.0, 0.0, 0.0}; }

// h after f (f: positions to the right, walked first).
__device__ __forceinline__ Map compose(const Map& f, const Map& h) {
  return Map{h.p * f.p, h.q * f.p + h.s * f.q, h.s * f.s, h.p * f.bv + h.bv, h.q * f.bv + h.s * f.ba + h.ba};
}

__device__ __forceinline__ Map shfl_up(const Map& m, int delta) {
  return Map{__shfl_up_sync(kFull, m.p, delta), __shfl_up_sync(kFull, m.q, delta),
             __shfl_up_sync(kFull, m.s, delta), __shfl_up_sync(kFull, m.bv, delta),
             __shfl_up_sync(kFull, m.ba, delta)};
}

// The composition of the maps of threads [0, tid) (thread 0 holds the
// rightmost positions); `total` gets that of all threads.
__device__ Map block_exclusive_scan(Map own, Map* warp_totals, Map& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Map inclusive = own;
  for (int delta = 1; delta < 32; delta <<= 1) {
    const Map other = shfl_up(inclusive, delta);
    if (lane >= delta) inclusive = compose(other, inclusive);
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  Map exclusive = shfl_up(inclusive, 1);
  if (lane == 0) exclusive = identity_map();
  __syncthreads();
  Map before = identity_map();
  total = identity_map();
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) before = total;
    total = compose(total, warp_totals[w]);
  }
  __syncthreads();  // warp_totals is reused by the next tile
  return compose(before, exclusive);
}

__global__ void __launch_bounds__(kThreads) gae_kernel(const float* __restrict__ rewards,
                                                       const float* __restrict__ values,
                                                       const uint8_t* __restrict__ mask, int64_t n_rows, int64_t T,
                                                       double gamma, double gl, float* __restrict__ adv,
                                                       float* __restrict__ ret) {
  __shared__ Map warp_totals[kWarps];
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const int64_t base = row * T;
    double carry_v = 0.0, carry_a = 0.0;  // state entering the tile from its right (same in every thread)
    for (int64_t end = T; end > 0; end -= kTile) {
      // This thread's positions, right to left: hi - 1, ..., hi - kItems.
      const int64_t hi = end - static_cast<int64_t>(threadIdx.x) * kItems;
      float r[kItems], v[kItems];
      bool valid[kItems];
      Map own = identity_map();
      for (int k = 0; k < kItems; ++k) {
        const int64_t t = hi - 1 - k;
        valid[k] = t >= 0 && mask[base + t] != 0;
        r[k] = valid[k] ? rewards[base + t] : 0.f;
        v[k] = valid[k] ? values[base + t] : 0.f;
        if (valid[k]) own = compose(own, Map{0.0, gamma, gl, double(v[k]), double(r[k]) - double(v[k])});
      }
      Map total;
      const Map before = block_exclusive_scan(own, warp_totals, total);
      double next_v = before.p * carry_v + before.bv;
      double next_a = before.q * carry_v + before.s * carry_a + before.ba;
      for (int k = 0; k < kItems; ++k) {
        const int64_t t = hi - 1 - k;
        if (t < 0) break;
        if (valid[k]) {
          next_a = (double(r[k]) - double(v[k])) + gamma * next_v + gl * next_a;
          next_v = v[k];
        }
        adv[base + t] = valid[k] ? static_cast<float>(next_a) : 0.f;
        ret[base + t] = valid[k] ? static_cast<float>(next_a + double(v[k])) : 0.f;
      }
      const double new_v = total.p * carry_v + total.bv;
      carry_a = total.q * carry_v + total.s * carry_a + total.ba;
      carry_v = new_v;
    }
  }
}

// ---- whitening -------------------------------------------------------------------

// Fixed-tree sum of (a, b) over the block; the result is valid in thread 0.
__device__ void block_sum2(double& a, double& b, double* scratch) {
  for (int delta = 16; delta > 0; delta >>= 1) {
    a += __shfl_down_sync(kFull, a, delta);
    b += __shfl_down_sync(kFull, b, delta);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    scratch[2 * warp] = a;
    scratch[2 * warp + 1] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = b = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      a += scratch[2 * w];
      b += scratch[2 * w + 1];
    }
  }
  __syncthreads();  // scratch is reused
}

// part[2 row] = count, part[2 row + 1] = sum of d (or of d^2 when centered)
// with d = x - center over the row's valid positions.
__global__ void __launch_bounds__(kThreads) row_moments_kernel(const float* __restrict__ x,
                                                               const uint8_t* __restrict__ mask, int64_t n_rows,
                                                               int64_t T, const double* __restrict__ center,
                                                               bool centered, double* __restrict__ part) {
  __shared__ double scratch[2 * kWarps];
  const double c = centered ? *center : 0.0;
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    double count = 0.0, acc = 0.0;
    for (int64_t t = threadIdx.x; t < T; t += kThreads) {
      const int64_t i = row * T + t;
      if (mask[i]) {
        const double d = double(x[i]) - c;
        count += 1.0;
        acc += centered ? d * d : d;
      }
    }
    block_sum2(count, acc, scratch);
    if (threadIdx.x == 0) {
      part[2 * row] = count;
      part[2 * row + 1] = acc;
    }
  }
}

// stats[0] = mean (0 with no valid position); centered: stats[1] =
// 1 / sqrt(var + eps) (var 0 with fewer than two valid positions).
__global__ void __launch_bounds__(kThreads) whiten_stats_kernel(const double* __restrict__ part, int64_t n_rows,
                                                                bool centered, double eps, double* stats) {
  __shared__ double scratch[2 * kWarps];
  double count = 0.0, acc = 0.0;
  for (int64_t row = threadIdx.x; row < n_rows; row += kThreads) {
    count += part[2 * row];
    acc += part[2 * row + 1];
  }
  block_sum2(count, acc, scratch);
  if (threadIdx.x != 0) return;
  if (centered) {
    const double var = count >= 2.0 ? acc / (count - 1.0) : 0.0;
    stats[1] = 1.0 / sqrt(var + eps);
  } else {
    stats[0] = count > 0.0 ? acc / count : 0.0;
  }
}

__global__ void whiten_apply_kernel(const float* __restrict__ x, const uint8_t* __restrict__ mask, int64_t n,
                                    const double* __restrict__ stats, bool shift_mean, float* __restrict__ out) {
  const double mean = stats[0], scale = stats[1], add_back = shift_mean ? 0.0 : mean;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = mask[i] ? static_cast<float>((double(x[i]) - mean) * scale + add_back) : 0.f;
  }
}

// ---- group advantages -------------------------------------------------------------

__global__ void group_kernel(const float* __restrict__ scores, int64_t n_groups, int64_t group_size,
                             bool normalize_std, double eps, float* __restrict__ out) {
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < n_groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* s = scores + g * group_size;
    double sum = 0.0;
    for (int64_t i = 0; i < group_size; ++i) sum += s[i];
    const double mean = sum / double(group_size);
    double ss = 0.0;
    for (int64_t i = 0; i < group_size; ++i) ss += (s[i] - mean) * (s[i] - mean);
    const double std_dev = group_size > 1 ? sqrt(ss / double(group_size - 1)) : 0.0;
    const double scale = normalize_std ? 1.0 / (std_dev + eps) : 1.0;
    for (int64_t i = 0; i < group_size; ++i) out[g * group_size + i] = static_cast<float>((s[i] - mean) * scale);
  }
}

}  // namespace

extern "C" int rlhf_gae_cuda(const float* rewards, const float* values, const uint8_t* mask, int64_t n_rows,
                             int64_t T, float gamma, float lam, float* advantages, float* returns, void* stream) {
  if (n_rows < 0 || T < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n_rows == 0 || T == 0) return 0;
  if (!rewards || !values || !mask || !advantages || !returns) return static_cast<int>(cudaErrorInvalidValue);
  const double g = gamma, gl = double(gamma) * double(lam);
  gae_kernel<<<grid_for(n_rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      rewards, values, mask, n_rows, T, g, gl, advantages, returns);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int rlhf_masked_whiten_cuda(const float* x, const uint8_t* mask, int64_t n_rows, int64_t T,
                                       int shift_mean, float eps, float* out, double* workspace, void* stream) {
  if (n_rows < 0 || T < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n_rows == 0 || T == 0) return 0;
  if (!x || !mask || !out || !workspace) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  double* part = workspace;
  double* stats = workspace + 2 * n_rows;  // (mean, 1 / sqrt(var + eps))
  for (const bool centered : {false, true}) {
    row_moments_kernel<<<grid_for(n_rows), kThreads, 0, s>>>(x, mask, n_rows, T, stats, centered, part);
    whiten_stats_kernel<<<1, kThreads, 0, s>>>(part, n_rows, centered, double(eps), stats);
  }
  const int64_t n = n_rows * T;
  whiten_apply_kernel<<<grid_for((n + kThreads - 1) / kThreads), kThreads, 0, s>>>(x, mask, n, stats,
                                                                                   shift_mean != 0, out);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int rlhf_group_advantages_cuda(const float* scores, int64_t n, int64_t group_size, int normalize_std,
                                          float eps, float* out, void* stream) {
  if (n < 0 || group_size < 1 || n % group_size != 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  if (!scores || !out) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t n_groups = n / group_size;
  group_kernel<<<grid_for((n_groups + kThreads - 1) / kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      scores, n_groups, group_size, normalize_std != 0, double(eps), out);
  return static_cast<int>(cudaGetLastError());
}
