"""linear_token_logprobs on every backend against a float64 reference built
from the full logits (hidden @ weight.T + bias, log_softmax, gather)."""
import math

import pytest
import torch

from rlhf_engine import profiling
from rlhf_engine.ops import linear_logprobs as lin_mod
from rlhf_engine.ops import linear_token_logprobs, token_logprobs
from tests.helpers import assert_close, cpu_backends, gpu_backends, poisoned_outputs, rel_error
from tests.inputs import linear_head_inputs

BACKENDS = cpu_backends("linear_token_logprobs")
IGNORE = -100
TOL = 1e-5  # float32 results and gradients against float64 (issue #4)


def reference(hidden, weight, bias, labels, temperature=1.0):
    """float64 (leaves, logp, entropy) with autograd, from the full logits."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    logits = h @ w.t() + (b if b is not None else 0)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    valid = labels != IGNORE
    logp = log_p.gather(-1, torch.where(valid, labels, 0)[..., None])[..., 0] * valid
    entropy = -torch.where(log_p > -math.inf, log_p.exp() * log_p, 0.0).sum(-1) * valid
    return leaves, logp, entropy


def run(hidden, weight, bias, labels, backend, g_logp, g_ent, **kwargs):
    """(logp, entropy, grads of hidden / weight / bias) of sum(g_logp*logp + g_ent*entropy)."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    with poisoned_outputs():
        logp, entropy = linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True,
                                              backend=backend, **kwargs)
        loss = (logp * g_logp.float() + entropy * g_ent.float()).sum()
        grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return logp, entropy, grads


def check(hidden, weight, bias, labels, backend, gen, temperature=1.0, **kwargs):
    leaves, logp_ref, ent_ref = reference(hidden, weight, bias, labels, temperature)
    g_logp = torch.randn(labels.shape, dtype=torch.float64, generator=gen).to(labels.device)
    g_ent = torch.randn(labels.shape, dtype=torch.float64, generator=gen).to(labels.device)
    refs = torch.autograd.grad((logp_ref * g_logp + ent_ref * g_ent).sum(), [t for t in leaves if t is not None])
    logp, entropy, grads = run(hidden, weight, bias, labels, backend, g_logp, g_ent, temperature=temperature,
                               **kwargs)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert_close(logp, logp_ref, TOL, "logp")
    assert_close(entropy, ent_ref, TOL, "entropy")
    assert (logp[labels == IGNORE] == 0).all() and (entropy[labels == IGNORE] == 0).all()
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, refs):
        assert grad.dtype == hidden.dtype
        assert_close(grad, ref, TOL, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,hidden_size,vocab,chunk_size", [
    ((13,), 100, 257, 4),       # H not a multiple of 128, V odd, N not a multiple of the chunk
    ((1,), 33, 1001, None),     # N = 1, chosen chunk size
    ((2, 3), 64, 31, 1),        # leading [B, T], one row per chunk
    ((5,), 130, 77, 64),        # chunk larger than N
], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64(backend, lead, hidden_size, vocab, chunk_size, temperature, gen):
    case = linear_head_inputs(gen, lead, hidden_size, vocab)
    check(*case, backend, gen, temperature=temperature, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias_and_all_ignored_chunk(backend, gen):
    hidden, weight, _, labels = linear_head_inputs(gen, (9,), 48, 123, bias=False, ignored=4)
    check(hidden, weight, None, labels, backend, gen, chunk_size=4)  # rows 0-3: a fully ignored chunk


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend, gen):
    hidden, weight, bias, labels = linear_head_inputs(gen, (3, 2), 16, 29, ignored=6)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    with poisoned_outputs():
        logp, entropy = linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                              chunk_size=4, backend=backend)
        (logp.sum() + entropy.sum()).backward()
    assert (logp == 0).all() and (entropy == 0).all()
    assert all((t.grad == 0).all() for t in leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_token_logprobs_bitwise_on_one_chunk(backend, gen):
    """One chunk: the same logits reach the same kernel as token_logprobs."""
    hidden, weight, bias, labels = linear_head_inputs(gen, (6,), 40, 91)
    ours = linear_token_logprobs(hidden, weight, labels, bias=bias, chunk_size=6, backend=backend)
    theirs = token_logprobs(torch.addmm(bias, hidden, weight.t()), labels, backend=backend)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_accumulate_weight_grad_in_float32(backend, gen):
    """bf16 hidden/weight/bias: gradients in bf16, the weight and bias ones
    summed over 64 one-row chunks in float32 and rounded once (a bf16 running
    sum would drift by about sqrt(64) roundings)."""
    hidden, weight, bias, labels = linear_head_inputs(gen, (64,), 32, 50, dtype=torch.bfloat16, ignored=0)
    leaves, logp_ref, _ = reference(hidden, weight, bias, labels)
    refs = torch.autograd.grad(logp_ref.sum(), leaves)
    x = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logp = linear_token_logprobs(x[0], x[1], labels, bias=x[2], chunk_size=1, backend=backend)
    grads = torch.autograd.grad(logp.sum(), x)
    # The logits themselves are rounded to bf16 by the matmul: a few roundings.
    assert rel_error(logp, logp_ref) < 2**-6
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, refs):
        assert grad.dtype == torch.bfloat16
        assert rel_error(grad, ref) < 2**-5, name
    # The float32 sum over chunks is the sum of the per-chunk bf16 products.
    chunks = [torch.autograd.grad(linear_token_logprobs(x[0][i:i + 1], x[1], labels[i:i + 1], bias=x[2],
                                                        backend=backend).sum(), x[2])[0] for i in range(64)]
    assert torch.equal(grads[2], torch.stack(chunks).float().sum(0).bfloat16())


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id == "cpu"])
def test_peak_memory_is_one_chunk_of_logits(backend, gen):
    """Forward + backward hold one chunk_size x V buffer of logits (the cpu
    backend writes their gradient in place), never N x V, beyond the inputs
    and the gradients."""
    n, hidden_size, vocab, chunk = 1024, 8, 4001, 16
    hidden, weight, bias, labels = linear_head_inputs(gen, (n,), hidden_size, vocab)
    for t in (hidden, weight, bias):
        t.requires_grad_()

    def step():
        logp = linear_token_logprobs(hidden, weight, labels, bias=bias, chunk_size=chunk, backend=backend)
        logp.sum().backward()

    step()
    for t in (hidden, weight, bias):
        t.grad = None
    _, stats = profiling.peak_memory(step)
    grads = 4 * (n * hidden_size + vocab * hidden_size + vocab)
    chunk_logits = chunk * vocab * 4
    assert stats.peak_bytes <= grads + chunk_logits + (1 << 16), stats
    assert stats.peak_bytes - grads < n * vocab * 4 / 32, stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_mutates_inputs_and_deterministic(backend, gen):
    case = linear_head_inputs(gen, (7,), 24, 61)
    before = [t.clone() for t in case]
    runs = [run(*case, backend, torch.ones(7), torch.ones(7), chunk_size=3) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(case, before))
    for a, b in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)


def test_nan_hidden_gives_nan_rows():
    hidden, weight, bias, labels = linear_head_inputs(torch.Generator().manual_seed(0), (4,), 8, 11, ignored=0)
    hidden[2, 3] = float("nan")
    logp = linear_token_logprobs(hidden, weight, labels, bias=bias, chunk_size=2)
    assert torch.isnan(logp[2]) and torch.isfinite(logp[[0, 1, 3]]).all()


def test_empty_batch():
    weight = torch.randn(11, 8, requires_grad=True)
    hidden = torch.randn(0, 5, 8, requires_grad=True)
    logp = linear_token_logprobs(hidden, weight, torch.zeros(0, 5, dtype=torch.long))
    assert logp.shape == (0, 5)
    logp.sum().backward()
    assert (weight.grad == 0).all() and hidden.grad.shape == hidden.shape


def test_default_chunk_size_fits_the_budget():
    rows = lin_mod.default_chunk_size(1 << 20, 32000, "cpu")
    assert 1 <= rows and rows * 32000 * 4 <= 256 << 20
    assert lin_mod.default_chunk_size(3, 32000, "cpu") == 3


# Invalid input --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden=torch.randn(3, 7)), "hidden must be"),
    (dict(weight=torch.randn(10)), "weight must be"),
    (dict(weight=torch.randn(10, 8, dtype=torch.float64)), "weight must have the dtype"),
    (dict(labels=torch.zeros(4, dtype=torch.long)), "labels must have shape"),
    (dict(labels=torch.zeros(3)), "labels must have dtype"),
    (dict(bias=torch.randn(9)), "bias must be"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.0), "chunk_size"),
    (dict(temperature=0.0), "temperature"),
    (dict(ignore_index=1.5), "ignore_index"),
    (dict(backend="nope"), "backend"),
    (dict(labels=torch.tensor([0, 10, 1])), "labels must be in"),
])
def test_bad_inputs_raise(kwargs, match):
    args = dict(hidden=torch.randn(3, 8), weight=torch.randn(10, 8), labels=torch.zeros(3, dtype=torch.long))
    args.update(kwargs)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        linear_token_logprobs(hidden, weight, labels, **args)


# Custom op -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias,compute_entropy", [(True, True), (False, False)])
def test_opcheck(backend, with_bias, compute_entropy, gen):
    hidden, weight, bias, labels = linear_head_inputs(gen, (5,), 12, 19, bias=with_bias)
    for t in (hidden, weight, bias):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(lin_mod.linear_token_logprobs_op, (hidden, weight, labels, bias),
                          dict(temperature=0.9, ignore_index=IGNORE, return_entropy=compute_entropy, chunk_size=2,
                               backend=backend))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "triton"])
def test_torch_compile_fullgraph_matches_eager(backend, gen):
    hidden, weight, bias, labels = linear_head_inputs(gen, (2, 5), 24, 57)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]

    def loss(h, w, b):
        logp, entropy = linear_token_logprobs(h, w, labels, bias=b, temperature=0.8, return_entropy=True,
                                              backend=backend)
        return (logp * 2 - 0.01 * entropy).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    out_c = compiled(*leaves)
    grads_c = torch.autograd.grad(out_c, leaves)
    out_e = loss(*leaves)
    grads_e = torch.autograd.grad(out_e, leaves)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=0)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-9)


# GPU -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", gpu_backends("linear_token_logprobs"))
def test_gpu_matches_float64(backend, gen):
    hidden, weight, bias, labels = (t.cuda() for t in linear_head_inputs(gen, (37,), 100, 1001))
    check(hidden, weight, bias, labels, backend, gen, temperature=0.9, chunk_size=8)
