"""linear_token_logprobs against the eager path (full logits -> log_softmax ->
gather, with autograd), at several N, and the memory curve.

Modes: ``fwd`` (under torch.no_grad, as in scoring old and reference
log-probs) and ``fwd+bwd`` (forward on leaf hidden and weight, then
``.sum().backward()``; the gradients are dropped before every call). Peak
memory is beyond the inputs; in fwd+bwd it includes the gradients of hidden
and weight (the same for every candidate), which the notes subtract.

CPU acceptance (issue #4) at N = 8192, H = 512, V = 32000, float32, fwd+bwd:
peak memory beyond inputs and gradients <= 1/4 of eager's, time <= 1.25x
eager's. The last test writes ``linear_logprobs_memory.png`` (peak memory
against N, eager and ours) next to the session's results.
"""
from typing import NamedTuple

import pytest
import torch

import harness
from rlhf_engine.ops import linear_token_logprobs
from tests.inputs import linear_head_inputs

OP = "linear_token_logprobs"
DEV = harness.device()


class Case(NamedTuple):
    n: int
    h: int
    v: int
    dtype: torch.dtype

    @property
    def name(self):
        return f"N={self.n} H={self.h} V={self.v} {str(self.dtype).removeprefix('torch.')}"

    @property
    def id(self):
        return f"{self.n}x{self.h}x{self.v}-{str(self.dtype).removeprefix('torch.')}"

    def grad_bytes(self):
        """Bytes of the hidden and weight gradients."""
        return (self.n + self.v) * self.h * self.dtype.itemsize


CASES = {
    "cpu": [Case(n, 512, 32000, torch.float32) for n in (2048, 4096, 8192)],
    # GPU target: >= 60% of the bf16 matmul rate (6 N H V FLOPs), < 2 GB beyond inputs and gradients.
    "cuda": [Case(n, 4096, 151936, torch.bfloat16) for n in (4096, 8192, 16384)],
}[DEV.type]
MODES = ("fwd", "fwd+bwd")
CANDIDATES = {
    "cpu": ("eager", "rlhf_engine[cpu]"),
    "cuda": ("eager", "rlhf_engine[triton]", "rlhf_engine[cuda]"),
}[DEV.type]


# Candidates ----------------------------------------------------------------------

def eager(hidden, weight, labels):
    """The reference: full logits, upcast, log_softmax, gather (with autograd)."""
    logits = hidden @ weight.t()
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]


def engine(backend):
    return lambda hidden, weight, labels: linear_token_logprobs(hidden, weight, labels, backend=backend)


def candidate_fn(name, case):
    """The candidate's function, or pytest.skip with the reason it cannot run."""
    if name == "eager":
        return eager
    backend = harness.engine_backend(OP, name, DEV, case.dtype)
    return engine(backend)


# Inputs ----------------------------------------------------------------------------

def inputs(case):
    """(hidden, weight, labels) of ``case``, drawn once and kept while its tests run."""
    return harness.cached_inputs(case, lambda: _draw(case))


def _draw(case):
    gen = torch.Generator(DEV).manual_seed(0)
    hidden, weight, _, labels = linear_head_inputs(gen, (case.n,), case.h, case.v, case.dtype, bias=False, ignored=0)
    return (hidden, weight, labels)


def notes(case, mode):
    out = [f"Full logits: {case.n * case.v * case.dtype.itemsize / harness.MB:.0f} MB in the input dtype."]
    if mode == "fwd+bwd":
        out.append(f"Peak memory includes the hidden and weight gradients ({case.grad_bytes() / harness.MB:.0f} MB).")
    return {"notes": out, "grad_bytes": case.grad_bytes() if mode == "fwd+bwd" else 0,
            "flops": (2 if mode == "fwd" else 6) * case.n * case.h * case.v}


# The benchmark ---------------------------------------------------------------------

PARAMS = [pytest.param(case, mode, name, id=f"{case.id}-{mode.replace('+', '_')}-{name}")
          for case in CASES for mode in MODES for name in CANDIDATES]


@pytest.mark.parametrize("case,mode,name", PARAMS)
def test_linear_token_logprobs(benchmark, collector, case, mode, name):
    base_hidden, base_weight, labels = inputs(case)
    try:
        fn = candidate_fn(name, case)
    except pytest.skip.Exception as exc:
        collector.skip(OP, case.name, name, mode, str(exc))
        raise
    hidden = base_hidden.detach().requires_grad_(mode == "fwd+bwd")
    weight = base_weight.detach().requires_grad_(mode == "fwd+bwd")

    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(hidden, weight, labels)
        setup = None
    else:
        def call():
            fn(hidden, weight, labels).sum().backward()

        def setup():
            hidden.grad = weight.grad = None

    harness.run(benchmark, collector, op=OP, case=case.name, candidate=name, mode=mode, fn=call, dev=DEV,
                setup=setup, extra=notes(case, mode))


def memory_curve(records, path):
    """Peak memory beyond inputs (and gradients) against N, one line per
    (candidate, mode), written as a PNG to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_case = {c.name: c for c in CASES}
    lines = {}
    for r in records:
        if r.op == OP and r.case in by_case:
            beyond = r.memory.peak_bytes - r.extra.get("grad_bytes", 0)
            lines.setdefault((r.candidate, r.mode), []).append((by_case[r.case].n, beyond / harness.MB))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (candidate, mode), points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", linestyle="-" if mode == "fwd+bwd" else "--", label=f"{candidate} {mode}")
    case = CASES[0]
    ax.set_xlabel("N (rows)")
    ax.set_ylabel("peak memory beyond inputs and gradients (MB)")
    ax.set_title(f"{OP}, H={case.h} V={case.v} {str(case.dtype).removeprefix('torch.')} "
                 f"({harness.machine_name()})", fontsize=9)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def test_memory_curve(collector):
    """Runs last in this file: the memory curve of the records above."""
    path = memory_curve(collector.records, harness.output_dir() / "linear_logprobs_memory.png")
    if path is None:
        pytest.skip("no linear_token_logprobs records in this session")
