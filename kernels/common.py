"""What every Triton kernel module shares: the interpreter flag, an fma that
the CPU interpreter rounds correctly, a clamp that passes NaN through, and
launching on the tensors' device."""
import contextlib

import torch
import triton
import triton.language as tl

# Decided as @triton.jit decides it (at import): kernels take it as a
# constexpr so the interpreter's defects can be worked around on the CPU only.
INTERPRET = bool(triton.knobs.runtime.interpret)


@triton.jit
def fma(a, b, c, INTERPRET: tl.constexpr):
    """a * b + c with one rounding (float32). The interpreter's tl.fma rounds
    the product first: emulate the fused result through float64 there."""
    if INTERPRET:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def clamp(x, lo, hi):
    """clamp that passes NaN through (comparisons, never minimum/maximum): the
    NaN rule of csrc/include/rlhf_engine/token_math.h."""
    x = tl.where(x < lo, lo, x)
    return tl.where(x > hi, hi, x)


def on_device(device):
    """Makes a CUDA ``device`` current for a launch (a no-op elsewhere)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
