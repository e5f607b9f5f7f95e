"""The backend registry: (op, backend) -> implementation, and backend choice.

Each op module registers one implementation per backend with
:func:`register`. :func:`resolve` turns the user's ``backend=`` argument into
a backend that can run the inputs, or raises :class:`BackendUnavailable`
saying why. ``"auto"`` picks by device: CUDA tensors -> triton, cuda, torch;
CPU tensors -> cpu, torch (the Triton interpreter is for tests, never auto).
"""
import importlib.util
import os

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
