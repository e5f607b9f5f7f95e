// C entry points of the token log-prob kernels (a plain C header: no torch
// types).
//
// The same contract holds for the CPU (`_cpu`) and CUDA (`_cuda`) builds.
// Linking: the `_cuda` entry points are plain CUDA C++ (the _cuda_kernels
// library links without PyTorch); the `_cpu` ones are TORCH-ONLY: the kernel
// (csrc/cpu/logprobs.cpp) is written with ATen's vector types and
// at::parallel_for, is compiled into the torch extension rlhf_engine._C, and
// needs libtorch (libc10, libtorch_cpu) and torch's OpenMP runtime to link;
// Python reaches it as torch.ops.rlhf_engine_cpu.token_logprobs_*. Shapes
// are given as pointer + sizes + row stride; all sizes are int64.
//
//   logits      [n_rows, vocab] with element stride 1 and row stride
//               `row_stride` (>= vocab), dtype `logits_dtype`
//   labels      [n_rows], int32 or int64 (`labels_int64`), contiguous
//   logp        [n_rows] float32: log_softmax(logits / T)[label]
//   entropy     [n_rows] float32 or NULL: entropy of softmax(logits / T)
//   stats       [n_rows, 2] float32: per-row statistics saved for backward,
//               in base-2 units of z = logits / T: a shift m2 (the row max
//               of x * c as the kernel computed it) and l2 = log2(sum
//               2^(x * c - m2)), with c = (float)(log2(e) / T). Then
//                 log2 p = fma(x, c, -m2) - l2,   lse = (m2 + l2) * ln 2.
//               Keeping the shift apart from the log-sum keeps full float32
//               precision at large common offsets (a float32 lse near 1e4
//               is only good to 5e-4).
//
// Rows whose label equals `ignore_index` get logp = entropy = 0 and
// stats = (0, 0), and are not read. Rows whose label is outside [0, vocab) get logp = entropy =
// NaN (the kernels never read out of bounds); callers validate labels first
// where that is cheap (CPU).
//
// The backward writes grad_logits [n_rows, vocab] (contiguous, dtype
// `logits_dtype`) in one pass over the logits:
//   log p = (fma(x, c, -m2) - l2) * ln 2
//   grad = (g_logp * (onehot(label) - p) - g_ent * p * (log p + entropy)) / T
// with `onehot - p` formed in float32 before rounding. `grad_entropy` and
// `entropy` may be NULL (no entropy term). Ignored rows get zeros; rows with
// an out-of-range label get NaN. `grad_logits` may alias `logits` when the
// row stride equals vocab (in-place backward into a dead logits buffer).
//
// Every function returns 0 on success, or a nonzero error code (for CUDA the
// cudaError_t of the launch).
#ifndef RLHF_ENGINE_LOGPROBS_H_
#define RLHF_ENGINE_LOGPROBS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum rlhf_dtype { RLHF_FLOAT32 = 0, RLHF_FLOAT16 = 1, RLHF_BFLOAT16 = 2 };

int rlhf_token_logprobs_forward_cpu(
    const void* logits, int logits_dtype, int64_t n_rows, int64_t vocab,
    int64_t row_stride, const void* labels, int labels_int64,
    float temperature, int64_t ignore_index, float* logp, float* entropy,
    float* stats);

int rlhf_token_logprobs_backward_cpu(
    const float* grad_logp, const float* grad_entropy, const void* logits,
    int logits_dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
    const void* labels, int labels_int64, const float* stats,
    const float* entropy, float temperature, int64_t ignore_index,
    void* grad_logits);

// CUDA: pointers are device pointers; `stream` is a cudaStream_t (NULL for
// the legacy default stream). Launches are asynchronous.
int rlhf_token_logprobs_forward_cuda(
    const void* logits, int logits_dtype, int64_t n_rows, int64_t vocab,
    int64_t row_stride, const void* labels, int labels_int64,
    float temperature, int64_t ignore_index, float* logp, float* entropy,
    float* stats, void* stream);

int rlhf_token_logprobs_backward_cuda(
    const float* grad_logp, const float* grad_entropy, const void* logits,
    int logits_dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
    const void* labels, int labels_int64, const float* stats,
    const float* entropy, float temperature, int64_t ignore_index,
    void* grad_logits, void* stream);

#ifdef __cplusplus
}
#endif

#endif  // RLHF_ENGINE_LOGPROBS_H_
