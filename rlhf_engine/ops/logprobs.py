"""token_logprobs: log-probabilities of given tokens (and entropy) from logits.

Layout of this module, top to bottom:

1. the torch reference (readable math; float64 in, float64 out for tests),
2. the adapters of the cpu, triton and cuda kernels, all with one signature:
   ``forward(rows [N, V], labels [N], T, ignore_index, compute_entropy)
   -> (logp [N], entropy [N] or [0], stats [N, 2])`` and
   ``backward(g_logp [N], g_ent [N] or None, rows, labels, stats, entropy, T,
   ignore_index) -> grad [N, V]`` (contiguous, dtype of the logits), and
   ``backward_inplace`` of the same signature, which may write the gradient
   over ``rows`` (what ``linear_token_logprobs`` uses on its dead chunks),
3. the custom ops ``torch.ops.rlhf_engine.token_logprobs`` (the public op's
   arguments and defaults; validation and backend choice happen in it) and
   ``token_logprobs_backward``, with fake kernels and autograd,
4. the public function :func:`token_logprobs` (the op's first outputs).

Only per-row statistics (a shift and a log-sum, the entropy) are saved for
backward.
"""
from typing import Optional

import torch

from rlhf_engine import _native
from rlhf_engine.ops import checks, registry

OP = "token_logprobs"
OP_BACKWARD = "token_logprobs_backward"
OP_BACKWARD_INPLACE = "token_logprobs_backward_inplace"
_LABEL_DTYPES = (torch.int64, torch.int32)
# Rows per slice of the torch reference, so it never upcasts more than about
# 2^24 logits at once.
_TORCH_SLICE_ELEMENTS = 1 << 24


# 1. torch reference -----------------------------------------------------------
# The per-row statistics saved for backward are, as in the kernels
# (csrc/include/rlhf_engine/logprobs.h), stats [N, 2] = (m2, l2) in base-2
# units: with c = log2(e) / T, log2 p = x * c - m2 - l2. The reference works
# on slices of rows; the shifted exponent x * c - m2 is formed in float64
# (exact, so a +1e4 offset costs no digits) and everything after it in the
# accumulation dtype: float32, or float64 for float64 logits.

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _row_masks(labels, vocab, ignore_index):
    """(ignored [N], valid [N], labels clamped into [0, V) as int64 [N])."""
    ignored = labels == ignore_index
    valid = ~ignored & (labels >= 0) & (labels < vocab)
    return ignored, valid, torch.where(valid, labels, 0).long()


def _acc_dtype(rows):
    return torch.float64 if rows.dtype == torch.float64 else torch.float32


def _row_slices(rows):
    step = max(1, _TORCH_SLICE_ELEMENTS // rows.shape[1])
    return [slice(s, s + step) for s in range(0, rows.shape[0], step)]


def _log2_p(x, stats, c, acc):
    """log2 softmax(x / T) [n, V] from x [n, V] and saved stats [n, 2]."""
    m2, l2 = stats.double().unbind(-1)
    return (x.double() * c - m2[:, None]).to(acc) - l2[:, None].to(acc)


@registry.register(OP, "torch")
def _torch_forward(rows, labels, temperature, ignore_index, compute_entropy):
    """Reference forward on [N, V] rows (see the module docstring)."""
    n, vocab = rows.shape
    acc = _acc_dtype(rows)
    c = LOG2E / temperature
    ignored, valid, safe = _row_masks(labels, vocab, ignore_index)
    logp = torch.empty(n, dtype=acc, device=rows.device)
    stats = torch.zeros(n, 2, dtype=acc, device=rows.device)
    entropy = torch.empty(n if compute_entropy else 0, dtype=acc, device=rows.device)
    for s in _row_slices(rows):
        stats[s, 0] = (rows[s].amax(-1).double() * c).to(acc)  # the shift, as stored
        shifted = _log2_p(rows[s], stats[s], c, acc)  # l2 = 0 so far
        stats[s, 1] = torch.exp2(shifted).sum(-1, dtype=torch.float64).log2().to(acc)
        log2_p = shifted - stats[s, 1:]
        logp[s] = log2_p.gather(1, safe[s, None])[:, 0] * LN2
        if compute_entropy:
            p = torch.exp2(log2_p)
            entropy[s] = -LN2 * torch.where(p > 0, p * log2_p, 0.0).sum(-1, dtype=torch.float64).to(acc)
    nan = torch.tensor(float("nan"), dtype=acc, device=rows.device)
    logp = torch.where(ignored, 0.0, torch.where(valid, logp, nan))
    if compute_entropy:
        entropy = torch.where(ignored, 0.0, torch.where(valid, entropy, nan))
    return logp, entropy, torch.where(ignored[:, None], 0.0, stats)


@registry.register(OP_BACKWARD, "torch")
@registry.register(OP_BACKWARD_INPLACE, "torch")
def _torch_backward(g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index):
    """Reference backward: grad [N, V] in the dtype of ``rows``."""
    vocab = rows.shape[1]
    acc = _acc_dtype(rows)
    c = LOG2E / temperature
    ignored, valid, safe = _row_masks(labels, vocab, ignore_index)
    grad = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    for s in _row_slices(rows):
        log2_p = _log2_p(rows[s], stats[s], c, acc)
        p = torch.exp2(log2_p)
        g = -g_logp[s, None].to(acc) * p
        # The label's entry: g_logp * (1 - p) with 1 - p formed before rounding.
        g.scatter_add_(1, safe[s, None], g_logp[s, None].to(acc))
        if g_ent is not None:
            g -= g_ent[s, None].to(acc) * p * (log2_p * LN2 + entropy[s, None].to(acc))
        g = torch.where(valid[s, None], g / temperature, float("nan"))
        grad[s] = torch.where(ignored[s, None], 0.0, g).to(rows.dtype)
    return grad


# 2. kernel adapters -------------------------------------------------------------
# cpu: the ATen-based kernel of csrc/cpu/logprobs.cpp (torch-only), through its
# torch.ops.rlhf_engine_cpu bindings; cuda: the plain entry points of
# logprobs.h through _native.call; triton: kernels/logprobs.py.
# OP_BACKWARD_INPLACE is the backward that may write the gradient over
# ``rows`` (contiguous, and dead after the call: a recomputed chunk of logits)
# where the kernel can (cpu, cuda), else into a new buffer; it returns the
# gradient either way.

@registry.register(OP, "cpu", requires=_native.CPU_ERROR)
def _cpu_forward(rows, labels, temperature, ignore_index, compute_entropy):
    return torch.ops.rlhf_engine_cpu.token_logprobs_forward(rows, labels, temperature, ignore_index, compute_entropy)


@registry.register(OP_BACKWARD, "cpu", requires=_native.CPU_ERROR)
def _cpu_backward(g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index):
    return torch.ops.rlhf_engine_cpu.token_logprobs_backward(
        g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index)


@registry.register(OP_BACKWARD_INPLACE, "cpu", requires=_native.CPU_ERROR)
def _cpu_backward_inplace(g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index):
    torch.ops.rlhf_engine_cpu.token_logprobs_backward_(rows, g_logp, g_ent, labels, stats, entropy, temperature,
                                                        ignore_index)
    return rows


@registry.register(OP, "triton")
def _triton_forward(rows, labels, temperature, ignore_index, compute_entropy):
    from rlhf_engine.kernels import logprobs as kernels

    return kernels.token_logprobs_forward(rows, labels, temperature, ignore_index, compute_entropy)


@registry.register(OP_BACKWARD, "triton")
@registry.register(OP_BACKWARD_INPLACE, "triton")
def _triton_backward(g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index):
    from rlhf_engine.kernels import logprobs as kernels

    return kernels.token_logprobs_backward(g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index)


@registry.register(OP, "cuda", requires=_native.CUDA_ERROR)
def _cuda_forward(rows, labels, temperature, ignore_index, compute_entropy):
    n, vocab = rows.shape
    logp = torch.empty(n, dtype=torch.float32, device=rows.device)
    stats = torch.empty(n, 2, dtype=torch.float32, device=rows.device)
    entropy = torch.empty(n if compute_entropy else 0, dtype=torch.float32, device=rows.device)
    _native.call(rows.device, "rlhf_token_logprobs_forward", rows, _native.DTYPE_CODES[rows.dtype], n, vocab,
                 rows.stride(0), labels, labels.dtype == torch.int64, temperature, ignore_index, logp,
                 entropy if compute_entropy else None, stats)
    return logp, entropy, stats


def _cuda_backward_into(grad, g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index):
    """The CUDA backward written into ``grad`` (contiguous [N, V]; may be ``rows``)."""
    n, vocab = rows.shape
    _native.call(rows.device, "rlhf_token_logprobs_backward", g_logp, g_ent, rows, _native.DTYPE_CODES[rows.dtype],
                 n, vocab, rows.stride(0), labels, labels.dtype == torch.int64, stats,
                 entropy if g_ent is not None else None, temperature, ignore_index, grad)
    return grad


@registry.register(OP_BACKWARD, "cuda", requires=_native.CUDA_ERROR)
def _cuda_backward(g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index):
    grad = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    return _cuda_backward_into(grad, g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index)


@registry.register(OP_BACKWARD_INPLACE, "cuda", requires=_native.CUDA_ERROR)
def _cuda_backward_inplace(g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index):
    return _cuda_backward_into(rows, g_logp, g_ent, rows, labels, stats, entropy, temperature, ignore_index)


# 3. custom ops -------------------------------------------------------------------

def _as_rows(logits, labels):
    """[..., V] logits -> [N, V] with unit stride along V (a view when possible);
    labels -> contiguous [N]."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, labels.reshape(-1).contiguous()


def check_label_values(labels, vocab, ignore_index):
    """ValueError when a label is outside [0, vocab) and not ignore_index (CPU
    tensors, or any under debug_checks(True); else nothing is checked)."""
    if not checks.value_checks_on(labels.device):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"{int(bad.sum())} are not (first: {first})")


def check_inputs(logits, labels, temperature, ignore_index):
    """Static checks of token_logprobs' inputs (ValueError naming the argument);
    run by the public function, the custom op and its fake kernel."""
    checks.tensor("logits", logits, kind="float")
    checks.tensor("labels", labels, dtypes=_LABEL_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    checks.same_device(logits=logits, labels=labels)
    temperature = checks.positive_float("temperature", temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    return temperature


def _out_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("rlhf_engine::token_logprobs", mutates_args=())
def token_logprobs_op(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                      ignore_index: int = -100, return_entropy: bool = False,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rlhf_engine.token_logprobs``: the public op's arguments;
    returns (logp, entropy, stats): logp and entropy float32 of
    ``labels.shape`` (entropy is empty [0] unless ``return_entropy``); stats
    ``labels.shape + (2,)``, the per-row statistics backward needs (see
    section 1)."""
    temperature = check_inputs(logits, labels, temperature, ignore_index)
    backend = registry.resolve(OP, backend, logits.device, logits.dtype)
    rows, flat_labels = _as_rows(logits, labels)
    check_label_values(flat_labels, rows.shape[1], ignore_index)
    forward = registry.get(OP, backend)
    logp, entropy, stats = forward(rows, flat_labels, temperature, ignore_index, return_entropy)
    out_dtype = _out_dtype(logits)
    shape = labels.shape
    entropy = entropy.to(out_dtype).view(shape) if return_entropy else entropy.to(out_dtype)
    return logp.to(out_dtype).view(shape), entropy, stats.to(out_dtype).view(*shape, 2)


@token_logprobs_op.register_fake
def _(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, backend="auto"):
    check_inputs(logits, labels, temperature, ignore_index)
    dtype = _out_dtype(logits)
    logp = logits.new_empty(labels.shape, dtype=dtype)
    entropy = logits.new_empty(labels.shape if return_entropy else (0,), dtype=dtype)
    return logp, entropy, logits.new_empty((*labels.shape, 2), dtype=dtype)


@torch.library.custom_op("rlhf_engine::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor], logits: torch.Tensor,
                               labels: torch.Tensor, stats: torch.Tensor, entropy: Optional[torch.Tensor],
                               temperature: float, ignore_index: int, backend: str) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` (its shape and dtype, contiguous); ``backend`` a resolved one."""
    rows, flat_labels = _as_rows(logits, labels)
    flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
    backward = registry.get(OP_BACKWARD, backend)
    grad = backward(flat(grad_logp), flat(grad_entropy), rows, flat_labels, stats.reshape(-1, 2).contiguous(),
                    flat(entropy), temperature, ignore_index)
    return grad.view(logits.shape)


@token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    logits, labels = inputs
    kw = keyword_only_inputs
    _, entropy, stats = output
    ctx.save_for_backward(logits, labels, stats, entropy if kw["return_entropy"] else None)
    backend = registry.resolve(OP, kw["backend"], logits.device, logits.dtype)
    ctx.args = (float(kw["temperature"]), kw["ignore_index"], kw["return_entropy"], backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_stats):
    logits, labels, stats, entropy = ctx.saved_tensors
    temperature, ignore_index, return_entropy, backend = ctx.args
    dtype = stats.dtype
    grad_logp = stats.new_zeros(labels.shape) if grad_logp is None else grad_logp.to(dtype)
    grad_entropy = None if not return_entropy or grad_entropy is None else grad_entropy.to(dtype)
    grad = token_logprobs_backward_op(grad_logp, grad_entropy, logits, labels, stats, entropy,
                                      temperature, ignore_index, backend)
    return grad, None


token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# 4. public function --------------------------------------------------------------

def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, backend="auto"):
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32 (float64 on the
            torch backend); any strides.
        labels: ``logits.shape[:-1]``, int64 or int32; ``ignore_index``
            marks positions to skip.
        temperature: divides the logits (finite, > 0).
        return_entropy: also return the entropy of each position's softmax.
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        ``logp`` float32 of ``labels.shape`` (0.0 where ignored), and with
        ``return_entropy`` the tuple ``(logp, entropy)``. Differentiable
        w.r.t. ``logits`` through both; the gradient has the logits' dtype.
        Labels outside ``[0, V)`` raise ValueError on CPU tensors; on GPU
        tensors they give NaN (ValueError under ``debug_checks(True)``).
    """
    temperature = check_inputs(logits, labels, temperature, ignore_index)
    logp, entropy, _ = token_logprobs_op(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                         return_entropy=bool(return_entropy), backend=backend)
    return (logp, entropy) if return_entropy else logp
