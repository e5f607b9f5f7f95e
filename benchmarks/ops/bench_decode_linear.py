"""decode_linear against F.linear (MKL's sgemm) on the linear layers of a
decode step: every weight of the small Llama of the PPO benchmark (hidden
512, MLP 1536, 6 layers, vocabulary 450; 82 MB of float32), multiplied by
the step's rows, one product per weight as the model runs them.

The floor is reading the weights once at the session's copy bandwidth (a
copy moves twice the weights' bytes: read and write). CPU only: the kernel
is a CPU kernel (on a GPU the decode step's matmuls are cuBLAS's).
"""
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import harness
from rlhf_engine import _native
from rlhf_engine.ops.decode_linear import decode_linear

OP = "decode_linear"
DEV = harness.device()
pytestmark = pytest.mark.skipif(DEV.type != "cpu", reason="decode_linear is a CPU kernel")

HIDDEN, MLP, LAYERS, VOCAB = 512, 1536, 6, 450
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]  # q k v o, gate up down


class Case(NamedTuple):
    rows: int

    @property
    def name(self):
        return f"rows={self.rows} small Llama decode step (82 MB fp32)"


CASES = [Case(rows) for rows in (1, 8, 16)]
CANDIDATES = ("eager", "rlhf_engine[cpu]")


def weights():
    """The stack's weights, drawn once for all cases."""
    def draw():
        gen = torch.Generator().manual_seed(0)
        stack = [torch.randn(out, inp, generator=gen) for _ in range(LAYERS) for out, inp in SHAPES]
        return stack + [torch.randn(VOCAB, HIDDEN, generator=gen)]
    return harness.cached_inputs("weights", draw)


def step(linear, rows):
    xs = {inp: torch.randn(rows, inp) for inp in (HIDDEN, MLP)}
    stack = weights()

    def call():
        with torch.no_grad():
            for w in stack:
                linear(xs[w.shape[1]], w)
    return call


@pytest.mark.parametrize("case", CASES, ids=[f"rows{c.rows}" for c in CASES])
@pytest.mark.parametrize("name", CANDIDATES + ("copy",))
def test_decode_linear(benchmark, collector, case, name):
    stack = weights()
    nbytes = sum(w.numel() * w.element_size() for w in stack)
    if name == "copy":
        harness.run_copy(benchmark, collector, op=OP, case=case.name, like=torch.cat([w.view(-1) for w in stack]),
                         dev=DEV)
        return
    if name == "rlhf_engine[cpu]" and _native.CPU_ERROR:
        collector.skip(OP, case.name, name, "fwd", _native.CPU_ERROR)
        pytest.skip(_native.CPU_ERROR)
    linear = F.linear if name == "eager" else decode_linear
    harness.run(benchmark, collector, op=OP, case=case.name, candidate=name, mode="fwd", fn=step(linear, case.rows),
                dev=DEV, model_bytes=nbytes, extra={"notes": [f"{len(stack)} products per step"],
                                                    "flops": 2 * case.rows * nbytes // 4})
