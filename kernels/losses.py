"""PPO policy and value losses and the pairwise reward loss in Triton.

Contract (per-token math, ``partials`` [B, 5] and ``stats`` [4] layouts, the
reductions): ``csrc/include/rlhf_engine/losses.h``. Inputs are contiguous
float32 [B, T], the mask uint8 (a bool tensor viewed as bytes).

Kernels:

* ``_forward_rows_kernel``: one program per row walks it in BLOCK_T chunks
  (one read of the four inputs), keeping BLOCK_T float32 lane accumulators
  per statistic, and writes the row's partials (a fixed-order ``tl.sum``).
* ``_finalize_kernel``: one program reduces the partials over rows in
  BLOCK_B blocks, in a fixed order, to the 0-d loss and the stats: no atomics,
  so results are bit-identical run to run.
* ``_backward_kernel``: one program per (row, BLOCK_T chunk) recomputes each
  token's derivative and writes ``grad_loss * w_row * dl/dx`` (the upstream
  gradient and the denominator are read from device memory: no host sync).

Pairwise (``pairwise_loss_forward``, ``pairwise_loss_backward``):
``_pairwise_tiles_kernel`` writes per-BLOCK partials (sum softplus(-z),
number correct), ``_pairwise_finalize_kernel`` reduces them in a fixed order
to the 0-d loss and accuracy, and ``_pairwise_backward_kernel`` writes both
gradients in one element-wise pass (upstream gradient read from device
memory). ``log1p(e)`` is ``log(u) * e / (u - 1)`` with ``u = 1 + e`` (``e``
when ``u`` rounds to 1), accurate where a plain ``log(1 + e)`` is not.

``exp(neg_kl)`` is formed as ``exp2(t) * (1 + r ln 2)`` with ``t = neg_kl *
log2(e)`` and ``r`` its exact rounding residual, so that it keeps float32
accuracy up to |neg_kl| = 20 (a plain ``exp2(neg_kl * log2(e))`` loses up to
1.2e-6 relative there). Clamps are written with ``tl.where`` so that NaN
propagates (``tl.maximum`` drops NaN on GPUs). Hyper-parameters are cast to
float32 in the kernels.
"""
import torch
import triton
import triton.language as tl

from rlhf_engine.kernels.common import INTERPRET, clamp, fma, on_device

__all__ = ["ppo_loss_forward", "ppo_loss_backward", "pairwise_loss_forward", "pairwise_loss_backward"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_KINDS = {"policy": 0, "value": 1}
_N_PARTIALS, _N_STATS = 5, 4
_EXP_BOUND = tl.constexpr(110.0)  # exp(+-110) is inf / 0 in float32; the residual is NaN at +-inf
_PAIRWISE_BLOCK = 1024


@triton.jit
def _exp_accurate(x, INTERPRET: tl.constexpr):
    """exp(x) = exp2(t) * (1 + r ln 2), t = x log2(e) and r its exact residual."""
    log2e = tl.full([], _LOG2E, tl.float32)
    t = x * log2e
    return tl.exp2(t) * (1.0 + fma(x, log2e, -t, INTERPRET) * _LN2)


@triton.jit
def _policy_token(x, old, adv, clip_low, clip_high, dual, INTERPRET: tl.constexpr):
    d = x - old
    neg_kl = clamp(d, -20.0, 20.0)
    ratio = _exp_accurate(neg_kl, INTERPRET)
    l1 = -adv * ratio
    l2 = -adv * clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = l2 > l1
    inside = (d >= -20.0) & (d <= 20.0)
    loss = tl.where(clipped, l2, l1)
    grad = tl.where(clipped, 0.0, l1 * tl.where(inside, 1.0, 0.0))
    bound = tl.where(dual > 0.0, -adv * dual, float("inf"))  # dual == 0: off
    lower = (adv < 0.0) & (loss > bound)
    loss = tl.where(lower, bound, loss)
    grad = tl.where(lower, 0.0, grad)
    return loss, grad, tl.where(clipped, 1.0, 0.0), -neg_kl, tl.where(lower, 1.0, 0.0)


@triton.jit
def _value_token(v, old, ret, clip):
    delta = v - old
    inside = (delta >= -clip) & (delta <= clip)
    e1 = v - ret
    e2 = tl.where(inside, e1, old + clamp(delta, -clip, clip) - ret)  # v_clip is exactly v inside
    s1 = e1 * e1
    s2 = e2 * e2
    on_e1 = s2 <= s1  # NaN in e2 selects e2: NaN propagates
    zero = tl.zeros_like(e1)
    return (0.5 * tl.where(on_e1, s1, s2), tl.where(on_e1, e1, e2 * 0.0), tl.where(s2 > s1, 1.0, 0.0),
            zero, zero)


@triton.jit
def _token(x, old, target, p0, p1, p2, KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """(l, dl, clipped, -neg_kl, lower) of a block of tokens (losses.h)."""
    if KIND == 0:
        return _policy_token(x, old, target, p0, p1, p2, INTERPRET)
    else:
        return _value_token(x, old, target, p0)


@triton.jit
def _load_tokens(x_ptr, old_ptr, target_ptr, mask_ptr, offs, in_bounds):
    x = tl.load(x_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    valid = tl.load(mask_ptr + offs, mask=in_bounds, other=0).to(tl.int32) != 0
    return x, old, target, valid


@triton.jit
def _forward_rows_kernel(x_ptr, old_ptr, target_ptr, mask_ptr, partials_ptr, T, p0, p1, p2,
                         KIND: tl.constexpr, BLOCK_T: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    p0, p1, p2 = tl.cast(p0, tl.float32), tl.cast(p1, tl.float32), tl.cast(p2, tl.float32)
    acc_l = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        x, old, target, valid = _load_tokens(x_ptr, old_ptr, target_ptr, mask_ptr, base + cols, cols < T)
        loss, _, clipped, kl, lower = _token(x, old, target, p0, p1, p2, KIND, INTERPRET)
        acc_l += tl.where(valid, loss, 0.0)
        acc_n += tl.where(valid, 1.0, 0.0)
        acc_c += tl.where(valid, clipped, 0.0)
        acc_k += tl.where(valid, kl, 0.0)
        acc_w += tl.where(valid, lower, 0.0)
    out = partials_ptr + row * 5
    tl.store(out + 0, tl.sum(acc_l, 0))
    tl.store(out + 1, tl.sum(acc_n, 0))
    tl.store(out + 2, tl.sum(acc_c, 0))
    tl.store(out + 3, tl.sum(acc_k, 0))
    tl.store(out + 4, tl.sum(acc_w, 0))


@triton.jit
def _finalize_kernel(partials_ptr, B, normalizer_ptr, loss_ptr, stats_ptr,
                     AGG: tl.constexpr, HAS_NORMALIZER: tl.constexpr, BLOCK_B: tl.constexpr):
    acc_l = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_rows = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_means = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        p = partials_ptr + rows.to(tl.int64) * 5
        in_bounds = rows < B
        sum_l = tl.load(p + 0, mask=in_bounds, other=0.0)
        count = tl.load(p + 1, mask=in_bounds, other=0.0)
        acc_l += sum_l
        acc_n += count
        acc_c += tl.load(p + 2, mask=in_bounds, other=0.0)
        acc_k += tl.load(p + 3, mask=in_bounds, other=0.0)
        acc_w += tl.load(p + 4, mask=in_bounds, other=0.0)
        has = count > 0.0
        acc_rows += tl.where(has, 1.0, 0.0)
        acc_means += tl.where(has, sum_l / tl.where(has, count, 1.0), 0.0)
    count = tl.sum(acc_n, 0)
    if AGG == 2:
        num = tl.sum(acc_means, 0)
    else:
        num = tl.sum(acc_l, 0)
    if HAS_NORMALIZER:
        denom = tl.load(normalizer_ptr).to(tl.float32)
    elif AGG == 0:
        denom = count
    else:
        denom = tl.sum(acc_rows, 0)
    tl.store(loss_ptr, tl.where(denom > 0.0, num / tl.where(denom > 0.0, denom, 1.0), 0.0))
    n = tl.where(count > 0.0, count, 1.0)
    tl.store(stats_ptr + 0, tl.sum(acc_c, 0) / n)
    tl.store(stats_ptr + 1, tl.where(count > 0.0, tl.sum(acc_k, 0) / n, 0.0))
    tl.store(stats_ptr + 2, tl.sum(acc_w, 0) / n)
    tl.store(stats_ptr + 3, denom)


@triton.jit
def _backward_kernel(grad_loss_ptr, x_ptr, old_ptr, target_ptr, mask_ptr, partials_ptr, stats_ptr, grad_ptr, T,
                     p0, p1, p2, KIND: tl.constexpr, AGG: tl.constexpr, BLOCK_T: tl.constexpr,
                     INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    p0, p1, p2 = tl.cast(p0, tl.float32), tl.cast(p1, tl.float32), tl.cast(p2, tl.float32)
    denom = tl.load(stats_ptr + 3)
    w = tl.where(denom > 0.0, tl.load(grad_loss_ptr) / tl.where(denom > 0.0, denom, 1.0), 0.0)
    if AGG == 2:
        count = tl.load(partials_ptr + row * 5 + 1)
        w = tl.where(count > 0.0, w / tl.where(count > 0.0, count, 1.0), 0.0)
    offs = row * T + cols
    in_bounds = cols < T
    x, old, target, valid = _load_tokens(x_ptr, old_ptr, target_ptr, mask_ptr, offs, in_bounds)
    _, dl, _, _, _ = _token(x, old, target, p0, p1, p2, KIND, INTERPRET)
    tl.store(grad_ptr + offs, tl.where(valid, w * dl, 0.0), mask=in_bounds)


def _block(n, cap):
    return max(16, min(triton.next_power_of_2(max(n, 1)), cap))


def _params(params):
    return tuple(params) + (0.0,) * (3 - len(params))


def ppo_loss_forward(kind, x, old, target, mask, normalizer, params, agg):
    """(loss [], stats [4], partials [B, 5]) float32 of contiguous [B, T]
    float32 inputs and a bool mask; ``normalizer`` a 0-d float32 tensor or None."""
    b, t = x.shape
    loss = x.new_empty(())
    stats = x.new_empty(_N_STATS)
    partials = x.new_empty(b, _N_PARTIALS)
    block_t = _block(t, 2048)
    with on_device(x.device):
        if b > 0:
            _forward_rows_kernel[(b,)](x, old, target, mask.view(torch.uint8), partials, t, *_params(params),
                                       KIND=_KINDS[kind], BLOCK_T=block_t, INTERPRET=INTERPRET,
                                       num_warps=max(1, min(8, block_t // 256)))
        _finalize_kernel[(1,)](partials, b, loss if normalizer is None else normalizer, loss, stats, AGG=agg,
                               HAS_NORMALIZER=normalizer is not None, BLOCK_B=_block(b, 1024), num_warps=4)
    return loss, stats, partials


def ppo_loss_backward(kind, grad_loss, x, old, target, mask, params, agg, partials, stats):
    """grad [B, T] float32 (see losses.h); ``grad_loss`` a 0-d float32 tensor."""
    b, t = x.shape
    grad = torch.empty_like(x)
    block_t = _block(t, 1024)
    if b > 0 and t > 0:
        grid = (b, triton.cdiv(t, block_t))
        with on_device(x.device):
            _backward_kernel[grid](grad_loss, x, old, target, mask.view(torch.uint8), partials, stats, grad, t,
                                   *_params(params), KIND=_KINDS[kind], AGG=agg, BLOCK_T=block_t,
                                   INTERPRET=INTERPRET, num_warps=max(1, min(8, block_t // 256)))
    return grad


@triton.jit
def _load_pairs(chosen_ptr, rejected_ptr, margin_ptr, offs, in_bounds):
    """(chosen, rejected, z = chosen - rejected - margin) of a block of pairs."""
    chosen = tl.load(chosen_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    rejected = tl.load(rejected_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    margin = tl.load(margin_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    return chosen, rejected, chosen - rejected - margin


@triton.jit
def _pairwise_tiles_kernel(chosen_ptr, rejected_ptr, margin_ptr, partials_ptr, N, BLOCK: tl.constexpr,
                           INTERPRET: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < N
    chosen, rejected, z = _load_pairs(chosen_ptr, rejected_ptr, margin_ptr, offs, in_bounds)
    e = _exp_accurate(-tl.abs(clamp(z, -_EXP_BOUND, _EXP_BOUND)), INTERPRET)
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    softplus = tl.where(z > 0.0, 0.0, -z) + log1p  # -logsigmoid(z); the comparison keeps NaN
    tl.store(partials_ptr + tile * 2, tl.sum(tl.where(in_bounds, softplus, 0.0), 0))
    tl.store(partials_ptr + tile * 2 + 1, tl.sum(tl.where(in_bounds & (chosen > rejected), 1.0, 0.0), 0))


@triton.jit
def _pairwise_finalize_kernel(partials_ptr, tiles, count, loss_ptr, accuracy_ptr, BLOCK: tl.constexpr):
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, tiles, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        p = partials_ptr + k.to(tl.int64) * 2
        acc_l += tl.load(p, mask=k < tiles, other=0.0)
        acc_c += tl.load(p + 1, mask=k < tiles, other=0.0)
    tl.store(loss_ptr, tl.sum(acc_l, 0) / count)
    tl.store(accuracy_ptr, tl.sum(acc_c, 0) / count)


@triton.jit
def _pairwise_backward_kernel(grad_loss_ptr, chosen_ptr, rejected_ptr, margin_ptr, grad_chosen_ptr,
                              grad_rejected_ptr, N, count, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < N
    _, _, z = _load_pairs(chosen_ptr, rejected_ptr, margin_ptr, offs, in_bounds)
    w = tl.load(grad_loss_ptr).to(tl.float32) / count
    g = -w / (1.0 + _exp_accurate(clamp(z, -_EXP_BOUND, _EXP_BOUND), INTERPRET))  # -sigmoid(-z) g / N
    tl.store(grad_chosen_ptr + offs, g, mask=in_bounds)
    tl.store(grad_rejected_ptr + offs, -g, mask=in_bounds)


def _count(n):
    """The divisor of the pairwise mean (a float32 runtime argument; 1 when empty)."""
    return float(max(n, 1))


def pairwise_loss_forward(chosen, rejected, margin):
    """(loss [], accuracy []) float32 of contiguous float32 [N] scores and margin."""
    n = chosen.numel()
    loss = chosen.new_empty(())
    accuracy = chosen.new_empty(())
    tiles = triton.cdiv(n, _PAIRWISE_BLOCK)
    partials = chosen.new_empty(tiles, 2)
    with on_device(chosen.device):
        if tiles > 0:
            _pairwise_tiles_kernel[(tiles,)](chosen, rejected, margin, partials, n, BLOCK=_PAIRWISE_BLOCK,
                                             INTERPRET=INTERPRET, num_warps=4)
        _pairwise_finalize_kernel[(1,)](partials, tiles, _count(n), loss, accuracy, BLOCK=_block(tiles, 1024),
                                        num_warps=4)
    return loss, accuracy


def pairwise_loss_backward(grad_loss, chosen, rejected, margin):
    """(grad_chosen [N], grad_rejected [N]) float32; ``grad_loss`` a 0-d float32 tensor."""
    n = chosen.numel()
    grad_chosen = torch.empty_like(chosen)
    grad_rejected = torch.empty_like(chosen)
    if n > 0:
        with on_device(chosen.device):
            _pairwise_backward_kernel[(triton.cdiv(n, _PAIRWISE_BLOCK),)](
                grad_loss, chosen, rejected, margin, grad_chosen, grad_rejected, n, _count(n),
                BLOCK=_PAIRWISE_BLOCK, INTERPRET=INTERPRET, num_warps=4)
    return grad_chosen, grad_rejected
