// Plain C entry points of the advantage kernels (no torch headers): GAE,
// masked whitening and group-relative advantages.
//
// The same contract holds for the CPU (`_cpu`) and CUDA (`_cuda`) builds, so
// a C/C++ framework can link either without PyTorch. Tensors are contiguous
// and row-major; all sizes are int64; floats are float32 and masks uint8
// holding 0 or 1.
//
// GAE over rewards, values, mask [n_rows, T] -> advantages, returns
// [n_rows, T]. Positions whose mask is 0 are skipped: with next_v and A the
// value and advantage of the next valid position of the row (both 0 past the
// last one),
//   delta_t = r_t + gamma * next_v - v_t,
//   A_t     = delta_t + gamma * lam * A_next,   returns_t = A_t + v_t,
// and both outputs are 0 where the mask is 0. Values at masked positions are
// never used (NaN there does not propagate); NaN at a valid position makes
// the outputs of that position and of every earlier valid position of the
// row NaN.
//
// Masked whitening of x, mask [n_rows, T] -> out [n_rows, T]: with mean and
// Bessel-corrected variance over all positions whose mask is 1 (variance 0
// with fewer than two of them; mean 0 with none),
//   out = (x - mean) / sqrt(var + eps)   (+ mean unless shift_mean),
// and 0 where the mask is 0. Statistics are summed in double, per row then
// over rows in a fixed order (bit-identical run to run).
//
// Group advantages of scores [n] (n a multiple of group_size >= 1, laid out
// as consecutive groups): out = score - group_mean, divided by
// (group_std + eps) when normalize_std, with the unbiased std (0 for a group
// of one, whose outputs are then 0).
//
// Every function returns 0 on success, or a nonzero error code (for CUDA the
// cudaError_t of the launches).
#ifndef RLHF_ENGINE_ADVANTAGES_H_
#define RLHF_ENGINE_ADVANTAGES_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

int rlhf_gae_cpu(const float* rewards, const float* values, const uint8_t* mask, int64_t n_rows, int64_t T,
                 float gamma, float lam, float* advantages, float* returns);

int rlhf_masked_whiten_cpu(const float* x, const uint8_t* mask, int64_t n_rows, int64_t T, int shift_mean,
                           float eps, float* out);

int rlhf_group_advantages_cpu(const float* scores, int64_t n, int64_t group_size, int normalize_std, float eps,
                              float* out);

// CUDA: pointers are device pointers; `stream` is a cudaStream_t (NULL for
// the legacy default stream). Launches are asynchronous; no host sync.
int rlhf_gae_cuda(const float* rewards, const float* values, const uint8_t* mask, int64_t n_rows, int64_t T,
                  float gamma, float lam, float* advantages, float* returns, void* stream);

// `workspace`: device scratch of at least RLHF_MASKED_WHITEN_WORKSPACE(n_rows)
// doubles (per-row partial sums, then the global statistics).
#define RLHF_MASKED_WHITEN_WORKSPACE(n_rows) (2 * (int64_t)(n_rows) + 4)

int rlhf_masked_whiten_cuda(const float* x, const uint8_t* mask, int64_t n_rows, int64_t T, int shift_mean,
                            float eps, float* out, double* workspace, void* stream);

int rlhf_group_advantages_cuda(const float* scores, int64_t n, int64_t group_size, int normalize_std, float eps,
                               float* out, void* stream);

#ifdef __cplusplus
}
#endif

#endif  // RLHF_ENGINE_ADVANTAGES_H_
