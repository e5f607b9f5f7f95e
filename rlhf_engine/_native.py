"""Loading of the compiled parts.

* ``rlhf_engine._C``: the ATen-based C++ CPU kernels, registered as
  ``torch.ops.rlhf_engine_cpu.*`` (an ordinary extension module).
* ``rlhf_engine._cpu_kernels``: the plain C++ CPU kernels, and
  ``rlhf_engine._cuda_kernels``: the CUDA kernels (built by nvcc without
  torch headers). Both are shared libraries of the C entry points declared in
  csrc/include/rlhf_engine/*.h, loaded with ctypes; :func:`kernel` binds one
  entry point. ``RLHF_ENGINE_CPU_KERNELS`` / ``RLHF_ENGINE_CUDA_KERNELS`` may
  name another build of a library to load instead.

Each part may be missing (not built, or built without nvcc); its ``*_ERROR``
constant then says why, and the backends needing it report that reason.
"""
import ctypes
import glob
import os

import torch  # noqa: F401  (the C++ module needs torch's libraries loaded first)

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_cpu_module():
    try:
        from rlhf_engine import _C
    except ImportError as exc:
        return None, f"the C++ extension rlhf_engine._C is not built ({exc}); run `pip install -e .`"
    return _C, None


def _load_library(stem, env, missing):
    path = os.environ.get(env) or next(iter(glob.glob(os.path.join(_HERE, stem + "*.so"))), None)
    if path is None:
        return None, missing
    try:
        return ctypes.CDLL(path), None
    except OSError as exc:
        return None, f"{stem} failed to load: {exc}"


# Loaded once at import (plain module constants, so torch.compile traces
# backend choice without guarding on caches).
CPU_MODULE, CPU_ERROR = _load_cpu_module()
CPU_KERNELS, CPU_KERNELS_ERROR = _load_library(
    "_cpu_kernels", "RLHF_ENGINE_CPU_KERNELS", "the plain C++ CPU kernels are not built; run `pip install -e .`")
CUDA_KERNELS, CUDA_ERROR = _load_library(
    "_cuda_kernels", "RLHF_ENGINE_CUDA_KERNELS",
    "the CUDA kernels are not built (nvcc was not found when rlhf_engine was installed)")

VOIDP, I64, INT, F32, F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double
_BOUND = {}


def kernel(library, name, argtypes):
    """The C entry point ``name`` of a ctypes ``library``, returning int."""
    key = (id(library), name)
    if key not in _BOUND:
        fn = getattr(library, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        _BOUND[key] = fn
    return _BOUND[key]


def check_status(code, name):
    """Raise when a C entry point returned a nonzero status."""
    if code != 0:
        raise RuntimeError(f"rlhf_engine: {name} failed with status {code}")


def ptr(t):
    """Data pointer of a tensor, or None (NULL) for None."""
    return None if t is None else t.data_ptr()


def stream(device):
    """The current CUDA stream of ``device`` as a cudaStream_t handle."""
    return torch.cuda.current_stream(device).cuda_stream


DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
