"""kl_penalty and kl_shaped_rewards on every backend against an independent
float64 reference (the contract's formulas, differentiated by autograd)."""
import math

import pytest
import torch

import rlhf_engine
from rlhf_engine.ops import kl as kl_mod
from rlhf_engine.ops import kl_penalty, kl_shaped_rewards
from tests.helpers import assert_close, cpu_backends, gpu_backends, poisoned_outputs
from tests.inputs import logprob_pair, response_mask

BACKENDS = cpu_backends("kl_penalty")
SHAPED_BACKENDS = cpu_backends("kl_shaped_rewards")
ESTIMATORS = ["k1", "abs", "k2", "mse", "k3", "low_var_kl"]
TOL = 1e-6


def reference_kl(lp, ref, estimator):
    """The contract's table, in float64 (no care for cancellation: float64 has digits to spare)."""
    d = lp - ref
    name = {"mse": "k2", "low_var_kl": "k3"}.get(estimator, estimator)
    if name == "k1":
        return d
    if name == "abs":
        return d.abs()
    if name == "k2":
        return 0.5 * d**2
    r = torch.clamp(-d, -20, 20)
    return torch.clamp(torch.exp(r) - r - 1, -10, 10)


def reference_shaped(scores, lp, ref, mask, kl_coef, estimator):
    """Row by row in Python: the score goes to the largest t with mask[b, t]."""
    mask = mask.bool()
    out = torch.where(mask, -kl_coef * reference_kl(lp, ref, estimator), torch.zeros_like(lp))
    rows = []
    for b in range(lp.shape[0]):
        valid = [t for t in range(lp.shape[1]) if mask[b, t]]
        onehot = torch.zeros_like(lp[b])
        if valid:
            onehot[valid[-1]] = 1.0
        rows.append(out[b] + onehot * scores[b])
    return torch.stack(rows) if rows else out


def grads_of(out, inputs, upstream):
    return torch.autograd.grad((out * upstream).sum(), inputs)


# kl_penalty -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(3, 5), (17,), (2, 1, 9), (), (1, 1)], ids=str)
def test_penalty_matches_float64(backend, estimator, shape, gen):
    lp, ref = logprob_pair(gen, shape, spread=3.0 if estimator in ("k3", "low_var_kl") else 0.3)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    x64, y64 = lp.double().requires_grad_(), ref.double().requires_grad_()
    want = reference_kl(x64, y64, estimator)
    want_grads = grads_of(want, (x64, y64), upstream)
    x, y = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    with poisoned_outputs():
        got = kl_penalty(x, y, estimator=estimator, backend=backend)
        got_grads = grads_of(got, (x, y), upstream.float())
    assert got.dtype == torch.float32 and got.shape == shape
    assert_close(got, want.detach(), TOL, "kl")
    for name, g, w in zip(("d logprobs", "d ref_logprobs"), got_grads, want_grads):
        assert_close(g, w, TOL, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_small_differences_keep_float32_precision(backend, gen):
    """exp(r) - r - 1 in float32 cancels at |d| ~ 1e-3 (the usual regime);
    the kernels must not."""
    lp = -torch.rand(4096, generator=gen)
    ref = lp + torch.randn(4096, generator=gen) * 1e-3
    got = kl_penalty(lp, ref, estimator="k3", backend=backend)
    assert_close(got, reference_kl(lp.double(), ref.double(), "k3"), TOL, "k3")


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_clamps_golden(backend):
    """Hand-computed: r = clamp(-d, -20, 20), value clamp(e^r - r - 1, -10, 10),
    gradient 1 - e^-d where neither clamp binds, else 0. (e^r - r - 1 >= 0,
    so the lower value bound -10 can never bind.)"""
    d = torch.tensor([-25.0, -5.0, -1.0, 0.0, 1e-4, 5.0, 15.0, 25.0])
    want = torch.tensor([10.0, 10.0, math.e - 2, 0.0, 5e-9 - 1e-12 / 6, math.exp(-5) + 4, 10.0, 10.0],
                        dtype=torch.float64)
    want_grad = torch.tensor([0.0, 0.0, 1 - math.e, 0.0, 1 - math.exp(-1e-4), 1 - math.exp(-5), 0.0, 0.0],
                             dtype=torch.float64)
    lp = d.clone().requires_grad_()
    ref = torch.zeros(8, requires_grad=True)
    out = kl_penalty(lp, ref, estimator="k3", backend=backend)
    out.sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=0)
    torch.testing.assert_close(lp.grad.double(), want_grad, rtol=2e-6, atol=0)
    torch.testing.assert_close(ref.grad, -lp.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_values_and_abs_gradient_at_zero(backend):
    lp = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    ref = torch.tensor([0.25, -0.5, 2.0])
    want = {"k1": [0.25, -0.5, 0.0], "abs": [0.25, 0.5, 0.0], "k2": [0.03125, 0.125, 0.0]}
    want_grad = {"k1": [1.0, 1.0, 1.0], "abs": [1.0, -1.0, 0.0], "k2": [0.25, -0.5, 0.0]}
    for est in want:
        lp.grad = None
        out = kl_penalty(lp, ref, estimator=est, backend=backend)
        out.sum().backward()
        assert out.tolist() == want[est] and lp.grad.tolist() == want_grad[est], est


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alias,name", [("mse", "k2"), ("low_var_kl", "k3")])
def test_aliases_are_the_same_estimator(backend, alias, name, gen):
    lp, ref = logprob_pair(gen, (4, 33), spread=2.0)
    assert torch.equal(kl_penalty(lp, ref, estimator=alias, backend=backend),
                       kl_penalty(lp, ref, estimator=name, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_give_float32_and_gradients_of_their_dtype(backend, dtype, gen):
    lp, ref = (t.to(dtype) for t in logprob_pair(gen, (3, 11)))
    x = lp.clone().requires_grad_()
    out = kl_penalty(x, ref, estimator="k2", backend=backend)
    assert out.dtype == torch.float32
    assert_close(out, reference_kl(lp.double(), ref.double(), "k2"), TOL)
    out.sum().backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_nan_in_gives_nan_out_where_touched(backend):
    lp = torch.tensor([0.1, float("nan"), 0.3], requires_grad=True)
    ref = torch.tensor([0.0, 0.0, float("nan")])
    for est in ("k1", "abs", "k2", "k3"):
        lp.grad = None
        out = kl_penalty(lp, ref, estimator=est, backend=backend)
        out.sum().backward()
        assert torch.isfinite(out[0]) and torch.isnan(out[1:]).all(), est
        assert torch.isfinite(lp.grad[0]) and torch.isnan(lp.grad[1:]).all(), est


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_empty(backend):
    for shape in ((0,), (3, 0)):
        x = torch.zeros(shape, requires_grad=True)
        out = kl_penalty(x, torch.zeros(shape), estimator="k3", backend=backend)
        out.sum().backward()
        assert out.shape == shape and x.grad.shape == shape


# kl_shaped_rewards ------------------------------------------------------------------

def engine_mask(lengths, n_cols):
    """What an engine builds: 1 on the first ``length`` response tokens."""
    return (torch.arange(n_cols) < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("backend", SHAPED_BACKENDS)
@pytest.mark.parametrize("pad_id,eos_id", [(0, 2), (2, 2)], ids=["pad!=eos", "pad==eos"])
def test_score_lands_on_last_response_token(backend, pad_id, eos_id):
    """Responses end with EOS and are right-padded. The mask comes from the
    response lengths, so the score lands on the EOS token even when the pad
    id equals the EOS id (where 'last token != pad' would pick index 0 or
    the wrong token)."""
    lengths = [3, 6, 1]
    tokens = torch.full((3, 6), pad_id)
    for b, n in enumerate(lengths):
        tokens[b, :n - 1] = 7
        tokens[b, n - 1] = eos_id
    mask = engine_mask(lengths, 6)
    lp = torch.full((3, 6), 0.5)
    ref = torch.full((3, 6), 0.25)
    scores = torch.tensor([1.0, -2.0, 4.0])
    with poisoned_outputs():
        rewards = kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.2, estimator="k1", backend=backend)
    want = torch.zeros(3, 6)
    for b, n in enumerate(lengths):
        want[b, :n] = -0.2 * 0.25
        want[b, n - 1] += scores[b]
        assert tokens[b, n - 1] == eos_id
    torch.testing.assert_close(rewards, want, rtol=1e-7, atol=0)
    assert rewards[0, 2] == pytest.approx(1.0 - 0.05) and rewards[1, 5] == pytest.approx(-2.05)
    assert rewards[2, 0] == pytest.approx(3.95)


@pytest.mark.parametrize("backend", SHAPED_BACKENDS)
def test_masked_spans_one_token_and_empty_rows(backend):
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0],   # tool output inside: score at 5, not 1
                         [0, 0, 0, 1, 0, 0, 0, 0],   # one valid token
                         [0, 0, 0, 0, 0, 0, 0, 0],   # none: all zeros
                         [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    lp = torch.full((4, 8), -1.0)
    ref = torch.full((4, 8), -1.5)  # d = 0.5: k2 = 0.125
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0])
    with poisoned_outputs():
        rewards = kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.5, estimator="mse", backend=backend)
    k = -0.5 * 0.125
    want = torch.tensor([[k, k, 0, 0, k, 10 + k, 0, 0],
                         [0, 0, 0, 20 + k, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 0, 0, 0],
                         [k, k, k, k, k, k, k, 40 + k]])
    torch.testing.assert_close(rewards, want, rtol=1e-7, atol=0)


@pytest.mark.parametrize("backend", SHAPED_BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("n_rows,n_cols", [(5, 13), (1, 1), (3, 1), (2, 200)])
def test_shaped_rewards_match_float64(backend, estimator, n_rows, n_cols, gen):
    lp, ref = logprob_pair(gen, (n_rows, n_cols), spread=2.0)
    mask = response_mask(gen, n_rows, n_cols, span=2)
    mask[0] = False  # always one empty row
    scores = torch.randn(n_rows, generator=gen)
    upstream = torch.randn(n_rows, n_cols, generator=gen, dtype=torch.float64)
    inputs64 = [t.double().requires_grad_() for t in (scores, lp, ref)]
    want = reference_shaped(*inputs64[:1], *inputs64[1:], mask, 0.05, estimator)
    want_grads = grads_of(want, inputs64, upstream)
    inputs = [t.clone().requires_grad_() for t in (scores, lp, ref)]
    with poisoned_outputs():
        got = kl_shaped_rewards(*inputs, mask.float(), kl_coef=0.05, estimator=estimator, backend=backend)
        got_grads = grads_of(got, inputs, upstream.float())
    assert got.dtype == torch.float32
    assert_close(got, want.detach(), TOL, "rewards")
    assert (got[~mask] == 0).all()
    for name, g, w in zip(("d scores", "d logprobs", "d ref_logprobs"), got_grads, want_grads):
        assert_close(g, w, TOL, name)


@pytest.mark.parametrize("backend", SHAPED_BACKENDS)
def test_shaped_rewards_nan_only_where_touched(backend):
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    lp = torch.zeros(2, 4)
    lp[0, 0] = float("nan")  # masked in: NaN there
    lp[0, 3] = float("nan")  # masked out: 0.0 there
    scores = torch.tensor([1.0, float("nan")])  # NaN only at row 1's last valid token
    rewards = kl_shaped_rewards(scores, lp, torch.zeros(2, 4), mask, kl_coef=0.1, backend=backend)
    nan = torch.zeros(2, 4, dtype=torch.bool)
    nan[0, 0] = nan[1, 2] = True
    assert torch.equal(torch.isnan(rewards), nan)
    assert (rewards[~nan & ~mask] == 0).all()


@pytest.mark.parametrize("backend", SHAPED_BACKENDS)
def test_shaped_rewards_empty(backend):
    for shape in ((0, 5), (3, 0), (0, 0)):
        scores = torch.zeros(shape[0], requires_grad=True)
        lp = torch.zeros(shape, requires_grad=True)
        out = kl_shaped_rewards(scores, lp, torch.zeros(shape), torch.ones(shape), kl_coef=0.1, backend=backend)
        out.sum().backward()
        assert out.shape == shape and scores.grad.shape == shape[:1] and (scores.grad == 0).all()


@pytest.mark.parametrize("op", ["kl_penalty", "kl_shaped_rewards"])
def test_debug_checks_turn_nan_into_value_error(op):
    lp = torch.zeros(2, 3)
    lp[1, 2] = float("nan")
    call = {"kl_penalty": lambda: kl_penalty(lp, torch.zeros(2, 3)),
            "kl_shaped_rewards": lambda: kl_shaped_rewards(torch.zeros(2), lp, torch.zeros(2, 3),
                                                           torch.ones(2, 3), kl_coef=0.1)}[op]
    call()  # NaN out, no error
    rlhf_engine.ops.debug_checks(True)
    try:
        with pytest.raises(ValueError, match="logprobs contains NaN or inf"):
            call()
    finally:
        rlhf_engine.ops.debug_checks(False)


# Invalid input ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(ref_logprobs=torch.zeros(2, 4)), "ref_logprobs must have the shape of logprobs"),
    (dict(logprobs=torch.zeros(2, 3, dtype=torch.long)), "logprobs must be a floating-point tensor"),
    (dict(ref_logprobs=[0.0]), "ref_logprobs must be a torch.Tensor"),
    (dict(estimator="k4"), "estimator must be one of"),
    (dict(estimator=None), "estimator must be one of"),
    (dict(ref_logprobs=torch.zeros(2, 3, device="meta")), "tensors must be on one device"),
    (dict(backend="gpu"), "backend must be one of"),
])
def test_penalty_bad_input_raises_value_error(kwargs, match):
    args = dict(logprobs=torch.zeros(2, 3), ref_logprobs=torch.zeros(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kl_penalty(args.pop("logprobs"), args.pop("ref_logprobs"), **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(logprobs=torch.zeros(6)), "logprobs must be \\[B, T\\]"),
    (dict(ref_logprobs=torch.zeros(2, 4)), "ref_logprobs must have the shape of logprobs"),
    (dict(scores=torch.zeros(3)), "scores must be \\[B\\]"),
    (dict(scores=torch.zeros(2, dtype=torch.int64)), "scores must be a floating-point tensor"),
    (dict(mask=torch.ones(2, 4)), "mask must have shape"),
    (dict(mask=[[1, 1, 1]] * 2), "mask must be a torch.Tensor"),
    (dict(estimator="kl"), "estimator must be one of"),
    (dict(kl_coef=float("nan")), "kl_coef must be a finite number"),
    (dict(kl_coef=float("inf")), "kl_coef must be a finite number"),
    (dict(kl_coef="0.1"), "kl_coef must be a finite number"),
    (dict(kl_coef=True), "kl_coef must be a finite number"),
    (dict(kl_coef=torch.tensor(0.1)), "kl_coef must be a finite number"),
    (dict(mask=torch.ones(2, 3, device="meta")), "tensors must be on one device"),
])
def test_shaped_bad_input_raises_value_error(kwargs, match):
    args = dict(scores=torch.zeros(2), logprobs=torch.zeros(2, 3), ref_logprobs=torch.zeros(2, 3),
                mask=torch.ones(2, 3), kl_coef=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kl_shaped_rewards(args.pop("scores"), args.pop("logprobs"), args.pop("ref_logprobs"), args.pop("mask"),
                          **args)


def test_backend_choice_and_unavailable_backends():
    cpu = torch.device("cpu")
    expected = "cpu" if kl_mod.registry.unavailable_reason(kl_mod.OP, "cpu", cpu) is None else "torch"
    assert kl_mod.registry.resolve(kl_mod.OP, "auto", cpu, torch.float32) == expected
    assert kl_mod.registry.resolve(kl_mod.OP_SHAPED, "auto", cpu, torch.float64) == "torch"
    with pytest.raises(rlhf_engine.BackendUnavailable, match="backend 'cuda' cannot run kl_penalty"):
        kl_penalty(torch.zeros(3), torch.zeros(3), backend="cuda")
    with pytest.raises(rlhf_engine.BackendUnavailable, match="backend 'cpu'.*float64"):
        kl_penalty(torch.zeros(3, dtype=torch.float64), torch.zeros(3), backend="cpu")


# torch integration --------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, gen):
    lp, ref = (t.requires_grad_() for t in logprob_pair(gen, (3, 7), spread=2.0))
    scores = torch.randn(3, generator=gen, requires_grad=True)
    mask = response_mask(gen, 3, 7, span=2)
    torch.library.opcheck(kl_mod.kl_penalty_op, (lp, ref), dict(estimator="k3", backend=backend))
    torch.library.opcheck(kl_mod.kl_shaped_rewards_op, (scores, lp, ref, mask),
                          dict(kl_coef=0.1, estimator="k2", backend=backend))
    # The backward op is not differentiable itself (no double backward).
    torch.library.opcheck(kl_mod.kl_penalty_backward_op,
                          (torch.randn(3, 7), lp.detach(), ref.detach(), mask, -0.1, "abs", backend))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "triton"])
def test_torch_compile_fullgraph_matches_eager(backend, gen):
    lp, ref = (t.requires_grad_() for t in logprob_pair(gen, (4, 9), spread=2.0))
    scores = torch.randn(4, generator=gen, requires_grad=True)
    mask = response_mask(gen, 4, 9, span=2)

    def loss(s, x, y):
        rewards = kl_shaped_rewards(s, x, y, mask, kl_coef=0.1, estimator="k3", backend=backend)
        return (rewards * 2).sum() + kl_penalty(x, y, estimator="abs", backend=backend).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)  # inductor
    out_c = compiled(scores, lp, ref)
    grads_c = torch.autograd.grad(out_c, (scores, lp, ref))
    out_e = loss(scores, lp, ref)
    grads_e = torch.autograd.grad(out_e, (scores, lp, ref))
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)


# GPU ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", gpu_backends("kl_shaped_rewards"))
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_gpu_matches_float64(backend, estimator):
    gen = torch.Generator().manual_seed(0)
    lp, ref = logprob_pair(gen, (64, 3000), spread=3.0)
    mask = response_mask(gen, 64, 3000, span=2)
    scores = torch.randn(64, generator=gen)
    name = backend.removeprefix("gpu-")
    inputs = [t.cuda().requires_grad_() for t in (scores, lp, ref)]
    with poisoned_outputs():
        rewards = kl_shaped_rewards(*inputs, mask.cuda(), kl_coef=0.1, estimator=estimator, backend=name)
        penalty = kl_penalty(*inputs[1:], estimator=estimator, backend=name)
        grads = torch.autograd.grad(rewards.sum() + penalty.sum(), inputs)
    inputs64 = [t.double().requires_grad_() for t in (scores, lp, ref)]
    want = reference_shaped(*inputs64, mask, 0.1, estimator)
    want_penalty = reference_kl(*inputs64[1:], estimator)
    want_grads = torch.autograd.grad(want.sum() + want_penalty.sum(), inputs64)
    assert_close(rewards.cpu(), want.detach(), TOL, "rewards")
    assert_close(penalty.cpu(), want_penalty.detach(), TOL, "kl")
    for g, w in zip(grads, want_grads):
        assert_close(g.cpu(), w, TOL, "grad")


@pytest.mark.cuda
def test_gpu_cuda_graph_capture():
    gen = torch.Generator().manual_seed(1)
    lp, ref = (t.cuda() for t in logprob_pair(gen, (8, 500)))
    mask = response_mask(gen, 8, 500, span=2).cuda()
    scores = torch.randn(8, generator=gen).cuda()
    kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator="k3")  # warm-up (compilation)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator="k3")
    graph.replay()
    torch.cuda.synchronize()
    want = reference_shaped(scores.cpu().double(), lp.cpu().double(), ref.cpu().double(), mask.cpu(), 0.1, "k3")
    assert_close(out.cpu(), want, TOL)
