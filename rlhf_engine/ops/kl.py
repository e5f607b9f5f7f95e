"""kl_penalty and kl_shaped_rewards: the per-token KL penalty to a reference
policy, and the InstructGPT token-level reward built from it.

Layout of this module, top to bottom:

1. the torch reference (readable math; float64 in, float64 out for tests),
2. the adapters of the cpu, triton and cuda kernels, all with one signature
   per op (contract: ``csrc/include/rlhf_engine/kl.h``):
   ``forward(lp [N], ref [N], estimator) -> kl [N]``;
   ``backward(grad [N], lp, ref, mask [N] bool or None, scale, estimator)
   -> (grad_lp [N], grad_ref [N])`` with
   ``grad_lp = where(mask, scale * grad * dkl/dd, 0)``, ``grad_ref = -grad_lp``;
   ``shaped(scores [B], lp [B, T], ref, mask [B, T] bool, kl_coef, estimator)
   -> (rewards [B, T], last [B] int64)``, ``last`` the last valid index of
   each row (-1 for none), saved for backward,
3. the custom ops ``torch.ops.rlhf_engine.kl_penalty``,
   ``kl_penalty_backward`` and ``kl_shaped_rewards`` with fake kernels and
   autograd; the two public ones take the public functions' arguments and
   defaults, and validate, convert and choose the backend themselves,
4. the public functions :func:`kl_penalty` and :func:`kl_shaped_rewards`
   (Python-level argument checks, then the ops).

All inputs reach the kernels as contiguous float32 (the torch backend also
takes float64); every op is one element-wise pass and saves only its inputs
(plus ``last`` [B]) for backward.
"""
import math
import numbers
from typing import Optional

import torch

from rlhf_engine import _native
from rlhf_engine.ops import checks, registry

OP = "kl_penalty"
OP_BACKWARD = "kl_penalty_backward"
OP_SHAPED = "kl_shaped_rewards"
# Accepted names -> canonical estimator, and the canonical names' codes in
# the kernels (enum rlhf_kl_estimator).
ESTIMATORS = {"k1": "k1", "abs": "abs", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}
CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
K3_RATIO_CLAMP = 20.0  # r = clamp(-d, -20, 20)
K3_VALUE_CLAMP = 10.0  # k3 = clamp(exp(r) - r - 1, -10, 10)


# 1. torch reference -----------------------------------------------------------

def exp_m1_m_id(r):
    """exp(r) - 1 - r for |r| <= 20 without cancellation: the Taylor series
    r^2 (1/2! + r/3! + ... + r^10/12!) for |r| < 1, expm1(r) - r beyond."""
    poly = torch.full_like(r, 1 / math.factorial(12))
    for k in range(11, 1, -1):
        poly = poly * r + 1 / math.factorial(k)
    return torch.where(r.abs() < 1, r * r * poly, torch.expm1(r) - r)


def kl_value(d, estimator):
    """kl(d) [...] of the canonical ``estimator`` from d = logprobs - ref [...]."""
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return 0.5 * d * d
    r = torch.clamp(-d, -K3_RATIO_CLAMP, K3_RATIO_CLAMP)
    return torch.clamp(exp_m1_m_id(r), -K3_VALUE_CLAMP, K3_VALUE_CLAMP)


def kl_derivative(d, estimator):
    """dkl/dd [...]: 0 where a k3 clamp binds (strictly outside its bounds),
    sign(d) for abs (0 at 0), NaN where d is NaN."""
    if estimator == "k1":
        out = torch.ones_like(d)
    elif estimator == "abs":
        out = torch.sign(d)
    elif estimator == "k2":
        out = d
    else:
        r = torch.clamp(-d, -K3_RATIO_CLAMP, K3_RATIO_CLAMP)
        v = exp_m1_m_id(r)
        binds = (d.abs() > K3_RATIO_CLAMP) | (v.abs() > K3_VALUE_CLAMP)
        out = torch.where(binds, 0.0, -(v + r))  # d/dd (e^r - r - 1) = -(e^r - 1)
    return torch.where(torch.isnan(d), d, out)


def last_valid_index(mask):
    """[B] int64: the last t with mask[b, t] (-1 for a row with none), from a bool [B, T]."""
    n_rows, n_cols = mask.shape
    if n_cols == 0:
        return torch.full((n_rows,), -1, dtype=torch.int64, device=mask.device)
    cols = torch.arange(n_cols, device=mask.device)
    return torch.where(mask, cols, -1).amax(1)


@registry.register(OP, "torch")
def _torch_forward(lp, ref, estimator):
    return kl_value(lp - ref, estimator)


@registry.register(OP_BACKWARD, "torch")
def _torch_backward(grad, lp, ref, mask, scale, estimator):
    g = scale * grad * kl_derivative(lp - ref, estimator)
    if mask is not None:
        g = torch.where(mask, g, 0.0)
    return g, -g


@registry.register(OP_SHAPED, "torch")
def _torch_shaped(scores, lp, ref, mask, kl_coef, estimator):
    rewards = torch.where(mask, -kl_coef * kl_value(lp - ref, estimator), 0.0)
    last = last_valid_index(mask)
    at_last = torch.arange(lp.shape[1], device=lp.device) == last[:, None]
    return rewards + torch.where(at_last, scores[:, None], 0.0), last


# 2. kernel adapters -------------------------------------------------------------

def _u8(mask):
    return None if mask is None else mask.view(torch.uint8)


def _native_forward(lp, ref, estimator):
    out = torch.empty_like(lp)
    _native.call(lp.device, "rlhf_kl_penalty_forward", lp, ref, lp.numel(), CODES[estimator], out)
    return out


def _native_backward(grad, lp, ref, mask, scale, estimator):
    g_lp, g_ref = torch.empty_like(lp), torch.empty_like(lp)
    _native.call(lp.device, "rlhf_kl_penalty_backward", grad, lp, ref, _u8(mask), scale, lp.numel(),
                 CODES[estimator], g_lp, g_ref)
    return g_lp, g_ref


def _native_shaped(scores, lp, ref, mask, kl_coef, estimator):
    rewards = torch.empty_like(lp)
    last = torch.empty(lp.shape[0], dtype=torch.int64, device=lp.device)
    _native.call(lp.device, "rlhf_kl_shaped_rewards", scores, lp, ref, _u8(mask), *lp.shape, kl_coef,
                 CODES[estimator], rewards, last)
    return rewards, last


for _backend, _requires in (("cpu", _native.CPU_KERNELS_ERROR), ("cuda", _native.CUDA_ERROR)):
    registry.register(OP, _backend, requires=_requires)(_native_forward)
    registry.register(OP_BACKWARD, _backend, requires=_requires)(_native_backward)
    registry.register(OP_SHAPED, _backend, requires=_requires)(_native_shaped)


@registry.register(OP, "triton")
def _triton_forward(lp, ref, estimator):
    from rlhf_engine.kernels import kl as kernels

    return kernels.kl_penalty_forward(lp, ref, CODES[estimator])


@registry.register(OP_BACKWARD, "triton")
def _triton_backward(grad, lp, ref, mask, scale, estimator):
    from rlhf_engine.kernels import kl as kernels

    return kernels.kl_penalty_backward(grad, lp, ref, _u8(mask), scale, CODES[estimator])


@registry.register(OP_SHAPED, "triton")
def _triton_shaped(scores, lp, ref, mask, kl_coef, estimator):
    from rlhf_engine.kernels import kl as kernels

    return kernels.kl_shaped_rewards(scores, lp, ref, _u8(mask), kl_coef, CODES[estimator])


# 3. custom ops -------------------------------------------------------------------

def _flat(t):
    return None if t is None else t.reshape(-1).contiguous()


def _penalty_inputs(logprobs, ref_logprobs, estimator, backend):
    """Checked kl_penalty inputs: (lp, ref in the compute dtype, canonical estimator, resolved backend)."""
    estimator = _canonical_estimator(estimator)
    dtype = _compute_dtype(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(ref_logprobs.shape)}")
    backend = registry.resolve(OP, backend, logprobs.device, dtype)
    return logprobs.to(dtype), ref_logprobs.to(dtype), estimator, backend


@torch.library.custom_op("rlhf_engine::kl_penalty", mutates_args=())
def kl_penalty_op(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1",
                  backend: str = "auto") -> torch.Tensor:
    """``torch.ops.rlhf_engine.kl_penalty``: the public op, float32 (float64
    for float64 inputs) of the shape of ``logprobs``."""
    lp, ref, estimator, backend = _penalty_inputs(logprobs, ref_logprobs, estimator, backend)
    checks.finite("logprobs", lp)
    checks.finite("ref_logprobs", ref)
    out = registry.get(OP, backend)(_flat(lp), _flat(ref), estimator)
    return out.view(logprobs.shape)


@kl_penalty_op.register_fake
def _(logprobs, ref_logprobs, *, estimator="k1", backend="auto"):
    lp, *_ = _penalty_inputs(logprobs, ref_logprobs, estimator, backend)
    return lp.new_empty(lp.shape)


@torch.library.custom_op("rlhf_engine::kl_penalty_backward", mutates_args=())
def kl_penalty_backward_op(grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                           mask: Optional[torch.Tensor], scale: float, estimator: str,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_logprobs, grad_ref_logprobs), shape and dtype of ``logprobs``:
    ``where(mask, scale * grad * dkl/dd, 0)`` and its negative (``mask`` None:
    everywhere). Takes the canonical estimator, a resolved backend and
    logprobs, ref_logprobs of the compute dtype."""
    g_lp, g_ref = registry.get(OP_BACKWARD, backend)(
        _flat(grad.to(logprobs.dtype)), _flat(logprobs), _flat(ref_logprobs), _flat(mask), scale, estimator)
    return g_lp.view(logprobs.shape), g_ref.view(logprobs.shape)


@kl_penalty_backward_op.register_fake
def _(grad, logprobs, ref_logprobs, mask, scale, estimator, backend):
    return logprobs.new_empty(logprobs.shape), logprobs.new_empty(logprobs.shape)


def _penalty_setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.args = (keyword_only_inputs["estimator"], keyword_only_inputs["backend"])


def _penalty_backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    lp, ref, estimator, backend = _penalty_inputs(logprobs, ref_logprobs, *ctx.args)
    g_lp, g_ref = kl_penalty_backward_op(grad, lp, ref, None, 1.0, estimator, backend)
    return g_lp.to(logprobs.dtype), g_ref.to(ref_logprobs.dtype)


kl_penalty_op.register_autograd(_penalty_backward, setup_context=_penalty_setup_context)


def _shaped_inputs(scores, logprobs, ref_logprobs, mask, kl_coef, estimator, backend):
    """Checked kl_shaped_rewards inputs: (scores, lp, ref contiguous in the
    compute dtype, mask contiguous bool, kl_coef, canonical estimator,
    resolved backend)."""
    estimator = _canonical_estimator(estimator)
    kl_coef = _finite_number("kl_coef", kl_coef)
    dtype = _compute_dtype(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(ref_logprobs.shape)}")
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be [B] = {tuple(logprobs.shape[:1])}, got {tuple(scores.shape)}")
    mask = checks.mask("mask", mask, logprobs.shape)
    checks.same_device(scores=scores, logprobs=logprobs, mask=mask)
    backend = registry.resolve(OP_SHAPED, backend, logprobs.device, dtype)
    tensors = (t.to(dtype).contiguous() for t in (scores, logprobs, ref_logprobs))
    return (*tensors, mask.contiguous(), kl_coef, estimator, backend)


@torch.library.custom_op("rlhf_engine::kl_shaped_rewards", mutates_args=())
def kl_shaped_rewards_op(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, *, kl_coef: float, estimator: str = "k1",
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.rlhf_engine.kl_shaped_rewards``: the public op; returns
    (rewards [B, T] float32 (float64 for float64 inputs), last [B] int64: the
    last valid index of each row, -1 for none)."""
    scores, lp, ref, mask, kl_coef, estimator, backend = _shaped_inputs(
        scores, logprobs, ref_logprobs, mask, kl_coef, estimator, backend)
    for name, t in (("scores", scores), ("logprobs", lp), ("ref_logprobs", ref)):
        checks.finite(name, t)
    return registry.get(OP_SHAPED, backend)(scores, lp, ref, mask, kl_coef, estimator)


@kl_shaped_rewards_op.register_fake
def _(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1", backend="auto"):
    _, lp, *_ = _shaped_inputs(scores, logprobs, ref_logprobs, mask, kl_coef, estimator, backend)
    return lp.new_empty(lp.shape), lp.new_empty(lp.shape[:1], dtype=torch.int64)


def _shaped_setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    ctx.args = (keyword_only_inputs["kl_coef"], keyword_only_inputs["estimator"], keyword_only_inputs["backend"])


def _at_last(grad, last):
    """grad[b, last[b]] [B], 0 where last[b] == -1."""
    if grad.shape[1] == 0:
        return grad.new_zeros(grad.shape[:1])
    return torch.where(last >= 0, grad.gather(1, last.clamp(min=0)[:, None])[:, 0], 0.0)


def _shaped_backward(ctx, grad, _grad_last):
    scores, logprobs, ref_logprobs, mask, last = ctx.saved_tensors
    _, lp, ref, bool_mask, kl_coef, estimator, backend = _shaped_inputs(scores, logprobs, ref_logprobs, mask,
                                                                        *ctx.args)
    g_lp, g_ref = kl_penalty_backward_op(grad, lp, ref, bool_mask, -kl_coef, estimator, backend)
    g_scores = _at_last(grad.to(lp.dtype), last)
    return g_scores.to(scores.dtype), g_lp.to(logprobs.dtype), g_ref.to(ref_logprobs.dtype), None


kl_shaped_rewards_op.register_autograd(_shaped_backward, setup_context=_shaped_setup_context)


# 4. public functions -------------------------------------------------------------

def _canonical_estimator(estimator):
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {estimator!r}")
    return ESTIMATORS[estimator]


def _compute_dtype(**tensors):
    """Check that each named tensor is floating and all share a device; the
    dtype to compute in: float64 if any is float64, else float32."""
    for name, t in tensors.items():
        checks.tensor(name, t, kind="float")
    checks.same_device(**tensors)
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32


def _finite_number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def kl_penalty(logprobs, ref_logprobs, *, estimator="k1", backend="auto"):
    """Per-token KL penalty of the policy to the reference, d = logprobs - ref_logprobs:

    ``"k1"`` d; ``"abs"`` |d|; ``"k2"`` / ``"mse"`` 0.5 d^2; ``"k3"`` /
    ``"low_var_kl"`` r = clamp(-d, -20, 20), clamp(exp(r) - r - 1, -10, 10)
    (evaluated without cancellation at small d).

    Args:
        logprobs, ref_logprobs: float tensors of one shape (any shape; float64
            only on the torch backend, other float dtypes computed in float32).
        estimator: one of the names above.
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        float32 tensor of the inputs' shape (float64 for float64 inputs).
        Differentiable w.r.t. both inputs: dkl/dd is 1, sign(d) (0 at 0), d,
        or 1 - exp(-d) (0 where a k3 clamp binds, i.e. the argument lies
        strictly outside the bound), and -dkl/dd for ``ref_logprobs``.
        NaN in an input gives NaN at that position (value and gradients);
        under ``debug_checks(True)`` NaN or inf inputs raise ValueError.
    """
    estimator = _canonical_estimator(estimator)
    checks.tensor("logprobs", logprobs, kind="float")
    checks.tensor("ref_logprobs", ref_logprobs, kind="float")
    return kl_penalty_op(logprobs, ref_logprobs, estimator=estimator, backend=backend)


def kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1", backend="auto"):
    """The InstructGPT token-level reward:
    ``rewards[b, t] = -kl_coef * kl_penalty(logprobs, ref_logprobs)[b, t]``
    where ``mask[b, t]``, plus ``scores[b]`` at the last position of row b
    where ``mask`` is 1 (the mask decides, not the token ids: padding equal to
    EOS, or masked spans inside a response, do not move the score); 0.0 where
    ``mask`` is 0; a row with no valid position is all zeros.

    Args:
        scores: ``[B]`` float (the reward model's score per response).
        logprobs, ref_logprobs: ``[B, T]`` float (policy and reference).
        mask: ``[B, T]``, bool or any float/int dtype holding 0/1.
        kl_coef: a finite number (Python or NumPy scalar, not a tensor).
        estimator: as in :func:`kl_penalty`.
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        ``[B, T]`` float32 (float64 for float64 inputs; other float dtypes are
        computed in float32). B = 0 or T = 0 gives an empty tensor.

        Differentiable w.r.t. ``scores`` (the gradient at each row's last
        valid position), ``logprobs`` and ``ref_logprobs`` (``-kl_coef``
        times those of :func:`kl_penalty`, 0 where ``mask`` is 0). Rewards
        are usually computed under ``torch.no_grad()``, and then nothing is
        saved; the gradient costs nothing otherwise and makes the op usable
        where the penalty is optimised directly (KL-in-the-loss set-ups).

        NaN in ``logprobs``/``ref_logprobs`` gives NaN only at masked-in
        positions, NaN in ``scores[b]`` only at row b's last valid position;
        under ``debug_checks(True)`` NaN or inf anywhere in these inputs
        raises ValueError.
    """
    estimator = _canonical_estimator(estimator)
    kl_coef = _finite_number("kl_coef", kl_coef)
    for name, t in (("scores", scores), ("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        checks.tensor(name, t, kind="float")
    checks.tensor("mask", mask)
    rewards, _ = kl_shaped_rewards_op(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator,
                                      backend=backend)
    return rewards
