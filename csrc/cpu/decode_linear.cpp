// The decode-step linear kernel on the CPU: the `_cpu` entry point of
// rlhf_engine/decode_linear.h.
//
// A decode step multiplies a few activation rows by every weight of the model,
// so it is bound by reading the weights (float32, about 4 bytes per
// multiply-add and row of x). MKL's sgemm packs the weight first and then
// streams the packed copy: measured at 8 rows on the 2-core AMD EPYC machine,
// it read a Llama layer stack's weights at 4-8 GB/s, against 23-28 GB/s for a
// plain sum over the same memory. Here each weight row is read once, in
// order, with a software prefetch 4 KiB ahead, and dotted with up to
// kRowsPerPass rows of x at a time (one accumulator each, so the FMAs of
// different rows overlap); more rows of x take further passes over the same
// weight row, which is then in L1.
#include "rlhf_engine/decode_linear.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fVec::size();
constexpr int64_t kPrefetch = 1024;  // floats ahead in the weight stream (4 KiB; 1-8 KiB measured alike)
constexpr int kRowsPerPass = 8;
constexpr int64_t kGrainBytes = 128 * 1024;  // weight bytes per thread chunk, at least

// y[i * ldy] = dot(x row i, w) + b for i < ROWS.
template <int ROWS>
inline void dot_rows(const float* x, int64_t ldx, const float* w, int64_t k_size, float b, float* y, int64_t ldy) {
  fVec acc[ROWS];
  for (int i = 0; i < ROWS; ++i) acc[i] = fVec(0.f);
  int64_t k = 0;
  for (; k + kLanes <= k_size; k += kLanes) {
    __builtin_prefetch(w + k + kPrefetch);
    const fVec wv = fVec::loadu(w + k);
    for (int i = 0; i < ROWS; ++i) acc[i] = at::vec::fmadd(fVec::loadu(x + i * ldx + k), wv, acc[i]);
  }
  if (k < k_size) {
    const int64_t rest = k_size - k;
    const fVec wv = fVec::loadu(w + k, rest);  // the lanes past `rest` are zero
    for (int i = 0; i < ROWS; ++i) acc[i] = at::vec::fmadd(fVec::loadu(x + i * ldx + k, rest), wv, acc[i]);
  }
  for (int i = 0; i < ROWS; ++i) {
    y[i * ldy] = at::vec::vec_reduce_all<float>([](fVec& a, fVec& c) { return a + c; }, acc[i]) + b;
  }
}

template <int ROWS>
inline void dot_rows_upto(int rows, const float* x, int64_t ldx, const float* w, int64_t k_size, float b, float* y,
                          int64_t ldy) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) return dot_rows<ROWS>(x, ldx, w, k_size, b, y, ldy);
    dot_rows_upto<ROWS - 1>(rows, x, ldx, w, k_size, b, y, ldy);
  }
}

}  // namespace

extern "C" int rlhf_decode_linear_cpu(const float* x, int64_t n_rows_x, int64_t in_features, int64_t ldx,
                                      const float* w, int64_t out_features, int64_t ldw, const float* bias,
                                      float* y) {
  if (n_rows_x < 0 || in_features < 0 || out_features < 0 || ldx < in_features || ldw < in_features) return 1;
  if (n_rows_x == 0 || out_features == 0) return 0;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, in_features * 4));
  at::parallel_for(0, out_features, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float b = bias ? bias[n] : 0.f;
      for (int64_t m = 0; m < n_rows_x; m += kRowsPerPass) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowsPerPass, n_rows_x - m));
        dot_rows_upto<kRowsPerPass>(rows, x + m * ldx, ldx, w + n * ldw, in_features, b, y + m * out_features + n,
                                    out_features);
      }
    }
  });
  return 0;
}
