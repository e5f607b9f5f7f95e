"""Loading of the compiled parts: the C++ module and the CUDA kernel library.

``rlhf_engine._C`` (C++ CPU kernels, registered as ``torch.ops.rlhf_engine_cpu``)
is an ordinary extension module. ``rlhf_engine._cuda_kernels`` is a plain
shared library of C entry points (csrc/include/rlhf_engine/*.h) built by nvcc
without torch headers; it is loaded with ctypes. Either may be missing (not
built, or built without nvcc); ``CPU_ERROR`` / ``CUDA_ERROR`` then say why.
"""
import ctypes
import glob
import os

import torch  # noqa: F401  (the C++ module needs torch's libraries loaded first)

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_cpu():
    try:
        from rlhf_engine import _C
    except ImportError as exc:
        return None, f"the C++ extension rlhf_engine._C is not built ({exc}); run `pip install -e .`"
    return _C, None


_VP, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

# Argument types of the C entry points, by function name.
_CUDA_SIGNATURES = {
    "rlhf_token_logprobs_forward_cuda": [_VP, _INT, _I64, _I64, _I64, _VP, _INT, _F32, _I64, _VP, _VP, _VP, _VP],
    "rlhf_token_logprobs_backward_cuda": [_VP, _VP, _VP, _INT, _I64, _I64, _I64, _VP, _INT, _VP, _VP, _F32, _I64, _VP, _VP],
}


def _load_cuda():
    paths = glob.glob(os.path.join(_HERE, "_cuda_kernels*.so"))
    if not paths:
        return None, "the CUDA kernels are not built (nvcc was not found when rlhf_engine was installed)"
    try:
        lib = ctypes.CDLL(paths[0])
    except OSError as exc:
        return None, f"the CUDA kernel library failed to load: {exc}"
    for name, argtypes in _CUDA_SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib, None


# Loaded once at import (plain module constants, so torch.compile traces
# backend choice without guarding on caches): the module or library, or None
# and the reason it is missing.
CPU_MODULE, CPU_ERROR = _load_cpu()
CUDA_LIBRARY, CUDA_ERROR = _load_cuda()


def check_cuda_status(code, name):
    """Raise when a CUDA entry point returned a nonzero status."""
    if code != 0:
        raise RuntimeError(f"rlhf_engine: {name} failed with CUDA error {code}")


DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
