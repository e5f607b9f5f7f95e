"""Token log-probabilities (and entropy) of temperature-scaled logits, in Triton.

Math (identical to ``csrc/include/rlhf_engine/logprobs.h``), per row n with
label y = labels[n] and z = logits[n] / T:

    lse     = logsumexp(z)
    logp    = z[y] - lse
    entropy = lse - sum(softmax(z) * z)
    grad    = (g_logp * (onehot(y) - p) - g_ent * p * (z - lse + entropy)) / T,
              p = exp(z - lse), ``onehot - p`` formed in float32

Rows with y == ignore_index: logp = entropy = lse = 0 and a zero gradient row;
the logits row is not read. Rows with y outside [0, V): logp = entropy = lse =
NaN and a NaN gradient row; the logits row is not read either (the header
leaves lse of such rows open; NaN poisons it too).

Design and traffic model (B = bytes per logit, N rows, V vocab):

* Forward: one program per row walks the row in BLOCK_V chunks with an online
  maximum, reading every logit exactly once (N*V*B bytes read, 12*N bytes
  written). The maximum is kept in raw logit units and every element is
  shifted before it is scaled, x = (l - m) * log2(e) / T, so that a large
  common offset (+1e4) costs no precision; exponentials are exp2 with log2(e)
  folded into the scale. The per-lane accumulators are
      s = sum over non-maximal elements of 2^x      (each term < 1)
      c = number of elements equal to the running maximum (each worth 2^0 = 1)
      t = sum 2^x * x                               (entropy only; max terms are 0)
  and are rescaled only in the (rare, uniform) iteration where the maximum
  grows. Keeping the exact 1s of the maximal elements out of s means that
  log(c + s) is computed as log(c) + log1p(s / c) with full relative
  precision, so confident rows (p(label) ~ 0.999, logp ~ -1e-3) keep fp32
  relative accuracy in logp and entropy. entropy = ln2 * (log2(c + s) - t / (c + s))
  has no cancellation since t <= 0. The label logit is one extra scalar load.
  Ignored and out-of-range rows run zero loop iterations.
* Backward: one program per row, one read of the logits and one write of the
  gradient (N*V*B read + N*V*B written, plus one scalar re-read and re-write
  of the label element). p = exp2(log2(e) * (l / T - lse)) with l / T - lse
  formed by fused multiply-adds. The label element is rewritten after the
  loop (behind a barrier, so the loop's stores stay unmasked and vectorised):
  when p(label) > 1/2 its ``1 - p`` is taken as the sum of the other p
  (accumulated on the way, no cancellation) and z_y - lse as log1p(-that sum),
  so confident rows keep relative accuracy in the true-class gradient instead
  of losing it to ``1 - p`` in float32. The label logit is read before the
  loop, so grad_logits may alias logits.

Precision. 1/T and log2(e)/T are passed as float32 (hi, lo) pairs and applied
as fma(v, hi, v * lo), so the rounding of those constants is not amplified by
|x| or |z|. What float32 cannot avoid: (a) each 2^x carries the rounding of x,
about |x| * 2^-24 relative, which for very confident rows (|x| ~ 30 for the
whole competing mass) is ~1e-6 on logp and entropy; (b) the backward sees lse
only as the contract's float32 value, whose rounding (2^-24 * |lse|) scales
every p of the row: ~1e-6 relative at |lse| ~ 16, ~3e-4 with a +1e4 offset.

Offsets of the form row * stride are int64 (N * V can exceed 2^31). Every
load is converted to float32 right away and all arithmetic is float32;
scalar arguments are cast to float32 in the kernels (guards against a
float64 promotion when a caller passes them as doubles). Launchers never
synchronise with the device.
"""

import os
import struct

import torch
import triton
import triton.language as tl

__all__ = ["token_logprobs_forward", "token_logprobs_backward"]

_LOG2E = 1.4426950408889634  # log2(e)


@triton.jit
def _log2_1p(y):
    """log2(1 + y) for y > -0.5, with full relative precision for small |y|."""
    # log1p(y) = 2 atanh(q), q = y / (2 + y), |q| < 1/3 for |y| < 0.5: odd
    # series in q, truncated where the next term is below 1e-9 of the sum.
    q = y / (2.0 + y)
    q2 = q * q
    poly = 1.0 / 19.0
    poly = 1.0 / 17.0 + q2 * poly
    poly = 1.0 / 15.0 + q2 * poly
    poly = 1.0 / 13.0 + q2 * poly
    poly = 1.0 / 11.0 + q2 * poly
    poly = 1.0 / 9.0 + q2 * poly
    poly = 1.0 / 7.0 + q2 * poly
    poly = 1.0 / 5.0 + q2 * poly
    poly = 1.0 / 3.0 + q2 * poly
    poly = 1.0 + q2 * poly
    small = (2.0 * 1.4426950408889634) * q * poly
    return tl.where(tl.abs(y) < 0.5, small, tl.log2(1.0 + y))


@triton.jit
def _bf16_rtne(x):
    """float32 -> bfloat16, round to nearest even, with integer ops only.

    Used under TRITON_INTERPRET=1 only: the interpreter's own float32 ->
    bfloat16 cast truncates, while compiled Triton rounds to nearest even.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    quiet_nan = (bits >> 16) | 0x40
    hi = tl.where(x != x, quiet_nan, rounded).to(tl.uint16)
    return hi.to(tl.bfloat16, bitcast=True)


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, lse_ptr,
    V, row_stride, inv_t_hi, inv_t_lo, scale_hi, scale_lo, ignore_index,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # 1/T = inv_t_hi + inv_t_lo and log2(e)/T = scale_hi + scale_lo (float32
    # pairs, ~48 bits): x = dl * scale is formed as fma(dl, hi, dl * lo), so
    # the float32 rounding of the scale is not amplified by |x| (it would
    # cost up to |x| * 6e-8 relative in every term of s).
    LN2: tl.constexpr = 0.6931471805599453
    NEG_INF: tl.constexpr = float("-inf")
    inv_t_hi = tl.cast(inv_t_hi, tl.float32)
    inv_t_lo = tl.cast(inv_t_lo, tl.float32)
    scale_hi = tl.cast(scale_hi, tl.float32)
    scale_lo = tl.cast(scale_lo, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    valid = (label >= 0) & (label < V) & (label != ignore_index)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)

    m = tl.full([], NEG_INF, tl.float32)  # running max, raw logit units
    s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    c_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    t_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    n_cols = tl.where(valid, V, 0)  # no loop iteration for rows not read
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        l = tl.load(row_ptr + offs, mask=offs < V, other=NEG_INF).to(tl.float32)
        m_new = tl.maximum(m, tl.max(l, axis=0))
        if m_new > m:
            # Rebase on the new maximum: every old term is scaled by
            # alpha = 2^dm, and the old maximal elements (c, worth 1 each)
            # become ordinary terms. Nothing to rescale when m was -inf.
            first = m == NEG_INF
            dm_raw = tl.where(first, 0.0, m - m_new)
            dm = tl.fma(dm_raw, scale_hi, dm_raw * scale_lo)
            alpha = tl.where(first, 0.0, tl.exp2(dm))
            w = s_vec + c_vec
            s_vec = alpha * w
            if HAS_ENTROPY:
                t_vec = alpha * (t_vec + dm * w)
            c_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
            m = m_new
        m_safe = tl.where(m == NEG_INF, 0.0, m)  # only -inf seen so far
        # Clamp keeps -inf (masked lanes, -inf logits) finite so that neither
        # the split product nor 2^x * x can make a NaN; NaN logits still
        # propagate.
        dl = tl.maximum(l - m_safe, -1e20, propagate_nan=tl.PropagateNan.ALL)
        x = tl.fma(dl, scale_hi, dl * scale_lo)  # <= 0
        e = tl.exp2(x)
        is_max = l == m
        s_vec += tl.where(is_max, 0.0, e)
        c_vec += is_max.to(tl.float32)
        if HAS_ENTROPY:
            t_vec += e * x

    c = tl.maximum(tl.sum(c_vec, axis=0), 1.0)
    s_rest = tl.sum(s_vec, axis=0)
    log2s = tl.log2(c) + _log2_1p(s_rest / c)  # log2 sum 2^x, >= 0
    m = tl.where(valid, m, 0.0)
    label_safe = tl.where(valid, label, 0)
    l_y = tl.load(row_ptr + label_safe, mask=valid, other=0.0).to(tl.float32)
    dl_y = l_y - m
    x_y = tl.fma(dl_y, scale_hi, dl_y * scale_lo)

    fill = tl.where(ignored, 0.0, float("nan"))
    logp = (x_y - log2s) * LN2
    # lse = m / T + ln(sum); the backward forms z - lse with the same split 1/T.
    lse = tl.fma(m, inv_t_hi, tl.fma(m, inv_t_lo, log2s * LN2))
    tl.store(logp_ptr + row, tl.where(valid, logp, fill))
    tl.store(lse_ptr + row, tl.where(valid, lse, fill))
    if HAS_ENTROPY:
        t = tl.sum(t_vec, axis=0)
        entropy = (log2s - t / (c + s_rest)) * LN2
        tl.store(entropy_ptr + row, tl.where(valid, entropy, fill))


@triton.jit
def _token_logprobs_bwd_kernel(
    grad_logp_ptr, grad_logp_stride, grad_ent_ptr, grad_ent_stride,
    logits_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_ptr,
    V, row_stride, inv_t_hi, inv_t_lo, ignore_index,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    # log2(e) = LOG2E_HI + LOG2E_LO and 1/T = inv_t_hi + inv_t_lo, as in the
    # forward: no float32 constant's rounding is amplified by |z - lse|.
    LOG2E_HI: tl.constexpr = 1.4426950216293335
    LOG2E_LO: tl.constexpr = 1.925963033500011e-08
    LN2: tl.constexpr = 0.6931471805599453
    inv_t_hi = tl.cast(inv_t_hi, tl.float32)
    inv_t_lo = tl.cast(inv_t_lo, tl.float32)
    inv_t = inv_t_hi + inv_t_lo
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    valid = (label >= 0) & (label < V) & (label != ignore_index)
    fill = tl.where(ignored, 0.0, float("nan"))
    y_col = tl.where(valid, label, -1)  # label column, rewritten after the loop

    # Per-row coefficients with 1/T folded in.
    g_lp = tl.load(grad_logp_ptr + row * grad_logp_stride, mask=valid, other=0.0).to(tl.float32) * inv_t
    neg_lse = -tl.load(lse_ptr + row, mask=valid, other=0.0).to(tl.float32)
    if HAS_ENTROPY:
        g_en = tl.load(grad_ent_ptr + row * grad_ent_stride, mask=valid, other=0.0).to(tl.float32) * inv_t
        ent = tl.load(entropy_ptr + row, mask=valid, other=0.0).to(tl.float32)

    in_row = logits_ptr + row * row_stride
    out_row = grad_ptr + row * V
    # The label logit is read before the loop writes anything, so the kernel
    # stays correct if grad_logits aliases logits.
    y_safe = tl.where(valid, label, 0)
    l_y = tl.load(in_row + y_safe, mask=valid, other=0.0).to(tl.float32)
    l_y = tl.maximum(l_y, -1e30, propagate_nan=tl.PropagateNan.ALL)
    d_y = tl.fma(l_y, inv_t_lo, tl.fma(l_y, inv_t_hi, neg_lse))
    p_y = tl.exp2(tl.fma(d_y, LOG2E_HI, d_y * LOG2E_LO))

    cols = tl.arange(0, BLOCK_V)
    q_vec = tl.zeros([BLOCK_V], dtype=tl.float32)  # sum of p off the label
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_bounds = offs < V
        l = tl.load(in_row + offs, mask=in_bounds & valid, other=0.0).to(tl.float32)
        # -inf logits (p = 0) must not meet the split 1/T as inf - inf.
        l = tl.maximum(l, -1e30, propagate_nan=tl.PropagateNan.ALL)
        d = tl.fma(l, inv_t_lo, tl.fma(l, inv_t_hi, neg_lse))  # z - lse
        p = tl.exp2(tl.fma(d, LOG2E_HI, d * LOG2E_LO))
        q_vec += tl.where(in_bounds & (offs != y_col), p, 0.0)
        g = -g_lp * p  # onehot - p off the label; the label column is redone below
        if HAS_ENTROPY:
            g -= g_en * (p * (d + ent))
        g = tl.where(valid, g, fill)
        if BF16_RTNE:
            g_out = _bf16_rtne(g)
        else:
            g_out = g.to(grad_ptr.dtype.element_ty)
        # Mask on the bounds only, so that the stores stay vectorised.
        tl.store(out_row + offs, g_out, mask=in_bounds)

    # Label column. 1 - p(label) = sum of the other p: exact in relative terms
    # where 1 - exp(z_y - lse) would cancel (confident rows), and then
    # z_y - lse = log1p(-sum) as well.
    q = tl.sum(q_vec, axis=0)
    confident = p_y > 0.5
    one_minus_p = tl.where(confident, q, 1.0 - p_y)
    g_y = g_lp * one_minus_p
    if HAS_ENTROPY:
        d_y = tl.where(confident, _log2_1p(-tl.minimum(q, 0.75)) * LN2, d_y)
        p_y = tl.where(confident, 1.0 - q, p_y)
        g_y -= g_en * (p_y * (d_y + ent))
    if BF16_RTNE:
        g_y_out = _bf16_rtne(g_y)
    else:
        g_y_out = g_y.to(grad_ptr.dtype.element_ty)
    # Every thread's loop store of this element must land before this one.
    tl.debug_barrier()
    tl.store(out_row + y_safe, g_y_out, mask=valid)


# Under the CPU interpreter, bfloat16 outputs are rounded by _bf16_rtne to
# match compiled Triton (the interpreter's own cast truncates).
# Decided like @triton.jit decides it (at import).
try:
    _INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older Triton without knobs
    _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LABEL_DTYPES = (torch.int32, torch.int64)


def _split(value):
    """A float64 value as a float32 pair (hi, lo) with hi + lo ~ value to ~48 bits."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    lo = struct.unpack("f", struct.pack("f", value - hi))[0]
    return hi, lo


def _launch_config(V):
    """BLOCK_V = next power of two of V, capped at 4096; warps follow BLOCK_V."""
    block_v = min(triton.next_power_of_2(max(V, 1)), 4096)
    block_v = max(block_v, 16)
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


def _check_temperature(temperature):
    temperature = float(temperature)
    if not (0.0 < temperature < float("inf") and _LOG2E / temperature < 3.0e38):
        raise ValueError(f"temperature must be positive, finite and >= 1e-38, got {temperature}")
    return temperature


def _row_stride(logits):
    N, V = logits.shape
    return logits.stride(0) if N > 1 else V


class _on_device:
    """Makes the tensors' CUDA device current for the launch (no-op elsewhere)."""

    def __init__(self, device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def token_logprobs_forward(logits, labels, temperature: float, ignore_index: int, compute_entropy: bool):
    """logits [N, V] (fp32/fp16/bf16, stride(1) == 1, any row stride >= V), labels [N] int32/int64 contiguous.
    Returns (logp [N] f32, entropy [N] f32 — or an empty float32 tensor of shape [0] when not compute_entropy, lse [N] f32)."""
    N, V = _check_inputs(logits, labels)
    labels = labels.contiguous()
    dev = logits.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    entropy = torch.empty(N if compute_entropy else 0, dtype=torch.float32, device=dev)
    if N == 0:
        return logp, entropy, lse
    temperature = _check_temperature(temperature)
    inv_t_hi, inv_t_lo = _split(1.0 / temperature)
    scale_hi, scale_lo = _split(_LOG2E / temperature)
    block_v, num_warps = _launch_config(V)
    with _on_device(dev):
        _token_logprobs_fwd_kernel[(N,)](
            logits, labels, logp, entropy if compute_entropy else logp, lse,
            V, _row_stride(logits), inv_t_hi, inv_t_lo, scale_hi, scale_lo, int(ignore_index),
            HAS_ENTROPY=bool(compute_entropy), BLOCK_V=block_v, num_warps=num_warps,
        )
    return logp, entropy, lse


def token_logprobs_backward(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature: float, ignore_index: int):
    """grad_logp [N] f32; grad_entropy [N] f32 or None (then entropy may be None and there is no entropy term).
    Returns grad_logits [N, V] contiguous with the dtype of logits."""
    N, V = _check_inputs(logits, labels)
    labels = labels.contiguous()
    dev = logits.device
    grad_logits = torch.empty((N, V), dtype=logits.dtype, device=dev)
    if N == 0 or V == 0:
        return grad_logits
    has_entropy = grad_entropy is not None
    if has_entropy and entropy is None:
        raise ValueError("grad_entropy given without the forward's entropy")
    for name, t in (("grad_logp", grad_logp), ("lse", lse)) + (
            (("grad_entropy", grad_entropy), ("entropy", entropy)) if has_entropy else ()):
        if t.dim() != 1 or t.shape[0] != N:
            raise ValueError(f"{name} must be [{N}], got shape {tuple(t.shape)}")
        if t.device != dev:
            raise ValueError(f"{name} must be on {dev}, got {t.device}")
    # Strided (even stride-0, e.g. the gradient of a sum) 1-D gradients are read
    # in place; only a dtype mismatch costs an [N] conversion.
    grad_logp = grad_logp.float()
    lse = lse.float().contiguous()
    if has_entropy:
        grad_entropy = grad_entropy.float()
        entropy = entropy.float().contiguous()
    else:
        grad_entropy, entropy = grad_logp, lse  # placeholders, never read
    inv_t_hi, inv_t_lo = _split(1.0 / _check_temperature(temperature))
    block_v, num_warps = _launch_config(V)
    with _on_device(dev):
        _token_logprobs_bwd_kernel[(N,)](
            grad_logp, grad_logp.stride(0), grad_entropy, grad_entropy.stride(0),
            logits, labels, lse, entropy, grad_logits,
            V, _row_stride(logits), inv_t_hi, inv_t_lo, int(ignore_index),
            HAS_ENTROPY=has_entropy, BLOCK_V=block_v,
            BF16_RTNE=_INTERPRETED and logits.dtype == torch.bfloat16, num_warps=num_warps,
        )
    return grad_logits
