// Torch operator registrations of the CPU kernels (namespace rlhf_engine_cpu).
//
// Thin bindings: check devices, shapes and dtypes, allocate outputs, and call
// the pointer-and-size entry points of csrc/cpu/. Autograd, backend choice and
// the public `torch.ops.rlhf_engine.*` ops live in rlhf_engine/ops/, which
// calls these; C++ users of libtorch can call them through the dispatcher.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <sys/mman.h>

#include <cstdint>

#include "rlhf_engine/decode_linear.h"
#include "rlhf_engine/logprobs.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return RLHF_FLOAT32;
    case at::kHalf: return RLHF_FLOAT16;
    case at::kBFloat16: return RLHF_BFLOAT16;
    default: TORCH_CHECK(false, "rlhf_engine: logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// A fresh output from torch's allocator (so memory profilers see it), with
// transparent huge pages asked for on its 2 MiB-aligned interior before the
// kernel first touches it. Fresh 4 KiB pages cost a page fault each on first
// write, which took longer than the kernel itself on the machines measured
// here (0.47 s for 512 MiB, against 0.05 s to fill them); torch asks for
// huge pages only under THP_MEM_ALLOC_ENABLE=1, a process-wide setting.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  at::Tensor out = at::empty(sizes, options);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
  }
  return out;
}

void check_rows(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "rlhf_engine_cpu: tensors must be on the CPU");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.stride(0) >= logits.size(1),
              "rlhf_engine_cpu: logits must be [N, V] with unit stride along V");
  TORCH_CHECK(logits.size(1) > 0, "rlhf_engine_cpu: logits must have V > 0");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.is_contiguous(),
              "rlhf_engine_cpu: labels must be contiguous [N]");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "rlhf_engine_cpu: labels must be int64 or int32");
}

void check_row_vector(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              "rlhf_engine_cpu: ", name, " must be a contiguous float32 [N] CPU tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward(
    const at::Tensor& logits, const at::Tensor& labels, double temperature,
    int64_t ignore_index, bool compute_entropy) {
  check_rows(logits, labels);
  const int64_t n = logits.size(0);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32);
  at::Tensor stats = at::empty({n, 2}, f32);
  at::Tensor entropy = at::empty({compute_entropy ? n : 0}, f32);
  const int rc = rlhf_token_logprobs_forward_cpu(
      logits.data_ptr(), dtype_code(logits), n, logits.size(1), logits.stride(0),
      labels.data_ptr(), labels.scalar_type() == at::kLong, static_cast<float>(temperature),
      ignore_index, logp.data_ptr<float>(), compute_entropy ? entropy.data_ptr<float>() : nullptr,
      stats.data_ptr<float>());
  TORCH_CHECK(rc == 0, "rlhf_token_logprobs_forward_cpu failed with code ", rc);
  return {logp, entropy, stats};
}

// Checks the backward's inputs and runs the kernel, writing the gradient to
// `grad_logits` ([N, V] contiguous, dtype of the logits; may be the logits
// themselves when their row stride is V).
void run_token_logprobs_backward(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
    const std::optional<at::Tensor>& entropy, double temperature, int64_t ignore_index, void* grad_logits) {
  check_rows(logits, labels);
  const int64_t n = logits.size(0);
  check_row_vector(grad_logp, n, "grad_logp");
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
              stats.dim() == 2 && stats.size(0) == n && stats.size(1) == 2,
              "rlhf_engine_cpu: stats must be a contiguous float32 [N, 2] CPU tensor");
  const bool with_entropy = grad_entropy.has_value();
  if (with_entropy) {
    TORCH_CHECK(entropy.has_value(), "rlhf_engine_cpu: grad_entropy needs entropy");
    check_row_vector(*grad_entropy, n, "grad_entropy");
    check_row_vector(*entropy, n, "entropy");
  }
  const int rc = rlhf_token_logprobs_backward_cpu(
      grad_logp.data_ptr<float>(), with_entropy ? grad_entropy->data_ptr<float>() : nullptr,
      logits.data_ptr(), dtype_code(logits), n, logits.size(1), logits.stride(0),
      labels.data_ptr(), labels.scalar_type() == at::kLong, stats.data_ptr<float>(),
      with_entropy ? entropy->data_ptr<float>() : nullptr, static_cast<float>(temperature),
      ignore_index, grad_logits);
  TORCH_CHECK(rc == 0, "rlhf_token_logprobs_backward_cpu failed with code ", rc);
}

at::Tensor token_logprobs_backward(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
    const std::optional<at::Tensor>& entropy, double temperature, int64_t ignore_index) {
  check_rows(logits, labels);
  at::Tensor grad = empty_output({logits.size(0), logits.size(1)}, logits.options());
  run_token_logprobs_backward(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature, ignore_index,
                              grad.data_ptr());
  return grad;
}

// In place: overwrites `logits` (contiguous [N, V], a dead buffer such as a
// recomputed chunk of logits) with their gradient.
void token_logprobs_backward_(
    at::Tensor& logits, const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& labels, const at::Tensor& stats, const std::optional<at::Tensor>& entropy,
    double temperature, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "rlhf_engine_cpu: in-place logits must be contiguous [N, V]");
  run_token_logprobs_backward(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature, ignore_index,
                              logits.data_ptr());
}

// x [M, K] (unit stride along K), weight [N, K] (unit stride along K), bias
// [N] or none: x @ weight.T + bias as a new contiguous [M, N], all float32.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rlhf_engine_cpu: tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rlhf_engine_cpu: decode_linear takes float32 x and weight, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "rlhf_engine_cpu: decode_linear needs x [M, K] and weight [N, K], got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK((x.size(1) <= 1 || x.stride(1) == 1) && (weight.size(1) <= 1 || weight.stride(1) == 1),
              "rlhf_engine_cpu: decode_linear needs unit stride along K");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == n && bias->is_contiguous(),
                "rlhf_engine_cpu: decode_linear's bias must be a contiguous float32 [N] CPU tensor");
    bias_ptr = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({m, n}, x.options());
  const int rc = rlhf_decode_linear_cpu(x.data_ptr<float>(), m, k, std::max<int64_t>(x.stride(0), k),
                                        weight.data_ptr<float>(), n, std::max<int64_t>(weight.stride(0), k),
                                        bias_ptr, y.data_ptr<float>());
  TORCH_CHECK(rc == 0, "rlhf_decode_linear_cpu failed with code ", rc);
  return y;
}

}  // namespace

TORCH_LIBRARY(rlhf_engine_cpu, m) {
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("token_logprobs_forward(Tensor logits, Tensor labels, float temperature, int ignore_index, "
        "bool compute_entropy) -> (Tensor logp, Tensor entropy, Tensor stats)");
  m.def("token_logprobs_backward(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor stats, Tensor? entropy, float temperature, int ignore_index) -> Tensor");
  m.def("token_logprobs_backward_(Tensor(a!) logits, Tensor grad_logp, Tensor? grad_entropy, Tensor labels, "
        "Tensor stats, Tensor? entropy, float temperature, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(rlhf_engine_cpu, CPU, m) {
  m.impl("decode_linear", &decode_linear);
  m.impl("token_logprobs_forward", &token_logprobs_forward);
  m.impl("token_logprobs_backward", &token_logprobs_backward);
  m.impl("token_logprobs_backward_", &token_logprobs_backward_);
}
