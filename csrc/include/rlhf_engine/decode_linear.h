// C entry point of the decode-step linear kernel (a plain C header: no torch
// types). TORCH-ONLY to link: the kernel (csrc/cpu/decode_linear.cpp) is
// written with ATen's vector types and at::parallel_for, is compiled into the
// torch extension rlhf_engine._C, and needs libtorch (libc10, libtorch_cpu)
// and torch's OpenMP runtime; Python reaches it as
// torch.ops.rlhf_engine_cpu.decode_linear.
//
//   y[m, n] = sum_k x[m, k] * w[n, k]  (+ bias[n])      for m < n_rows_x
//
//   x     [n_rows_x, in_features] float32, element stride 1, row stride ldx
//   w     [out_features, in_features] float32, element stride 1, row stride ldw
//         (an nn.Linear weight as stored)
//   bias  [out_features] float32, contiguous, or NULL
//   y     [n_rows_x, out_features] float32, contiguous
//
// Meant for a handful of rows (a decode step: one token per sequence), where a
// GEMM library's packing of `w` costs more than the product itself. Each
// weight row is read once, front to back with a software prefetch, and dotted
// with every row of `x` (which stays in L1); output rows of the weight are
// spread over at::parallel_for's threads. Returns 0, or nonzero for invalid
// sizes.
#ifndef RLHF_ENGINE_DECODE_LINEAR_H_
#define RLHF_ENGINE_DECODE_LINEAR_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

int rlhf_decode_linear_cpu(const float* x, int64_t n_rows_x, int64_t in_features, int64_t ldx, const float* w,
                           int64_t out_features, int64_t ldw, const float* bias, float* y);

#ifdef __cplusplus
}
#endif

#endif  // RLHF_ENGINE_DECODE_LINEAR_H_
