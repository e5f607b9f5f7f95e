"""token_logprobs against eager torch, torch.compile and (on a GPU) Liger-Kernel.

Modes: ``fwd`` (under torch.no_grad, as in scoring old and reference
log-probs) and ``fwd+bwd`` (forward on a leaf logits tensor, then
``.sum().backward()``; the gradient is dropped before every call).

Byte model (B bytes per logit): fwd reads the logits once (N*V*B);
fwd+bwd reads them in forward and in backward and writes the gradient
(3*N*V*B). The floor is those bytes at the copy bandwidth of the same run.
"""
import os
from typing import NamedTuple

import pytest
import torch

import harness
from rlhf_engine.ops import token_logprobs
from tests.inputs import logits_and_labels

OP = "token_logprobs"
T = 1.0  # temperature (Liger has none; the others divide by it)
DEV = harness.device()


class Case(NamedTuple):
    n: int
    v: int
    dtype: torch.dtype

    @property
    def name(self):
        return f"[{self.n}, {self.v}] {str(self.dtype).removeprefix('torch.')}"

    @property
    def id(self):
        return f"{self.n}x{self.v}-{str(self.dtype).removeprefix('torch.')}"

    def model_bytes(self, mode):
        logits = self.n * self.v * self.dtype.itemsize
        return {"fwd": logits, "fwd+bwd": 3 * logits}[mode]


CASES = {
    # [4096, 32000] float32 and bfloat16 are the CPU acceptance targets: the cpu
    # backend >= 1.5x faster than eager in fwd+bwd, <= half its peak memory.
    "cpu": [Case(4096, 32000, torch.float32), Case(4096, 32000, torch.bfloat16), Case(512, 151936, torch.bfloat16)],
    # Targets: fwd >= 80% of copy bandwidth (logits read once), fwd+bwd >= 70%
    # (read + read + write).
    "cuda": [Case(16384, 152064, torch.bfloat16), Case(4096, 32000, torch.float32)],
}[DEV.type]
MODES = ("fwd", "fwd+bwd")
CANDIDATES = {
    "cpu": ("eager", "rlhf_engine[cpu]", "compiled", "rlhf_engine[torch]"),
    "cuda": ("eager", "rlhf_engine[triton]", "rlhf_engine[cuda]", "liger", "compiled", "rlhf_engine[torch]"),
}[DEV.type]
# The torch backend (the readable reference, sliced, partly in float64) takes
# 10-20 s a call on a small CPU beyond ~1e8 logits: there it runs only with
# RLHF_ENGINE_BENCH_SLOW=1.
SLOW_CPU_ELEMENTS = 100_000_000


# Candidates ----------------------------------------------------------------------

def eager(logits, labels):
    """The reference: upcast, scale, log_softmax, gather (with autograd)."""
    return torch.log_softmax(logits.float() / T, -1).gather(-1, labels[..., None])[..., 0]


_compiled = torch.compile(eager, dynamic=False)


def compiled(logits, labels):
    return _compiled(logits, labels)


def engine(backend):
    return lambda logits, labels: token_logprobs(logits, labels, temperature=T, backend=backend)


def liger(logits, labels):
    """-cross entropy per token; Liger writes the gradient into the logits in forward."""
    from liger_kernel.transformers.functional import liger_cross_entropy

    return -liger_cross_entropy(logits if T == 1.0 else logits / T, labels, reduction="none")


def candidate_fn(name, case):
    """The candidate's function, or pytest.skip with the reason it cannot run."""
    if name == "eager":
        return eager
    if name == "compiled":
        harness.skip_if_compile_failed()
        return compiled
    if name == "liger":
        try:
            import liger_kernel.transformers.functional  # noqa: F401
        except Exception as exc:
            pytest.skip(f"liger_kernel not importable: {exc!r}")
        return liger
    backend = harness.engine_backend(OP, name, DEV, case.dtype)
    if backend == "torch" and DEV.type == "cpu" and case.n * case.v > SLOW_CPU_ELEMENTS \
            and os.environ.get("RLHF_ENGINE_BENCH_SLOW") != "1":
        pytest.skip("the torch reference backend is too slow on the CPU at this size "
                    "(RLHF_ENGINE_BENCH_SLOW=1 runs it)")
    return engine(backend)


# Inputs ----------------------------------------------------------------------------

def inputs(case):
    """(logits, labels) of ``case``, drawn once and kept while its tests run."""
    return harness.cached_inputs(case, lambda: _draw(case))


def _draw(case):
    gen = torch.Generator(DEV).manual_seed(0)
    return logits_and_labels(gen, (case.n,), case.v, case.dtype, scale=3.0, ignored=0)


def notes(case):
    mb = case.n * case.v * case.dtype.itemsize / harness.MB
    out = [f"Byte model: fwd reads the logits once ({mb:.0f} MB); fwd+bwd reads them twice and writes "
           f"the gradient ({3 * mb:.0f} MB)."]
    extra = {"notes": out}
    if case.dtype != torch.float32:
        fp32 = case.n * case.v * 4
        extra["fp32_copy_bytes"] = fp32
        out.append(f"A float32 N×V tensor is {fp32 / harness.MB:.0f} MB: a candidate whose largest allocation "
                   "through torch's allocator is smaller never made a float32 copy of the logits (last column).")
    return extra


# The benchmark ---------------------------------------------------------------------

PARAMS = []
for _case in CASES:
    PARAMS.append(pytest.param(_case, "copy", "copy", id=f"{_case.id}-copy"))
    PARAMS += [pytest.param(_case, mode, name, id=f"{_case.id}-{mode.replace('+', '_')}-{name}")
               for mode in MODES for name in CANDIDATES]


@pytest.mark.parametrize("case,mode,name", PARAMS)
def test_token_logprobs(benchmark, collector, case, mode, name):
    base, labels = inputs(case)
    if name == "copy":
        harness.run_copy(benchmark, collector, op=OP, case=case.name, like=base, dev=DEV)
        return
    try:
        fn = candidate_fn(name, case)
    except pytest.skip.Exception as exc:
        collector.skip(OP, case.name, name, mode, str(exc))
        raise
    # Liger overwrites its input with the gradient: it gets a copy of its own.
    logits = (base.clone() if name == "liger" else base.detach()).requires_grad_(mode == "fwd+bwd")

    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(logits, labels)
        setup = None
    else:
        def call():
            fn(logits, labels).sum().backward()

        def setup():
            logits.grad = None

    extra = notes(case)
    if name == "compiled":  # the first call compiles: bounded, and timed apart
        harness.warm_compiled(call, DEV, collector, op=OP, case=case.name, candidate=name, mode=mode, extra=extra)
    slow = name == "rlhf_engine[torch]"
    harness.run(benchmark, collector, op=OP, case=case.name, candidate=name, mode=mode, fn=call, dev=DEV,
                setup=setup, model_bytes=case.model_bytes(mode), extra=extra,
                warmup=(0 if DEV.type == "cpu" else 1) if slow else None,
                min_rounds=(1 if DEV.type == "cpu" else 3) if slow else None)
