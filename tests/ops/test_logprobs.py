"""token_logprobs on every backend against an independent float64 reference."""
import math
import os
import subprocess
import sys

import pytest
import torch

import rlhf_engine
from rlhf_engine.ops import logprobs as lp_mod
from rlhf_engine.ops import token_logprobs
from tests.helpers import (DTYPES, RESULT_TOL, ROUNDOFF, assert_close, assert_rounded_close, cpu_backends, gpu_backends,
                           poisoned_outputs)
from tests.inputs import logits_and_labels

BACKENDS = cpu_backends("token_logprobs")
IGNORE = -100
# (leading shape, V): vocab sizes that are multiples of no block size, at row
# counts the Triton interpreter gets through quickly.
SHAPES = [((3, 5), 7), ((4,), 50257), ((2,), 151936)]


def reference(logits, labels, temperature=1.0, ignore_index=IGNORE):
    """float64 (logp, entropy) with autograd, from plain log_softmax."""
    x = logits.detach().double().requires_grad_()
    log_p = torch.log_softmax(x / temperature, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    logp = log_p.gather(-1, safe[..., None])[..., 0] * valid
    entropy = -torch.where(log_p > -math.inf, log_p.exp() * log_p, 0.0).sum(-1) * valid
    return x, logp, entropy


def check_forward_backward(logits, labels, backend, temperature, tol, gen):
    """Forward values, and the gradient of each output alone and of both."""
    x_ref, logp_ref, ent_ref = reference(logits, labels, temperature)
    x = logits.clone().requires_grad_()
    with poisoned_outputs():
        logp, entropy = token_logprobs(x, labels, temperature=temperature, return_entropy=True, backend=backend)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert_close(logp, logp_ref, tol, "logp")
    assert_close(entropy, ent_ref, tol, "entropy")
    assert (logp[labels == IGNORE] == 0).all() and (entropy[labels == IGNORE] == 0).all()

    g_logp = torch.randn(labels.shape, dtype=torch.float64, generator=gen)
    g_ent = torch.randn(labels.shape, dtype=torch.float64, generator=gen)
    for name, g1, g2 in (("d logp", g_logp, 0 * g_ent), ("d entropy", 0 * g_logp, g_ent), ("d both", g_logp, g_ent)):
        (ref,) = torch.autograd.grad((logp_ref * g1 + ent_ref * g2).sum(), x_ref, retain_graph=True)
        with poisoned_outputs():
            (grad,) = torch.autograd.grad((logp * g1.float() + entropy * g2.float()).sum(), x, retain_graph=True)
        assert grad.dtype == logits.dtype
        if name == "d both":
            # The two terms can cancel element by element: normalise by their
            # sizes (half precision: one rounding of each element at most).
            parts = [torch.autograd.grad((o * g).sum(), x_ref, retain_graph=True)[0] for o, g in
                     ((logp_ref, g1), (ent_ref, g2))]
            err = (grad.double() - ref).norm() / (parts[0].norm() + parts[1].norm())
            both_tol = tol if logits.dtype == torch.float32 else 2 * ROUNDOFF[logits.dtype]
            assert err <= both_tol, f"{name}: relative error {err:.3e} > {both_tol:.1e}"
        elif logits.dtype != torch.float32:
            # The entropy term p (log p + H) cancels where log p ~ -H: allow
            # the float32 evaluation of its parts (a few ulps of each) on top
            # of the one rounding to the output dtype.
            log_p = torch.log_softmax(x_ref.detach() / temperature, -1)
            parts = log_p.exp() * (log_p.abs() + ent_ref.detach()[..., None]) * g2.abs()[..., None] / temperature
            assert_rounded_close(grad, ref, name, slack=2e-6 * parts)
        else:
            assert_close(grad, ref, tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,vocab", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64(backend, dtype, lead, vocab, temperature, gen):
    logits, labels = logits_and_labels(gen, lead, vocab, dtype)
    check_forward_backward(logits, labels, backend, temperature, RESULT_TOL[dtype], gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_common_offset(backend, dtype, gen):
    """+1e4 on every float32 logit: a float32 log-sum-exp near 1e4 is only
    good to 5e-4, so the kernels must keep the shift apart. (Half-precision
    logits get the largest offset that leaves them distinct: bf16 at 1e4
    has a resolution of 64.)"""
    offset = {torch.float32: 1e4, torch.float16: 1e3, torch.bfloat16: 1e2}[dtype]
    logits, labels = logits_and_labels(gen, (3,), 5003, dtype, scale=4.0, offset=offset)
    check_forward_backward(logits, labels, backend, 1.0, RESULT_TOL[dtype], gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_confident_rows_label_gradient(backend, dtype, gen):
    """softmax(label) >= 0.999: 1 - p must be formed in float32 before
    rounding, or the label's gradient loses all its digits in bf16."""
    vocab, rows = 1000, torch.arange(4)
    logits, labels = logits_and_labels(gen, (4,), vocab, dtype, scale=1.0, ignored=0)
    # Label logit such that p(label) is between 0.9995 and 0.9999 (>= 0.999
    # once the logit is rounded to bf16).
    others = torch.logsumexp(logits.double(), -1)
    target = 0.9995 + 0.0004 * torch.rand(4, generator=gen, dtype=torch.float64)
    logits[rows, labels] = (others + torch.log(target / (1 - target))).to(dtype)
    x_ref, logp_ref, _ = reference(logits, labels)
    assert (logp_ref.exp() >= 0.999).all()
    x = logits.clone().requires_grad_()
    token_logprobs(x, labels, backend=backend).sum().backward()
    (ref,) = torch.autograd.grad(logp_ref.sum(), x_ref)
    at_label, ref_at_label = x.grad[rows, labels].double(), ref[rows, labels]
    # One rounding to the output dtype, plus float32 evaluation of p near 1
    # (about 1e-6 at these logits; rounding p to bf16 first is off by 4e-3).
    bound = 2 * ROUNDOFF[dtype] * ref_at_label.abs() + 2e-6
    assert ((at_label - ref_at_label).abs() <= bound).all(), (at_label, ref_at_label)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_gradient_fully_written(backend, gen):
    """A gradient over 8 MiB (the CPU kernels back it with huge pages) is
    still poisoned before the call and fully written."""
    logits, labels = logits_and_labels(gen, (16,), 151936, torch.float32, ignored=3)
    x_ref, logp_ref, _ = reference(logits, labels)
    (ref,) = torch.autograd.grad(logp_ref.sum(), x_ref)
    x = logits.requires_grad_()
    with poisoned_outputs():
        token_logprobs(x, labels, backend=backend).sum().backward()
    assert_close(x.grad, ref, 1e-6, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_rows(backend):
    logits = torch.randn(3, 4, 37, requires_grad=True)
    labels = torch.full((3, 4), IGNORE)
    with poisoned_outputs():
        logp, entropy = token_logprobs(logits, labels, return_entropy=True, backend=backend)
        (logp.sum() + entropy.sum()).backward()
    assert (logp == 0).all() and (entropy == 0).all() and (logits.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=str)
def test_strided_rows_and_custom_ignore_index(backend, label_dtype, gen):
    """Rows with a stride > V (a slice of a padded buffer), a transposed
    (non-unit last stride) tensor, int32 labels and ignore_index != -100."""
    base = torch.randn(6, 101 + 5, generator=gen)
    logits = base[:, :101]
    assert logits.stride(0) == 106
    labels = torch.randint(0, 101, (6,), generator=gen).to(label_dtype)
    labels[2] = 7_000
    for x in (logits, base.t().contiguous().t()[:, :101]):
        logp = token_logprobs(x, labels, ignore_index=7_000, backend=backend)
        _, ref, _ = reference(x, labels, ignore_index=7_000)
        assert_close(logp, ref, 1e-6)
        assert logp[2] == 0


def test_zero_dim_leading_shape_and_empty_batch():
    logits = torch.randn(11)
    label = torch.tensor(4)
    _, ref, _ = reference(logits, label)
    assert_close(token_logprobs(logits, label), ref, 1e-6)
    empty = token_logprobs(torch.randn(0, 5, 11), torch.zeros(0, 5, dtype=torch.long))
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_mutates_inputs(backend, gen):
    logits = torch.randn(3, 50, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (3,), generator=gen)
    before = logits.detach().clone(), labels.clone()
    token_logprobs(logits, labels, temperature=0.5, backend=backend).sum().backward()
    assert torch.equal(logits.detach(), before[0]) and torch.equal(labels, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, gen):
    logits = torch.randn(5, 999, generator=gen, requires_grad=True)
    labels = torch.randint(0, 999, (5,), generator=gen)
    runs = []
    for _ in range(2):
        logits.grad = None
        logp, entropy = token_logprobs(logits, labels, return_entropy=True, backend=backend)
        (logp.sum() + entropy.sum()).backward()
        runs.append((logp, entropy, logits.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# Invalid input --------------------------------------------------------------------

def test_out_of_range_labels_raise_on_cpu():
    logits = torch.randn(2, 10)
    for bad in (10, -1, 1 << 40):
        with pytest.raises(ValueError, match="labels must be in \\[0, 10\\)"):
            token_logprobs(logits, torch.tensor([1, bad]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_poison_out_of_range_rows_with_nan(backend):
    """Below the value check (which GPUs skip), a bad label gives NaN in its
    row, never an out-of-bounds read or a plausible number."""
    rows = torch.randn(3, 10)
    labels = torch.tensor([1, 10, -5])
    forward = lp_mod.registry.get(lp_mod.OP, backend)
    backward = lp_mod.registry.get(lp_mod.OP_BACKWARD, backend)
    with poisoned_outputs():
        logp, entropy, stats = forward(rows, labels, 1.0, IGNORE, True)
        grad = backward(torch.ones(3), torch.ones(3), rows, labels, stats, entropy, 1.0, IGNORE)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all() and torch.isnan(entropy[1:]).all()
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1:]).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(logits=torch.zeros(2, 3, dtype=torch.long)), "logits must be a floating-point tensor"),
    (dict(logits=[[0.0]]), "logits must be a torch.Tensor"),
    (dict(labels=torch.zeros(2, dtype=torch.float32)), "labels must have dtype int64, int32"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), "labels must have shape"),
    (dict(logits=torch.zeros(2, 0)), "V > 0"),
    (dict(temperature=0.0), "temperature must be finite and > 0"),
    (dict(temperature=float("nan")), "temperature must be finite and > 0"),
    (dict(temperature=float("inf")), "temperature must be finite and > 0"),
    (dict(ignore_index=1.5), "ignore_index must be an int"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(labels=torch.zeros(2, dtype=torch.long, device="meta")), "tensors must be on one device"),
])
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(logits=torch.randn(2, 3), labels=torch.zeros(2, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        token_logprobs(args.pop("logits"), args.pop("labels"), **args)


def test_unavailable_backend_names_itself():
    with pytest.raises(rlhf_engine.BackendUnavailable, match="backend 'cuda' cannot run token_logprobs"):
        token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="cuda")
    with pytest.raises(rlhf_engine.BackendUnavailable, match="backend 'cpu'.*float64"):
        token_logprobs(torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), backend="cpu")


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    assert lp_mod.registry.resolve(lp_mod.OP, "auto", torch.device("cpu"), torch.bfloat16) == "cpu"
    assert lp_mod.registry.resolve(lp_mod.OP, "auto", torch.device("cpu"), torch.float64) == "torch"


def test_debug_checks_turn_on_value_checks_for_gpu_tensors():
    from rlhf_engine.ops import checks

    gpu = torch.device("cuda", 0)
    assert checks.value_checks_on(torch.device("cpu")) and not checks.value_checks_on(gpu)
    rlhf_engine.ops.debug_checks(True)
    try:
        assert checks.value_checks_on(gpu)
    finally:
        rlhf_engine.ops.debug_checks(False)


# torch integration -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compute_entropy", [True, False])
def test_opcheck(backend, compute_entropy, gen):
    logits = torch.randn(2, 3, 33, generator=gen, requires_grad=True)
    labels = torch.randint(0, 33, (2, 3), generator=gen)
    labels[0, 1] = IGNORE
    torch.library.opcheck(lp_mod.token_logprobs_op, (logits, labels),
                          dict(temperature=0.9, ignore_index=IGNORE, return_entropy=compute_entropy, backend=backend))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "triton"])
def test_torch_compile_fullgraph_matches_eager(backend, gen):
    logits = torch.randn(4, 6, 57, generator=gen, requires_grad=True)
    labels = torch.randint(0, 57, (4, 6), generator=gen)
    labels[1] = IGNORE

    def loss(x):
        logp, entropy = token_logprobs(x, labels, temperature=0.8, return_entropy=True, backend=backend)
        return (logp * 2 - 0.01 * entropy).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)  # inductor
    out_c = compiled(logits)
    (grad_c,) = torch.autograd.grad(out_c, logits)
    out_e = loss(logits)
    (grad_e,) = torch.autograd.grad(out_e, logits)
    # The op itself runs the same kernels; only inductor's fused sum around
    # it may round differently.
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=1e-9)


# GPU -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", gpu_backends("token_logprobs"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_float64(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    logits, labels = logits_and_labels(gen, (64,), 151936, dtype)
    x_ref, logp_ref, ent_ref = reference(logits, labels, 0.9)
    x = logits.cuda().requires_grad_()
    with poisoned_outputs():
        logp, entropy = token_logprobs(x, labels.cuda(), temperature=0.9, return_entropy=True,
                                       backend=backend.removeprefix("gpu-"))
        (logp.sum() + entropy.sum()).backward()
    assert_close(logp.cpu(), logp_ref, RESULT_TOL[dtype], "logp")
    assert_close(entropy.cpu(), ent_ref, RESULT_TOL[dtype], "entropy")
    (ref,) = torch.autograd.grad((logp_ref + ent_ref).sum(), x_ref)
    if dtype == torch.float32:
        assert_close(x.grad.cpu(), ref, RESULT_TOL[dtype], "grad")
    else:
        assert_rounded_close(x.grad.cpu(), ref, "grad")


@pytest.mark.parametrize("backend", gpu_backends("token_logprobs"))
def test_gpu_bad_labels_give_nan_or_raise_under_debug_checks(backend):
    logits = torch.randn(2, 10, device="cuda")
    labels = torch.tensor([1, 10], device="cuda")
    name = backend.removeprefix("gpu-")
    logp = token_logprobs(logits, labels, backend=name)
    assert torch.isfinite(logp[0]).item() and torch.isnan(logp[1]).item()
    rlhf_engine.ops.debug_checks(True)
    try:
        with pytest.raises(ValueError, match="labels must be in"):
            token_logprobs(logits, labels, backend=name)
    finally:
        rlhf_engine.ops.debug_checks(False)


@pytest.mark.cuda
def test_gpu_cuda_graph_capture():
    logits = torch.randn(8, 5000, device="cuda", requires_grad=True)
    labels = torch.randint(0, 5000, (8,), device="cuda")
    token_logprobs(logits, labels).sum().backward()  # warm-up (kernel compilation)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = token_logprobs(logits.detach(), labels)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out.cpu(), reference(logits.cpu(), labels.cpu())[1], 1e-6)


# Packaging -------------------------------------------------------------------------

def test_transformers_import_from_repo_root_does_not_load_our_kernels_twice():
    """transformers imports any top-level `kernels` package it can see; ours
    must stay an empty shell there, with the Triton modules loaded once, as
    rlhf_engine.kernels."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = (
        "import sys, importlib.util, transformers\n"
        "from transformers.utils import import_utils\n"
        "import_utils.is_kernels_available()\n"
        "import transformers.modeling_utils\n"
        "import rlhf_engine.ops\n"
        "from rlhf_engine.kernels import logprobs\n"
        "top = sys.modules.get('kernels')\n"
        "assert top is None or not [n for n in vars(top) if not n.startswith('__')], vars(top)\n"
        "loaded = [n for n in sys.modules if n.endswith('kernels.logprobs')]\n"
        "assert loaded == ['rlhf_engine.kernels.logprobs'], loaded\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
