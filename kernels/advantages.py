"""GAE, masked whitening and group advantages in Triton.

Contract: ``csrc/include/rlhf_engine/advantages.h`` (same semantics as the
C++/CUDA entry points). Inputs are contiguous float32 tensors and uint8 masks.

GAE as a scan. Walking a row from right to left, each position is an affine
map of the state s = (next_v, A) (the value and advantage of the next valid
position): a valid position maps s to (v, (r - v) + gamma * next_v +
gamma * lam * A); a masked one is the identity. These maps are lower
triangular, ``[[p, 0], [q, s]]`` plus an offset ``(bv, ba)``, and compose
associatively, so one program per row walks the row in chunks of BLOCK_T
positions (the index reversed, so the scan runs forward: Triton's reverse
associative scan has a known bug), scans each chunk's maps in parallel, and
applies the chunk's prefix maps to the state carried in from the chunk to
its right. A row costs ceil(T / BLOCK_T) dependent steps instead of T.
The scan runs in float64 (a float32 one drifts past 1e-6 relative over a
thousand undiscounted steps); the traffic is unchanged and H100-class GPUs
have the float64 throughput for it.
Masked positions enter as the identity through ``tl.where`` (never
multiplied by 0), so whatever they hold (NaN too) is never used.

Whitening: per-row partial moments in float64 (one program per row, a fixed
reduction tree), a one-program fixed-order sum over rows, then an
element-wise pass; the mean is found first and the variance summed around
it. Group advantages: one program per block of groups (any group size),
float64 statistics.
Launchers never synchronise with the device.
"""
import torch
import triton
import triton.language as tl

from rlhf_engine.kernels.common import on_device

__all__ = ["gae", "masked_whiten", "group_advantages"]

MAX_BLOCK_T = 1024


@triton.jit
def _compose(p1, q1, s1, bv1, ba1, p2, q2, s2, bv2, ba2):
    """Map 2 after map 1, both ``(nv, A) -> ([[p, 0], [q, s]] (nv, A) + (bv, ba))``."""
    return (p2 * p1, q2 * p1 + s2 * q1, s2 * s1, p2 * bv1 + bv2, q2 * bv1 + s2 * ba1 + ba2)


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, T, gamma, gl, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    gamma = tl.cast(gamma, tl.float32).to(tl.float64)
    gl = tl.cast(gl, tl.float32).to(tl.float64)
    j = tl.arange(0, BLOCK_T)
    nv = tl.zeros((), tl.float64)
    a = tl.zeros((), tl.float64)
    for start in range(0, T, BLOCK_T):
        t = T - 1 - (start + j)  # reversed: j = 0 is the rightmost position of the chunk
        inside = t >= 0
        valid = (tl.load(m_ptr + base + t, mask=inside, other=0) != 0) & inside
        r = tl.load(r_ptr + base + t, mask=valid, other=0.0).to(tl.float32).to(tl.float64)
        v = tl.load(v_ptr + base + t, mask=valid, other=0.0).to(tl.float32).to(tl.float64)
        one = tl.full((BLOCK_T,), 1.0, tl.float64)
        zero = tl.zeros((BLOCK_T,), tl.float64)
        p = tl.where(valid, zero, one)
        q = tl.where(valid, gamma, zero)
        s = tl.where(valid, gl, one)
        bv = tl.where(valid, v, zero)
        ba = tl.where(valid, r - v, zero)
        p, q, s, bv, ba = tl.associative_scan((p, q, s, bv, ba), 0, _compose)
        nv_t = p * nv + bv
        a_t = q * nv + s * a + ba
        tl.store(adv_ptr + base + t, tl.where(valid, a_t, 0.0).to(tl.float32), mask=inside)
        tl.store(ret_ptr + base + t, tl.where(valid, a_t + v, 0.0).to(tl.float32), mask=inside)
        last = j == BLOCK_T - 1
        nv = tl.sum(tl.where(last, nv_t, 0.0), 0)
        a = tl.sum(tl.where(last, a_t, 0.0), 0)


@triton.jit
def _row_moments_kernel(x_ptr, m_ptr, center_ptr, part_ptr, C, CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    """part[row] = (count, sum of d) or, CENTERED, (count, sum of d^2), with
    d = x - center over the row's valid positions, in float64."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    center = tl.zeros((), tl.float64)
    if CENTERED:
        center = tl.load(center_ptr).to(tl.float64)
    count = tl.zeros((BLOCK,), tl.float64)
    acc = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, C, BLOCK):
        cols = start + offs
        inside = cols < C
        valid = (tl.load(m_ptr + row * C + cols, mask=inside, other=0) != 0) & inside
        x = tl.load(x_ptr + row * C + cols, mask=valid, other=0.0).to(tl.float32)
        d = tl.where(valid, x.to(tl.float64) - center, 0.0)
        count += tl.where(valid, 1.0, 0.0).to(tl.float64)
        if CENTERED:
            acc += d * d
        else:
            acc += d
    tl.store(part_ptr + row * 2, tl.sum(count, 0))
    tl.store(part_ptr + row * 2 + 1, tl.sum(acc, 0))


@triton.jit
def _whiten_stats_kernel(part_ptr, stats_ptr, R, eps, CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    """Fixed-order sum of the per-row moments. Not CENTERED: stats[0] = mean
    (0 with no valid position). CENTERED: stats[1] = 1 / sqrt(var + eps)
    (var 0 with fewer than two valid positions)."""
    offs = tl.arange(0, BLOCK)
    count = tl.zeros((BLOCK,), tl.float64)
    acc = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, R, BLOCK):
        rows = start + offs
        inside = rows < R
        count += tl.load(part_ptr + rows * 2, mask=inside, other=0.0)
        acc += tl.load(part_ptr + rows * 2 + 1, mask=inside, other=0.0)
    n = tl.sum(count, 0)
    total = tl.sum(acc, 0)
    if CENTERED:
        var = tl.where(n >= 2.0, total / tl.maximum(n - 1.0, 1.0), 0.0)
        tl.store(stats_ptr + 1, 1.0 / tl.sqrt(var + tl.cast(eps, tl.float64)))
    else:
        tl.store(stats_ptr, tl.where(n > 0.0, total / tl.maximum(n, 1.0), 0.0))


@triton.jit
def _whiten_apply_kernel(x_ptr, m_ptr, stats_ptr, out_ptr, N, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    valid = (tl.load(m_ptr + offs, mask=inside, other=0) != 0) & inside
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    mean = tl.load(stats_ptr)
    scale = tl.load(stats_ptr + 1)
    y = (x.to(tl.float64) - mean) * scale
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(valid, y.to(tl.float32), 0.0), mask=inside)


@triton.jit
def _group_kernel(s_ptr, out_ptr, n_groups, group_size, eps, NORMALIZE_STD: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """BLOCK_G groups per program, walked in column blocks of BLOCK_S: the
    sum, then the squared deviations, then the outputs."""
    groups = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    rows = groups[:, None] < n_groups
    cols = tl.arange(0, BLOCK_S)[None, :]
    total = tl.zeros((BLOCK_G,), tl.float64)
    for c0 in range(0, group_size, BLOCK_S):
        inside = rows & (c0 + cols < group_size)
        x = tl.load(s_ptr + groups[:, None] * group_size + c0 + cols, mask=inside, other=0.0).to(tl.float32)
        total += tl.sum(x.to(tl.float64), 1)
    mean = total / group_size
    scale = tl.full((BLOCK_G,), 1.0, tl.float64)
    if NORMALIZE_STD:
        ss = tl.zeros((BLOCK_G,), tl.float64)
        for c0 in range(0, group_size, BLOCK_S):
            inside = rows & (c0 + cols < group_size)
            x = tl.load(s_ptr + groups[:, None] * group_size + c0 + cols, mask=inside, other=0.0).to(tl.float32)
            d = tl.where(inside, x.to(tl.float64) - mean[:, None], 0.0)
            ss += tl.sum(d * d, 1)
        scale = 1.0 / (tl.sqrt(ss / tl.maximum(group_size - 1, 1)) + tl.cast(eps, tl.float64))
    for c0 in range(0, group_size, BLOCK_S):
        inside = rows & (c0 + cols < group_size)
        offs = groups[:, None] * group_size + c0 + cols
        x = tl.load(s_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        y = (x.to(tl.float64) - mean[:, None]) * scale[:, None]
        tl.store(out_ptr + offs, y.to(tl.float32), mask=inside)




def gae(rewards, values, mask, gamma: float, lam: float, block_t: int = None):
    """rewards, values [B, T] float32, mask [B, T] uint8 (all contiguous) ->
    (advantages, returns) [B, T] float32. ``block_t`` (a power of two; tests
    use small ones to cover several chunks) defaults to min(T, 1024) rounded up."""
    B, T = rewards.shape
    adv, ret = torch.empty_like(rewards), torch.empty_like(rewards)
    if B == 0 or T == 0:
        return adv.zero_(), ret.zero_()
    block = block_t or min(MAX_BLOCK_T, triton.next_power_of_2(T))
    with on_device(rewards.device):
        _gae_kernel[(B,)](rewards, values, mask, adv, ret, T, gamma, gamma * lam, BLOCK_T=block,
                          num_warps=max(1, min(8, block // 128)))
    return adv, ret


def masked_whiten(x, mask, shift_mean: bool, eps: float):
    """x [R, C] float32, mask [R, C] uint8 (contiguous) -> whitened [R, C] float32."""
    R, C = x.shape
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    part = torch.empty((R, 2), dtype=torch.float64, device=x.device)
    stats = torch.empty(2, dtype=torch.float64, device=x.device)  # (mean, 1 / sqrt(var + eps))
    block_c = min(1024, triton.next_power_of_2(C))
    block_r = min(1024, triton.next_power_of_2(R))
    with on_device(x.device):
        for centered in (False, True):
            _row_moments_kernel[(R,)](x, mask, stats, part, C, CENTERED=centered, BLOCK=block_c)
            _whiten_stats_kernel[(1,)](part, stats, R, eps, CENTERED=centered, BLOCK=block_r)
        block = 1024
        _whiten_apply_kernel[(triton.cdiv(x.numel(), block),)](x, mask, stats, out, x.numel(),
                                                               SHIFT_MEAN=bool(shift_mean), BLOCK=block)
    return out


def group_advantages(scores, group_size: int, normalize_std: bool, eps: float):
    """scores [N] float32 (N a multiple of group_size) -> [N] float32."""
    out = torch.empty_like(scores)
    n_groups = scores.shape[0] // group_size
    if n_groups == 0:
        return out
    block_s = min(1024, triton.next_power_of_2(group_size))
    block_g = max(1, min(64, 4096 // block_s))
    with on_device(scores.device):
        _group_kernel[(triton.cdiv(n_groups, block_g),)](scores, out, n_groups, group_size, eps,
                                                         NORMALIZE_STD=bool(normalize_std), BLOCK_G=block_g,
                                                         BLOCK_S=block_s)
    return out
