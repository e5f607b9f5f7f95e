"""Helpers every op test uses: backends to run, float64 comparison, poisoned
outputs, and input generators for the regimes kernels get wrong."""
import contextlib
import os

import pytest
import torch

from rlhf_engine.ops import registry

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Unit roundoff of each dtype: the error of rounding a float64 result to it.
ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Float32-accumulated results against float64 (issue #2): 1e-6 for float32
# inputs, 1e-5 for half-precision inputs (of the same rounded values).
RESULT_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def cpu_backends(op):
    """Backends that run ``op`` on CPU tensors here, as pytest params
    (triton under the interpreter, marked so it can be deselected)."""
    params = []
    for backend in ("torch", "cpu", "triton"):
        reason = registry.unavailable_reason(op, backend, torch.device("cpu"), torch.float32)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if backend == "triton":
            marks.append(pytest.mark.triton)
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


def gpu_backends(op):
    """Backends that run ``op`` on CUDA tensors, as params marked ``cuda``."""
    return [pytest.param(b, marks=pytest.mark.cuda, id=f"gpu-{b}") for b in ("triton", "cuda", "torch")]


def device_of(backend):
    return "cuda" if backend.startswith("gpu-") else "cpu"


def rel_error(out, ref):
    """||out - ref|| / ||ref|| in float64 (0 when both are 0)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm()
    diff = (out - ref).norm()
    return (diff / denom).item() if denom > 0 else diff.item()


def assert_close(out, ref, tol, what="output"):
    """Relative error of ``out`` against the float64 ``ref`` is at most ``tol``;
    NaN anywhere in ``out`` where ``ref`` is finite fails."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert torch.isfinite(out[finite]).all(), f"{what}: non-finite values where the reference is finite"
    assert torch.isnan(out[torch.isnan(ref)]).all(), f"{what}: reference NaNs not reproduced"
    err = rel_error(out[finite], ref[finite])
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_rounded_close(out, ref, what="output", slack=0.0):
    """``out`` (bf16/fp16) is float32 math rounded once: within one unit of
    rounding of the float64 ``ref``, element by element (subnormals
    included), plus ``slack`` (an absolute allowance per element, e.g. for
    float32 cancellation the caller can bound)."""
    dtype = out.dtype
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    bound = 2 * ROUNDOFF[dtype] * ref.abs() + tiny + slack
    bad = ~((out.double() - ref).abs() <= bound)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off by more than a rounding, e.g. " \
        f"{out[bad][:3].tolist()} vs {ref[bad][:3].tolist()}"


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor allocated uninitialised (torch.empty here, at::empty in
    C++) comes filled with NaN, so a kernel that skips writing an output
    element fails the comparison instead of passing on zeroed memory."""
    det = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(det, warn_only=warn)


def fresh_generator():
    """A torch.Generator with a fresh seed; the seed is printed so that a
    failing test (pytest shows its output) can be replayed with
    RLHF_ENGINE_TEST_SEED."""
    seed = int(os.environ.get("RLHF_ENGINE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
