"""``torch.ops.rlhf_engine.<name>``, the custom-op form of every public op,
called the way a user, TorchScript or another framework's torch bridge calls
it: by the contract's signature (shared/API.md), with only the required
arguments and defaults everywhere else, or with ``backend="auto"`` spelled
out. It must match the Python op, pass ``torch.library.opcheck`` and compile
with ``fullgraph=True``. Also: the Triton backend from a source checkout put on
PYTHONPATH without installing the package."""
import inspect
import os
import subprocess
import sys

import pytest
import torch

import rlhf_engine
from rlhf_engine import ops
from tests.inputs import logprob_pair

B, T, V, H = 3, 7, 11, 8


def _mask(gen, dtype=torch.bool):
    """[B, T] 0/1 with a row of one valid token; the contract's masks may be any dtype."""
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[0, 0] = True
    mask[1] = False
    mask[1, 3] = True
    return mask.to(dtype)


# name -> gen -> (required positional args, required keyword args, the Python
# op's outputs as the leading outputs of the torch op, the indices of the
# positional args that are differentiable)
def _token_logprobs(gen):
    logits = torch.randn(2, B, V, generator=gen) * 2
    labels = torch.randint(0, V, (2, B), generator=gen)
    labels[0, 1] = -100
    return (logits, labels), {}, lambda a, k: [ops.token_logprobs(*a, **k)], (0,)


def _linear_token_logprobs(gen):
    hidden = torch.randn(2, B, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    labels = torch.randint(0, V, (2, B), generator=gen)
    labels[1, 0] = -100
    return (hidden, weight, labels), {}, lambda a, k: [ops.linear_token_logprobs(*a, **k)], (0, 1)


def _kl_penalty(gen):
    return logprob_pair(gen, (B, T)), {}, lambda a, k: [ops.kl_penalty(*a, **k)], (0, 1)


def _kl_shaped_rewards(gen):
    lp, ref = logprob_pair(gen, (B, T))
    args = (torch.randn(B, generator=gen), lp, ref, _mask(gen, torch.float32))
    return args, {"kl_coef": 0.1}, lambda a, k: [ops.kl_shaped_rewards(*a, **k)], (0, 1, 2)


def _gae(gen):
    args = (torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen), _mask(gen, torch.int64))
    return args, {}, lambda a, k: list(ops.gae(*a, **k)), ()


def _masked_whiten(gen):
    return ((torch.randn(B, T, generator=gen) * 3 + 1, _mask(gen)), {},
            lambda a, k: [ops.masked_whiten(*a, **k)], ())


def _group_advantages(gen):
    return (torch.randn(2 * B, generator=gen), B), {}, lambda a, k: [ops.group_advantages(*a, **k)], ()


def _policy_outputs(args, kwargs):
    loss, stats = ops.ppo_policy_loss(*args, **kwargs)
    return [loss, torch.stack([stats["clipfrac"], stats["approx_kl"], stats["clipfrac_lower"]])]


def _ppo_policy_loss(gen):
    args = (*logprob_pair(gen, (B, T)), torch.randn(B, T, generator=gen), _mask(gen))
    return args, {}, _policy_outputs, (0,)


def _value_outputs(args, kwargs):
    loss, stats = ops.ppo_value_loss(*args, **kwargs)
    return [loss, stats["clipfrac"][None]]


def _ppo_value_loss(gen):
    v = torch.randn(B, T, generator=gen)
    args = (v, v + 0.3 * torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen), _mask(gen, torch.float32))
    return args, {}, _value_outputs, (0,)


def _pairwise_outputs(args, kwargs):
    loss, stats = ops.pairwise_reward_loss(*args, **kwargs)
    return [loss, stats["accuracy"]]


def _pairwise_reward_loss(gen):
    return (torch.randn(2 * B, generator=gen), torch.randn(2 * B, generator=gen)), {}, _pairwise_outputs, (0, 1)


CASES = {
    "token_logprobs": _token_logprobs,
    "linear_token_logprobs": _linear_token_logprobs,
    "kl_penalty": _kl_penalty,
    "kl_shaped_rewards": _kl_shaped_rewards,
    "gae": _gae,
    "masked_whiten": _masked_whiten,
    "group_advantages": _group_advantages,
    "ppo_policy_loss": _ppo_policy_loss,
    "ppo_value_loss": _ppo_value_loss,
    "pairwise_reward_loss": _pairwise_reward_loss,
}
NAMES = sorted(CASES)
# The leading outputs of a stats vector (ppo losses) that stand for the Python op's stats dict.
STATS_LEN = {"ppo_policy_loss": 3, "ppo_value_loss": 1}


def torch_op(name):
    return getattr(torch.ops.rlhf_engine, name)


def leading(name, out, n):
    """The torch op's first ``n`` outputs (stats vectors cut to the Python op's entries)."""
    out = [out] if isinstance(out, torch.Tensor) else list(out)
    if name in STATS_LEN:
        out[1] = out[1][:STATS_LEN[name]]
    return out[:n]


def assert_same(outs, refs):
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_every_public_op_is_registered():
    assert sorted(set(ops.__all__) - {"debug_checks"}) == NAMES
    for name in NAMES:
        assert hasattr(torch.ops.rlhf_engine, name), name


@pytest.mark.parametrize("name", NAMES)
def test_schema_takes_the_contract_signature(name):
    """The schema has the Python op's parameters: its required positional ones
    first and in order, every other one with the same default (keyword-only
    where the Python op's is, or positional with the default); arguments the
    Python op lacks only with defaults."""
    schema = torch_op(name).default._schema
    args = {a.name: a for a in schema.arguments}
    params = inspect.signature(getattr(ops, name)).parameters.values()
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty]
    assert [a.name for a in schema.arguments[:len(positional)]] == positional, str(schema)
    for p in params:
        assert p.name in args, f"{p.name} missing from {schema}"
        arg = args[p.name]
        if p.default is p.empty:
            assert not arg.has_default_value(), f"{p.name} has a default in {schema}"
            assert arg.kwarg_only == (p.kind == p.KEYWORD_ONLY), f"{p.name} in {schema}"
        else:
            assert arg.has_default_value(), f"{p.name} has no default in {schema}"
            assert arg.default_value == p.default, f"{p.name}: {arg.default_value!r} != {p.default!r} in {schema}"
    for arg in schema.arguments:
        assert arg.name in {p.name for p in params} or arg.has_default_value(), f"{arg.name} in {schema}"
    assert args["backend"].default_value == "auto"


@pytest.mark.parametrize("explicit_auto", [False, True], ids=["defaults", "auto"])
@pytest.mark.parametrize("name", NAMES)
def test_contract_call_matches_the_python_op(name, explicit_auto, gen):
    args, kwargs, python_op, _ = CASES[name](gen)
    if explicit_auto:
        kwargs = dict(kwargs, backend="auto")
    expected = python_op(args, kwargs)
    assert_same(leading(name, torch_op(name)(*args, **kwargs), len(expected)), expected)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises_as_the_python_op(name, gen):
    """Validation lives in the op: a mismatched shape is a ValueError, never a
    read out of bounds; a backend that cannot run the inputs says why."""
    args, kwargs, _, _ = CASES[name](gen)
    bad = list(args)
    i = 1 if isinstance(args[1], torch.Tensor) else 0
    bad[i] = bad[i][..., :-1]
    with pytest.raises(ValueError):
        torch_op(name)(*bad, **kwargs)
    with pytest.raises(rlhf_engine.BackendUnavailable, match="'cuda'"):
        torch_op(name)(*args, **kwargs, backend="cuda")


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name, gen):
    args, kwargs, _, differentiable = CASES[name](gen)
    args = tuple(a.clone().requires_grad_() if i in differentiable else a for i, a in enumerate(args))
    torch.library.opcheck(torch_op(name).default, args, kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph(name, gen):
    args, kwargs, _, differentiable = CASES[name](gen)
    op = torch_op(name)

    def run(*a):
        out = op(*a, **kwargs)
        return out if isinstance(out, torch.Tensor) else out[0]

    def value_and_grads(fn):
        leaves = [a.clone().requires_grad_() if i in differentiable else a for i, a in enumerate(args)]
        out = fn(*leaves)
        grads = torch.autograd.grad((out * 1.5).sum(), [leaves[i] for i in differentiable]) if differentiable else ()
        return [out.detach(), *grads]

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    assert_same(value_and_grads(compiled), value_and_grads(run))


@pytest.mark.triton
def test_triton_backend_from_a_source_checkout_on_pythonpath(tmp_path):
    """The package on PYTHONPATH, not installed (no site processing, so no
    editable-install finder; torch and triton straight from their folder):
    ``rlhf_engine.kernels`` is the checkout's ``kernels/`` and the Triton
    backend runs; ``kernels`` itself stays no top-level module."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    site = os.path.dirname(os.path.dirname(torch.__file__))
    script = (
        "import os, sys, torch, rlhf_engine\n"
        "from rlhf_engine.ops import kl_penalty\n"
        f"assert rlhf_engine.__file__.startswith({root!r}), rlhf_engine.__file__\n"
        "lp = torch.linspace(-3, 0, 5)\n"
        "out = kl_penalty(lp, lp * 0.5, estimator='k3', backend='triton')\n"
        "torch.testing.assert_close(out, kl_penalty(lp, lp * 0.5, estimator='k3', backend='torch'))\n"
        "import rlhf_engine.kernels as k\n"
        f"assert os.path.dirname(k.__file__) == os.path.join({root!r}, 'kernels'), k.__file__\n"
        "assert 'kernels' not in sys.modules\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, site]), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
