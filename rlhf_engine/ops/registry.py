"""The backend registry: (op, backend) -> implementation, and backend choice.

Each op module registers one implementation per backend with
:func:`register`. :func:`resolve` turns the user's ``backend=`` argument into
a backend that can run the inputs, or raises :class:`BackendUnavailable`
saying why. ``"auto"`` picks by device: CUDA tensors -> triton, cuda, torch;
CPU tensors -> cpu, torch (the Triton interpreter is for tests, never auto).

The Triton kernels are the top-level ``kernels/`` folder, which setup.py
installs as ``rlhf_engine.kernels``; :func:`_map_checkout_kernels` maps it the
same way for a source checkout put on PYTHONPATH without installing.
"""
import importlib.util
import os
import sys

import torch

from rlhf_engine.errors import BackendUnavailable

BACKENDS = ("torch", "cpu", "triton", "cuda")
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_IMPLS = {}
_REQUIRES = {}


def register(op, backend, requires=None):
    """Decorator: the implementation of ``op`` on ``backend``. ``requires``:
    why the native code it calls is missing (an ``rlhf_engine._native``
    ``*_ERROR`` constant), None when it is there."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def wrap(fn):
        _IMPLS[(op, backend)] = fn
        _REQUIRES[(op, backend)] = requires
        return fn

    return wrap


def get(op, backend):
    """The implementation registered for (op, backend)."""
    return _IMPLS[(op, backend)]


def _map_checkout_kernels():
    """Make ``rlhf_engine.kernels`` the checkout's ``kernels/`` folder (beside
    the ``rlhf_engine`` package) when nothing else provides it: a source
    checkout on PYTHONPATH, not installed. An install (editable or not) maps
    it itself and is left alone. The folder never becomes importable as a
    top-level ``kernels`` module (transformers probes for one)."""
    if "rlhf_engine.kernels" in sys.modules or importlib.util.find_spec("rlhf_engine.kernels") is not None:
        return
    package = sys.modules["rlhf_engine"]
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(package.__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("rlhf_engine.kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    package.kernels = module


_map_checkout_kernels()
_TRITON_ERROR = None if importlib.util.find_spec("triton") else "triton is not installed"


def unavailable_reason(op, backend, device, dtype=None):
    """Why ``backend`` cannot run ``op`` on tensors of ``device``/``dtype``; None if it can."""
    if (op, backend) not in _IMPLS:
        return f"{op} has no {backend} implementation"
    if backend == "torch":
        return None
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return f"its kernels take float32, float16 or bfloat16, not {dtype}"
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs CPU tensors, these are on {device}"
        return _REQUIRES[(op, backend)]
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs CUDA tensors, these are on {device}"
        return _REQUIRES[(op, backend)]
    # triton
    if _TRITON_ERROR:
        return _TRITON_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"it runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), these are on {device}"


def resolve(op, backend, device, dtype=None):
    """The backend that will run ``op``: ``backend`` itself, or auto's choice."""
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            if unavailable_reason(op, candidate, device, dtype) is None:
                return candidate
        raise BackendUnavailable(f"no backend of {op} runs tensors on {device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    reason = unavailable_reason(op, backend, device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot run {op}: {reason}")
    return backend
