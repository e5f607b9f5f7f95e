"""Advantage estimation: ``gae``, ``masked_whiten`` and ``group_advantages``.

Layout of this module, top to bottom:

1. the torch references (readable math, always accumulated in float64),
2. the adapters of the cpu, triton and cuda kernels, one signature per op:
   ``gae(rewards [B, T], values [B, T], mask [B, T] bool, gamma, lam)
   -> (advantages, returns)``, ``masked_whiten(x [R, C], mask [R, C] bool,
   shift_mean, eps) -> out [R, C]`` and ``group_advantages(scores [N],
   group_size, normalize_std, eps) -> out [N]``; the kernel adapters take
   contiguous float32 tensors and return float32,
3. the custom ops ``torch.ops.rlhf_engine.gae``, ``masked_whiten`` and
   ``group_advantages`` with fake kernels: the public functions' arguments
   and defaults; validation, dtype conversion and backend choice happen in
   them,
4. the public functions (Python-level argument checks, then the ops).

None of the three is differentiable: their outputs are training targets
(advantages, returns) or transformed targets. The ops detach their inputs,
and the results never require grad.

Kernels and their contract: ``csrc/include/rlhf_engine/advantages.h``
(C++/CUDA) and ``kernels/advantages.py`` (Triton).
"""
import math

import torch

from rlhf_engine import _native
from rlhf_engine.ops import checks, registry

OP_GAE = "gae"
OP_WHITEN = "masked_whiten"
OP_GROUP = "group_advantages"


# 1. torch references --------------------------------------------------------------

@registry.register(OP_GAE, "torch")
def _torch_gae(rewards, values, mask, gamma, lam):
    """GAE with masked positions skipped: a reverse loop over time on [B]
    columns in float64, carrying the value and advantage of the next valid
    position. Returns (advantages, returns) [B, T] in the inputs' dtype."""
    r, v = rewards.double(), values.double()
    next_v = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    next_a = torch.zeros_like(next_v)
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        valid = mask[:, t]
        next_v = torch.where(valid, v[:, t], next_v)
        next_a = torch.where(valid, a, next_a)
        adv[:, t] = torch.where(valid, a, 0.0)
    ret = torch.where(mask, adv + v, 0.0)
    return adv.to(rewards.dtype), ret.to(rewards.dtype)


def _masked_moments(x, mask):
    """(count, mean, unbiased variance) of x over mask, float64 0-d tensors;
    mean 0 with no valid position, variance 0 with fewer than two."""
    xd = x.double()
    count = mask.sum(dtype=torch.float64)
    mean = torch.where(mask, xd, 0.0).sum() / count.clamp(min=1)
    ss = torch.where(mask, (xd - mean) ** 2, 0.0).sum()
    var = torch.where(count >= 2, ss / (count - 1).clamp(min=1), 0.0)
    return count, mean, var


@registry.register(OP_WHITEN, "torch")
def _torch_masked_whiten(x, mask, shift_mean, eps):
    _, mean, var = _masked_moments(x, mask)
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0).to(x.dtype)


@registry.register(OP_GROUP, "torch")
def _torch_group_advantages(scores, group_size, normalize_std, eps):
    groups = scores.double().view(-1, group_size)
    centered = groups - groups.mean(-1, keepdim=True)
    if normalize_std:
        std = groups.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(groups)
        centered = centered / (std + eps)
    return centered.reshape(-1).to(scores.dtype)


# 2. kernel adapters -----------------------------------------------------------------

def _u8(mask):
    """A bool mask as uint8, zero-copy."""
    return mask.view(torch.uint8)


@registry.register(OP_GAE, "cpu", requires=_native.CPU_KERNELS_ERROR)
@registry.register(OP_GAE, "cuda", requires=_native.CUDA_ERROR)
def _native_gae(rewards, values, mask, gamma, lam):
    adv, ret = torch.empty_like(rewards), torch.empty_like(rewards)
    _native.call(rewards.device, "rlhf_gae", rewards, values, _u8(mask), *rewards.shape, gamma, lam, adv, ret)
    return adv, ret


@registry.register(OP_WHITEN, "cpu", requires=_native.CPU_KERNELS_ERROR)
@registry.register(OP_WHITEN, "cuda", requires=_native.CUDA_ERROR)
def _native_masked_whiten(x, mask, shift_mean, eps):
    out = torch.empty_like(x)
    # CUDA: a float64 workspace of RLHF_MASKED_WHITEN_WORKSPACE(n_rows) = 2 n_rows + 4 (advantages.h)
    workspace = () if x.device.type == "cpu" else (x.new_empty(2 * x.shape[0] + 4, dtype=torch.float64),)
    _native.call(x.device, "rlhf_masked_whiten", x, _u8(mask), *x.shape, shift_mean, eps, out, *workspace)
    return out


@registry.register(OP_GROUP, "cpu", requires=_native.CPU_KERNELS_ERROR)
@registry.register(OP_GROUP, "cuda", requires=_native.CUDA_ERROR)
def _native_group_advantages(scores, group_size, normalize_std, eps):
    out = torch.empty_like(scores)
    _native.call(scores.device, "rlhf_group_advantages", scores, scores.shape[0], group_size, normalize_std, eps,
                 out)
    return out


@registry.register(OP_GAE, "triton")
def _triton_gae(rewards, values, mask, gamma, lam):
    from rlhf_engine.kernels import advantages as kernels

    return kernels.gae(rewards, values, _u8(mask), gamma, lam)


@registry.register(OP_WHITEN, "triton")
def _triton_masked_whiten(x, mask, shift_mean, eps):
    from rlhf_engine.kernels import advantages as kernels

    return kernels.masked_whiten(x, _u8(mask), shift_mean, eps)


@registry.register(OP_GROUP, "triton")
def _triton_group_advantages(scores, group_size, normalize_std, eps):
    from rlhf_engine.kernels import advantages as kernels

    return kernels.group_advantages(scores, group_size, normalize_std, eps)


# 3. custom ops ----------------------------------------------------------------------

def _gae_inputs(rewards, values, mask, gamma, lam, backend):
    """Checked gae inputs: (rewards, values, bool mask, contiguous, detached, in
    the compute dtype; gamma, lam; resolved backend)."""
    checks.tensor("rewards", rewards, kind="float")
    checks.tensor("values", values, kind="float")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    if values.shape != rewards.shape:
        raise ValueError(f"values must have the shape of rewards {tuple(rewards.shape)}, got {tuple(values.shape)}")
    mask = checks.mask("mask", mask, rewards.shape)
    checks.same_device(rewards=rewards, values=values, mask=mask)
    gamma, lam = _fraction("gamma", gamma), _fraction("lam", lam)
    chosen, (rewards, values) = _prepare(backend, OP_GAE, rewards=rewards, values=values)
    return rewards, values, mask.contiguous(), gamma, lam, chosen


def _whiten_inputs(x, mask, eps, backend):
    """Checked masked_whiten inputs: (x as contiguous [R, C] rows in the compute
    dtype, mask as bool [R, C] rows, eps, resolved backend)."""
    checks.tensor("x", x, kind="float")
    mask = checks.mask("mask", mask, x.shape)
    checks.same_device(x=x, mask=mask)
    eps = _nonnegative("eps", eps)
    chosen, (rows,) = _prepare(backend, OP_WHITEN, x=_as_rows(x))
    return rows, _as_rows(mask).contiguous(), eps, chosen


def _group_inputs(scores, group_size, eps, backend):
    """Checked group_advantages inputs: (scores contiguous in the compute dtype, eps, resolved backend)."""
    checks.tensor("scores", scores, kind="float")
    if scores.dim() != 1:
        raise ValueError(f"scores must be [N], got shape {tuple(scores.shape)}")
    _check_group_size(group_size)
    if scores.shape[0] % group_size:
        raise ValueError(f"scores length {scores.shape[0]} is not a multiple of group_size={group_size}")
    eps = _nonnegative("eps", eps)
    chosen, (scores,) = _prepare(backend, OP_GROUP, scores=scores)
    return scores, eps, chosen


def _check_group_size(group_size):
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")


def _check_finite(name, x, mask):
    """Under debug_checks: NaN/inf at a valid position raises ValueError
    (masked positions are never read, so they may hold anything)."""
    if checks.debug_enabled():
        checks.finite(name, torch.where(mask, x, 0.0))


@torch.library.custom_op("rlhf_engine::gae", mutates_args=())
def gae_op(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 1.0,
           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.rlhf_engine.gae``: the public op, (advantages, returns)."""
    rewards, values, mask, gamma, lam, backend = _gae_inputs(rewards, values, mask, gamma, lam, backend)
    _check_finite("rewards", rewards, mask)
    _check_finite("values", values, mask)
    if rewards.numel() == 0:
        return torch.zeros_like(rewards), torch.zeros_like(rewards)
    return registry.get(OP_GAE, backend)(rewards, values, mask, gamma, lam)


@gae_op.register_fake
def _(rewards, values, mask, *, gamma=1.0, lam=1.0, backend="auto"):
    rewards, *_ = _gae_inputs(rewards, values, mask, gamma, lam, backend)
    return torch.empty_like(rewards), torch.empty_like(rewards)


@torch.library.custom_op("rlhf_engine::masked_whiten", mutates_args=())
def masked_whiten_op(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                     backend: str = "auto") -> torch.Tensor:
    """``torch.ops.rlhf_engine.masked_whiten``: the public op."""
    rows, mask_rows, eps, backend = _whiten_inputs(x, mask, eps, backend)
    _check_finite("x", rows, mask_rows)
    if rows.numel() == 0:
        return torch.zeros_like(rows).view(x.shape)
    return registry.get(OP_WHITEN, backend)(rows, mask_rows, shift_mean, eps).view(x.shape)


@masked_whiten_op.register_fake
def _(x, mask, *, shift_mean=True, eps=1e-8, backend="auto"):
    rows, *_ = _whiten_inputs(x, mask, eps, backend)
    return rows.new_empty(x.shape)


@torch.library.custom_op("rlhf_engine::group_advantages", mutates_args=())
def group_advantages_op(scores: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6,
                        backend: str = "auto") -> torch.Tensor:
    """``torch.ops.rlhf_engine.group_advantages``: the public op."""
    scores, eps, backend = _group_inputs(scores, group_size, eps, backend)
    checks.finite("scores", scores)
    if scores.numel() == 0:
        return torch.zeros_like(scores)
    return registry.get(OP_GROUP, backend)(scores, group_size, normalize_std, eps)


@group_advantages_op.register_fake
def _(scores, group_size, *, normalize_std=True, eps=1e-6, backend="auto"):
    scores, *_ = _group_inputs(scores, group_size, eps, backend)
    return torch.empty_like(scores)


def _not_differentiable(ctx, inputs, keyword_only_inputs, output):
    ctx.mark_non_differentiable(*((output,) if isinstance(output, torch.Tensor) else output))


def _no_gradient(ctx, *grads):
    return (None,) * len(ctx.needs_input_grad)


for _op in (gae_op, masked_whiten_op, group_advantages_op):  # targets: outputs never require grad
    _op.register_autograd(_no_gradient, setup_context=_not_differentiable)


# 4. public functions ----------------------------------------------------------------

def _fraction(name, value):
    """``value`` must be a number in [0, 1]; returned as a Python float."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not 0.0 <= out <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return out


def _nonnegative(name, value):
    """``value`` must be a finite number >= 0; returned as a Python float."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not 0.0 <= out < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return out


def _prepare(backend, op, **tensors):
    """(backend chosen, the tensors detached, contiguous, in the compute dtype:
    float64 if any of them is float64, else float32)."""
    first = next(iter(tensors.values()))
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32
    chosen = registry.resolve(op, backend, first.device, dtype)
    return chosen, [t.detach().to(dtype).contiguous() for t in tensors.values()]


def gae(rewards, values, mask, *, gamma=1.0, lam=1.0, backend="auto"):
    """Generalized advantage estimation with masked positions skipped.

    Positions where ``mask`` is 0 (padding, or tool/observation tokens inside
    a response) neither add a TD error nor decay the credit: with ``next_v``
    and ``A`` the value and advantage of the next valid position of the row
    (both 0 past the last one)::

        delta_t = r_t + gamma * next_v - v_t
        A_t = delta_t + gamma * lam * A_next,      returns_t = A_t + v_t

    Args:
        rewards, values: ``[B, T]`` floating tensors (converted to float32;
            float64 stays float64 on the torch backend).
        mask: ``[B, T]``, bool or 0/1 of any dtype.
        gamma, lam: discount and GAE lambda, in [0, 1].
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` float32 (float64 for
        float64 inputs on the torch backend), 0.0 where ``mask`` is 0. Not differentiable (targets; the inputs are detached). NaN at a
        valid position gives NaN at it and at every earlier valid position of
        its row (ValueError under ``debug_checks(True)``); masked positions
        are never read. No whitening: see :func:`masked_whiten`.
    """
    checks.tensor("rewards", rewards, kind="float")
    checks.tensor("values", values, kind="float")
    checks.tensor("mask", mask)
    gamma, lam = _fraction("gamma", gamma), _fraction("lam", lam)
    return gae_op(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)


def _as_rows(x):
    """Any shape -> [R, C] (C the last dimension; a 0-d tensor is [1, 1])."""
    cols = x.shape[-1] if x.dim() else 1
    return x.reshape(math.prod(x.shape[:-1]) if x.dim() else 1, cols)


def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8, backend="auto"):
    """``(x - mean) * rsqrt(var + eps)`` over the positions where ``mask`` is 1.

    Mean and Bessel-corrected (unbiased) variance are taken over every valid
    position of the whole tensor, accumulated in float64 per row and then
    over rows in a fixed order (bit-identical run to run). With fewer than
    two valid positions the variance is 0 (and with none the mean is 0).

    Args:
        x: floating tensor of any shape (usually advantages ``[B, T]``).
        mask: ``x.shape``, bool or 0/1 of any dtype.
        shift_mean: when False the mean is added back after scaling.
        eps: added to the variance (finite, >= 0).
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        float32 of ``x.shape`` (float64 for float64 ``x`` on the torch
        backend), 0.0 where ``mask`` is 0. Not differentiable
        (applied to targets; the input is detached). A NaN at a valid
        position makes every valid output NaN (ValueError under
        ``debug_checks(True)``); masked positions are never read.
    """
    checks.tensor("x", x, kind="float")
    checks.tensor("mask", mask)
    eps = _nonnegative("eps", eps)
    return masked_whiten_op(x, mask, shift_mean=bool(shift_mean), eps=eps, backend=backend)


def group_advantages(scores, group_size, *, normalize_std=True, eps=1e-6, backend="auto"):
    """Group-relative advantages (GRPO / RLOO-style baselines).

    ``scores`` holds consecutive groups of ``group_size`` samples of one
    prompt each; every score becomes ``score - group_mean``, divided by
    ``group_std + eps`` (unbiased std) when ``normalize_std``. A group of
    size 1 gives 0.

    Args:
        scores: ``[N]`` floating tensor, ``N`` a multiple of ``group_size``.
        group_size: int >= 1.
        normalize_std: divide by the group's std (+ eps).
        eps: finite, >= 0.
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        ``[N]`` float32 (float64 for float64 scores on the torch backend).
        Not differentiable (the input is detached). A NaN
        score makes its whole group NaN (ValueError under
        ``debug_checks(True)``).
    """
    checks.tensor("scores", scores, kind="float")
    _check_group_size(group_size)
    eps = _nonnegative("eps", eps)
    return group_advantages_op(scores, group_size, normalize_std=bool(normalize_std), eps=eps, backend=backend)
