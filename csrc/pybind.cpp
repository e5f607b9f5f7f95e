// The pybind11 module rlhf_engine._C: loading it registers the torch ops of
// csrc/torch_ops.cpp; its functions report how the CPU kernels were built.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifndef RLHF_ENGINE_CPU_CAPABILITY
#define RLHF_ENGINE_CPU_CAPABILITY "DEFAULT"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_engine native CPU kernels (torch ops under torch.ops.rlhf_engine_cpu)";
  m.def("cpu_capability", [] { return std::string(RLHF_ENGINE_CPU_CAPABILITY); },
        "vector instruction set the CPU kernels were compiled for");
  m.def("num_threads", [] { return at::get_num_threads(); },
        "threads at::parallel_for uses for the CPU kernels");
}
