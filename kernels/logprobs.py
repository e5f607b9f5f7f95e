"""Token log-probabilities (and entropy) of temperature-scaled logits, in Triton.

Contract: ``csrc/include/rlhf_engine/logprobs.h``. Per row with label y, and
c = (float)(log2(e) / T) (T rounded to float32 first, as the C entry points
receive it):

    stats   = (m2, l2): m2 = the row max of x * c as float32, and
              l2 = log2(sum 2^(x * c - m2)), so that
              log2 p = fma(x, c, -m2) - l2        and  lse = (m2 + l2) ln 2
    logp    = ln2 * log2 p[y]
    entropy = -sum p ln p
    grad    = (g_logp * (onehot(y) - p) - g_ent * p * (ln p + entropy)) / T,
              ``onehot - p`` formed in float32 before rounding

Keeping the shift m2 apart from the small log-sum l2 keeps full float32
precision at large common offsets (a float32 lse near 1e4 is only good to
5e-4). Rows with y == ignore_index: logp = entropy = 0, stats = (0, 0), zero
gradient row, the logits row is not read. Rows with y outside [0, V):
logp = entropy = NaN and a NaN gradient row; the logits row is not read and
stats are NaN too (the header leaves them open).

Design and traffic model (B = bytes per logit, N rows, V vocab):

* Forward: one program per row walks the row in BLOCK_V chunks with an online
  maximum m (raw logit units), reading every logit exactly once (N*V*B bytes
  read, 16*N written). Each element costs one subtract, one multiply and one
  exp2 (log2(e) / T is folded into c): u = (l - m) * c <= 0. Per-lane
  accumulators, rescaled only in the (rare, block-uniform) iteration where m
  grows:
      s = sum over non-maximal elements of 2^u      (each term < 1)
      k = number of elements equal to m             (each worth 2^0 = 1)
      t = sum 2^u * u                               (entropy only; <= 0)
  Keeping the exact 1s of the maximal elements out of s gives
  log2(k + s) = log2(k) + log1p(s / k) / ln2 to full relative precision, so
  confident rows (p(y) ~ 0.999 and above) keep float32 relative accuracy in
  logp and entropy; entropy = ln2 * (log2(k + s) - t / (k + s)) adds two
  non-negative terms. Then m2 = m * c, l2 = fma(m, c, -m2) + log2(k + s)
  (the exact residual of m2 folded into l2). The label logit is one more
  scalar load. Rows not read run zero loop iterations.
* Backward: one program per row, one read of the logits and one write of the
  gradient (N*V*B read + N*V*B written). log2 p = fma(l, c, -m2) - l2 and
  p = exp2(log2 p); at the label, 1 - p = -expm1(ln p) is formed from the
  label's log-probability (read before the loop) rather than as 1 - p, which
  loses ~6e-8 / (1 - p) relative in float32. The label logit is read before
  anything is written, so grad_logits may alias the logits.

Offsets of the form row * stride are int64 (N * V can exceed 2^31). Every
load is converted to float32 right away and all arithmetic is float32.
Scalar arguments are cast to float32 in the kernels (guards against a float64
promotion when a caller passes them as doubles). Launchers never synchronise
with the device.

Under TRITON_INTERPRET=1 the kernels get INTERPRET=True, so that the CPU
interpreter computes what compiled Triton computes: the interpreter's tl.fma
rounds the product before the add, so _fma forms the fused result through
float64 (where a float32 product is exact); and its float32 -> bfloat16 cast
truncates, so bfloat16 gradients are rounded to nearest even with integer ops.
"""

import struct

import torch
import triton
import triton.language as tl

from rlhf_engine.kernels.common import INTERPRET, fma, on_device

__all__ = ["token_logprobs_forward", "token_logprobs_backward"]

_LOG2E = 1.4426950408889634  # log2(e)


@triton.jit
def _log2_1p(y):
    """log2(1 + y) for y >= 0, with full relative precision for small y."""
    # log1p(y) = 2 atanh(q), q = y / (2 + y) < 0.2 for y < 0.5: odd series in
    # q, truncated where the next term is below 1e-10 of the sum.
    q = y / (2.0 + y)
    q2 = q * q
    poly = 1.0 / 13.0
    poly = 1.0 / 11.0 + q2 * poly
    poly = 1.0 / 9.0 + q2 * poly
    poly = 1.0 / 7.0 + q2 * poly
    poly = 1.0 / 5.0 + q2 * poly
    poly = 1.0 / 3.0 + q2 * poly
    poly = 1.0 + q2 * poly
    small = (2.0 * 1.4426950408889634) * q * poly
    return tl.where(y < 0.5, small, tl.log2(1.0 + y))


@triton.jit
def _expm1(a):
    """exp(a) - 1 with full relative precision for small |a|."""
    # Taylor series in Horner form for |a| < 0.5 (next term < 1e-13 of it).
    poly = 1.0 + a / 12.0
    poly = 1.0 + a / 11.0 * poly
    poly = 1.0 + a / 10.0 * poly
    poly = 1.0 + a / 9.0 * poly
    poly = 1.0 + a / 8.0 * poly
    poly = 1.0 + a / 7.0 * poly
    poly = 1.0 + a / 6.0 * poly
    poly = 1.0 + a / 5.0 * poly
    poly = 1.0 + a / 4.0 * poly
    poly = 1.0 + a / 3.0 * poly
    poly = 1.0 + a / 2.0 * poly
    return tl.where(tl.abs(a) < 0.5, a * poly, tl.exp2(a * 1.4426950408889634) - 1.0)


@triton.jit
def _bf16_rtne(x):
    """float32 -> bfloat16, round to nearest even, with integer ops only."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    quiet_nan = (bits >> 16) | 0x40
    hi = tl.where(x != x, quiet_nan, rounded).to(tl.uint16)
    return hi.to(tl.bfloat16, bitcast=True)


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, stats_ptr,
    V, row_stride, c, ignore_index,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, INTERPRET: tl.constexpr,
):
    LN2: tl.constexpr = 0.6931471805599453
    NEG_INF: tl.constexpr = float("-inf")
    c = tl.cast(c, tl.float32)  # log2(e) / T
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    valid = (label >= 0) & (label < V) & (label != ignore_index)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)

    m = tl.full([], NEG_INF, tl.float32)  # running max, raw logit units
    s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    k_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    t_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    n_cols = tl.where(valid, V, 0)  # no loop iteration for rows not read
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        l = tl.load(row_ptr + offs, mask=offs < V, other=NEG_INF).to(tl.float32)
        m_new = tl.maximum(m, tl.max(l, axis=0))
        if m_new > m:
            # Rebase on the new maximum: every old term is scaled by
            # alpha = 2^du, and the old maximal elements (k, worth 1 each)
            # become ordinary terms. Nothing to rescale when m was -inf.
            first = m == NEG_INF
            du = tl.where(first, 0.0, m - m_new) * c
            alpha = tl.where(first, 0.0, tl.exp2(du))
            w = s_vec + k_vec
            s_vec = alpha * w
            if HAS_ENTROPY:
                t_vec = alpha * (t_vec + du * w)
            k_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
            m = m_new
        m_safe = tl.where(m == NEG_INF, 0.0, m)  # only -inf seen so far
        # The clamp keeps -inf (masked lanes, -inf logits) out of 2^u * u,
        # where 0 * -inf would be NaN; NaN logits still propagate.
        u = tl.maximum(l - m_safe, -1e20, propagate_nan=tl.PropagateNan.ALL) * c
        e = tl.exp2(u)
        is_max = l == m
        s_vec += tl.where(is_max, 0.0, e)
        k_vec += is_max.to(tl.float32)
        if HAS_ENTROPY:
            t_vec += e * u

    k = tl.maximum(tl.sum(k_vec, axis=0), 1.0)
    s_rest = tl.sum(s_vec, axis=0)
    log2_sum = tl.log2(k) + _log2_1p(s_rest / k)  # log2 sum 2^u, >= 0
    m = tl.where(valid, m, 0.0)
    m2 = m * c
    l2 = fma(m, c, -m2, INTERPRET) + log2_sum
    y_safe = tl.where(valid, label, 0)
    l_y = tl.load(row_ptr + y_safe, mask=valid, other=0.0).to(tl.float32)
    logp = ((l_y - m) * c - log2_sum) * LN2

    fill = tl.where(ignored, 0.0, float("nan"))
    tl.store(logp_ptr + row, tl.where(valid, logp, fill))
    tl.store(stats_ptr + 2 * row, tl.where(valid, m2, fill))
    tl.store(stats_ptr + 2 * row + 1, tl.where(valid, l2, fill))
    if HAS_ENTROPY:
        t = tl.sum(t_vec, axis=0)
        entropy = (log2_sum - t / (k + s_rest)) * LN2
        tl.store(entropy_ptr + row, tl.where(valid, entropy, fill))


@triton.jit
def _token_logprobs_bwd_kernel(
    grad_logp_ptr, grad_logp_stride, grad_ent_ptr, grad_ent_stride,
    logits_ptr, labels_ptr, stats_ptr, entropy_ptr, grad_ptr,
    V, row_stride, c, inv_t, ignore_index,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, INTERPRET: tl.constexpr,
):
    LN2: tl.constexpr = 0.6931471805599453
    c = tl.cast(c, tl.float32)  # log2(e) / T
    inv_t = tl.cast(inv_t, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    valid = (label >= 0) & (label < V) & (label != ignore_index)
    fill = tl.where(ignored, 0.0, float("nan"))

    # Per-row coefficients, 1/T folded in.
    g_lp = tl.load(grad_logp_ptr + row * grad_logp_stride, mask=valid, other=0.0).to(tl.float32) * inv_t
    neg_m2 = -tl.load(stats_ptr + 2 * row, mask=valid, other=0.0).to(tl.float32)
    l2 = tl.load(stats_ptr + 2 * row + 1, mask=valid, other=0.0).to(tl.float32)
    if HAS_ENTROPY:
        g_en = tl.load(grad_ent_ptr + row * grad_ent_stride, mask=valid, other=0.0).to(tl.float32) * inv_t
        ent = tl.load(entropy_ptr + row, mask=valid, other=0.0).to(tl.float32)

    in_row = logits_ptr + row * row_stride
    out_row = grad_ptr + row * V
    # The label's 1 - p, from its log-probability. Read before the loop
    # writes anything, so grad_logits may alias the logits.
    y_col = tl.where(valid, label, -1)
    l_y = tl.load(in_row + tl.where(valid, label, 0), mask=valid, other=0.0).to(tl.float32)
    log2_p_y = fma(l_y, c, neg_m2, INTERPRET) - l2
    one_minus_p_y = -_expm1(log2_p_y * LN2)

    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_bounds = offs < V
        l = tl.load(in_row + offs, mask=in_bounds & valid, other=0.0).to(tl.float32)
        # The clamp keeps p = 0 at a -inf logit out of 0 * -inf below.
        l = tl.maximum(l, -1e30, propagate_nan=tl.PropagateNan.ALL)
        log2_p = fma(l, c, neg_m2, INTERPRET) - l2
        p = tl.exp2(log2_p)
        g = g_lp * tl.where(offs == y_col, one_minus_p_y, -p)  # onehot - p in float32
        if HAS_ENTROPY:
            g -= g_en * (p * (log2_p * LN2 + ent))
        g = tl.where(valid, g, fill)
        if INTERPRET and grad_ptr.dtype.element_ty == tl.bfloat16:
            g_out = _bf16_rtne(g)
        else:
            g_out = g.to(grad_ptr.dtype.element_ty)
        tl.store(out_row + offs, g_out, mask=in_bounds)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LABEL_DTYPES = (torch.int32, torch.int64)


def _f32(value):
    """Round a Python float to float32 (returned as a Python float)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return float("inf")


def _scales(temperature):
    """(c, 1/T) as the C entry points form them from a float32 temperature:
    c = (float)(log2(e) / (double)T), 1/T = 1.f / T."""
    t = float(temperature)
    if not (0.0 < t < float("inf")):
        raise ValueError(f"temperature must be finite and > 0, got {t}")
    t32 = _f32(t)
    c = _f32(_LOG2E / t32)
    if t32 == 0.0 or c == float("inf"):
        raise ValueError(f"temperature {t} is too small for float32")
    return c, _f32(1.0 / t32)


def _launch_config(V):
    """BLOCK_V = next power of two of V, at least 16 and at most 4096; warps follow BLOCK_V."""
    block_v = max(16, min(triton.next_power_of_2(max(V, 1)), 4096))
    num_warps = max(1, min(8, block_v // 256))
    return block_v, num_warps


def _check_inputs(logits, labels):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits dtype must be float32/float16/bfloat16, got {logits.dtype}")
    N, V = logits.shape
    if V >= 2**31:
        raise ValueError(f"vocab {V} does not fit the kernels' int32 column offsets")
    if V > 1 and logits.stride(1) != 1:
        raise ValueError("logits must have stride(1) == 1")
    if N > 1 and logits.stride(0) < V:
        raise ValueError(f"logits row stride {logits.stride(0)} < vocab {V}")
    if labels.dim() != 1 or labels.shape[0] != N:
        raise ValueError(f"labels must be [{N}], got shape {tuple(labels.shape)}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"labels dtype must be int32/int64, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError("logits and labels must be on the same device")
    return N, V


def _row_stride(logits):
    N, V = logits.shape
    return logits.stride(0) if N > 1 else V




def token_logprobs_forward(logits, labels, temperature: float, ignore_index: int, compute_entropy: bool):
    """logits [N, V] (fp32/fp16/bf16, stride(1) == 1, any row stride >= V), labels [N] int32/int64.

    Returns (logp [N] f32, entropy [N] f32 -- or an empty float32 tensor of
    shape [0] when not compute_entropy, stats [N, 2] f32 = (m2, l2))."""
    N, V = _check_inputs(logits, labels)
    c, _ = _scales(temperature)
    labels = labels.contiguous()
    dev = logits.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    stats = torch.empty((N, 2), dtype=torch.float32, device=dev)
    entropy = torch.empty(N if compute_entropy else 0, dtype=torch.float32, device=dev)
    if N == 0:
        return logp, entropy, stats
    block_v, num_warps = _launch_config(V)
    with on_device(dev):
        _token_logprobs_fwd_kernel[(N,)](
            logits, labels, logp, entropy if compute_entropy else logp, stats,
            V, _row_stride(logits), c, int(ignore_index),
            HAS_ENTROPY=bool(compute_entropy), BLOCK_V=block_v, INTERPRET=INTERPRET,
            num_warps=num_warps,
        )
    return logp, entropy, stats


def token_logprobs_backward(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature: float,
                            ignore_index: int):
    """grad_logp [N] f32; grad_entropy [N] f32 or None (then entropy may be None
    and there is no entropy term); stats [N, 2] f32 from the forward.

    Returns grad_logits [N, V] contiguous with the dtype of logits."""
    N, V = _check_inputs(logits, labels)
    c, inv_t = _scales(temperature)
    labels = labels.contiguous()
    dev = logits.device
    grad_logits = torch.empty((N, V), dtype=logits.dtype, device=dev)
    if N == 0 or V == 0:
        return grad_logits
    has_entropy = grad_entropy is not None
    if has_entropy and entropy is None:
        raise ValueError("grad_entropy given without the forward's entropy")
    if tuple(stats.shape) != (N, 2):
        raise ValueError(f"stats must be [{N}, 2], got shape {tuple(stats.shape)}")
    for name, t in (("grad_logp", grad_logp),) + (
            (("grad_entropy", grad_entropy), ("entropy", entropy)) if has_entropy else ()):
        if t.dim() != 1 or t.shape[0] != N:
            raise ValueError(f"{name} must be [{N}], got shape {tuple(t.shape)}")
    for name, t in (("grad_logp", grad_logp), ("stats", stats)) + (
            (("grad_entropy", grad_entropy), ("entropy", entropy)) if has_entropy else ()):
        if t.device != dev:
            raise ValueError(f"{name} must be on {dev}, got {t.device}")
    # 1-D gradients are read with their stride (stride 0 too: the gradient of
    # a sum); only a dtype change costs an [N] conversion.
    grad_logp = grad_logp.float()
    stats = stats.float().contiguous()
    if has_entropy:
        grad_entropy = grad_entropy.float()
        entropy = entropy.float().contiguous()
    else:
        grad_entropy, entropy = grad_logp, grad_logp  # placeholders, never read
    block_v, num_warps = _launch_config(V)
    with on_device(dev):
        _token_logprobs_bwd_kernel[(N,)](
            grad_logp, grad_logp.stride(0), grad_entropy, grad_entropy.stride(0),
            logits, labels, stats, entropy, grad_logits,
            V, _row_stride(logits), c, inv_t, int(ignore_index),
            HAS_ENTROPY=has_entropy, BLOCK_V=block_v, INTERPRET=INTERPRET, num_warps=num_warps,
        )
    return grad_logits
