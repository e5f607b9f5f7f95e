// CUDA kernels of the token log-prob contract in rlhf_engine/logprobs.h.
//
// Design: one thread block per row (grid-stride over rows when n_rows
// exceeds the grid), no torch headers.
//
//   forward   reads each logits row once. Every thread keeps an online
//             log-sum-exp state over its slice of the row, in log2 units:
//               m2 = running shift (max of x * c, c = log2(e) / T)
//               s  = sum 2^(x*c - m2)
//               t  = sum 2^(x*c - m2) * (x*c - m2)     (for the entropy)
//             so each element costs one FMA and one ex2 (log2(e) / T folded
//             into the FMA) plus an add and an FMA for the sums. States
//             merge across the block with warp shuffles plus shared memory.
//             Then stats = (m2, log2 s), logp = (x_label c - m2) ln2 - ln s,
//             entropy = ln s - ln2 t / s: everything is relative to the row
//             max, so large common offsets do not cancel.
//             Traffic: 1 read of the logits.
//   backward  reads each logits row once and writes grad_logits once,
//             element by element (no block synchronisation):
//               d2 = fma(x, c, -m2) - l2 = log2 p, p = 2^d2
//               grad = g_logp/T * (onehot - p) - g_ent/T * p * (d2 ln2 + entropy)
//             with onehot - p formed in float32. Each element is read and
//             then written by the same thread, so grad_logits may alias the
//             logits (row_stride == vocab). Traffic: 1 read + 1 write.
//
// Loads are 16-byte vectors (4 fp32 or 8 fp16/bf16) over the 16-byte aligned
// body of each row, with scalar head and tail elements, converted to float
// right after the load; all arithmetic is float32. Row offsets are int64.
// The hot paths do not depend on --use_fast_math (ex2 is explicit, the one
// log per row is taken in double).
// Checked on the host (else cudaErrorInvalidValue, nothing launched) once
// n_rows > 0: vocab >= 1, row_stride >= vocab, 0 < temperature < inf, known
// dtype, non-NULL required pointers.
#include "rlhf_engine/logprobs.h"

#include <cuda_runtime.h>
#include <stdint.h>

#include "common.cuh"

namespace {

using rlhf::cuda::load_one;
using rlhf::cuda::load_vec;
using rlhf::cuda::load_vecs;
using rlhf::cuda::RowSplit;
using rlhf::cuda::split_row;
using rlhf::cuda::store_one;
using rlhf::cuda::store_vec;
using rlhf::cuda::Vec;

constexpr int kMaxThreads = 512;   // threads per block (upper bound)
constexpr int kMinBlocks = 2;      // blocks per SM: caps registers at 64
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kUnroll = 4;         // 16-byte vectors in flight per thread
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kFltMax = 3.402823466e38f;

// c = log2(e) / T rounded once, as the header defines it (forward and
// backward must use the same c as every other backend).
__device__ __forceinline__ float log2e_over(float temperature) {
  return static_cast<float>(1.4426950408889634 / static_cast<double>(temperature));
}

// 2^x on the special-function unit (ex2.approx; results below 2^-126 flush
// to zero, which cannot matter in a sum normalised to its max).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename L>
__device__ __forceinline__ int64_t load_label(const L* labels, int64_t row) {
  return static_cast<int64_t>(__ldg(labels + row));
}

// ---------------------------------------------------------------------------
// Forward: online log-sum-exp (+ entropy) state and its reductions.

struct LseState {
  float m2;  // shift, log2 units
  float s;   // sum 2^(u - m2), u = x * c
  float t;   // sum 2^(u - m2) * (u - m2)
};

// Folds a chunk of K values into the thread state. `mx` is the raw max seen
// so far (c > 0, so max(x) * c is the max of u).
template <int K>
__device__ __forceinline__ void accumulate(LseState& st, float& mx,
                                           const float* x, float c) {
  float cm = x[0];
#pragma unroll
  for (int k = 1; k < K; ++k) cm = fmaxf(cm, x[k]);
  if (cm > mx) {  // new max: rescale the sums to the new shift
    const float m2 = cm * c;
    const float delta = fmaxf(st.m2 - m2, -kFltMax);
    const float sc = fast_exp2(delta);
    const float s_sc = st.s * sc;
    st.t = fmaf(delta, s_sc, st.t * sc);
    st.s = s_sc;
    st.m2 = m2;
    mx = cm;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = fmaf(x[k], c, -st.m2);  // u - m2, log2(e)/T folded in
    const float w = fast_exp2(d);
    st.s += w;
    // -inf logits give w = 0 and d = -inf: clamp so 0 * d stays 0 (a NaN
    // logit still poisons s).
    st.t = fmaf(w, fmaxf(d, -kFltMax), st.t);
  }
}

__device__ __forceinline__ LseState merge(const LseState& a,
                                          const LseState& b) {
  const float m = fmaxf(a.m2, b.m2);
  const float da = fmaxf(a.m2 - m, -kFltMax);
  const float db = fmaxf(b.m2 - m, -kFltMax);
  const float sa = fast_exp2(da);
  const float sb = fast_exp2(db);
  const float as = a.s * sa;
  const float bs = b.s * sb;
  return {m, as + bs, fmaf(da, as, a.t * sa) + fmaf(db, bs, b.t * sb)};
}

__device__ __forceinline__ LseState warp_reduce(LseState st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState o;
    o.m2 = __shfl_xor_sync(0xffffffffu, st.m2, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.t = __shfl_xor_sync(0xffffffffu, st.t, off);
    st = merge(st, o);
  }
  return st;
}

// Block-wide merge; the result is valid in thread 0. Safe to call again
// right after (the trailing barrier protects the shared slots).
__device__ __forceinline__ LseState block_reduce(LseState st,
                                                 LseState* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  st = warp_reduce(st);
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < nwarps ? smem[lane] : LseState{-kFltMax, 0.f, 0.f};
    st = warp_reduce(st);
  }
  __syncthreads();
  return st;
}

template <typename T, typename L>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    token_logprobs_fwd_kernel(const T* __restrict__ logits, int64_t n_rows,
                              int64_t vocab, int64_t row_stride,
                              const L* __restrict__ labels, float temperature,
                              int64_t ignore_index, float* __restrict__ logp,
                              float* __restrict__ entropy,
                              float* __restrict__ stats) {
  constexpr int kLen = Vec<T>::kLen;
  __shared__ LseState smem[kMaxWarps];
  const float c = log2e_over(temperature);  // u = x * c = z * log2(e)
  const int tid = threadIdx.x;
  const int nt = blockDim.x;

  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const int64_t label = load_label(labels, row);
    if (label == ignore_index) {  // uniform across the block: not read
      if (tid == 0) {
        logp[row] = 0.f;
        stats[2 * row] = stats[2 * row + 1] = 0.f;
        if (entropy) entropy[row] = 0.f;
      }
      continue;
    }
    const bool label_ok = label >= 0 && label < vocab;
    const T* x = logits + row * row_stride;

    float x_label = 0.f;  // issued early so its latency hides under the pass
    if (tid == 0 && label_ok) x_label = load_one(x + label);

    LseState st{-kFltMax, 0.f, 0.f};
    float mx = -INFINITY;
    const RowSplit sp = split_row<T>(x, vocab);

    // Scalar head and tail (fewer than kLen elements each).
    if (tid < sp.head) {
      const float v = load_one(x + tid);
      accumulate<1>(st, mx, &v, c);
    }
    if (tid < vocab - sp.tail_start) {
      const float v = load_one(x + sp.tail_start + tid);
      accumulate<1>(st, mx, &v, c);
    }

    // Vector body: kUnroll coalesced 16-byte loads in flight per thread.
    const T* body = x + sp.head;
    int64_t i = tid;
    for (; i + (kUnroll - 1) * nt < sp.nvec; i += kUnroll * nt) {
      float v[kUnroll][kLen];
      load_vecs<kUnroll>(body + i * kLen, nt, v);
      accumulate<kUnroll * kLen>(st, mx, &v[0][0], c);
    }
    for (; i < sp.nvec; i += nt) {
      float v[kLen];
      load_vec(body + i * kLen, v);
      accumulate<kLen>(st, mx, v, c);
    }

    st = block_reduce(st, smem);
    if (tid == 0) {
      // Once per row, in double: exact to float whatever --use_fast_math
      // does to logf (ln s ~ 1e-7 for confident rows).
      const float ln_s = static_cast<float>(log(static_cast<double>(st.s)));
      stats[2 * row] = st.m2;
      stats[2 * row + 1] = static_cast<float>(log2(static_cast<double>(st.s)));
      if (label_ok) {
        // logp <= 0 and entropy >= 0 hold exactly; rounding could break
        // them by an ulp, so clamp (the selects keep NaN).
        const float lp = fmaf(fmaf(x_label, c, -st.m2), kLn2, -ln_s);
        logp[row] = lp > 0.f ? 0.f : lp;
        if (entropy) {
          const float h = ln_s - kLn2 * (st.t / st.s);
          entropy[row] = h < 0.f ? 0.f : h;
        }
      } else {  // out-of-range label: poison, never read out of bounds
        logp[row] = __int_as_float(0x7fffffff);
        if (entropy) entropy[row] = __int_as_float(0x7fffffff);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward.

struct GradCoef {
  float c;   // log2(e) / T
  float m2;  // saved shift
  float l2;  // saved log2-sum
  float a;  // g_logp / T
  float b;  // g_ent / T (0 without the entropy term)
  float h;  // entropy (0 without the entropy term)
};

__device__ __forceinline__ float grad_of(float x, float onehot,
                                         const GradCoef& k) {
  const float d2 = fmaf(x, k.c, -k.m2) - k.l2;  // log2 p
  const float p = fast_exp2(d2);
  const float d = d2 * kLn2;  // log p
  const float oh_minus_p = onehot - p;  // float32: no bf16 cancellation
  // p * (d + H); the clamp keeps p = 0 at a -inf logit from giving NaN.
  const float ent = p * (fmaxf(d, -kFltMax) + k.h);
  return fmaf(k.a, oh_minus_p, -k.b * ent);
}

// Writes `value` over a contiguous row of n elements.
template <typename T>
__device__ __forceinline__ void fill_row(T* out, int64_t n, float value) {
  constexpr int kLen = Vec<T>::kLen;
  const RowSplit sp = split_row<T>(out, n);
  const int tid = threadIdx.x;
  if (tid < sp.head) store_one(out + tid, value);
  if (tid < n - sp.tail_start) store_one(out + sp.tail_start + tid, value);
  float v[kLen];
#pragma unroll
  for (int j = 0; j < kLen; ++j) v[j] = value;
  for (int64_t i = tid; i < sp.nvec; i += blockDim.x)
    store_vec(out + sp.head + i * kLen, v);
}

// logits and grad_logits may alias: no __restrict__ on them, and every
// element is loaded before it is stored by the same thread.
template <typename T, typename L>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    token_logprobs_bwd_kernel(const float* __restrict__ grad_logp,
                              const float* __restrict__ grad_entropy,
                              const T* logits, int64_t n_rows, int64_t vocab,
                              int64_t row_stride, const L* __restrict__ labels,
                              const float* __restrict__ stats,
                              const float* __restrict__ entropy, float temperature,
                              int64_t ignore_index, T* grad_logits) {
  constexpr int kLen = Vec<T>::kLen;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const bool has_ent = grad_entropy != nullptr && entropy != nullptr;
  const float inv_t = 1.f / temperature;
  const float c = log2e_over(temperature);

  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    T* out = grad_logits + row * vocab;
    const int64_t label = load_label(labels, row);
    if (label == ignore_index) {
      fill_row(out, vocab, 0.f);
      continue;
    }
    if (label < 0 || label >= vocab) {
      fill_row(out, vocab, __int_as_float(0x7fffffff));
      continue;
    }
    const T* x = logits + row * row_stride;
    GradCoef k;
    k.c = c;
    k.m2 = __ldg(stats + 2 * row);
    k.l2 = __ldg(stats + 2 * row + 1);
    k.a = __ldg(grad_logp + row) * inv_t;
    k.b = has_ent ? __ldg(grad_entropy + row) * inv_t : 0.f;
    k.h = has_ent ? __ldg(entropy + row) : 0.f;

    const bool same_phase =
        ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(out)) &
         15u) == 0;
    if (same_phase) {
      const RowSplit sp = split_row<T>(x, vocab);
      if (tid < sp.head) {
        const float v = load_one(x + tid);
        store_one(out + tid, grad_of(v, tid == label ? 1.f : 0.f, k));
      }
      if (tid < vocab - sp.tail_start) {
        const int64_t e = sp.tail_start + tid;
        const float v = load_one(x + e);
        store_one(out + e, grad_of(v, e == label ? 1.f : 0.f, k));
      }
      const T* xb = x + sp.head;
      T* ob = out + sp.head;
      const int64_t label_b = label - sp.head;  // label index in the body
      int64_t i = tid;
      for (; i + (kUnroll - 1) * nt < sp.nvec; i += kUnroll * nt) {
        float v[kUnroll][kLen];
        load_vecs<kUnroll>(xb + i * kLen, nt, v);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t rel = label_b - (i + u * nt) * kLen;
#pragma unroll
          for (int j = 0; j < kLen; ++j)
            v[u][j] = grad_of(v[u][j], rel == j ? 1.f : 0.f, k);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          store_vec(ob + (i + u * nt) * kLen, v[u]);
      }
      for (; i < sp.nvec; i += nt) {
        float v[kLen];
        load_vec(xb + i * kLen, v);
        const int64_t rel = label_b - i * kLen;
#pragma unroll
        for (int j = 0; j < kLen; ++j)
          v[j] = grad_of(v[j], rel == j ? 1.f : 0.f, k);
        store_vec(ob + i * kLen, v);
      }
    } else {
      // Input and output rows are misaligned relative to each other (padded
      // row stride): scalar path, kUnroll loads in flight per thread.
      int64_t e = tid;
      for (; e + (kUnroll - 1) * nt < vocab; e += kUnroll * nt) {
        float v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = load_one(x + e + u * nt);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t idx = e + u * nt;
          store_one(out + idx, grad_of(v[u], idx == label ? 1.f : 0.f, k));
        }
      }
      for (; e < vocab; e += nt)
        store_one(out + e, grad_of(load_one(x + e), e == label ? 1.f : 0.f, k));
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

// Enough threads that each has about kUnroll vectors per row, 32 to 512.
int pick_threads(int64_t vocab, int vec_len) {
  const int64_t want = (vocab + vec_len * kUnroll - 1) / (vec_len * kUnroll);
  int threads = 32;
  while (threads < kMaxThreads && threads < want) threads *= 2;
  return threads;
}

unsigned int pick_grid(int64_t n_rows) {
  const int64_t kMaxGrid = 0x7fffffff;  // gridDim.x limit
  return static_cast<unsigned int>(n_rows < kMaxGrid ? n_rows : kMaxGrid);
}

bool valid_shape(int64_t n_rows, int64_t vocab, int64_t row_stride,
                 float temperature) {
  return n_rows >= 0 && vocab >= 1 && row_stride >= vocab &&
         temperature > 0.f && temperature <= 3.402823466e38f;
}

template <typename T, typename L>
int launch_forward(const void* logits, int64_t n_rows, int64_t vocab,
                   int64_t row_stride, const void* labels, float temperature,
                   int64_t ignore_index, float* logp, float* entropy,
                   float* stats, cudaStream_t stream) {
  const int threads = pick_threads(vocab, Vec<T>::kLen);
  token_logprobs_fwd_kernel<T, L><<<pick_grid(n_rows), threads, 0, stream>>>(
      static_cast<const T*>(logits), n_rows, vocab, row_stride,
      static_cast<const L*>(labels), temperature, ignore_index, logp, entropy, stats);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename L>
int launch_backward(const float* grad_logp, const float* grad_entropy,
                    const void* logits, int64_t n_rows, int64_t vocab,
                    int64_t row_stride, const void* labels, const float* stats,
                    const float* entropy, float temperature, int64_t ignore_index,
                    void* grad_logits, cudaStream_t stream) {
  const int threads = pick_threads(vocab, Vec<T>::kLen);
  token_logprobs_bwd_kernel<T, L><<<pick_grid(n_rows), threads, 0, stream>>>(
      grad_logp, grad_entropy, static_cast<const T*>(logits), n_rows, vocab,
      row_stride, static_cast<const L*>(labels), stats, entropy, temperature,
      ignore_index, static_cast<T*>(grad_logits));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int forward_dtype(const void* logits, int64_t n_rows, int64_t vocab,
                  int64_t row_stride, const void* labels, int labels_int64,
                  float temperature, int64_t ignore_index, float* logp,
                  float* entropy, float* stats, cudaStream_t stream) {
  return labels_int64
             ? launch_forward<T, int64_t>(logits, n_rows, vocab, row_stride,
                                          labels, temperature, ignore_index, logp,
                                          entropy, stats, stream)
             : launch_forward<T, int32_t>(logits, n_rows, vocab, row_stride,
                                          labels, temperature, ignore_index, logp,
                                          entropy, stats, stream);
}

template <typename T>
int backward_dtype(const float* grad_logp, const float* grad_entropy,
                   const void* logits, int64_t n_rows, int64_t vocab,
                   int64_t row_stride, const void* labels, int labels_int64,
                   const float* stats, const float* entropy, float temperature,
                   int64_t ignore_index, void* grad_logits,
                   cudaStream_t stream) {
  return labels_int64
             ? launch_backward<T, int64_t>(grad_logp, grad_entropy, logits,
                                           n_rows, vocab, row_stride, labels,
                                           stats, entropy, temperature, ignore_index,
                                           grad_logits, stream)
             : launch_backward<T, int32_t>(grad_logp, grad_entropy, logits,
                                           n_rows, vocab, row_stride, labels,
                                           stats, entropy, temperature, ignore_index,
                                           grad_logits, stream);
}

}  // namespace

extern "C" int rlhf_token_logprobs_forward_cuda(
    const void* logits, int logits_dtype, int64_t n_rows, int64_t vocab,
    int64_t row_stride, const void* labels, int labels_int64,
    float temperature, int64_t ignore_index, float* logp, float* entropy,
    float* stats, void* stream) {
  if (n_rows == 0) return 0;
  if (!valid_shape(n_rows, vocab, row_stride, temperature))
    return static_cast<int>(cudaErrorInvalidValue);
  if (!logits || !labels || !logp || !stats)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (logits_dtype) {
    case RLHF_FLOAT32:
      return forward_dtype<float>(logits, n_rows, vocab, row_stride, labels,
                                  labels_int64, temperature, ignore_index, logp,
                                  entropy, stats, s);
    case RLHF_FLOAT16:
      return forward_dtype<__half>(logits, n_rows, vocab, row_stride, labels,
                                   labels_int64, temperature, ignore_index, logp,
                                   entropy, stats, s);
    case RLHF_BFLOAT16:
      return forward_dtype<__nv_bfloat16>(logits, n_rows, vocab, row_stride,
                                          labels, labels_int64, temperature,
                                          ignore_index, logp, entropy, stats, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int rlhf_token_logprobs_backward_cuda(
    const float* grad_logp, const float* grad_entropy, const void* logits,
    int logits_dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
    const void* labels, int labels_int64, const float* stats,
    const float* entropy, float temperature, int64_t ignore_index,
    void* grad_logits, void* stream) {
  if (n_rows == 0) return 0;
  if (!valid_shape(n_rows, vocab, row_stride, temperature))
    return static_cast<int>(cudaErrorInvalidValue);
  if (!grad_logp || !logits || !labels || !stats || !grad_logits)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (logits_dtype) {
    case RLHF_FLOAT32:
      return backward_dtype<float>(grad_logp, grad_entropy, logits, n_rows,
                                   vocab, row_stride, labels, labels_int64,
                                   stats, entropy, temperature, ignore_index,
                                   grad_logits, s);
    case RLHF_FLOAT16:
      return backward_dtype<__half>(grad_logp, grad_entropy, logits, n_rows,
                                    vocab, row_stride, labels, labels_int64,
                                    stats, entropy, temperature, ignore_index,
                                    grad_logits, s);
    case RLHF_BFLOAT16:
      return backward_dtype<__nv_bfloat16>(
          grad_logp, grad_entropy, logits, n_rows, vocab, row_stride, labels,
          labels_int64, stats, entropy, temperature, ignore_index, grad_logits, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
