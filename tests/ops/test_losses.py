"""ppo_policy_loss, ppo_value_loss and pairwise_reward_loss on every backend,
against hand-computed values and an independent float64 reference."""
import math

import pytest
import torch

import rlhf_engine
from rlhf_engine.ops import losses as losses_mod
from rlhf_engine.ops import pairwise_reward_loss, ppo_policy_loss, ppo_value_loss
from tests.helpers import assert_close, cpu_backends, gpu_backends, poisoned_outputs
from tests.inputs import ppo_loss_inputs
from tests.reference import policy_token_losses

BACKENDS = cpu_backends("ppo_policy_loss")
PAIRWISE_BACKENDS = cpu_backends("pairwise_reward_loss")
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
# [B, T] sizes the Triton interpreter gets through quickly: odd T, B = 1, T = 1.
SHAPES = [(5, 37), (1, 1), (3, 300)]
TOL = 1e-6


# The independent float64 reference: API.md's formulas with autograd -------------------

def aggregate(per_token, mask, agg):
    """API.md's aggregation of [B, T] per-token losses (float64 autograd)."""
    masked = torch.where(mask, per_token, 0.0)
    count = mask.sum(1).double()
    if agg == "token-mean":
        return masked.sum() / count.sum() if count.sum() > 0 else masked.sum() * 0
    rows = count > 0
    per_row = masked.sum(1) if agg == "seq-mean-token-sum" else masked.sum(1) / count.clamp(min=1)
    return per_row[rows].mean() if rows.any() else masked.sum() * 0


def masked_mean(x, mask):
    return x.double()[mask].mean() if mask.any() else torch.zeros((), dtype=torch.float64)


def policy_reference(logprobs, old, adv, mask, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean"):
    """float64 (x, loss, stats) with x the leaf logprobs."""
    x = logprobs.detach().double().requires_grad_()
    loss, l1, l2, neg_kl, lower = policy_token_losses(x, old.double(), adv.double(), clip_low, clip_high, dual_clip)
    stats = {"clipfrac": masked_mean(l2 > l1, mask), "approx_kl": masked_mean(-neg_kl, mask),
             "clipfrac_lower": masked_mean(lower, mask)}
    scales = {"loss": aggregate(loss.detach().abs(), mask, agg), "approx_kl": masked_mean(neg_kl.detach().abs(), mask)}
    return x, aggregate(loss, mask, agg), stats, scales


def value_reference(values, old, returns, mask, clip=0.2, agg="token-mean"):
    x = values.detach().double().requires_grad_()
    old, returns = old.double(), returns.double()
    v_clip = old + torch.clamp(x - old, -clip, clip)
    # Inside the clip range v_clip is exactly x: keep float64 rounding out of the flag.
    v_clip = torch.where((x - old).abs() <= clip, x, v_clip)
    s1, s2 = (x - returns) ** 2, (v_clip - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(s1, s2), mask, agg)
    # float32 forms v_clip as old + (x - old): off from x by a rounding of |x| + |old|, which moves a squared
    # error by 2 |x - R| times that; near v = R (a loss near 0) it dominates whatever the kernel does.
    scale = 0.5 * aggregate(2 * (x - returns).abs() * (x.abs() + old.abs()), mask, agg).detach()
    return x, loss, {"clipfrac": masked_mean(s2 > s1, mask)}, {"loss": scale}


def assert_scalar_close(out, ref, scale, tol, what):
    """|out - ref| <= tol * max(|ref|, scale): a mean of terms of both signs is
    compared relative to the mean of their magnitudes (``scale``), since
    float32 inputs carry that much rounding whatever the kernel does."""
    assert out.shape == () and out.dtype == torch.float32, what
    bound = tol * max(abs(ref.item()), float(scale))
    assert abs(out.item() - ref.item()) <= bound, f"{what}: {out.item()!r} vs {ref.item()!r} (bound {bound:.2e})"


def check_against_reference(out, ref, x, x_ref, tol=TOL):
    (loss, stats), (loss_ref, stats_ref, scales) = out, ref
    assert_scalar_close(loss.detach(), loss_ref.detach(), scales.get("loss", 0), tol, "loss")
    for name, value in stats_ref.items():
        assert_scalar_close(stats[name], value, scales.get(name, 0), tol, name)
    g = torch.randn((), dtype=torch.float64).item()
    (grad_ref,) = torch.autograd.grad(loss_ref * g, x_ref)
    with poisoned_outputs():
        (grad,) = torch.autograd.grad(loss * g, x)
    assert grad.dtype == x.dtype
    assert_close(grad, grad_ref, tol, "grad")


# Golden cases --------------------------------------------------------------------------

GOLD_RATIO = torch.tensor([1.0, 1.5, 0.5, 4.0], dtype=torch.float64)
GOLD_ADV = torch.tensor([1.0, 1.0, -1.0, -1.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_golden(backend, dual_clip):
    """ratio (1, 1.5, 0.5, 4), A (1, 1, -1, -1), clip 0.2: l1 = (-1, -1.5, 0.5, 4),
    l2 = (-1, -1.2, 0.8, 1.2), l = (-1, -1.2, 0.8, 4), the dual clip c = 3
    bounds the last to 3."""
    x = GOLD_RATIO.log().float()[None].requires_grad_()
    zeros, mask = torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool)
    with poisoned_outputs():
        loss, stats = ppo_policy_loss(x, zeros, GOLD_ADV[None], mask, dual_clip=dual_clip, backend=backend)
        loss.backward()
    expected = 0.4 if dual_clip else 0.65
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(-math.log(3) / 4, rel=1e-6)
    assert stats["clipfrac_lower"].item() == (0.25 if dual_clip else 0.0)
    expected_grad = [-0.25, 0.0, 0.0, 0.0 if dual_clip else 1.0]
    torch.testing.assert_close(x.grad[0], torch.tensor(expected_grad), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg,expected", [("token-mean", 6.6 / 5), ("seq-mean-token-sum", 6.6 / 2),
                                          ("seq-mean-token-mean", (0.65 + 4) / 2)])
def test_policy_golden_aggregation(backend, agg, expected):
    """Rows: all four golden tokens; only the last (l = 4); none."""
    x = GOLD_RATIO.log().float().expand(3, 4).clone().requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.int32)
    loss, _ = ppo_policy_loss(x, torch.zeros(3, 4), GOLD_ADV.expand(3, 4), mask, agg=agg, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    row_weight = {"token-mean": [1 / 5, 1 / 5], "seq-mean-token-sum": [1 / 2, 1 / 2],
                  "seq-mean-token-mean": [1 / 8, 1 / 2]}[agg]
    expected_grad = torch.tensor([[-row_weight[0], 0, 0, 4 * row_weight[0]], [0, 0, 0, 4 * row_weight[1]],
                                  [0, 0, 0, 0]])
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_asymmetric_clip_golden(backend):
    """clip_low 0.1, clip_high 0.5: ratio 1.4 is inside, 0.8 is clipped to 0.9."""
    x = torch.tensor([[math.log(1.4), math.log(0.8)]], requires_grad=True)
    loss, stats = ppo_policy_loss(x, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2),
                                  clip_low=0.1, clip_high=0.5, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx((-1.4 + 0.9) / 2, rel=1e-6)
    assert stats["clipfrac"].item() == 0.5
    torch.testing.assert_close(x.grad, torch.tensor([[-0.7, 0.0]]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_clamp_binding(backend):
    """|logprobs - old| = 30 > 20: ratio exp(+-20), zero gradient through the clamp."""
    x = torch.tensor([[30.0, -30.0]], requires_grad=True)
    loss, stats = ppo_policy_loss(x, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2),
                                  backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx((math.exp(20) - math.exp(-20)) / 2, rel=1e-6)
    assert stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0
    assert (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_golden(backend):
    """delta (0.1, 1, -0.5, -0.5), clip 0.2: l = (0, 1, 1, 1.69), the last clipped."""
    v = torch.tensor([[1.0, 2.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.9, 1.0, 0.5, 0.5]])
    returns = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    with poisoned_outputs():
        loss, stats = ppo_value_loss(v, old, returns, torch.ones(1, 4), backend=backend)
        loss.backward()
    assert loss.item() == pytest.approx(0.5 * 3.69 / 4, rel=1e-6)
    assert stats["clipfrac"].item() == 0.25
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 0.25, -0.25, 0.0]]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", PAIRWISE_BACKENDS)
def test_pairwise_golden(backend):
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0], requires_grad=True)
    with poisoned_outputs():
        loss, stats = pairwise_reward_loss(chosen, rejected, backend=backend)
        loss.backward()
    softplus = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(1.0))]
    assert loss.item() == pytest.approx(sum(softplus) / 2, rel=1e-6)
    assert stats["accuracy"].item() == 0.5
    sig = torch.tensor([1 / (1 + math.exp(2.0)), 1 / (1 + math.exp(-1.0))])
    torch.testing.assert_close(chosen.grad, -sig / 2)
    torch.testing.assert_close(rejected.grad, sig / 2)


# Against float64 -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("b,t", SHAPES)
@pytest.mark.parametrize("clips", [dict(), dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)],
                         ids=["symmetric", "asymmetric-dual"])
def test_policy_matches_float64(backend, agg, b, t, clips, gen):
    logprobs, old, adv, mask = ppo_loss_inputs(gen, b, t)
    x_ref, *ref = policy_reference(logprobs, old, adv, mask, agg=agg, **clips)
    x = logprobs.clone().requires_grad_()
    with poisoned_outputs():
        out = ppo_policy_loss(x, old, adv, mask, agg=agg, backend=backend, **clips)
    check_against_reference(out, ref, x, x_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("b,t", SHAPES)
def test_value_matches_float64(backend, agg, b, t, gen):
    values, old, returns, mask = ppo_loss_inputs(gen, b, t, clamp_tokens=False)
    x_ref, *ref = value_reference(values, old, returns, mask, clip=0.1, agg=agg)
    x = values.clone().requires_grad_()
    with poisoned_outputs():
        out = ppo_value_loss(x, old, returns, mask, clip=0.1, agg=agg, backend=backend)
    check_against_reference(out, ref, x, x_ref)


def check_pairwise_against_float64(chosen, rejected, margin, backend, device="cpu"):
    """float32 loss, accuracy and gradients of ``backend`` within TOL of float64."""
    c_ref, r_ref = chosen.double().requires_grad_(), rejected.double().requires_grad_()
    loss_ref = -torch.nn.functional.logsigmoid(c_ref - r_ref - margin.double()).mean()
    c, r = chosen.to(device).requires_grad_(), rejected.to(device).requires_grad_()
    g = torch.randn((), dtype=torch.float64).item()
    with poisoned_outputs():
        loss, stats = pairwise_reward_loss(c, r, margin=margin.to(device), backend=backend)
        grads = torch.autograd.grad(loss * g, (c, r))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss.detach().cpu(), loss_ref.detach(), TOL, "loss")
    assert stats["accuracy"].item() == pytest.approx((chosen > rejected).double().mean().item(), rel=1e-6)
    grads_ref = torch.autograd.grad(loss_ref * g, (c_ref, r_ref))
    for grad, ref, name in zip(grads, grads_ref, ("grad_chosen", "grad_rejected")):
        assert_close(grad.cpu(), ref, TOL, name)


@pytest.mark.parametrize("backend", PAIRWISE_BACKENDS)
@pytest.mark.parametrize("shape,margin_shape,scale", [((33,), (33,), 30), ((1,), (), 3), ((3, 1500), (1500,), 30)],
                         ids=["N33", "N1-scalar-margin", "3x1500-broadcast-margin"])
def test_pairwise_matches_float64(backend, shape, margin_shape, scale, gen):
    """Scores of scale 30 (|z| up to ~100: both softplus tails; 3 for one pair,
    whose loss must stay a normal float32), several tiles of the C kernels
    (4500 pairs), a margin broadcast from fewer dims."""
    chosen, rejected = torch.randn(2, *shape, generator=gen) * scale
    margin = torch.rand(margin_shape, generator=gen)
    check_pairwise_against_float64(chosen, rejected, margin, backend)


@pytest.mark.parametrize("backend", PAIRWISE_BACKENDS)
def test_pairwise_far_tail_and_ties(backend):
    """z = +-100, +-30 and 0 (a tie: not counted as correct)."""
    chosen = torch.tensor([100.0, -100.0, 30.0, -30.0, 0.5])
    rejected = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5])
    check_pairwise_against_float64(chosen, rejected, torch.zeros(5), backend)


@pytest.mark.parametrize("backend", PAIRWISE_BACKENDS)
def test_pairwise_deterministic(backend, gen):
    chosen, rejected = torch.randn(2, 9000, generator=gen)
    runs = []
    for _ in range(2):
        c = chosen.clone().requires_grad_()
        loss, stats = pairwise_reward_loss(c, rejected, margin=0.5, backend=backend)
        runs.append((loss, stats["accuracy"], torch.autograd.grad(loss, c)[0]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# Micro-batches ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("op", ["policy", "value"])
def test_micro_batches_sum_to_the_batch(backend, agg, op, gen):
    """Three uneven micro-batches with the whole batch's normalizer: their
    losses sum to the batch's loss and their gradients are the batch's."""
    logprobs, old, adv, mask = ppo_loss_inputs(gen, 9, 41)
    fn = ppo_policy_loss if op == "policy" else ppo_value_loss
    x = logprobs.clone().requires_grad_()
    loss, _ = fn(x, old, adv, mask, agg=agg, backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    normalizer = mask.sum() if agg == "token-mean" else (mask.sum(1) > 0).sum()
    parts, grads = [], []
    for part in (slice(0, 2), slice(2, 7), slice(7, 9)):
        xp = logprobs[part].clone().requires_grad_()
        loss_p, _ = fn(xp, old[part], adv[part], mask[part], agg=agg, normalizer=normalizer, backend=backend)
        grads.append(torch.autograd.grad(loss_p, xp)[0])
        parts.append(loss_p.item())
    # Four float32 roundings (the three parts and the whole).
    assert abs(sum(parts) - loss.item()) <= 2.4e-7 * (abs(loss.item()) + sum(map(abs, parts)))
    torch.testing.assert_close(torch.cat(grads), grad, rtol=1e-6, atol=1e-9)


def test_float_normalizer_equals_tensor_normalizer(gen):
    logprobs, old, adv, mask = ppo_loss_inputs(gen, 3, 10)
    a, _ = ppo_policy_loss(logprobs, old, adv, mask, normalizer=50)
    b, _ = ppo_policy_loss(logprobs, old, adv, mask, normalizer=torch.tensor(50))
    own, _ = ppo_policy_loss(logprobs, old, adv, mask)
    assert a.item() == b.item() == pytest.approx(own.item() * mask.sum().item() / 50, rel=1e-6)


# Edge cases -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_batch_gives_zero_loss_and_grad(backend, agg, gen):
    logprobs, old, adv, _ = ppo_loss_inputs(gen, 3, 17)
    mask = torch.zeros(3, 17, dtype=torch.bool)
    for fn, name in ((ppo_policy_loss, "policy"), (ppo_value_loss, "value")):
        x = logprobs.clone().requires_grad_()
        with poisoned_outputs():
            loss, stats = fn(x, old, adv, mask, agg=agg, backend=backend)
            loss.backward()
        assert loss.item() == 0.0 and (x.grad == 0).all(), name
        assert all(v.item() == 0.0 for v in stats.values()), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_empty_batch(backend, shape):
    x = torch.zeros(shape, requires_grad=True)
    for fn in (ppo_policy_loss, ppo_value_loss):
        loss, stats = fn(x, torch.zeros(shape), torch.zeros(shape), torch.ones(shape), backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and x.grad.shape == shape
        assert all(v.item() == 0.0 for v in stats.values())
        x.grad = None


@pytest.mark.parametrize("backend", PAIRWISE_BACKENDS)
def test_pairwise_empty(backend):
    chosen = torch.zeros(0, requires_grad=True)
    with poisoned_outputs():
        loss, stats = pairwise_reward_loss(chosen, torch.zeros(0), margin=torch.zeros(0), backend=backend)
        loss.backward()
    assert loss.item() == 0.0 and stats["accuracy"].item() == 0.0 and chosen.grad.shape == (0,)


@pytest.mark.parametrize("backend", PAIRWISE_BACKENDS)
def test_pairwise_nan_gives_nan_and_raises_under_debug_checks(backend):
    chosen = torch.tensor([1.0, float("nan"), 0.0], requires_grad=True)
    rejected = torch.zeros(3)
    loss, stats = pairwise_reward_loss(chosen, rejected, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and stats["accuracy"].item() == pytest.approx(1 / 3)
    assert torch.isnan(chosen.grad[1]) and torch.isfinite(chosen.grad[[0, 2]]).all()
    rlhf_engine.ops.debug_checks(True)
    try:
        with pytest.raises(ValueError, match="chosen contains NaN"):
            pairwise_reward_loss(chosen, rejected, backend=backend)
        with pytest.raises(ValueError, match="rejected contains NaN"):
            pairwise_reward_loss(rejected, chosen.detach(), backend=backend)
    finally:
        rlhf_engine.ops.debug_checks(False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_valid_token_gives_nan_and_raises_under_debug_checks(backend, gen):
    logprobs, old, adv, mask = ppo_loss_inputs(gen, 3, 9)
    adv[0, 0] = float("nan")  # valid
    x = logprobs.clone().requires_grad_()
    loss, _ = ppo_policy_loss(x, old, adv, mask, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(x.grad[0, 0])
    assert torch.isfinite(x.grad[1:]).all()
    values_loss, _ = ppo_value_loss(x, old, adv, mask, backend=backend)
    assert torch.isnan(values_loss)
    rlhf_engine.ops.debug_checks(True)
    try:
        with pytest.raises(ValueError, match="advantages contains NaN"):
            ppo_policy_loss(x, old, adv, mask, backend=backend)
        with pytest.raises(ValueError, match="returns contains NaN"):
            ppo_value_loss(x, old, adv, mask, backend=backend)
    finally:
        rlhf_engine.ops.debug_checks(False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_masked_token_is_ignored(backend, gen):
    logprobs, old, adv, mask = ppo_loss_inputs(gen, 3, 9)
    mask[0, 3] = False
    adv[0, 3] = old[0, 3] = float("nan")
    x = logprobs.clone().requires_grad_()
    for fn in (ppo_policy_loss, ppo_value_loss):
        loss, stats = fn(x, old, adv, mask, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(v) for v in stats.values())
        x.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_dtypes_and_half_inputs(backend, gen):
    logprobs, old, adv, mask = ppo_loss_inputs(gen, 4, 13)
    ref, _ = ppo_policy_loss(logprobs, old, adv, mask, backend=backend)
    for m in (mask.float(), mask.to(torch.int64), mask.to(torch.uint8)):
        assert ppo_policy_loss(logprobs, old, adv, m, backend=backend)[0].item() == ref.item()
    x = logprobs.to(torch.bfloat16).requires_grad_()
    loss, _ = ppo_policy_loss(x, old, adv.half(), mask, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, gen):
    logprobs, old, adv, mask = ppo_loss_inputs(gen, 6, 333)
    runs = []
    for _ in range(2):
        x = logprobs.clone().requires_grad_()
        loss, stats = ppo_policy_loss(x, old, adv, mask, agg="seq-mean-token-mean", dual_clip=2.0, backend=backend)
        loss.backward()
        runs.append((loss, *stats.values(), x.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_mutates_inputs(backend, gen):
    inputs = ppo_loss_inputs(gen, 3, 20)
    before = [t.clone() for t in inputs]
    x = inputs[0].requires_grad_()
    loss, _ = ppo_policy_loss(x, *inputs[1:], backend=backend)
    loss.backward(retain_graph=True)
    loss.backward()  # a second backward gives the same gradient again
    assert all(torch.equal(a.detach(), b) for a, b in zip(inputs, before))
    first = x.grad / 2
    x.grad = None
    loss, _ = ppo_policy_loss(x, *inputs[1:], backend=backend)
    loss.backward()
    torch.testing.assert_close(x.grad, first, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id == "cpu"])
def test_only_the_gradient_is_allocated(backend, gen):
    """The design (see rlhf_engine/ops/losses.py): a forward allocates no
    [B, T] tensor, a forward + backward only the gradient."""
    from rlhf_engine import profiling

    logprobs, old, adv, mask = ppo_loss_inputs(gen, 64, 1024)
    x = logprobs.requires_grad_()
    _, fwd = profiling.peak_memory(lambda: ppo_policy_loss(x.detach(), old, adv, mask, backend=backend))
    _, both = profiling.peak_memory(lambda: ppo_policy_loss(x, old, adv, mask, backend=backend)[0].backward())
    grad_bytes = x.numel() * 4
    assert fwd.peak_bytes < 16 * 1024
    assert grad_bytes <= both.peak_bytes < grad_bytes + 16 * 1024


# Invalid input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(logprobs=torch.zeros(2, 3, dtype=torch.long)), "logprobs must be a floating-point tensor"),
    (dict(logprobs=[[0.0]]), "logprobs must be a torch.Tensor"),
    (dict(logprobs=torch.zeros(6), old_logprobs=torch.zeros(6), advantages=torch.zeros(6), mask=torch.ones(6)),
     "logprobs must be \\[B, T\\]"),
    (dict(old_logprobs=torch.zeros(2, 4)), "old_logprobs must have shape"),
    (dict(advantages=torch.zeros(3, 2)), "advantages must have shape"),
    (dict(mask=torch.ones(2, 2)), "mask must have shape"),
    (dict(agg="mean"), "agg must be one of"),
    (dict(clip_low=-0.1), "clip_low must be finite and >= 0"),
    (dict(clip_high=float("nan")), "clip_high must be finite and >= 0"),
    (dict(dual_clip=1.0), "dual_clip must be > 1"),
    (dict(dual_clip="3"), "dual_clip must be a number"),
    (dict(normalizer=0), "normalizer must be > 0"),
    (dict(normalizer=torch.ones(2)), "normalizer must be a 0-d tensor"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(mask=torch.ones(2, 3, device="meta")), "tensors must be on one device"),
])
def test_policy_bad_input_raises_value_error(kwargs, match):
    args = dict(logprobs=torch.zeros(2, 3), old_logprobs=torch.zeros(2, 3), advantages=torch.zeros(2, 3),
                mask=torch.ones(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ppo_policy_loss(args.pop("logprobs"), args.pop("old_logprobs"), args.pop("advantages"), args.pop("mask"),
                        **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(values=torch.zeros(2, 3, dtype=torch.int32)), "values must be a floating-point tensor"),
    (dict(returns=torch.zeros(2)), "returns must have shape"),
    (dict(clip=float("inf")), "clip must be finite and >= 0"),
    (dict(agg=None), "agg must be one of"),
])
def test_value_bad_input_raises_value_error(kwargs, match):
    args = dict(values=torch.zeros(2, 3), old_values=torch.zeros(2, 3), returns=torch.zeros(2, 3),
                mask=torch.ones(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ppo_value_loss(args.pop("values"), args.pop("old_values"), args.pop("returns"), args.pop("mask"), **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(chosen=torch.zeros(3, dtype=torch.long)), "chosen must be a floating-point tensor"),
    (dict(rejected=torch.zeros(4)), "rejected must have shape"),
    (dict(margin="x"), "margin must be None, a finite number or a tensor"),
    (dict(margin=torch.zeros(2)), "margin of shape"),
    (dict(margin=float("inf")), "margin must be None, a finite number or a tensor"),
    (dict(rejected=torch.zeros(3, device="meta")), "tensors must be on one device"),
])
@pytest.mark.parametrize("backend", PAIRWISE_BACKENDS)
def test_pairwise_bad_input_raises_value_error(kwargs, match, backend):
    args = dict(chosen=torch.zeros(3), rejected=torch.zeros(3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pairwise_reward_loss(args.pop("chosen"), args.pop("rejected"), backend=backend, **args)


def test_unavailable_backend_names_itself_and_auto_picks_cpu():
    x = torch.zeros(2, 3)
    with pytest.raises(rlhf_engine.BackendUnavailable, match="backend 'cuda' cannot run ppo_policy_loss"):
        ppo_policy_loss(x, x, x, x, backend="cuda")
    with pytest.raises(rlhf_engine.BackendUnavailable, match="backend 'cpu'.*float64"):
        ppo_value_loss(x.double(), x, x, x, backend="cpu")
    registry = losses_mod.registry
    if registry.unavailable_reason(losses_mod.POLICY_OP, "cpu", x.device, x.dtype) is None:
        assert registry.resolve(losses_mod.POLICY_OP, "auto", x.device, x.dtype) == "cpu"


# torch integration ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, gen):
    logprobs, old, adv, mask = ppo_loss_inputs(gen, 3, 11)
    x = logprobs.requires_grad_()
    norm = torch.tensor(20.0)
    torch.library.opcheck(losses_mod.ppo_policy_loss_op, (x, old, adv, mask),
                          dict(clip_low=0.2, clip_high=0.3, dual_clip=3.0, agg="seq-mean-token-mean", backend=backend))
    torch.library.opcheck(losses_mod.ppo_value_loss_op, (x, old, adv, mask, norm), dict(clip=0.2, backend=backend))
    chosen = torch.randn(2, 5, generator=gen, requires_grad=True)
    rejected, margin = torch.randn(2, 2, 5, generator=gen)
    torch.library.opcheck(losses_mod.pairwise_reward_loss_op, (chosen, rejected, margin), dict(backend=backend))
    torch.library.opcheck(losses_mod.pairwise_reward_loss_backward_op,
                          (torch.tensor(0.5), chosen.detach(), rejected, margin, backend))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "triton"])
def test_torch_compile_fullgraph_matches_eager(backend, gen):
    logprobs, old, adv, mask = ppo_loss_inputs(gen, 4, 23)
    chosen, rejected = torch.randn(2, 6, generator=gen)

    def step(x):
        policy, stats = ppo_policy_loss(x, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean", backend=backend)
        value, _ = ppo_value_loss(x, old, adv, mask, normalizer=mask.sum(), backend=backend)
        reward, _ = pairwise_reward_loss(chosen, rejected * x[0, :6], margin=0.25, backend=backend)
        return policy + 0.5 * value + reward, stats["clipfrac"]

    x = logprobs.clone().requires_grad_()
    torch._dynamo.reset()
    out_c, frac_c = torch.compile(step, fullgraph=True)(x)
    (grad_c,) = torch.autograd.grad(out_c, x)
    out_e, frac_e = step(x)
    (grad_e,) = torch.autograd.grad(out_e, x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=0)
    assert frac_c.item() == frac_e.item()
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=1e-9)


# GPU ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", gpu_backends("ppo_policy_loss"))
@pytest.mark.parametrize("agg", AGGS)
def test_gpu_matches_float64(backend, agg):
    gen = torch.Generator().manual_seed(0)
    name = backend.removeprefix("gpu-")
    logprobs, old, adv, mask = ppo_loss_inputs(gen, 64, 3001)
    x_ref, loss_ref, stats_ref, scales = policy_reference(logprobs, old, adv, mask, dual_clip=3.0, agg=agg)
    x = logprobs.cuda().requires_grad_()
    with poisoned_outputs():
        loss, stats = ppo_policy_loss(x, old.cuda(), adv.cuda(), mask.cuda(), dual_clip=3.0, agg=agg, backend=name)
        loss.backward()
    assert_scalar_close(loss.detach().cpu(), loss_ref.detach(), scales["loss"], TOL, "loss")
    for key, value in stats_ref.items():
        assert_scalar_close(stats[key].cpu(), value, scales.get(key, 0), TOL, key)
    assert_close(x.grad.cpu(), torch.autograd.grad(loss_ref, x_ref)[0], TOL, "grad")
    v_ref, vloss_ref, _, _ = value_reference(logprobs, old, adv, mask, agg=agg)
    v = logprobs.cuda().requires_grad_()
    vloss, _ = ppo_value_loss(v, old.cuda(), adv.cuda(), mask.cuda(), agg=agg, backend=name)
    vloss.backward()
    assert_scalar_close(vloss.detach().cpu(), vloss_ref.detach(), 0, TOL, "value loss")
    assert_close(v.grad.cpu(), torch.autograd.grad(vloss_ref, v_ref)[0], TOL, "value grad")


@pytest.mark.parametrize("backend", gpu_backends("pairwise_reward_loss"))
def test_gpu_pairwise_matches_float64_and_is_bit_identical(backend):
    gen = torch.Generator().manual_seed(2)
    name = backend.removeprefix("gpu-")
    chosen, rejected = torch.randn(2, 100_003, generator=gen) * 30  # many tiles, a partial last one
    margin = torch.rand(100_003, generator=gen)
    check_pairwise_against_float64(chosen, rejected, margin, name, device="cuda")
    c = chosen.cuda().requires_grad_()
    runs = []
    for _ in range(2):
        loss, stats = pairwise_reward_loss(c, rejected.cuda(), margin=margin.cuda(), backend=name)
        runs.append((loss, stats["accuracy"], *torch.autograd.grad(loss, c)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    empty, _ = pairwise_reward_loss(torch.zeros(0, device="cuda"), torch.zeros(0, device="cuda"), backend=name)
    assert empty.item() == 0.0


@pytest.mark.parametrize("backend", gpu_backends("ppo_policy_loss"))
def test_gpu_cuda_graph_capture_and_bit_identical(backend):
    gen = torch.Generator().manual_seed(1)
    name = backend.removeprefix("gpu-")
    logprobs, old, adv, mask = (t.cuda() for t in ppo_loss_inputs(gen, 32, 999))
    x = logprobs.clone().requires_grad_()
    norm = mask.sum()

    def step():
        loss, stats = ppo_policy_loss(x, old, adv, mask, dual_clip=3.0, normalizer=norm, backend=name)
        loss.backward()
        return loss, stats["clipfrac"]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        x.grad = None
        eager = [t.clone() for t in step()] + [x.grad.clone()]
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
        assert torch.equal(x.grad, eager[2])
