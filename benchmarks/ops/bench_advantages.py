"""gae, masked_whiten and group_advantages against what RL frameworks ship.

* gae: ``eager`` is the Python-loop GAE of TRL / veRL (a reverse
  ``for t in range(T)`` over [B] slices, with masked positions skipped as
  veRL does), the reference of the speed-ups. Target on the CPU: the cpu
  backend >= 50x faster on [512, 4096] float32.
* masked_whiten: ``eager`` is the vectorised torch composition of TRL /
  veRL (masked mean, Bessel-corrected masked variance, rsqrt); also under
  torch.compile.
* group_advantages: ``eager`` is the GRPO baseline as TRL writes it (view
  as [groups, G], mean and unbiased std per group); also under
  torch.compile. Case [B, T] = B groups of T samples.

Mode ``fwd`` only: none of these ops is differentiable (their outputs are targets).
Byte model: gae reads rewards and values (4 B each) and the mask (1 B) and
writes advantages and returns (4 B each): 17 B a position. masked_whiten
reads x and the mask and writes the output once: 9 B a position (the
kernels read x and the mask three times, the extra passes from cache only
when it fits). group_advantages reads and writes each score once: 8 B a
score. The floor is those bytes at the copy bandwidth of the run.
"""
from typing import NamedTuple

import pytest
import torch

import harness
from rlhf_engine.ops import gae, group_advantages, masked_whiten
from tests.inputs import gae_inputs, response_mask

DEV = harness.device()
GAMMA, LAM = 0.99, 0.95


class Case(NamedTuple):
    op: str
    b: int
    t: int

    @property
    def name(self):
        return f"[{self.b}, {self.t}] float32"

    @property
    def id(self):
        return f"{self.op}-{self.b}x{self.t}"

    def model_bytes(self):
        per_position = {"gae": 17, "masked_whiten": 9, "group_advantages": 8}[self.op]
        return per_position * self.b * self.t


CASES = [Case("gae", 512, 4096), Case("masked_whiten", 512, 4096), Case("group_advantages", 4096, 16)]
CANDIDATES = {
    "gae": {"cpu": ("eager", "rlhf_engine[cpu]", "rlhf_engine[torch]"),
            "cuda": ("eager", "rlhf_engine[triton]", "rlhf_engine[cuda]", "rlhf_engine[torch]")},
    "masked_whiten": {"cpu": ("eager", "rlhf_engine[cpu]", "compiled", "rlhf_engine[torch]"),
                      "cuda": ("eager", "rlhf_engine[triton]", "rlhf_engine[cuda]", "compiled",
                               "rlhf_engine[torch]")},
}
CANDIDATES["group_advantages"] = CANDIDATES["masked_whiten"]


# Candidates ----------------------------------------------------------------------

def eager_gae(rewards, values, mask):
    """veRL's compute_gae_advantage_return (without its whitening): the
    Python loop over time, masked positions carrying the state across."""
    mask = mask.to(values.dtype)
    next_values = torch.zeros_like(values[:, 0])
    last_gae_lam = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        last_gae_lam_ = delta + GAMMA * LAM * last_gae_lam
        next_values = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_values
        last_gae_lam = last_gae_lam_ * mask[:, t] + (1 - mask[:, t]) * last_gae_lam
        advantages_reversed.append(last_gae_lam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def eager_whiten(x, mask):
    """TRL / veRL masked_whiten: masked mean, unbiased masked variance."""
    mask = mask.to(x.dtype)
    count = mask.sum()
    mean = (x * mask).sum() / count
    var = ((x - mean) ** 2 * mask).sum() / count * (count / (count - 1))
    return (x - mean) * torch.rsqrt(var + 1e-8)


def eager_group(scores, group_size):
    """GRPO's group baseline as TRL computes it."""
    grouped = scores.view(-1, group_size)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + 1e-6)).view(-1)


_compiled = {"masked_whiten": torch.compile(eager_whiten, dynamic=False),
             "group_advantages": torch.compile(eager_group, dynamic=False)}


def candidate_fn(name, case):
    """fn(rewards, values, mask) of the candidate, or pytest.skip with the reason.
    group_advantages takes the rewards, flattened, as B groups of T scores."""
    if name == "compiled":
        harness.skip_if_compile_failed()
    if name in ("eager", "compiled"):
        whiten, group = ((eager_whiten, eager_group) if name == "eager"
                         else (_compiled["masked_whiten"], _compiled["group_advantages"]))
        return {"gae": eager_gae,
                "masked_whiten": lambda r, v, m: whiten(r, m),
                "group_advantages": lambda r, v, m: group(r.view(-1), case.t)}[case.op]
    backend = harness.engine_backend(case.op, name, DEV, torch.float32)
    return {"gae": lambda r, v, m: gae(r, v, m, gamma=GAMMA, lam=LAM, backend=backend),
            "masked_whiten": lambda r, v, m: masked_whiten(r, m, backend=backend),
            "group_advantages": lambda r, v, m: group_advantages(r.view(-1), case.t, backend=backend)}[case.op]


# Inputs ----------------------------------------------------------------------------

def inputs(case):
    """(rewards, values, mask) of ``case``: right-padded responses of random
    lengths with a masked tool span inside; drawn once per shape."""
    return harness.cached_inputs((case.b, case.t), lambda: _draw(case))


def _draw(case):
    gen = torch.Generator(DEV).manual_seed(0)
    return gae_inputs(gen, case.b, case.t, empty_row=False,
                      mask=lambda g, b, t: response_mask(g, b, t, min_length=t // 2, span=(t // 8, t // 4)))


# The benchmark ---------------------------------------------------------------------

PARAMS = []
for _case in CASES:
    PARAMS.append(pytest.param(_case, "copy", id=f"{_case.id}-copy"))
    PARAMS += [pytest.param(_case, name, id=f"{_case.id}-{name}") for name in CANDIDATES[_case.op][DEV.type]]


@pytest.mark.parametrize("case,name", PARAMS)
def test_advantages(benchmark, collector, case, name):
    rewards, values, mask = inputs(case)
    if name == "copy":
        harness.run_copy(benchmark, collector, op=case.op, case=case.name, like=rewards, dev=DEV)
        return
    try:
        fn = candidate_fn(name, case)
    except pytest.skip.Exception as exc:
        collector.skip(case.op, case.name, name, "fwd", str(exc))
        raise

    def call():
        with torch.no_grad():
            fn(rewards, values, mask)

    notes = {"notes": [f"Byte model: {case.model_bytes() / harness.MB:.0f} MB "
                       f"({case.model_bytes() // (case.b * case.t)} B a position, see the module docstring)."]}
    if name == "compiled":  # the first call compiles: bounded, and timed apart
        harness.warm_compiled(call, DEV, collector, op=case.op, case=case.name, candidate=name, mode="fwd",
                              extra=notes)
    harness.run(benchmark, collector, op=case.op, case=case.name, candidate=name, mode="fwd", fn=call, dev=DEV,
                model_bytes=case.model_bytes(), extra=notes)
