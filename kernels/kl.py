"""KL penalty and KL-shaped rewards in Triton.

Contract: ``csrc/include/rlhf_engine/kl.h`` (float32 contiguous inputs, uint8
masks; estimator codes k1 = 0, abs = 1, k2 = 2, k3 = 3). With
d = logprobs - ref_logprobs:

* ``kl_penalty_forward``: kl(d), one program per BLOCK elements.
* ``kl_penalty_backward``: both gradients in one pass,
  g = mask ? scale * grad * dkl/dd : 0, written as (g, -g).
* ``kl_shaped_rewards``: one program per row; a first loop over the row's
  mask (1 byte per token) finds the last valid index, a second writes the
  row: mask ? -kl_coef * kl(d) (+ score at the last valid index) : 0. No host
  synchronisation; the last index is also stored ([B] int64, -1 for none).

k3's exp(r) - r - 1 uses its Taylor series for |r| < 1 (no cancellation at
small d); the clamps pass NaN through, and derivatives are NaN where d is NaN.
Every load is converted to float32 right after ``tl.load``; float
hyper-parameters are runtime arguments cast to float32 in the kernels.
"""
import torch
import triton
import triton.language as tl

from rlhf_engine.kernels.common import clamp, on_device

__all__ = ["kl_penalty_forward", "kl_penalty_backward", "kl_shaped_rewards"]

_BLOCK = 1024  # elements per program (element-wise kernels)
_MAX_BLOCK_T = 1024  # tokens per loop step (shaped rewards)


@triton.jit
def _exp_m1_m_id(r):
    """exp(r) - 1 - r for |r| <= 20: series r^2 (1/2! + ... + r^10/12!) for |r| < 1."""
    p = 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    return tl.where(tl.abs(r) < 1.0, r * r * p, (tl.exp(r) - 1.0) - r)


@triton.jit
def _kl_value(d, ESTIMATOR: tl.constexpr):
    if ESTIMATOR == 0:
        out = d
    elif ESTIMATOR == 1:
        out = tl.abs(d)
    elif ESTIMATOR == 2:
        out = 0.5 * d * d
    else:
        out = clamp(_exp_m1_m_id(clamp(-d, -20.0, 20.0)), -10.0, 10.0)
    return out


@triton.jit
def _kl_derivative(d, ESTIMATOR: tl.constexpr):
    if ESTIMATOR == 0:
        out = tl.full(d.shape, 1.0, tl.float32)
    elif ESTIMATOR == 1:
        out = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    elif ESTIMATOR == 2:
        out = d
    else:
        r = clamp(-d, -20.0, 20.0)
        v = _exp_m1_m_id(r)
        binds = (tl.abs(d) > 20.0) | (tl.abs(v) > 10.0)
        out = tl.where(binds, 0.0, -(v + r))
    return tl.where(d != d, d, out)


@triton.jit
def _kl_forward_kernel(lp_ptr, ref_ptr, out_ptr, n, ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _kl_value(lp - ref, ESTIMATOR), mask=inb)


@triton.jit
def _kl_backward_kernel(grad_ptr, lp_ptr, ref_ptr, mask_ptr, g_lp_ptr, g_ref_ptr, scale, n,
                        HAS_MASK: tl.constexpr, ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    scale = tl.cast(scale, tl.float32)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    grad = tl.load(grad_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = scale * grad * _kl_derivative(lp - ref, ESTIMATOR)
    if HAS_MASK:
        valid = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
        g = tl.where(valid, g, 0.0)
    tl.store(g_lp_ptr + offs, g, mask=inb)
    tl.store(g_ref_ptr + offs, -g, mask=inb)


@triton.jit
def _kl_shaped_kernel(scores_ptr, lp_ptr, ref_ptr, mask_ptr, rewards_ptr, last_ptr, kl_coef, T,
                      ESTIMATOR: tl.constexpr, BLOCK_T: tl.constexpr):
    neg_coef = -tl.cast(kl_coef, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    cols = tl.arange(0, BLOCK_T)
    last = tl.full([], -1, tl.int32)
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        valid = tl.load(mask_ptr + base + offs, mask=offs < T, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(valid, offs, -1), axis=0))
    score = tl.load(scores_ptr + row).to(tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + cols
        inb = offs < T
        valid = tl.load(mask_ptr + base + offs, mask=inb, other=0) != 0
        lp = tl.load(lp_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        r = tl.where(valid, neg_coef * _kl_value(lp - ref, ESTIMATOR), 0.0)
        r = tl.where(offs == last, r + score, r)
        tl.store(rewards_ptr + base + offs, r, mask=inb)
    tl.store(last_ptr + row, last.to(tl.int64))




def kl_penalty_forward(lp, ref, estimator: int):
    """lp, ref [N] float32 contiguous -> kl [N] float32."""
    out = torch.empty_like(lp)
    n = lp.numel()
    if n:
        with on_device(lp.device):
            _kl_forward_kernel[(triton.cdiv(n, _BLOCK),)](lp, ref, out, n, ESTIMATOR=estimator, BLOCK=_BLOCK)
    return out


def kl_penalty_backward(grad, lp, ref, mask, scale: float, estimator: int):
    """grad, lp, ref [N] float32, mask [N] uint8 or None -> (grad_lp, grad_ref) [N] float32."""
    g_lp, g_ref = torch.empty_like(lp), torch.empty_like(lp)
    n = lp.numel()
    if n:
        with on_device(lp.device):
            _kl_backward_kernel[(triton.cdiv(n, _BLOCK),)](
                grad, lp, ref, lp if mask is None else mask, g_lp, g_ref, float(scale), n,
                HAS_MASK=mask is not None, ESTIMATOR=estimator, BLOCK=_BLOCK)
    return g_lp, g_ref


def kl_shaped_rewards(scores, lp, ref, mask, kl_coef: float, estimator: int):
    """scores [B], lp, ref [B, T] float32, mask [B, T] uint8 (contiguous) ->
    (rewards [B, T] float32, last [B] int64). T must be below 2^31."""
    n_rows, n_cols = lp.shape
    rewards = torch.empty_like(lp)
    last = torch.empty(n_rows, dtype=torch.int64, device=lp.device)
    if n_rows:
        block_t = max(16, min(triton.next_power_of_2(max(n_cols, 1)), _MAX_BLOCK_T))
        with on_device(lp.device):
            _kl_shaped_kernel[(n_rows,)](scores, lp, ref, mask, rewards, last, float(kl_coef), n_cols,
                                         ESTIMATOR=estimator, BLOCK_T=block_t)
    return rewards, last
