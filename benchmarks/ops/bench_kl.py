"""kl_penalty and kl_shaped_rewards against the eager torch composition.

Cases (float32 [512, 4096], a PPO batch of 512 responses of 4096 tokens):

* ``kl_penalty`` with k1 and k3, modes ``fwd`` (under torch.no_grad, as when
  rewards are built) and ``fwd+bwd`` (both inputs require grad, then
  ``.sum().backward()``; gradients dropped before every call);
* ``kl_shaped_rewards`` (k1, the InstructGPT reward), mode ``fwd`` under
  torch.no_grad, with right-padded responses of random length.

Byte model (n = B * T, float32): kl_penalty fwd reads two inputs and writes
one (12 n); fwd+bwd adds a backward reading the upstream gradient and both
inputs and writing both gradients (32 n in all); kl_shaped_rewards reads two
inputs and the 1-byte mask and writes the rewards (13 n). The floor is those
bytes at the copy bandwidth of the same run.
"""
from typing import NamedTuple

import pytest
import torch

import harness
from rlhf_engine.ops import kl_penalty, kl_shaped_rewards
from tests.inputs import logprob_pair, response_mask

DEV = harness.device()
SHAPE = (512, 4096)
KL_COEF = 0.05
CANDIDATES = {
    "cpu": ("eager", "rlhf_engine[cpu]", "rlhf_engine[torch]"),
    "cuda": ("eager", "rlhf_engine[triton]", "rlhf_engine[cuda]", "rlhf_engine[torch]"),
}[DEV.type]


class Case(NamedTuple):
    op: str
    estimator: str
    modes: tuple

    @property
    def name(self):
        return f"{self.estimator} [{SHAPE[0]}, {SHAPE[1]}] float32"

    def model_bytes(self, mode):
        n = SHAPE[0] * SHAPE[1]
        if self.op == "kl_shaped_rewards":
            return 13 * n
        return {"fwd": 12 * n, "fwd+bwd": 32 * n}[mode]


CASES = [Case("kl_penalty", "k1", ("fwd", "fwd+bwd")), Case("kl_penalty", "k3", ("fwd", "fwd+bwd")),
         Case("kl_shaped_rewards", "k1", ("fwd",))]


# Eager compositions (what RL frameworks write) ------------------------------------------

def eager_penalty(lp, ref, estimator):
    if estimator == "k1":
        return lp - ref
    r = torch.clamp(ref - lp, -20, 20)
    return torch.clamp(torch.exp(r) - r - 1, -10, 10)


def eager_shaped(scores, lp, ref, mask, estimator):
    rewards = torch.where(mask, -KL_COEF * eager_penalty(lp, ref, estimator), 0.0)
    last = torch.where(mask, torch.arange(lp.shape[1], device=lp.device), -1).amax(1)
    at_last = torch.where(last >= 0, scores, 0.0)
    return rewards.scatter_add_(1, last.clamp(min=0)[:, None], at_last[:, None])


def candidate_fn(name, case):
    """fn(scores, lp, ref, mask) of the candidate, or pytest.skip with the reason."""
    if name == "eager":
        if case.op == "kl_penalty":
            return lambda s, lp, ref, m: eager_penalty(lp, ref, case.estimator)
        return lambda s, lp, ref, m: eager_shaped(s, lp, ref, m, case.estimator)
    backend = harness.engine_backend(case.op, name, DEV, torch.float32)
    if case.op == "kl_penalty":
        return lambda s, lp, ref, m: kl_penalty(lp, ref, estimator=case.estimator, backend=backend)
    return lambda s, lp, ref, m: kl_shaped_rewards(s, lp, ref, m, kl_coef=KL_COEF, estimator=case.estimator,
                                                   backend=backend)


def inputs():
    """(scores [B], logprobs, ref_logprobs, mask [B, T] bool), drawn once."""
    return harness.cached_inputs("all", _draw)


def _draw():
    gen = torch.Generator(DEV).manual_seed(0)
    lp, ref = logprob_pair(gen, SHAPE, spread=0.3)
    mask = response_mask(gen, *SHAPE, min_length=1)
    return (torch.randn(SHAPE[0], generator=gen, device=DEV), lp, ref, mask)


PARAMS = []
for _case in CASES:
    _id = f"{_case.op}-{_case.estimator}"
    PARAMS.append(pytest.param(_case, "copy", "copy", id=f"{_id}-copy"))
    PARAMS += [pytest.param(_case, mode, name, id=f"{_id}-{mode.replace('+', '_')}-{name}")
               for mode in _case.modes for name in CANDIDATES]


@pytest.mark.parametrize("case,mode,name", PARAMS)
def test_kl(benchmark, collector, case, mode, name):
    scores, base_lp, base_ref, mask = inputs()
    if name == "copy":
        harness.run_copy(benchmark, collector, op=case.op, case=case.name, like=base_lp, dev=DEV)
        return
    try:
        fn = candidate_fn(name, case)
    except pytest.skip.Exception as exc:
        collector.skip(case.op, case.name, name, mode, str(exc))
        raise
    lp = base_lp.detach().requires_grad_(mode == "fwd+bwd")
    ref = base_ref.detach().requires_grad_(mode == "fwd+bwd")

    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(scores, lp, ref, mask)
        setup = None
    else:
        def call():
            fn(scores, lp, ref, mask).sum().backward()

        def setup():
            lp.grad = ref.grad = None

    mb = case.model_bytes(mode) / harness.MB
    extra = {"notes": [f"Byte model: {mb:.0f} MB for {mode} (see the module docstring)."]}
    harness.run(benchmark, collector, op=case.op, case=case.name, candidate=name, mode=mode, fn=call, dev=DEV,
                setup=setup, model_bytes=case.model_bytes(mode), extra=extra)
