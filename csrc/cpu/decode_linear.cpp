// The decode-step linear kernel on the CPU: the `_cpu` entry point of
// rlhf_engine/decode_linear.h.
//
// A decode step multiplies a few activation rows by every weight of the model,
// so it is bound by reading the weights (float32, about 4 bytes per
// multiply-add and row of x). MKL's sgemm packs the weight first and then
// streams the packed copy, which at a few rows reads the weights at a fraction
// of the memory bandwidth (one machine's numbers:
// benchmarks/results/amd-epyc/notes.md). Here each weight row is read once, in
// order, with a software prefetch 4 KiB ahead; two weight rows at a time are
// dotted with up to kRowsPerPass rows of x (eight accumulators, so the FMAs
// overlap and each load of x serves two weight rows; measured 6-11 % faster
// than one weight row against eight rows of x); more rows of x take further
// passes over the same weight rows, which are then in L1.
#include "rlhf_engine/decode_linear.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fVec::size();
constexpr int64_t kPrefetch = 1024;  // floats ahead in the weight stream (4 KiB; 1-8 KiB measured alike)
constexpr int kRowsPerPass = 4;  // rows of x per pass ...
constexpr int kWeightRows = 2;   // ... against this many weight rows: 8 accumulators
constexpr int64_t kGrainBytes = 128 * 1024;  // weight bytes per thread chunk, at least

// y[i * ldy + j] = dot(x row i, w row j) + b[j] for i < ROWS, j < NR.
template <int ROWS, int NR>
inline void dot_block(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k_size, const float* b,
                      float* y, int64_t ldy) {
  fVec acc[ROWS][NR];
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = fVec(0.f);
  int64_t k = 0;
  for (; k + kLanes <= k_size; k += kLanes) {
    fVec wv[NR];
    for (int j = 0; j < NR; ++j) {
      __builtin_prefetch(w + j * ldw + k + kPrefetch);
      wv[j] = fVec::loadu(w + j * ldw + k);
    }
    for (int i = 0; i < ROWS; ++i) {
      const fVec xv = fVec::loadu(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = at::vec::fmadd(xv, wv[j], acc[i][j]);
    }
  }
  if (k < k_size) {
    const int64_t rest = k_size - k;
    fVec wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = fVec::loadu(w + j * ldw + k, rest);  // the lanes past `rest` are zero
    for (int i = 0; i < ROWS; ++i) {
      const fVec xv = fVec::loadu(x + i * ldx + k, rest);
      for (int j = 0; j < NR; ++j) acc[i][j] = at::vec::fmadd(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < NR; ++j)
      y[i * ldy + j] = at::vec::vec_reduce_all<float>([](fVec& a, fVec& c) { return a + c; }, acc[i][j]) + b[j];
}

// dot_block<rows, NR> for a run-time rows <= ROWS.
template <int ROWS, int NR>
inline void dot_block_upto(int rows, const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k_size,
                           const float* b, float* y, int64_t ldy) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) return dot_block<ROWS, NR>(x, ldx, w, ldw, k_size, b, y, ldy);
    dot_block_upto<ROWS - 1, NR>(rows, x, ldx, w, ldw, k_size, b, y, ldy);
  }
}

// Weight rows [n, n + NR) against every row of x.
template <int NR>
inline void weight_rows(const float* x, int64_t n_rows_x, int64_t ldx, const float* w, int64_t ldw,
                        int64_t k_size, const float* b, float* y, int64_t ldy) {
  for (int64_t m = 0; m < n_rows_x; m += kRowsPerPass) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowsPerPass, n_rows_x - m));
    dot_block_upto<kRowsPerPass, NR>(rows, x + m * ldx, ldx, w, ldw, k_size, b, y + m * ldy, ldy);
  }
}

}  // namespace

extern "C" int rlhf_decode_linear_cpu(const float* x, int64_t n_rows_x, int64_t in_features, int64_t ldx,
                                      const float* w, int64_t out_features, int64_t ldw, const float* bias,
                                      float* y) {
  if (n_rows_x < 0 || in_features < 0 || out_features < 0 || ldx < in_features || ldw < in_features) return 1;
  if (n_rows_x == 0 || out_features == 0) return 0;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, in_features * 4));
  const int64_t blocks = (out_features + kWeightRows - 1) / kWeightRows;
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain / kWeightRows), [&](int64_t begin, int64_t end) {
    float zeros[kWeightRows] = {};
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n = block * kWeightRows;
      const float* b = bias ? bias + n : zeros;
      if (n + kWeightRows <= out_features) {
        weight_rows<kWeightRows>(x, n_rows_x, ldx, w + n * ldw, ldw, in_features, b, y + n, out_features);
      } else {
        for (int64_t r = n; r < out_features; ++r)
          weight_rows<1>(x, n_rows_x, ldx, w + r * ldw, ldw, in_features, bias ? bias + r : zeros, y + r,
                         out_features);
      }
    }
  });
  return 0;
}
