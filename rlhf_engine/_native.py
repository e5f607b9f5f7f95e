"""Loading of the compiled parts, and the one way to call their C entry points.

* ``rlhf_engine._C``: the torch extension. It registers
  ``torch.ops.rlhf_engine_cpu.*``, the bindings of the two ATen-based CPU
  kernels (csrc/cpu/logprobs.cpp, csrc/cpu/decode_linear.cpp: torch-only,
  their ``_cpu`` entry points are not in the plain library), which the ops
  call as torch ops.
* ``rlhf_engine._cpu_kernels``: the plain C++ CPU kernels, and
  ``rlhf_engine._cuda_kernels``: the CUDA kernels (built by nvcc without
  torch headers). Both are shared libraries of the C entry points declared in
  csrc/include/rlhf_engine/*.h, loaded with ctypes and called through
  :func:`call`. ``RLHF_ENGINE_CPU_KERNELS`` / ``RLHF_ENGINE_CUDA_KERNELS`` may
  name another build of a library to load instead.

Each part may be missing (not built, or built without nvcc); its ``*_ERROR``
constant then says why, and the backends needing it report that reason.

:data:`SIGNATURES` holds the C signatures, one table per header, written
once. :func:`call` picks the library by the device, appends the CUDA stream,
turns tensors into pointers and checks the status; before a CPU call it
gives the plain library the caller's ``torch.get_num_threads()``
(``rlhf_set_num_threads``, threads.h), so the kernels honour
``torch.set_num_threads`` (per calling thread, as torch does).
"""
import ctypes
import glob
import os
import threading

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

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # enum rlhf_dtype (logprobs.h)

# C signatures ------------------------------------------------------------------------
# One table per header of csrc/include/rlhf_engine/: entry point without its
# _cpu / _cuda suffix -> argument types, common to both builds (the _cuda one
# takes the stream as one more, last, argument); a name with its suffix
# overrides that for one build. Every entry point returns an int status.

_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

SIGNATURES = {
    "advantages.h": {
        "rlhf_gae": [_P, _P, _P, _I64, _I64, _F32, _F32, _P, _P],
        "rlhf_masked_whiten": [_P, _P, _I64, _I64, _INT, _F32, _P],
        "rlhf_masked_whiten_cuda": [_P, _P, _I64, _I64, _INT, _F32, _P, _P],  # + workspace
        "rlhf_group_advantages": [_P, _I64, _I64, _INT, _F32, _P],
    },
    "kl.h": {
        "rlhf_kl_penalty_forward": [_P, _P, _I64, _INT, _P],
        "rlhf_kl_penalty_backward": [_P, _P, _P, _P, _F32, _I64, _INT, _P, _P],
        "rlhf_kl_shaped_rewards": [_P, _P, _P, _P, _I64, _I64, _F32, _INT, _P, _P],
    },
    "losses.h": {
        "rlhf_ppo_policy_loss_forward": [_P, _P, _P, _P, _I64, _I64, _F32, _F32, _F32, _INT, _P, _P, _P, _P],
        "rlhf_ppo_policy_loss_backward": [_P, _P, _P, _P, _P, _I64, _I64, _F32, _F32, _F32, _INT, _P, _P, _P],
        "rlhf_ppo_value_loss_forward": [_P, _P, _P, _P, _I64, _I64, _F32, _INT, _P, _P, _P, _P],
        "rlhf_ppo_value_loss_backward": [_P, _P, _P, _P, _P, _I64, _I64, _F32, _INT, _P, _P, _P],
        "rlhf_pairwise_reward_loss_forward": [_P, _P, _P, _I64, _P, _P, _P],
        "rlhf_pairwise_reward_loss_backward": [_P, _P, _P, _P, _I64, _P, _P],
    },
    # The _cpu entry points are the torch extension's (torch.ops.rlhf_engine_cpu).
    "logprobs.h": {
        "rlhf_token_logprobs_forward": [_P, _INT, _I64, _I64, _I64, _P, _INT, _F32, _I64, _P, _P, _P],
        "rlhf_token_logprobs_backward": [_P, _P, _P, _INT, _I64, _I64, _I64, _P, _INT, _P, _P, _F32, _I64, _P],
    },
    # Plain library only; no suffix.
    "threads.h": {
        "rlhf_set_num_threads": [_INT],
        "rlhf_get_num_threads": [],
        "rlhf_last_parallel_width": [],
        "rlhf_last_parallel_threads": [],
        "rlhf_pool_workers": [],
    },
}
_ARGTYPES = {name: types for table in SIGNATURES.values() for name, types in table.items()}
_BOUND = {}


def _bind(library, symbol, argtypes):
    key = (id(library), symbol)
    fn = _BOUND.get(key)
    if fn is None:
        fn = getattr(library, symbol)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        _BOUND[key] = fn
    return fn


_THREADS = threading.local()  # the count last given to the plain library from this thread


def _set_cpu_threads():
    n = torch.get_num_threads()
    if getattr(_THREADS, "n", None) != n:
        _bind(CPU_KERNELS, "rlhf_set_num_threads", [_INT])(n)
        _THREADS.n = n


def _arg(a):
    if a is None or isinstance(a, torch.Tensor):
        return None if a is None else a.data_ptr()
    return int(a) if isinstance(a, bool) else a


def call(device, name, *args):
    """Call the C entry point ``name`` (no suffix) of the cpu or cuda library,
    chosen by ``device``; tensors are passed as their data pointers, None as
    NULL, bools as ints. The CUDA one gets the current stream of ``device``;
    the CPU one runs on ``torch.get_num_threads()`` threads. Raises
    RuntimeError on a nonzero status."""
    args = [_arg(a) for a in args]
    if device.type == "cpu":
        library, symbol = CPU_KERNELS, name + "_cpu"
        argtypes = _ARGTYPES.get(symbol) or _ARGTYPES[name]
        _set_cpu_threads()
    else:
        library, symbol = CUDA_KERNELS, name + "_cuda"
        argtypes = (_ARGTYPES.get(symbol) or _ARGTYPES[name]) + [_P]
        args.append(torch.cuda.current_stream(device).cuda_stream)
    code = _bind(library, symbol, argtypes)(*args)
    if code != 0:
        raise RuntimeError(f"rlhf_engine: {symbol} failed with status {code}")


def cpu_threads():
    """The plain CPU library's view of the calling thread (threads.h), for
    tests and profiling: (threads it uses now, chunks and threads of the last
    parallel loop run from this thread, workers in its pool)."""
    get = lambda name: _bind(CPU_KERNELS, name, [])()  # noqa: E731
    return (get("rlhf_get_num_threads"), get("rlhf_last_parallel_width"), get("rlhf_last_parallel_threads"),
            get("rlhf_pool_workers"))
