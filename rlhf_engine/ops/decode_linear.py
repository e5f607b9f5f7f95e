"""decode_linear: ``x @ weight.T + bias`` for the few rows of a decode step,
on the CPU, without autograd.

A decode step multiplies one token per sequence by every weight of the model,
so its linear layers are bound by reading the weights. MKL's sgemm (what
``F.linear`` runs on the CPU) packs each weight before using it, which at a
few rows costs more than the product (reading the weights at a fraction
of the memory bandwidth). The C++ kernel (csrc/cpu/decode_linear.cpp) reads
each weight row once, in order; it wins at a few rows and loses beyond,
hence :data:`MAX_ROWS` (``benchmarks/ops/bench_decode_linear.py``; one
machine's numbers in ``benchmarks/results/amd-epyc/notes.md``).

:func:`linear` is the drop-in ``F.linear``: the kernel where it applies
(:func:`applies`), ``F.linear`` otherwise. The results differ from
``F.linear``'s only by float32 rounding (another summation order).
"""
import math

import torch
import torch.nn.functional as F

from rlhf_engine import _native

MAX_ROWS = 16


def applies(x, weight, bias=None):
    """Whether :func:`decode_linear` runs these inputs: float32 CPU tensors,
    at most :data:`MAX_ROWS` rows of ``x`` ``[..., K]``, a 2-D ``weight``
    ``[N, K]`` with unit stride along K, a float32 ``bias`` or None, grad
    mode off, and the native extension built."""
    return (_native.CPU_ERROR is None and not torch.is_grad_enabled()
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and math.prod(x.shape[:-1]) <= MAX_ROWS and (weight.shape[1] <= 1 or weight.stride(1) == 1)
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu")))


def decode_linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)`` through the decode-step kernel.

    Args:
        x: ``[..., K]`` float32 CPU, at most :data:`MAX_ROWS` rows in all.
        weight: ``[N, K]`` float32 CPU, unit stride along K (as ``nn.Linear``
            stores it).
        bias: ``[N]`` float32 CPU, or None.

    Returns:
        ``[..., N]`` float32, a new tensor (no autograd: grad mode must be off).

    Raises:
        ValueError: when the inputs are not for this kernel (:func:`applies`).
    """
    if not applies(x, weight, bias):
        raise ValueError(
            f"decode_linear takes float32 CPU x [..., K] with at most {MAX_ROWS} rows, weight [N, K] with unit stride "
            f"along K, an optional float32 CPU bias, grad mode off and the native extension built "
            f"({_native.CPU_ERROR or 'built'}); got x {x.dtype} {tuple(x.shape)} on {x.device}, weight {weight.dtype} "
            f"{tuple(weight.shape)} on {weight.device}, grad mode {torch.is_grad_enabled()}")
    return _run(x, weight, bias)


def _run(x, weight, bias):
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.ops.rlhf_engine_cpu.decode_linear(rows, weight, None if bias is None else bias.contiguous())
    return out.view(*x.shape[:-1], weight.shape[0])


def linear(x, weight, bias=None):
    """``F.linear``, through :func:`decode_linear` where it :func:`applies`."""
    if applies(x, weight, bias):
        return _run(x, weight, bias)
    return F.linear(x, weight, bias)
