"""ppo_policy_loss, ppo_value_loss and pairwise_reward_loss against eager
torch and torch.compile.

Modes: ``fwd`` (under torch.no_grad: loss and stats only) and ``fwd+bwd``
(forward on a leaf [B, T] tensor, then ``loss.backward()``; the gradient is
dropped before every call). Every candidate computes the loss and the stats
(the eager composition as the op's users write it: clamp, exp, maximum,
masked sums; no ``.item()``).

Byte model (per token: three float32 inputs and a one-byte mask, 13 bytes):
fwd reads the inputs once (13 B·T·B); fwd+bwd, at best, reads them once and
writes the float32 gradient (17 B per token). The kernels' backward reads the
inputs a second time (30 B per token) so that no [B, T] buffer but the
gradient is ever allocated: the floor column shows what that costs.
pairwise_reward_loss runs on the same inputs flattened into B·T pairs
(chosen = x, rejected = old); its byte model is not given.
"""
from typing import NamedTuple

import pytest
import torch

import harness
from rlhf_engine.ops import pairwise_reward_loss, ppo_policy_loss, ppo_value_loss
from tests.inputs import ppo_loss_inputs
from tests.reference import policy_token_losses

DEV = harness.device()
CLIP = 0.2
BYTES_PER_TOKEN = {"fwd": 13, "fwd+bwd": 17}


class Case(NamedTuple):
    b: int
    t: int

    @property
    def name(self):
        return f"[{self.b}, {self.t}] float32"

    @property
    def id(self):
        return f"{self.b}x{self.t}"

    def model_bytes(self, op, mode):
        return BYTES_PER_TOKEN[mode] * self.b * self.t if op != "pairwise_reward_loss" else None


# [512, 4096] float32 is the CPU acceptance target: ppo_policy_loss fwd+bwd on
# the cpu backend >= 2x faster than eager, with no [B, T] allocation but the
# gradient.
CASES = {"cpu": [Case(512, 4096)], "cuda": [Case(512, 4096), Case(2048, 8192)]}[DEV.type]
MODES = ("fwd", "fwd+bwd")
CANDIDATES = {
    "cpu": ("eager", "rlhf_engine[cpu]", "compiled", "rlhf_engine[torch]"),
    "cuda": ("eager", "rlhf_engine[triton]", "rlhf_engine[cuda]", "compiled", "rlhf_engine[torch]"),
}[DEV.type]


# Candidates ----------------------------------------------------------------------

def eager_policy(logprobs, old, adv, mask):
    """The reference: API.md's formulas (tests/reference.py, the op tests'
    reference), token-mean, with autograd."""
    per_token, l1, l2, neg_kl, _ = policy_token_losses(logprobs, old, adv, CLIP, CLIP)
    m = mask.float()
    n = m.sum().clamp(min=1)
    loss = (per_token * m).sum() / n
    return loss, {"clipfrac": ((l2 > l1).float() * m).sum() / n, "approx_kl": (-neg_kl * m).sum() / n}


def eager_value(values, old, returns, mask):
    v_clip = old + torch.clamp(values - old, -CLIP, CLIP)
    s1, s2 = (values - returns) ** 2, (v_clip - returns) ** 2
    m = mask.float()
    n = m.sum().clamp(min=1)
    return 0.5 * (torch.maximum(s1, s2) * m).sum() / n, {"clipfrac": ((s2 > s1).float() * m).sum() / n}


def eager_pairwise(chosen, rejected, _target, _mask):
    """Bradley-Terry loss as reward-model trainers write it."""
    chosen, rejected = chosen.view(-1), rejected.view(-1)
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean(), {"accuracy": (chosen > rejected).float().mean()}


# op -> (eager reference, fn(x, old, target, mask, backend) of the engine's op)
OPS = {
    "ppo_policy_loss": (eager_policy, lambda x, o, t, m, backend: ppo_policy_loss(x, o, t, m, clip_low=CLIP,
                                                                                  backend=backend)),
    "ppo_value_loss": (eager_value, lambda x, o, t, m, backend: ppo_value_loss(x, o, t, m, clip=CLIP, backend=backend)),
    "pairwise_reward_loss": (eager_pairwise, lambda x, o, t, m, backend: pairwise_reward_loss(x.view(-1), o.view(-1),
                                                                                              backend=backend)),
}
_compiled = {op: torch.compile(fns[0], dynamic=False) for op, fns in OPS.items()}


def candidate_fn(op, name):
    """The candidate's function, or pytest.skip with the reason it cannot run."""
    eager, engine = OPS[op]
    if name == "eager":
        return eager
    if name == "compiled":
        harness.skip_if_compile_failed()
        return _compiled[op]
    backend = harness.engine_backend(op, name, DEV, torch.float32)
    return lambda x, old, target, mask: engine(x, old, target, mask, backend)


# Inputs ----------------------------------------------------------------------------

def inputs(case):
    """(x, old, target, mask) of ``case``, drawn once and kept while its tests run:
    log-prob-like x, old within a few tenths of it, unit targets, 10% padding."""
    return harness.cached_inputs(case, lambda: _draw(case))


def _draw(case):
    gen = torch.Generator(DEV).manual_seed(0)
    return ppo_loss_inputs(gen, case.b, case.t, spread=0.2, masked=0.1, edge_rows=False, clamp_tokens=False)


def notes(op, case):
    mb = case.b * case.t / harness.MB
    if op == "pairwise_reward_loss":
        return {"notes": [f"{case.b * case.t} pairs (chosen = x, rejected = old of the PPO cases, flattened)."]}
    return {"notes": [f"Byte model: fwd reads the inputs once ({13 * mb:.0f} MB); fwd+bwd at best reads them once "
                      f"and writes the gradient ({17 * mb:.0f} MB). A float32 [B, T] tensor is {4 * mb:.1f} MB."]}


# The benchmark ---------------------------------------------------------------------

PARAMS = []
for _case in CASES:
    for _op in OPS:
        PARAMS.append(pytest.param(_op, _case, "copy", "copy", id=f"{_op}-{_case.id}-copy"))
        PARAMS += [pytest.param(_op, _case, mode, name, id=f"{_op}-{_case.id}-{mode.replace('+', '_')}-{name}")
                   for mode in MODES for name in CANDIDATES]


@pytest.mark.parametrize("op,case,mode,name", PARAMS)
def test_losses(benchmark, collector, op, case, mode, name):
    x, old, target, mask = inputs(case)
    if name == "copy":
        harness.run_copy(benchmark, collector, op=op, case=case.name, like=x, dev=DEV)
        return
    try:
        fn = candidate_fn(op, name)
    except pytest.skip.Exception as exc:
        collector.skip(op, case.name, name, mode, str(exc))
        raise
    leaf = x.detach().requires_grad_(mode == "fwd+bwd")

    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(leaf, old, target, mask)
        setup = None
    else:
        def call():
            fn(leaf, old, target, mask)[0].backward()

        def setup():
            leaf.grad = None

    extra = notes(op, case)
    if name == "compiled":  # the first call compiles: bounded, and timed apart
        harness.warm_compiled(call, DEV, collector, op=op, case=case.name, candidate=name, mode=mode, extra=extra)
    harness.run(benchmark, collector, op=op, case=case.name, candidate=name, mode=mode, fn=call, dev=DEV,
                setup=setup, model_bytes=case.model_bytes(op, mode), extra=extra)
