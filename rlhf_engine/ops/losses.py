"""PPO policy and value losses and the pairwise reward-model loss.

Layout of this module, top to bottom:

1. the torch reference (readable math; float64 in, float64 out for tests),
2. the adapters of the cpu, triton and cuda kernels, all with one signature
   for both PPO losses (``kind`` is "policy" or "value"):
   ``forward(kind, x, old, target, mask [B, T], normalizer [] or None,
   params, agg) -> (loss [], stats [4], partials [B, 5])`` and
   ``backward(kind, grad_loss [], x, old, target, mask, params, agg,
   partials, stats) -> grad [B, T]``; and for the pairwise loss
   ``forward(chosen, rejected, margin [N]) -> (loss [], accuracy [])`` and
   ``backward(grad_loss [], chosen, rejected, margin) -> (grad_chosen [N],
   grad_rejected [N])``,
3. the custom ops ``torch.ops.rlhf_engine.ppo_policy_loss``,
   ``ppo_value_loss`` and ``pairwise_reward_loss`` (and their
   ``*_backward``), with fake kernels and autograd; the three public ones
   take the public functions' arguments and defaults (plus ``normalizer``),
   and validate, convert and choose the backend themselves,
4. the public functions (Python-level arguments: numbers for ``normalizer``
   and ``margin``, the stats dict).

The per-token math, the ``partials`` and ``stats`` layouts and the
reductions are specified once, in ``csrc/include/rlhf_engine/losses.h``.
For the policy loss, ``x, old, target`` are (logprobs, old_logprobs,
advantages) and ``params`` (clip_low, clip_high, dual_clip or 0); for the
value loss (values, old_values, returns) and (clip,).

Memory and passes (the design choice). A PPO loss is a handful of flops per
token on four [B, T] inputs, so it is bound by memory traffic and by
allocations (on the CPU a fresh [B, T] buffer costs its page faults, about as
much as a pass over it). The forward kernel makes one pass that writes only
per-row partials ([B, 5]) and, after a fixed-order final reduction, the 0-d
loss and stats; it allocates no [B, T] tensor. The backward kernel makes one
more pass that recomputes the per-token derivative from the inputs and writes
``upstream * weight_row * dl/dx`` straight into the gradient: the gradient is
the only [B, T] allocation of a forward + backward (measured peak beyond the
inputs on [512, 4096] float32: 8.4 MB, the gradient, against 88 MB for the
eager composition; a forward alone allocates 10 KB, against 59 MB; see
benchmarks/ops/bench_losses.py). The alternative, a forward
that also writes the unscaled gradient for the backward to scale, needs
either a second [B, T] buffer for the scaled copy, or an in-place scale of a
saved tensor, which is wrong as soon as backward runs twice
(``retain_graph=True``) and hides a mutation from torch.compile. Both designs
move about the same bytes (forward + backward read the 13 bytes per token of
the inputs twice and write 4, against 13 + 4 + 4 + 4), and the recompute
keeps a forward without autograd (scoring, logging) free of [B, T] writes.

Values, never syncs: the loss and stats stay on the device as 0-d tensors, the
upstream gradient is read by the kernel through a pointer, and the
micro-batch ``normalizer`` may be a device tensor, so a whole PPO micro-step
can be captured in a CUDA graph. Reductions run in a fixed order: results are
bit-identical run to run.

NaN: a NaN in a valid (mask 1) token of any input gives a NaN loss and NaN
gradient there (``debug_checks(True)`` turns it into a ValueError); masked
tokens are never used, NaN or not.
"""
import math
import numbers
from typing import Optional

import torch

from rlhf_engine import _native
from rlhf_engine.ops import checks, registry

POLICY_OP = "ppo_policy_loss"
VALUE_OP = "ppo_value_loss"
PAIRWISE_OP = "pairwise_reward_loss"
KINDS = {"policy": POLICY_OP, "value": VALUE_OP}
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")  # codes 0, 1, 2 in the kernels
N_PARTIALS, N_STATS = 5, 4
PAIRWISE_TILE = 4096  # RLHF_PAIRWISE_TILE: pairs per partial sum of the C kernels
STAT_NAMES = ("clipfrac", "approx_kl", "clipfrac_lower")
_INPUT_NAMES = {"policy": ("logprobs", "old_logprobs", "advantages"), "value": ("values", "old_values", "returns")}
NEG_KL_BOUND = 20.0


def _backward_op_name(op):
    return op + "_backward"


# 1. torch reference -----------------------------------------------------------------

def _policy_terms(logprobs, old_logprobs, advantages, params):
    """Per token [B, T]: (l, dl/dlogprobs, clipped, -neg_kl, lower)."""
    clip_low, clip_high, dual_clip = params
    d = logprobs - old_logprobs
    neg_kl = d.clamp(-NEG_KL_BOUND, NEG_KL_BOUND)
    ratio = neg_kl.exp()
    l1 = -advantages * ratio
    l2 = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = l2 > l1
    loss = torch.where(clipped, l2, l1)
    grad = torch.where(clipped, 0.0, l1 * ((d >= -NEG_KL_BOUND) & (d <= NEG_KL_BOUND)))
    lower = torch.zeros_like(clipped)
    if dual_clip > 0:
        bound = -advantages * dual_clip
        lower = (advantages < 0) & (loss > bound)
        loss = torch.where(lower, bound, loss)
        grad = torch.where(lower, 0.0, grad)
    return loss, grad, clipped, -neg_kl, lower


def _value_terms(values, old_values, returns, params):
    """Per token [B, T]: (l, dl/dvalues, clipped, 0, 0)."""
    (clip,) = params
    delta = values - old_values
    inside = (delta >= -clip) & (delta <= clip)
    e1 = values - returns
    # v_clip is exactly values inside the clip range (no rounding noise in the flag)
    e2 = torch.where(inside, e1, old_values + delta.clamp(-clip, clip) - returns)
    clipped = e2 * e2 > e1 * e1
    on_e2 = ~(e2 * e2 <= e1 * e1)  # NaN in e2 selects it: NaN propagates
    loss = 0.5 * torch.where(on_e2, e2 * e2, e1 * e1)
    grad = torch.where(on_e2, e2 * 0.0, e1)
    zeros = torch.zeros_like(e1)
    return loss, grad, clipped, zeros, zeros


_TERMS = {"policy": _policy_terms, "value": _value_terms}


def _row_partials(terms, mask):
    """[B, 5]: per row, the masked sums of (l, 1, clipped, -neg_kl, lower)."""
    return torch.stack([torch.where(mask, t, 0).sum(1, dtype=terms[0].dtype)
                        for t in (terms[0], torch.ones_like(terms[0]), *terms[2:])], dim=1)


def _denominator(partials, agg, normalizer):
    """The divisor of the loss (0-d): the normalizer, else valid tokens or rows."""
    count = partials[:, 1]
    if normalizer is not None:
        return normalizer.to(partials.dtype)
    return count.sum() if agg == 0 else (count > 0).sum().to(partials.dtype)


@registry.register(POLICY_OP, "torch")
@registry.register(VALUE_OP, "torch")
def _torch_forward(kind, x, old, target, mask, normalizer, params, agg):
    """Reference forward (see the module docstring)."""
    partials = _row_partials(_TERMS[kind](x, old, target, params), mask)
    sum_l, count = partials[:, 0], partials[:, 1]
    num = torch.where(count > 0, sum_l / count.clamp(min=1), 0).sum() if agg == 2 else sum_l.sum()
    denom = _denominator(partials, agg, normalizer)
    loss = torch.where(denom > 0, num / denom, 0.0)
    n = count.sum().clamp(min=1)
    stats = torch.stack([*(partials[:, 2:].sum(0) / n), denom])
    return loss, stats, partials


@registry.register(_backward_op_name(POLICY_OP), "torch")
@registry.register(_backward_op_name(VALUE_OP), "torch")
def _torch_backward(kind, grad_loss, x, old, target, mask, params, agg, partials, stats):
    """Reference backward: grad [B, T] = w_row * dl/dx on valid tokens."""
    _, dl, *_ = _TERMS[kind](x, old, target, params)
    denom, count = stats[3], partials[:, 1]
    w = torch.where(denom > 0, grad_loss / denom, 0.0).expand(count.shape)
    if agg == 2:
        w = torch.where(count > 0, w / count.clamp(min=1), 0.0)
    return torch.where(mask, w[:, None] * dl, 0.0)


@registry.register(PAIRWISE_OP, "torch")
def _torch_pairwise(chosen, rejected, margin):
    """(loss [], accuracy []) with z = chosen - rejected - margin."""
    z = chosen - rejected - margin
    n = max(z.numel(), 1)
    loss = torch.nn.functional.softplus(-z).sum() / n  # -logsigmoid(z), stable
    accuracy = (chosen > rejected).sum().to(z.dtype) / n
    return loss, accuracy


@registry.register(_backward_op_name(PAIRWISE_OP), "torch")
def _torch_pairwise_backward(grad_loss, chosen, rejected, margin):
    """(grad_chosen, grad_rejected) [N]: -+sigmoid(-z) grad_loss / N."""
    z = chosen - rejected - margin
    d_chosen = -torch.sigmoid(-z) * (grad_loss / max(z.numel(), 1))
    return d_chosen, -d_chosen


# 2. kernel adapters ------------------------------------------------------------------
# The C entry points (losses.h): rlhf_ppo_<kind>_loss_{forward,backward}_{cpu,cuda}
# and rlhf_pairwise_reward_loss_{forward,backward}_{cpu,cuda}, called through
# _native.call (which picks the library by the tensors' device).

def _c_forward(kind, x, old, target, mask, normalizer, params, agg):
    loss, stats, partials = x.new_empty(()), x.new_empty(N_STATS), x.new_empty(x.shape[0], N_PARTIALS)
    _native.call(x.device, f"rlhf_ppo_{kind}_loss_forward", x, old, target, mask.view(torch.uint8), *x.shape,
                 *params, agg, normalizer, partials, loss, stats)
    return loss, stats, partials


def _c_backward(kind, grad_loss, x, old, target, mask, params, agg, partials, stats):
    grad = torch.empty_like(x)
    _native.call(x.device, f"rlhf_ppo_{kind}_loss_backward", grad_loss, x, old, target, mask.view(torch.uint8),
                 *x.shape, *params, agg, partials, stats, grad)
    return grad


def _c_pairwise_forward(chosen, rejected, margin):
    n = chosen.numel()
    loss, accuracy = chosen.new_empty(()), chosen.new_empty(())
    partials = chosen.new_empty(-(-n // PAIRWISE_TILE), 2)  # the tiles' workspace
    _native.call(chosen.device, "rlhf_pairwise_reward_loss_forward", chosen, rejected, margin, n, partials, loss,
                 accuracy)
    return loss, accuracy


def _c_pairwise_backward(grad_loss, chosen, rejected, margin):
    grad_chosen, grad_rejected = torch.empty_like(chosen), torch.empty_like(chosen)
    _native.call(chosen.device, "rlhf_pairwise_reward_loss_backward", grad_loss, chosen, rejected, margin,
                 chosen.numel(), grad_chosen, grad_rejected)
    return grad_chosen, grad_rejected


def _triton_adapter(name):
    """The adapter running ``name`` of kernels/losses.py (imported on first use)."""
    def run(*args):
        from rlhf_engine.kernels import losses as kernels

        return getattr(kernels, name)(*args)

    return run


def _adapters(backend):
    """{op: implementation} on the kernel ``backend`` for every op of this module."""
    if backend == "triton":
        impls = map(_triton_adapter, ("ppo_loss_forward", "ppo_loss_backward", "pairwise_loss_forward",
                                      "pairwise_loss_backward"))
    else:
        impls = (_c_forward, _c_backward, _c_pairwise_forward, _c_pairwise_backward)
    forward, backward, pairwise_forward, pairwise_backward = impls
    adapters = {PAIRWISE_OP: pairwise_forward, _backward_op_name(PAIRWISE_OP): pairwise_backward}
    for op in KINDS.values():
        adapters[op], adapters[_backward_op_name(op)] = forward, backward
    return adapters


for _backend, _requires in (("cpu", _native.CPU_KERNELS_ERROR), ("triton", None), ("cuda", _native.CUDA_ERROR)):
    for _op, _impl in _adapters(_backend).items():
        registry.register(_op, _backend, requires=_requires)(_impl)


# 3. custom ops -------------------------------------------------------------------------

def _loss_forward(kind, x, old, target, mask, normalizer, params, agg, backend):
    """Run the forward of ``backend`` on contiguous inputs (NaN checks first)."""
    for name, t in zip(_INPUT_NAMES[kind], (x, old, target)):
        checks.finite(name, t)
    forward = registry.get(KINDS[kind], backend)
    flat = None if normalizer is None else normalizer.reshape(()).contiguous()
    return forward(kind, x.contiguous(), old.contiguous(), target.contiguous(), mask.contiguous(), flat,
                   params, agg)


def _loss_backward(kind, grad_loss, x, old, target, mask, partials, stats, params, agg, backend):
    backward = registry.get(_backward_op_name(KINDS[kind]), backend)
    return backward(kind, grad_loss.to(x.dtype).reshape(()).contiguous(), x.contiguous(), old.contiguous(),
                    target.contiguous(), mask.contiguous(), params, agg, partials, stats)


def _fake_forward(x):
    return x.new_empty(()), x.new_empty(N_STATS), x.new_empty(x.shape[0], N_PARTIALS)


@torch.library.custom_op("rlhf_engine::ppo_policy_loss", mutates_args=())
def ppo_policy_loss_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, normalizer: Optional[torch.Tensor] = None, *, clip_low: float = 0.2,
                       clip_high: Optional[float] = None, dual_clip: Optional[float] = None, agg: str = "token-mean",
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rlhf_engine.ppo_policy_loss``: the public op; returns (loss
    [], stats [4] = (clipfrac, approx_kl, clipfrac_lower, the loss's divisor),
    partials [B, 5]) (losses.h)."""
    return _loss_forward("policy", *_loss_inputs("policy", logprobs, old_logprobs, advantages, mask, normalizer,
                                                 (clip_low, clip_high, dual_clip), agg, backend))


@torch.library.custom_op("rlhf_engine::ppo_policy_loss_backward", mutates_args=())
def ppo_policy_loss_backward_op(grad_loss: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                                advantages: torch.Tensor, mask: torch.Tensor, partials: torch.Tensor,
                                stats: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float, agg: int,
                                backend: str) -> torch.Tensor:
    """Gradient w.r.t. ``logprobs`` [B, T], from prepared inputs (:func:`_loss_inputs`)."""
    return _loss_backward("policy", grad_loss, logprobs, old_logprobs, advantages, mask, partials, stats,
                          (clip_low, clip_high, dual_clip), agg, backend)


@torch.library.custom_op("rlhf_engine::ppo_value_loss", mutates_args=())
def ppo_value_loss_op(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                      normalizer: Optional[torch.Tensor] = None, *, clip: float = 0.2, agg: str = "token-mean",
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rlhf_engine.ppo_value_loss``: the public op; returns (loss [],
    stats [4] = (clipfrac, 0, 0, the loss's divisor), partials [B, 5]) (losses.h)."""
    return _loss_forward("value", *_loss_inputs("value", values, old_values, returns, mask, normalizer, (clip,), agg,
                                                backend))


@torch.library.custom_op("rlhf_engine::ppo_value_loss_backward", mutates_args=())
def ppo_value_loss_backward_op(grad_loss: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
                               returns: torch.Tensor, mask: torch.Tensor, partials: torch.Tensor,
                               stats: torch.Tensor, clip: float, agg: int, backend: str) -> torch.Tensor:
    """Gradient w.r.t. ``values`` [B, T], from prepared inputs (:func:`_loss_inputs`)."""
    return _loss_backward("value", grad_loss, values, old_values, returns, mask, partials, stats, (clip,), agg,
                          backend)


@ppo_policy_loss_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, normalizer=None, *, clip_low=0.2, clip_high=None, dual_clip=None,
      agg="token-mean", backend="auto"):
    x, *_ = _loss_inputs("policy", logprobs, old_logprobs, advantages, mask, normalizer,
                         (clip_low, clip_high, dual_clip), agg, backend)
    return _fake_forward(x)


@ppo_value_loss_op.register_fake
def _(values, old_values, returns, mask, normalizer=None, *, clip=0.2, agg="token-mean", backend="auto"):
    x, *_ = _loss_inputs("value", values, old_values, returns, mask, normalizer, (clip,), agg, backend)
    return _fake_forward(x)


@ppo_policy_loss_backward_op.register_fake
def _(grad_loss, logprobs, *args):
    return torch.empty_like(logprobs, memory_format=torch.contiguous_format)


@ppo_value_loss_backward_op.register_fake
def _(grad_loss, values, *args):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    _, stats, partials = output
    ctx.mark_non_differentiable(stats, partials)
    ctx.save_for_backward(*inputs[:4], partials, stats)  # not the normalizer: stats[3] is the divisor
    ctx.args = keyword_only_inputs


def _autograd_backward(kind, backward_op):
    """The autograd formula of the ``kind`` loss: the gradient w.r.t. its first
    input, through ``backward_op`` on the inputs prepared as in forward."""
    def backward(ctx, grad_loss, _grad_stats, _grad_partials):
        *inputs, partials, stats = ctx.saved_tensors
        kw = ctx.args
        x, old, target, mask, _, params, agg, backend = _loss_inputs(
            kind, *inputs, None, [kw[name] for name in _PARAM_NAMES[kind]], kw["agg"], kw["backend"])
        grad = backward_op(grad_loss, x, old, target, mask, partials, stats, *params, agg, backend)
        return grad.to(inputs[0].dtype), None, None, None, None

    return backward


ppo_policy_loss_op.register_autograd(_autograd_backward("policy", ppo_policy_loss_backward_op),
                                     setup_context=_setup_context)
ppo_value_loss_op.register_autograd(_autograd_backward("value", ppo_value_loss_backward_op),
                                    setup_context=_setup_context)


@torch.library.custom_op("rlhf_engine::pairwise_reward_loss", mutates_args=())
def pairwise_reward_loss_op(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None, *,
                            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.rlhf_engine.pairwise_reward_loss``: the public op (``margin``
    None or a tensor broadcastable to the scores); returns (loss [], accuracy [])."""
    chosen, rejected, margin, backend = _pairwise_inputs(chosen, rejected, margin, backend)
    checks.finite("chosen", chosen)
    checks.finite("rejected", rejected)
    return registry.get(PAIRWISE_OP, backend)(*_flat(chosen, rejected, margin))


@torch.library.custom_op("rlhf_engine::pairwise_reward_loss_backward", mutates_args=())
def pairwise_reward_loss_backward_op(grad_loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                                     margin: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``chosen`` and ``rejected`` (their shape), from prepared
    inputs (:func:`_pairwise_inputs`)."""
    backward = registry.get(_backward_op_name(PAIRWISE_OP), backend)
    grads = backward(grad_loss.to(chosen.dtype).reshape(()).contiguous(), *_flat(chosen, rejected, margin))
    return tuple(g.reshape(chosen.shape) for g in grads)


def _flat(*tensors):
    """Contiguous [N] views (or copies) of same-shaped tensors."""
    return tuple(t.reshape(-1).contiguous() for t in tensors)


@pairwise_reward_loss_op.register_fake
def _(chosen, rejected, margin=None, *, backend="auto"):
    chosen, *_ = _pairwise_inputs(chosen, rejected, margin, backend)
    return chosen.new_empty(()), chosen.new_empty(())


@pairwise_reward_loss_backward_op.register_fake
def _(grad_loss, chosen, rejected, margin, backend):
    return (torch.empty_like(chosen, memory_format=torch.contiguous_format),
            torch.empty_like(chosen, memory_format=torch.contiguous_format))


def _pairwise_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs)
    ctx.backend = keyword_only_inputs["backend"]


def _pairwise_backward(ctx, grad_loss, _grad_accuracy):
    chosen, rejected, margin = ctx.saved_tensors
    grad_chosen, grad_rejected = pairwise_reward_loss_backward_op(
        grad_loss, *_pairwise_inputs(chosen, rejected, margin, ctx.backend))
    return grad_chosen.to(chosen.dtype), grad_rejected.to(rejected.dtype), None


pairwise_reward_loss_op.register_autograd(_pairwise_backward, setup_context=_pairwise_setup)


# 4. public functions ----------------------------------------------------------------------

def _nonnegative(name, value):
    """``value`` must be a finite real number >= 0; returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not (0 <= out < math.inf):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return out


def _agg_code(agg):
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    return AGGS.index(agg)


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _normalizer(normalizer, device, dtype):
    """None, or the 0-d ``dtype`` tensor on ``device`` that divides the loss."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.dim() > 1:
            raise ValueError(f"normalizer must be a 0-d tensor or a number, got shape {tuple(normalizer.shape)}")
        if normalizer.device != device:
            raise ValueError(f"normalizer must be on the inputs' device {device}, got {normalizer.device}")
        return normalizer.reshape(()).to(dtype)
    value = _nonnegative("normalizer", normalizer)
    if value == 0:
        raise ValueError("normalizer must be > 0, got 0")
    return torch.full((), value, dtype=dtype, device=device)


def _prepare(kind, tensors, mask, normalizer, backend):
    """Validate [B, T] inputs; return (float inputs, bool mask, normalizer, backend)."""
    names = _INPUT_NAMES[kind]
    for name, t in zip(names, tensors):
        checks.tensor(name, t, kind="float")
    if tensors[0].dim() != 2:
        raise ValueError(f"{names[0]} must be [B, T], got shape {tuple(tensors[0].shape)}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != tensors[0].shape:
            raise ValueError(f"{name} must have shape {tuple(tensors[0].shape)}, got {tuple(t.shape)}")
    mask = checks.mask("mask", mask, tensors[0].shape)
    checks.same_device(**dict(zip(names, tensors)), mask=mask)
    dtype = _compute_dtype(*tensors)
    chosen = registry.resolve(KINDS[kind], backend, tensors[0].device, dtype)
    tensors = [t.to(dtype) for t in tensors]
    return tensors, mask, _normalizer(normalizer, tensors[0].device, dtype), chosen


_PARAM_NAMES = {"policy": ("clip_low", "clip_high", "dual_clip"), "value": ("clip",)}


def _policy_params(clip_low, clip_high, dual_clip):
    """(clip_low, clip_high, dual_clip or 0) checked, as floats."""
    clip_low = _nonnegative("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else _nonnegative("clip_high", clip_high)
    if dual_clip is not None:
        dual_clip = _nonnegative("dual_clip", dual_clip)
        if not dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
    return clip_low, clip_high, dual_clip or 0.0


def _value_params(clip):
    return (_nonnegative("clip", clip),)


def _loss_inputs(kind, x, old, target, mask, normalizer, params, agg, backend):
    """The ``kind`` loss's arguments checked and prepared for the kernels:
    (x, old, target in the compute dtype, bool mask, normalizer 0-d tensor or
    None, params, agg code, resolved backend). A no-op on prepared inputs."""
    params = (_policy_params if kind == "policy" else _value_params)(*params)
    code = _agg_code(agg)
    (x, old, target), mask, normalizer, backend = _prepare(kind, (x, old, target), mask, normalizer, backend)
    return x, old, target, mask, normalizer, params, code, backend


def _checked_normalizer(kind, tensors, mask, normalizer, agg):
    """The public functions' checks of what the custom op's schema cannot
    take (ValueError rather than the dispatcher's TypeError); the normalizer
    as the op takes it (a number becomes a 0-d tensor)."""
    _agg_code(agg)
    for name, t in zip(_INPUT_NAMES[kind], tensors):
        checks.tensor(name, t, kind="float")
    checks.tensor("mask", mask)
    if normalizer is None or isinstance(normalizer, torch.Tensor):
        return normalizer
    return _normalizer(normalizer, tensors[0].device, _compute_dtype(*tensors))


def _stats_dict(stats, names):
    return {name: stats[i] for i, name in enumerate(names)}


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    agg="token-mean", normalizer=None, backend="auto"):
    """The clipped PPO policy-gradient loss (API.md "Losses").

    Args:
        logprobs, old_logprobs, advantages: ``[B, T]`` floating (float32 math;
            float64 on the torch backend).
        mask: ``[B, T]`` bool or 0/1 of any dtype; tokens with 0 are not used.
        clip_low, clip_high: ratio clip ``[1 - clip_low, 1 + clip_high]``
            (``clip_high=None``: ``clip_low``); finite, >= 0.
        dual_clip: ``c > 1`` bounds the loss of negative-advantage tokens by
            ``-A c``; None for no dual clip.
        agg: "token-mean", "seq-mean-token-sum" or "seq-mean-token-mean".
        normalizer: divides the loss instead of this batch's own token count
            (token-mean) or count of rows with a valid token (seq-mean-*): a
            0-d tensor (on the inputs' device, never read on the host) or a
            number > 0. Giving every micro-batch the whole batch's count makes
            the micro-batch losses (and gradients) sum to the whole batch's.
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        ``(loss, stats)``: ``loss`` 0-d, differentiable w.r.t. ``logprobs``
        (0.0 with zero gradient when no token is valid); ``stats`` a dict of
        0-d tensors ``clipfrac``, ``approx_kl``, ``clipfrac_lower`` (masked
        means over this batch's valid tokens, 0 with none), all on the
        inputs' device. A NaN in a valid token gives a NaN loss (ValueError
        under ``debug_checks(True)``).
    """
    clip_low, clip_high, dual_clip = _policy_params(clip_low, clip_high, dual_clip)
    norm = _checked_normalizer("policy", (logprobs, old_logprobs, advantages), mask, normalizer, agg)
    loss, stats, _ = ppo_policy_loss_op(logprobs, old_logprobs, advantages, mask, norm, clip_low=clip_low,
                                        clip_high=clip_high, dual_clip=dual_clip or None, agg=agg, backend=backend)
    return loss, _stats_dict(stats, STAT_NAMES)


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, agg="token-mean", normalizer=None,
                   backend="auto"):
    """The clipped value loss ``0.5 * agg(max((v - R)^2, (v_clip - R)^2))``.

    Args as :func:`ppo_policy_loss`: ``values``, ``old_values``,
    ``returns`` and ``mask`` ``[B, T]``; ``clip`` (finite, >= 0) bounds
    ``values - old_values``; ``agg`` and ``normalizer`` likewise.

    Returns:
        ``(loss, stats)``: ``loss`` 0-d, differentiable w.r.t. ``values``;
        ``stats = {"clipfrac": ...}`` (masked mean of
        ``(v_clip - R)^2 > (v - R)^2``). NaN as for the policy loss.
    """
    (clip,) = _value_params(clip)
    norm = _checked_normalizer("value", (values, old_values, returns), mask, normalizer, agg)
    loss, stats, _ = ppo_value_loss_op(values, old_values, returns, mask, norm, clip=clip, agg=agg, backend=backend)
    return loss, _stats_dict(stats, STAT_NAMES[:1])


def _margin_tensor(margin, dtype, device):
    """A margin given as None or a number, as a 0-d tensor."""
    value = 0.0 if margin is None else float(margin) if isinstance(margin, (int, float)) else None
    if value is None or not math.isfinite(value):
        raise ValueError(f"margin must be None, a finite number or a tensor, got {margin!r}")
    return torch.full((), value, dtype=dtype, device=device)


def _pairwise_inputs(chosen, rejected, margin, backend):
    """Checked pairwise inputs: (chosen, rejected in the compute dtype, margin
    (None, a number or a broadcastable tensor) as a contiguous tensor of their
    shape, resolved backend). A no-op on prepared inputs."""
    checks.tensor("chosen", chosen, kind="float")
    checks.tensor("rejected", rejected, kind="float")
    if rejected.shape != chosen.shape:
        raise ValueError(f"rejected must have shape {tuple(chosen.shape)}, got {tuple(rejected.shape)}")
    checks.same_device(chosen=chosen, rejected=rejected)
    dtype = _compute_dtype(chosen, rejected)
    backend = registry.resolve(PAIRWISE_OP, backend, chosen.device, dtype)
    if margin is None or not isinstance(margin, torch.Tensor):
        margin = _margin_tensor(margin, dtype, chosen.device)
    else:
        checks.tensor("margin", margin, kind="float")
        checks.same_device(chosen=chosen, margin=margin)
        try:
            torch.broadcast_shapes(margin.shape, chosen.shape)
        except RuntimeError:
            raise ValueError(f"margin of shape {tuple(margin.shape)} does not broadcast to "
                             f"{tuple(chosen.shape)}") from None
    margin = margin.to(dtype).expand(chosen.shape).contiguous()
    return chosen.to(dtype), rejected.to(dtype), margin, backend


def pairwise_reward_loss(chosen, rejected, *, margin=None, backend="auto"):
    """Bradley-Terry reward-model loss ``mean(-logsigmoid(chosen - rejected - margin))``.

    Args:
        chosen, rejected: same-shaped floating scores (usually ``[N]``).
        margin: None (0), a number, or a tensor broadcastable to their shape.
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        ``(loss, {"accuracy": mean(chosen > rejected)})``, 0-d float32
        (float64 on the torch backend with float64 scores), on the inputs'
        device; both 0.0 for empty inputs. Differentiable w.r.t. ``chosen``
        and ``rejected``. Sums run in a fixed order (bit-identical results).
        NaN scores give a NaN loss (ValueError under ``debug_checks(True)``).
    """
    checks.tensor("chosen", chosen, kind="float")
    checks.tensor("rejected", rejected, kind="float")
    if margin is not None and not isinstance(margin, torch.Tensor):
        margin = _margin_tensor(margin, _compute_dtype(chosen, rejected), chosen.device)
    loss, accuracy = pairwise_reward_loss_op(chosen, rejected, margin, backend=backend)
    return loss, {"accuracy": accuracy}
