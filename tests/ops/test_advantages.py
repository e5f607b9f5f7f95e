"""gae, masked_whiten and group_advantages on every backend against
hand-computed cases and the float64 torch reference."""
import pytest
import torch

import rlhf_engine
from rlhf_engine.ops import advantages as adv_mod
from rlhf_engine.ops import gae, group_advantages, masked_whiten
from tests.helpers import assert_close, cpu_backends, gpu_backends, poisoned_outputs
from tests.inputs import gae_inputs

GAE_BACKENDS = cpu_backends("gae")
WHITEN_BACKENDS = cpu_backends("masked_whiten")
GROUP_BACKENDS = cpu_backends("group_advantages")
TOL = 1e-6


def gae_float64(rewards, values, mask, gamma, lam):
    """The float64 reference of the torch backend."""
    return gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam, backend="torch")


# gae: golden cases ------------------------------------------------------------------

# (rewards, values, mask, gamma, lam, advantages, returns), worked by hand.
GOLDEN = {
    "all valid": ([0, 0, 1], [0.5, 0.5, 0.5], [1, 1, 1], 1.0, 1.0, [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]),
    # Tool tokens at 1-2 hold rewards and values that must not be used, and
    # neither add a TD error nor decay the credit: as if the row were [0, 1].
    "masked span": ([0, 9, 9, 1], [0.5, 7, 7, 0.25], [1, 0, 0, 1], 0.5, 0.5,
                    [-0.1875, 0, 0, 0.75], [0.3125, 0, 0, 1.0]),
    "one valid token": ([0, 2, 0], [0, 0.5, 0], [0, 1, 0], 0.9, 0.9, [0, 1.5, 0], [0, 2.0, 0]),
    "no valid token": ([1, 2, 3], [4, 5, 6], [0, 0, 0], 0.9, 0.9, [0, 0, 0], [0, 0, 0]),
    # delta_3 = 1 - 0.5; delta_2 = 0.9 * 0.5 - 0.5 = -0.05; A_2 = -0.05 + 0.72 * 0.5.
    "left padding": ([5, 5, 0, 1], [3, 3, 0.5, 0.5], [0, 0, 1, 1], 0.9, 0.8, [0, 0, 0.31, 0.5], [0, 0, 0.81, 1.0]),
    "right padding": ([0, 1, 5, 5], [0.5, 0.5, 3, 3], [1, 1, 0, 0], 0.9, 0.8, [0.31, 0.5, 0, 0], [0.81, 1.0, 0, 0]),
}


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("name", list(GOLDEN))
def test_gae_golden(backend, name):
    r, v, m, gamma, lam, want_adv, want_ret = GOLDEN[name]
    with poisoned_outputs():
        adv, ret = gae(torch.tensor([r], dtype=torch.float32), torch.tensor([v], dtype=torch.float32),
                       torch.tensor([m]), gamma=gamma, lam=lam, backend=backend)
    assert adv.dtype == ret.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([want_adv], dtype=torch.float32), rtol=0, atol=1e-6)
    torch.testing.assert_close(ret, torch.tensor([want_ret], dtype=torch.float32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_masked_span_equals_the_compressed_row(backend, gen):
    """Any masked positions, anywhere: the valid positions get what GAE gives
    the row with the masked positions removed."""
    T = 41
    rewards, values, _ = gae_inputs(gen, 1, T)
    mask = torch.rand(1, T, generator=gen) > 0.4
    mask[0, 5:12] = False  # a tool-output span
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9, backend=backend)
    n = int(mask.sum())
    ref_adv, ref_ret = gae_float64(rewards[mask].view(1, n), values[mask].view(1, n), torch.ones(1, n, dtype=bool),
                                   0.97, 0.9)
    assert_close(adv[mask], ref_adv[0], TOL, "advantages")
    assert_close(ret[mask], ref_ret[0], TOL, "returns")
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


# gae: float64 reference, sizes, dtypes --------------------------------------------------

@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 37), (4, 300), (2, 1030)], ids=str)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)], ids=str)
def test_gae_matches_float64(backend, B, T, gamma, lam, gen):
    rewards, values, mask = gae_inputs(gen, B, T)
    ref_adv, ref_ret = gae_float64(rewards, values, mask, gamma, lam)
    with poisoned_outputs():
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    assert_close(adv, ref_adv, TOL, "advantages")
    assert_close(ret, ref_ret, TOL, "returns")
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("block_t", [4, 16])
def test_triton_gae_scan_across_chunks(block_t, gen):
    """Chunks smaller than T: the state carried across chunks, masked runs
    crossing chunk boundaries, a last chunk only partly inside the row."""
    reason = adv_mod.registry.unavailable_reason("gae", "triton", torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(reason)
    from rlhf_engine.kernels import advantages as kernels

    rewards, values, mask = gae_inputs(gen, 3, 37)
    mask[0, 3:11] = False
    ref_adv, ref_ret = gae_float64(rewards, values, mask, 0.95, 0.9)
    with poisoned_outputs():
        adv, ret = kernels.gae(rewards, values, mask.view(torch.uint8), 0.95, 0.9, block_t=block_t)
    assert_close(adv, ref_adv, TOL, "advantages")
    assert_close(ret, ref_ret, TOL, "returns")


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gae_half_inputs_and_mask_dtypes(backend, dtype, gen):
    """Half-precision inputs are converted to float32; masks may be 0/1 floats or ints."""
    rewards, values, mask = gae_inputs(gen, 2, 9)
    rewards, values = rewards.to(dtype), values.to(dtype)
    ref_adv, ref_ret = gae_float64(rewards, values, mask, 0.9, 0.9)
    for m in (mask, mask.float(), mask.to(torch.int32)):
        adv, ret = gae(rewards, values, m, gamma=0.9, lam=0.9, backend=backend)
        assert adv.dtype == ret.dtype == torch.float32
        assert_close(adv, ref_adv, TOL, "advantages")
        assert_close(ret, ref_ret, TOL, "returns")


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)], ids=str)
def test_gae_empty(backend, shape):
    adv, ret = gae(torch.zeros(shape), torch.zeros(shape), torch.ones(shape), backend=backend)
    assert adv.shape == ret.shape == shape and adv.dtype == torch.float32


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_nan(backend, gen):
    """NaN at a valid position: NaN there and at every earlier valid position
    of its row, nowhere else. NaN at masked positions: never read."""
    rewards, values, _ = gae_inputs(gen, 2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 7:9] = False
    rewards[0, 6] = float("nan")
    values[1, 7] = rewards[1, 8] = float("nan")
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, backend=backend)
    assert torch.isnan(adv[0, :7]).all() and torch.isfinite(adv[0, 7:]).all()
    assert torch.isfinite(adv[1]).all() and torch.isfinite(ret[1]).all()
    ref_adv, _ = gae_float64(rewards, values, mask, 0.9, 0.8)
    assert_close(adv, ref_adv, TOL)
    rlhf_engine.ops.debug_checks(True)
    try:
        with pytest.raises(ValueError, match="rewards contains NaN"):
            gae(rewards, values, mask, backend=backend)
        gae(rewards[1:], values[1:], mask[1:], backend=backend)  # NaN only where masked: fine
    finally:
        rlhf_engine.ops.debug_checks(False)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_is_not_differentiable_and_does_not_mutate(backend, gen):
    rewards, values, mask = gae_inputs(gen, 2, 6)
    values.requires_grad_()
    before = rewards.clone(), values.detach().clone()
    adv, ret = gae(rewards, values, mask, backend=backend)
    assert not adv.requires_grad and not ret.requires_grad
    assert torch.equal(rewards, before[0]) and torch.equal(values.detach(), before[1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(rewards=torch.zeros(2, 3, dtype=torch.long)), "rewards must be a floating-point tensor"),
    (dict(values=[[0.0]]), "values must be a torch.Tensor"),
    (dict(rewards=torch.zeros(6)), "rewards must be \\[B, T\\]"),
    (dict(values=torch.zeros(2, 4)), "values must have the shape of rewards"),
    (dict(mask=torch.ones(3, 2)), "mask must have shape"),
    (dict(gamma=1.5), "gamma must be in \\[0, 1\\]"),
    (dict(lam=float("nan")), "lam must be in \\[0, 1\\]"),
    (dict(gamma="x"), "gamma must be a number"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(mask=torch.ones(2, 3, device="meta")), "tensors must be on one device"),
])
def test_gae_bad_input_raises_value_error(kwargs, match):
    args = dict(rewards=torch.zeros(2, 3), values=torch.zeros(2, 3), mask=torch.ones(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


def test_unavailable_backend_names_itself():
    with pytest.raises(rlhf_engine.BackendUnavailable, match="backend 'cuda' cannot run gae"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), backend="cuda")
    with pytest.raises(rlhf_engine.BackendUnavailable, match="backend 'cpu'.*float64"):
        masked_whiten(torch.zeros(2, dtype=torch.float64), torch.ones(2), backend="cpu")


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    for op in ("gae", "masked_whiten", "group_advantages"):
        reason = adv_mod.registry.unavailable_reason(op, "cpu", torch.device("cpu"), torch.float32)
        want = "torch" if reason else "cpu"
        assert adv_mod.registry.resolve(op, "auto", torch.device("cpu"), torch.float32) == want
        assert adv_mod.registry.resolve(op, "auto", torch.device("cpu"), torch.float64) == "torch"


# masked_whiten ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", WHITEN_BACKENDS)
def test_whiten_golden(backend):
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, -99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # mean 2.5, unbiased variance 5/3
    scale = (5.0 / 3.0 + 1e-8) ** -0.5
    want = torch.tensor([[-1.5 * scale, -0.5 * scale, 0.0], [0.5 * scale, 1.5 * scale, 0.0]])
    with poisoned_outputs():
        torch.testing.assert_close(masked_whiten(x, mask, backend=backend), want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False, backend=backend),
                                   torch.where(mask.bool(), want + 2.5, 0.0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", WHITEN_BACKENDS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_fewer_than_two_valid(backend, shift_mean):
    x = torch.tensor([[5.0, float("nan"), 7.0]])
    one = masked_whiten(x, torch.tensor([[0, 0, 1]]), shift_mean=shift_mean, backend=backend)
    torch.testing.assert_close(one, torch.tensor([[0.0, 0.0, 0.0 if shift_mean else 7.0]]))
    none = masked_whiten(x, torch.zeros(1, 3), shift_mean=shift_mean, backend=backend)
    assert (none == 0).all()


@pytest.mark.parametrize("backend", WHITEN_BACKENDS)
@pytest.mark.parametrize("shape", [(7,), (3, 37), (2, 3, 130), (300, 5)], ids=str)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_float64(backend, shape, shift_mean, gen):
    """Large common offsets too: the variance is summed around the mean."""
    x = torch.randn(shape, generator=gen) * 3 + 1e3
    mask = torch.rand(shape, generator=gen) > 0.3
    ref = masked_whiten(x.double(), mask, shift_mean=shift_mean, backend="torch")
    with poisoned_outputs():
        out = masked_whiten(x, mask, shift_mean=shift_mean, backend=backend)
    assert out.dtype == torch.float32 and out.shape == shape
    assert_close(out, ref, TOL)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("backend", WHITEN_BACKENDS)
def test_whiten_deterministic_empty_and_nan(backend, gen):
    x = torch.randn(64, 129, generator=gen)
    mask = torch.rand(64, 129, generator=gen) > 0.5
    assert torch.equal(masked_whiten(x, mask, backend=backend), masked_whiten(x, mask, backend=backend))
    assert masked_whiten(torch.zeros(0, 4), torch.zeros(0, 4), backend=backend).shape == (0, 4)
    x[3, 4] = float("nan")
    mask[3, 5] = False
    x[3, 5] = float("nan")
    mask[3, 4] = True
    out = masked_whiten(x, mask, backend=backend)
    assert torch.isnan(out[mask]).all() and (out[~mask] == 0).all()


def test_whiten_bad_input():
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        masked_whiten(torch.zeros(3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_whiten(torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        masked_whiten(torch.zeros(3), torch.ones(3), eps=-1.0)


# group_advantages -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", GROUP_BACKENDS)
def test_group_golden(backend):
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    with poisoned_outputs():
        out = group_advantages(scores, 3, eps=0.0 + 1e-6, backend=backend)
        centered = group_advantages(scores, 3, normalize_std=False, backend=backend)
        single = group_advantages(scores, 1, backend=backend)
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-6))
    torch.testing.assert_close(centered, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert (single == 0).all()


@pytest.mark.parametrize("backend", GROUP_BACKENDS)
@pytest.mark.parametrize("n,group_size", [(1, 1), (12, 4), (35, 7), (48, 16), (2100, 1050)], ids=str)
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_matches_float64(backend, n, group_size, normalize_std, gen):
    scores = torch.randn(n, generator=gen) * 2 + 10
    ref = group_advantages(scores.double(), group_size, normalize_std=normalize_std, backend="torch")
    with poisoned_outputs():
        out = group_advantages(scores, group_size, normalize_std=normalize_std, backend=backend)
    assert out.dtype == torch.float32
    assert_close(out, ref, TOL)


@pytest.mark.parametrize("backend", GROUP_BACKENDS)
def test_group_empty_and_nan(backend):
    assert group_advantages(torch.zeros(0), 4, backend=backend).shape == (0,)
    scores = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    out = group_advantages(scores, 2, backend=backend)
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2:]).all()
    rlhf_engine.ops.debug_checks(True)
    try:
        with pytest.raises(ValueError, match="scores contains NaN"):
            group_advantages(scores, 2, backend=backend)
        with pytest.raises(ValueError, match="x contains NaN"):
            masked_whiten(scores, torch.ones(4), backend=backend)
        masked_whiten(scores, torch.tensor([1, 0, 1, 1]), backend=backend)  # NaN only where masked: fine
    finally:
        rlhf_engine.ops.debug_checks(False)


@pytest.mark.parametrize("group_size,match", [
    (4, "not a multiple of group_size=4"), (0, "group_size must be an int >= 1"),
    (2.0, "group_size must be an int >= 1"), (True, "group_size must be an int >= 1"),
])
def test_group_bad_input(group_size, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(6), group_size)
    with pytest.raises(ValueError, match="scores must be \\[N\\]"):
        group_advantages(torch.zeros(2, 3), 3)


# torch integration ------------------------------------------------------------------------

def _op_cases(backend, gen):
    rewards, values, mask = gae_inputs(gen, 3, 11)
    return [
        (adv_mod.gae_op, (rewards, values, mask), dict(gamma=0.9, lam=0.8, backend=backend)),
        (adv_mod.masked_whiten_op, (rewards, mask), dict(shift_mean=False, eps=1e-8, backend=backend)),
        (adv_mod.group_advantages_op, (rewards[0, :9].contiguous(), 3), dict(eps=1e-6, backend=backend)),
    ]


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_opcheck(backend, gen):
    for op, args, kwargs in _op_cases(backend, gen):
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("backend", [p for p in GAE_BACKENDS if p.id != "triton"])
def test_torch_compile_fullgraph_matches_eager(backend, gen):
    rewards, values, mask = gae_inputs(gen, 4, 13)
    scores = torch.randn(8, generator=gen)

    def pipeline(r, v, s):
        adv, ret = gae(r, v, mask, gamma=0.99, lam=0.95, backend=backend)
        return masked_whiten(adv, mask, backend=backend), ret * 2, group_advantages(s, 4, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(pipeline, fullgraph=True)  # inductor
    for out_c, out_e in zip(compiled(rewards, values, scores), pipeline(rewards, values, scores)):
        torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=0)


# GPU ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", gpu_backends("gae"))
def test_gpu_matches_float64(backend):
    gen = torch.Generator().manual_seed(0)
    name = backend.removeprefix("gpu-")
    rewards, values, mask = gae_inputs(gen, 64, 4099)
    mask[2, 1000:3000] = False
    ref_adv, ref_ret = gae_float64(rewards, values, mask, 0.99, 0.95)
    with poisoned_outputs():
        adv, ret = gae(rewards.cuda(), values.cuda(), mask.cuda(), gamma=0.99, lam=0.95, backend=name)
    assert_close(adv.cpu(), ref_adv, TOL, "advantages")
    assert_close(ret.cpu(), ref_ret, TOL, "returns")
    x = torch.randn(64, 4099, generator=gen) + 100
    ref = masked_whiten(x.double(), mask, backend="torch")
    out = masked_whiten(x.cuda(), mask.cuda(), backend=name)
    assert_close(out.cpu(), ref, TOL, "whiten")
    assert torch.equal(out, masked_whiten(x.cuda(), mask.cuda(), backend=name))
    scores = torch.randn(4096, generator=gen)
    for group_size in (1, 5, 64, 512):
        n = 4096 // group_size * group_size
        ref = group_advantages(scores[:n].double(), group_size, backend="torch")
        assert_close(group_advantages(scores[:n].cuda(), group_size, backend=name).cpu(), ref, TOL, "group")


@pytest.mark.cuda
def test_gpu_cuda_graph_capture():
    rewards, values = torch.randn(8, 500, device="cuda"), torch.randn(8, 500, device="cuda")
    mask = torch.rand(8, 500, device="cuda") > 0.3
    for backend in ("triton", "cuda"):
        gae(rewards, values, mask, backend=backend)  # warm-up (kernel compilation)
        masked_whiten(rewards, mask, backend=backend)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            adv, _ = gae(rewards, values, mask, gamma=0.9, backend=backend)
            white = masked_whiten(adv, mask, backend=backend)
        graph.replay()
        torch.cuda.synchronize()
        ref_adv, _ = gae_float64(rewards.cpu(), values.cpu(), mask.cpu(), 0.9, 1.0)
        assert_close(adv.cpu(), ref_adv, TOL)
        assert_close(white.cpu(), masked_whiten(ref_adv, mask.cpu(), backend="torch"), TOL)
