// Helpers shared by the CUDA kernels (csrc/cuda/*.cu; plain CUDA C++, no
// torch headers): fp32 / fp16 / bf16 <-> float conversions, 16-byte vector
// loads and stores, and the split of a row into a scalar head, a vector body
// and a scalar tail. The per-token math shared with the CPU kernels is
// rlhf_engine/token_math.h.
#ifndef RLHF_ENGINE_CUDA_COMMON_CUH_
#define RLHF_ENGINE_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace rlhf {
namespace cuda {

// Loads and stores: fp32 / fp16 / bf16 <-> float.

template <typename T>
struct Vec {
  static constexpr int kLen = 16 / static_cast<int>(sizeof(T));  // per 16 B
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One 32-bit word of a vector <-> its 1 or 2 floats.
__device__ __forceinline__ void unpack_word(uint32_t w, float* f, float) {
  f[0] = __uint_as_float(w);
}
__device__ __forceinline__ void unpack_word(uint32_t w, float* f, __half) {
  f[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w)));
  f[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ void unpack_word(uint32_t w, float* f,
                                            __nv_bfloat16) {
  f[0] = __uint_as_float(w << 16);
  f[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ uint32_t pack_word(const float* f, float) {
  return __float_as_uint(f[0]);
}
__device__ __forceinline__ uint32_t pack_word(const float* f, __half) {
  const __half2_raw r = __floats2half2_rn(f[0], f[1]);
  return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
}
__device__ __forceinline__ uint32_t pack_word(const float* f, __nv_bfloat16) {
  const __nv_bfloat162_raw r = __floats2bfloat162_rn(f[0], f[1]);
  return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
}

// Streaming (evict-first) loads: the logits are read exactly once. ld.cs is
// coherent, so it is safe when grad_logits aliases the logits.
template <typename T>
__device__ __forceinline__ float load_one(const T* p) {
  return to_float(__ldcs(p));
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[Vec<T>::kLen]) {
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  constexpr int kPerWord = Vec<T>::kLen / 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) unpack_word(w[i], f + i * kPerWord, T());
}

// U vectors in flight: vector u of `f` from p + u * stride vectors (a
// thread's share of U coalesced block-wide loads when stride is the number of
// threads).
template <int U, typename T>
__device__ __forceinline__ void load_vecs(const T* p, int64_t stride, float (&f)[U][Vec<T>::kLen]) {
#pragma unroll
  for (int u = 0; u < U; ++u) load_vec(p + u * stride * Vec<T>::kLen, f[u]);
}

template <typename T>
__device__ __forceinline__ void store_one(T* p, float x) {
  *p = from_float<T>(x);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p,
                                          const float (&f)[Vec<T>::kLen]) {
  constexpr int kPerWord = Vec<T>::kLen / 4;
  uint4 raw;
  raw.x = pack_word(f + 0 * kPerWord, T());
  raw.y = pack_word(f + 1 * kPerWord, T());
  raw.z = pack_word(f + 2 * kPerWord, T());
  raw.w = pack_word(f + 3 * kPerWord, T());
  *reinterpret_cast<uint4*>(p) = raw;
}

// A row split into a scalar head (up to the first 16-byte boundary), a body
// of 16-byte vectors and a scalar tail.
struct RowSplit {
  int64_t head;        // elements [0, head) are scalar
  int64_t nvec;        // vectors covering [head, tail_start)
  int64_t tail_start;  // elements [tail_start, n) are scalar
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const void* row, int64_t n) {
  constexpr int kLen = Vec<T>::kLen;
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(row) & 15u);
  int64_t head = mis ? (16 - mis) / static_cast<int>(sizeof(T)) : 0;
  head = head < n ? head : n;
  const int64_t nvec = (n - head) / kLen;
  return {head, nvec, head + nvec * kLen};
}

}  // namespace cuda
}  // namespace rlhf

#endif  // RLHF_ENGINE_CUDA_COMMON_CUH_
