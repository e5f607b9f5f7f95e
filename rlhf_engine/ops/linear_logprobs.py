"""linear_token_logprobs: token log-probs from hidden states and an output
head, without ever holding the full logits.

``linear_token_logprobs(hidden, weight, labels, bias=...)`` equals
``token_logprobs(hidden @ weight.T + bias, labels, ...)``, computed over
chunks of ``chunk_size`` rows so that at most ``chunk_size x V`` logits are
alive at once, in forward and in backward.

Layout of this module, top to bottom:

1. the per-chunk logits gradient of each backend (registry entries of this
   op): token_logprobs' ``backward_inplace(g_logp [n], g_ent [n] or None,
   logits [n, V], labels [n], stats [n, 2], entropy [n] or None, T,
   ignore_index) -> grad [n, V]``, which may overwrite ``logits`` (the cpu
   and cuda kernels write the gradient in place into the recomputed chunk;
   triton and torch write a second chunk buffer);
2. the chunk loops (forward, backward), shared by all backends: matmuls
   through torch (BLAS / cuBLAS), the log-prob work through the backend's
   ``token_logprobs`` kernels (rlhf_engine/ops/logprobs.py). Fusing the
   log-softmax into the matmul's epilogue on GPUs is future work;
3. the custom ops ``torch.ops.rlhf_engine.linear_token_logprobs`` (the
   public op's arguments and defaults; validation and backend choice happen
   in it) and ``linear_token_logprobs_backward``, with fake kernels and
   autograd;
4. the chunk size chosen from free memory, and the public function.

Forward saves only hidden, weight, bias, labels and per-row statistics
(stats [N, 2], entropy [N]); backward recomputes each chunk's logits. The
weight and bias gradients accumulate in float32 across chunks (float64 for
float64 inputs) whatever the parameter dtype, and are cast once at the end.
The chunk loops have trip counts fixed by the shapes: no host syncs.
"""
import math
import os
from typing import Optional

import torch

from rlhf_engine import _native
from rlhf_engine.ops import checks, logprobs, registry

OP = "linear_token_logprobs"
_LABEL_DTYPES = (torch.int64, torch.int32)
# Bytes of chunk buffers per logit: a float32 chunk, or a half-precision chunk
# and its gradient in a second buffer (triton).
_BYTES_PER_LOGIT = 4
_CPU_BUDGET_BYTES = 256 << 20  # and at most 1/8 of the available RAM
_CUDA_BUDGET_BYTES = 1 << 30  # and at most 1/8 of the free device memory
_ROW_MULTIPLE = 64  # chunk sizes above it are rounded down to a multiple of it


# 1. per-chunk logits gradient ----------------------------------------------------
# The chunk gradient of each backend is token_logprobs' backward_inplace
# (rlhf_engine/ops/logprobs.py), which the registry holds under this op too, so
# that resolving this op knows which backends run it.

for _backend, _requires in (("torch", None), ("triton", None), ("cpu", _native.CPU_ERROR),
                            ("cuda", _native.CUDA_ERROR)):
    registry.register(OP, _backend, requires=_requires)(registry.get(logprobs.OP_BACKWARD_INPLACE, _backend))


# 2. chunk loops -------------------------------------------------------------------

def _chunks(n, chunk_size):
    return [slice(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _chunk_logits(hidden, weight, bias):
    """hidden [n, H] @ weight.T (+ bias) -> contiguous [n, V] in the input dtype."""
    if bias is None:
        return torch.mm(hidden, weight.t())
    return torch.addmm(bias, hidden, weight.t())


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _forward_chunk(forward, hidden, weight, bias, labels, temperature, ignore_index, compute_entropy):
    """The backend's log-prob forward on one chunk of logits (which die on return)."""
    logits = _chunk_logits(hidden, weight, bias)
    return forward(logits, labels, temperature, ignore_index, compute_entropy)


def _forward(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_size, backend):
    """(logp [N], entropy [N] or [0], stats [N, 2]), float32 (float64 for float64 inputs)."""
    n = hidden.shape[0]
    acc = _acc_dtype(hidden)
    forward = registry.get(logprobs.OP, backend)
    logp = hidden.new_empty(n, dtype=acc)
    stats = hidden.new_empty((n, 2), dtype=acc)
    entropy = hidden.new_empty(n if compute_entropy else 0, dtype=acc)
    for s in _chunks(n, chunk_size):
        logp_c, entropy_c, stats_c = _forward_chunk(forward, hidden[s], weight, bias, labels[s], temperature,
                                                    ignore_index, compute_entropy)
        logp[s] = logp_c
        stats[s] = stats_c
        if compute_entropy:
            entropy[s] = entropy_c
    return logp, entropy, stats


def _accumulate_weight_grad(acc, grad_logits, hidden):
    """acc [V, H] (float32 / float64) += grad_logits [n, V].T @ hidden [n, H]."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden)
    elif acc.is_cuda:  # cuBLAS: half-precision inputs straight into the float32 accumulator
        torch.addmm(acc, grad_logits.t(), hidden, out_dtype=acc.dtype, out=acc)
    else:  # the chunk's [V, H] product rounded once to the input dtype, then added in float32
        acc.add_(torch.mm(grad_logits.t(), hidden))


def _backward_chunk(chunk_grad, g_logp, g_ent, hidden, weight, bias, labels, stats, entropy, temperature,
                    ignore_index, grad_hidden, grad_weight, grad_bias):
    """One chunk of backward: recompute its logits, turn them into their
    gradient G [n, V], write G @ weight into ``grad_hidden`` [n, H] and add
    G.T @ hidden to ``grad_weight`` and G.sum(0) to ``grad_bias`` (float32
    accumulators). The chunk buffers die on return."""
    logits = _chunk_logits(hidden, weight, bias)
    g = chunk_grad(g_logp, g_ent, logits, labels, stats, entropy, temperature, ignore_index)
    torch.mm(g, weight, out=grad_hidden)
    _accumulate_weight_grad(grad_weight, g, hidden)
    if bias is not None:
        grad_bias.add_(g.sum(0, dtype=grad_bias.dtype))


def _backward(grad_logp, grad_entropy, hidden, weight, bias, labels, stats, entropy, temperature, ignore_index,
              chunk_size, backend):
    """(grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or [0]) in the
    dtypes of hidden, weight and bias."""
    n = hidden.shape[0]
    acc = _acc_dtype(weight)
    chunk_grad = registry.get(OP, backend)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_bias = torch.zeros(weight.shape[0] if bias is not None else 0, dtype=acc, device=weight.device)
    for s in _chunks(n, chunk_size):
        _backward_chunk(chunk_grad, grad_logp[s], None if grad_entropy is None else grad_entropy[s], hidden[s],
                        weight, bias, labels[s], stats[s], None if grad_entropy is None else entropy[s],
                        temperature, ignore_index, grad_hidden[s], grad_weight, grad_bias)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


# 3. custom ops ----------------------------------------------------------------------
# Both take hidden [..., H] and labels hidden.shape[:-1] (the rows are formed
# here) and a chunk size or None (picked from the free memory when the op runs).

def _rows(hidden, labels):
    """hidden [..., H] -> [N, H] (a view when possible), labels -> contiguous [N]."""
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).contiguous()


def _chunk_size(chunk_size, n, weight):
    return default_chunk_size(n, weight.shape[0], str(weight.device)) if chunk_size is None else chunk_size


@torch.library.custom_op("rlhf_engine::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                             ignore_index: int = -100, return_entropy: bool = False,
                             chunk_size: Optional[int] = None,
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.rlhf_engine.linear_token_logprobs``: the public op's
    arguments (``bias`` may also be passed positionally); returns (logp,
    entropy, stats): logp and entropy of ``labels.shape`` (entropy empty [0]
    unless ``return_entropy``), stats ``labels.shape + (2,)``; float32
    (float64 for float64 inputs)."""
    temperature = check_inputs(hidden, weight, labels, bias, chunk_size, temperature, ignore_index)
    backend = registry.resolve(OP, backend, hidden.device, hidden.dtype)
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        checks.finite(name, t)
    rows, flat_labels = _rows(hidden, labels)
    logprobs.check_label_values(flat_labels, weight.shape[0], ignore_index)
    logp, entropy, stats = _forward(rows, weight, bias, flat_labels, temperature, ignore_index, return_entropy,
                                    _chunk_size(chunk_size, rows.shape[0], weight), backend)
    shape = labels.shape
    return logp.view(shape), entropy.view(shape) if return_entropy else entropy, stats.view(*shape, 2)


@linear_token_logprobs_op.register_fake
def _(hidden, weight, labels, bias=None, *, temperature=1.0, ignore_index=-100, return_entropy=False,
      chunk_size=None, backend="auto"):
    check_inputs(hidden, weight, labels, bias, chunk_size, temperature, ignore_index)
    shape, dtype = labels.shape, _acc_dtype(hidden)
    return (hidden.new_empty(shape, dtype=dtype), hidden.new_empty(shape if return_entropy else (0,), dtype=dtype),
            hidden.new_empty((*shape, 2), dtype=dtype))


@torch.library.custom_op("rlhf_engine::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward_op(
        grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor,
        bias: Optional[torch.Tensor], labels: torch.Tensor, stats: torch.Tensor, entropy: Optional[torch.Tensor],
        temperature: float, ignore_index: int, chunk_size: Optional[int],
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden of hidden's shape, grad_weight [V, H], grad_bias [V], or [0]
    without bias); ``backend`` a resolved one."""
    rows, flat_labels = _rows(hidden, labels)
    flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
    grad_hidden, grad_weight, grad_bias = _backward(
        flat(grad_logp), flat(grad_entropy), rows, weight, bias, flat_labels, stats.reshape(-1, 2), flat(entropy),
        temperature, ignore_index, _chunk_size(chunk_size, rows.shape[0], weight), backend)
    return grad_hidden.view(hidden.shape), grad_weight, grad_bias


@linear_token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, stats, entropy, temperature, ignore_index,
      chunk_size, backend):
    return (hidden.new_empty(hidden.shape), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if bias is not None else 0))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    hidden, weight, labels, bias = inputs
    kw = keyword_only_inputs
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy if kw["return_entropy"] else None)
    backend = registry.resolve(OP, kw["backend"], hidden.device, hidden.dtype)
    ctx.args = (float(kw["temperature"]), kw["ignore_index"], kw["return_entropy"], kw["chunk_size"], backend)


def _autograd_backward(ctx, grad_logp, grad_entropy, _grad_stats):
    hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
    temperature, ignore_index, return_entropy, chunk_size, backend = ctx.args
    dtype = stats.dtype
    grad_logp = stats.new_zeros(labels.shape) if grad_logp is None else grad_logp.to(dtype).contiguous()
    grad_entropy = None if not return_entropy or grad_entropy is None else grad_entropy.to(dtype).contiguous()
    grad_hidden, grad_weight, grad_bias = linear_token_logprobs_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, labels, stats, entropy, temperature, ignore_index,
        chunk_size, backend)
    return grad_hidden, grad_weight, None, grad_bias if bias is not None else None


linear_token_logprobs_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# 4. chunk size and public function ---------------------------------------------------

def _budget_bytes(device):
    """Bytes the chunk buffers may take on ``device``: 1/8 of the free memory,
    capped (CPU: 256 MiB; CUDA: 1 GiB). Asks the OS / the CUDA driver, never
    the device's data: no sync."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(free // 8, _CUDA_BUDGET_BYTES)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return _CPU_BUDGET_BYTES
    return min(available // 8, _CPU_BUDGET_BYTES)


def _constant_under_compile(fn):
    """What ``torch.compiler.assume_constant_result`` does (it sets this one
    flag for Dynamo), without importing torch._dynamo when rlhf_engine is
    imported: that import alone costs every process ~1.3 s."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def default_chunk_size(n, vocab, device):
    """Rows per chunk for ``n`` rows of ``vocab`` logits on ``device``: the
    memory budget over the bytes of one row's chunk buffers, rounded down to a
    multiple of 64 above 64, within [1, n]."""
    rows = max(1, _budget_bytes(torch.device(device)) // (vocab * _BYTES_PER_LOGIT))
    if rows > _ROW_MULTIPLE:
        rows -= rows % _ROW_MULTIPLE
    return max(1, min(rows, n))


def check_inputs(hidden, weight, labels, bias, chunk_size, temperature, ignore_index):
    """Static checks of the inputs (ValueError naming the argument), run by the
    public function, the custom op and its fake kernel; the temperature as a float."""
    checks.tensor("hidden", hidden, kind="float")
    checks.tensor("weight", weight, kind="float")
    checks.tensor("labels", labels, dtypes=_LABEL_DTYPES)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V > 0, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [..., H] with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if bias is not None:
        checks.tensor("bias", bias, kind="float")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise ValueError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {t.dtype}")
    checks.same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    return checks.positive_float("temperature", temperature)


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, chunk_size=None, backend="auto"):
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without the full logits.

    Args:
        hidden: ``[..., H]`` float16 / bfloat16 / float32 (float64 on the
            torch backend); any strides.
        weight: ``[V, H]`` (the output head), the dtype of ``hidden``.
        labels: ``hidden.shape[:-1]``, int64 or int32; ``ignore_index``
            marks positions to skip.
        bias: ``[V]`` or None, the dtype of ``hidden``.
        temperature: divides the logits (finite, > 0).
        return_entropy: also return the entropy of each position's softmax.
        chunk_size: rows of logits formed at once (at most ``chunk_size x V``
            logits alive, in forward and backward); None picks it from the
            free memory (:func:`default_chunk_size`).
        backend: "auto", "torch", "cpu", "triton" or "cuda" (the log-prob
            kernels used per chunk; the matmuls always run through torch).

    Returns:
        ``logp`` float32 of ``labels.shape`` (0.0 where ignored), and with
        ``return_entropy`` the tuple ``(logp, entropy)``. Differentiable
        w.r.t. ``hidden``, ``weight`` and ``bias``; gradients have their
        dtypes, the weight and bias ones accumulated in float32 across
        chunks. NaN in the inputs gives NaN in the affected outputs (a
        ValueError under ``debug_checks(True)``). Labels outside ``[0, V)``
        raise ValueError on CPU tensors; on GPU tensors they give NaN.
    """
    temperature = check_inputs(hidden, weight, labels, bias, chunk_size, temperature, ignore_index)
    if chunk_size is None:
        chunk_size = default_chunk_size(math.prod(labels.shape), weight.shape[0], str(hidden.device))
    logp, entropy, _ = linear_token_logprobs_op(hidden, weight, labels, bias, temperature=temperature,
                                                ignore_index=ignore_index, return_entropy=bool(return_entropy),
                                                chunk_size=chunk_size, backend=backend)
    return (logp, entropy) if return_entropy else logp
