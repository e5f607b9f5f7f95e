"""Log-probabilities of chosen tokens under a HuggingFace causal LM, without
ever holding the full logits.

The engine asks every model for log-probs (old policy, reference, the
policy's training forward) through :func:`causal_lm_logprobs`:

1. run the model *body* (``model.base_model``: embeddings, blocks, final
   norm) to its last hidden states ``[B, T, H]``;
2. keep only the rows that predict a scored token (token ``t`` is predicted
   from position ``t - 1``);
3. apply :func:`rlhf_engine.ops.linear_token_logprobs` with the model's
   output head (``model.get_output_embeddings()``: its weight -- the
   embedding matrix when tied -- and bias), folding a plain final logit
   multiplier ``s`` into the temperature (``logits * s / T == logits / (T / s)``).

A head that is not ``linear * s`` (final logit soft-capping, an unknown
scaling attribute, a non-``nn.Linear`` head) takes the full-logits path,
``model(...).logits`` then :func:`rlhf_engine.ops.token_logprobs`, with one
warning per model.

Positions: the body is called with the same ``input_ids``,
``attention_mask`` (and ``position_ids``, if given) as ``model(...)`` would
pass it, so it computes positions exactly as the model's own forward does;
the result equals ``model(input_ids, attention_mask=..., position_ids=...)
.logits`` shifted by one and fed to ``token_logprobs``. In transformers 5.17
the Llama, Qwen2 and GPT-2 forwards number positions ``0..T-1`` when
``position_ids`` is None, padding or not; :func:`positions_from_mask` gives
the numbering ``generate`` uses for left-padded prompts.
"""
import weakref
import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn

from rlhf_engine import ops as _ops
from rlhf_engine.distributed import call_as_forward
from rlhf_engine.models.last_layer import last_hidden
from rlhf_engine.models.lora import WithoutAdapters, adapters_context, base_model_of, is_adapter_layer

# Final logit scaling of the transformers families that apply one, keyed by
# ``config.model_type`` (checked against transformers 5.17's modeling code):
# logits = lm_head(h) * multiplier(model).
_MULTIPLY_MODEL_ATTR = ("cohere", "cohere2", "cohere2_moe", "cohere_compass")  # logits * model.logit_scale
_DIVIDE_CONFIG_ATTR = ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
                       "granitemoeshared")  # logits / config.logits_scaling
_MULTIPLY_CONFIG_ATTR = ("hyperclovax",)  # logits * config.logits_scaling
_DIVIDE_HIDDEN = ("minicpm3",)  # lm_head(h / config.logits_scaling): a multiplier only without a bias

# Config attributes that change the final logits in some family. On a family
# not listed above their meaning is unknown, so such a model takes the
# full-logits path rather than risk a silently wrong answer.
_SCALING_ATTRS = ("logit_scale", "logits_scaling", "output_multiplier", "logit_multiplier",
                  "final_logit_softcapping")

_warned = weakref.WeakSet()  # models already warned about the full-logits path


class LinearHead(NamedTuple):
    """The output head as ``logits = (hidden @ weight.T + bias) * scale``."""

    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]  # [V] or None
    scale: float


def linear_head(model):
    """``(LinearHead, None)`` when ``model``'s logits are its body's last
    hidden states through a linear map times a constant, else
    ``(None, reason)``."""
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        return None, f"final_logit_softcapping={softcap} (tanh soft-capping is not linear)"
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return None, f"the output head is {type(head).__name__}, not nn.Linear"
    bias = head.bias
    model_type = getattr(config, "model_type", "")
    if model_type in _MULTIPLY_MODEL_ATTR:
        scale = getattr(model, "logit_scale", getattr(config, "logit_scale", 1.0))
    elif model_type in _DIVIDE_CONFIG_ATTR:
        scale = 1.0 / config.logits_scaling
    elif model_type in _MULTIPLY_CONFIG_ATTR:
        scale = config.logits_scaling
    elif model_type in _DIVIDE_HIDDEN:
        if bias is not None:
            return None, "hidden states are scaled before a biased head"
        scale = 1.0 / config.logits_scaling
    else:
        for attr in _SCALING_ATTRS:
            if getattr(config, attr, None) is not None:
                return None, f"config.{attr} is set on model type {model_type!r}, whose logit scaling is not known"
        scale = 1.0
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not scale > 0:
        return None, f"the logit scale {scale!r} is not a positive number"
    return LinearHead(head.weight, bias, float(scale)), None


def positions_from_mask(attention_mask):
    """``[B, T]`` position ids counted from each row's first real token
    (``cumsum(mask) - 1``, 0 on left padding), as ``generate`` numbers them.
    Pass them as ``position_ids`` to score left-padded rows the way they were
    sampled: ``model(ids, attention_mask=...)`` alone numbers positions
    ``0..T-1`` (which only matters for absolute position embeddings, e.g.
    GPT-2; RoPE families see relative positions)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _body(model):
    """The body (embeddings, blocks, final norm) of the HuggingFace model
    ``model`` (under a PEFT wrapper: of the model it wraps, LoRA layers
    included), None when it has no separate one."""
    body = getattr(model, "base_model", None)
    return None if body is model or not isinstance(body, nn.Module) else body


def _check(input_ids, attention_mask, score_mask, position_ids, temperature):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    for name, t in (("attention_mask", attention_mask), ("score_mask", score_mask), ("position_ids", position_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(getattr(t, 'shape', ())) if isinstance(t, torch.Tensor) else type(t)}")
        if t.device != input_ids.device:
            raise ValueError(f"{name} is on {t.device}, input_ids on {input_ids.device}")
    if score_mask is None:
        raise ValueError("score_mask is required: a [B, T] mask of the target tokens to score")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def causal_lm_logprobs(model, input_ids, attention_mask, score_mask, *, temperature=1.0, return_entropy=False,
                       position_ids=None, chunk_size=None, backend="auto"):
    """Log-probabilities of the scored tokens of ``input_ids`` under ``model``.

    Args:
        model: a HuggingFace causal LM (``...ForCausalLM`` / ``...LMHeadModel``),
            a PEFT model of one, or a :class:`~rlhf_engine.models.lora.WithoutAdapters`
            view of one (scored with its adapters disabled).
        input_ids: ``[B, T]`` int token ids (prompt and response, any padding).
        attention_mask: ``[B, T]`` 0/1 (or bool), passed to the model as is;
            ``None`` means no padding.
        score_mask: ``[B, T]`` bool or 0/1: the *target* tokens to score
            (e.g. the response tokens). Token ``t`` is predicted from position
            ``t - 1``, so column 0 is never scored.
        temperature: logits are divided by it (folded with the model's own
            final logit multiplier, if any).
        return_entropy: also return the per-position entropy of the
            (tempered) predictive distribution.
        position_ids: optional ``[B, T]``, passed to the model as is.
        chunk_size, backend: passed to ``linear_token_logprobs``.

    Returns:
        ``logp`` ``[B, T]`` float32, ``0.0`` where not scored; with
        ``return_entropy`` the pair ``(logp, entropy)``, both ``[B, T]``.
        Differentiable w.r.t. the model's parameters.

    Raises:
        ValueError: naming the argument, for wrong ranks, shapes or devices.
    """
    _check(input_ids, attention_mask, score_mask, position_ids, temperature)
    batch, seq = input_ids.shape
    # Targets: scored tokens that have a predecessor. nonzero() syncs with the
    # host once; the op then sees only the rows it needs.
    targets = score_mask.bool().clone()
    targets[:, 0] = False
    rows_b, rows_t = targets.nonzero(as_tuple=True)
    labels = input_ids[rows_b, rows_t].long()
    model_kwargs = model_inputs(input_ids, attention_mask, position_ids, drop_last=True)

    hf_model = base_model_of(model)  # a PEFT wrapper's model: its body and head, adapters in them
    head, reason = linear_head(hf_model)
    if head is None and is_adapter_layer(hf_model.get_output_embeddings()):
        reason = "the output head carries LoRA adapters (lm_head is a lora_target_modules entry)"
    body = _body(hf_model) if head is not None else None
    if head is not None and body is None:
        head, reason = None, f"{type(hf_model).__name__} has no separate body module"

    # The body's last layer runs from the first position that predicts a target on.
    first = int(rows_t.min()) - 1 if labels.numel() else 0

    def body_then_head():  # None when the body's output does not fit the head
        hidden, offset = last_hidden(body, model_kwargs, first)
        current = linear_head(hf_model)[0]  # read now: FSDP2 swaps in the gathered weight during the forward
        if hidden is None or hidden.shape[-1] != current.weight.shape[1]:
            return None
        rows = hidden[rows_b, rows_t - 1 - offset]
        if labels.numel() == 0:
            return _empty(rows, return_entropy)
        return _ops.linear_token_logprobs(rows, current.weight, labels, bias=current.bias,
                                          temperature=temperature / current.scale, return_entropy=return_entropy,
                                          chunk_size=chunk_size, backend=backend)

    with adapters_context(model):  # a WithoutAdapters view: its PEFT model with the adapters off
        out = None if head is None else call_as_forward(model, body_then_head)
        if head is not None and out is None:
            reason = "the body returns no last_hidden_state of the head's width"
        if out is None:
            if model not in _warned:
                _warned.add(model)
                warnings.warn(f"causal_lm_logprobs: {type(model).__name__} takes the full-logits path "
                              f"({reason}); its [B, T, V] logits are materialized", stacklevel=2)
            forward = hf_model if isinstance(model, WithoutAdapters) else model
            rows = forward(**model_kwargs).logits[rows_b, rows_t - 1]
            out = _empty(rows, return_entropy) if labels.numel() == 0 else _ops.token_logprobs(
                rows, labels, temperature=temperature, return_entropy=return_entropy, backend=backend)
    outs = out if return_entropy else (out,)
    scattered = tuple(_scatter(v, rows_b, rows_t, batch, seq) for v in outs)
    return scattered if return_entropy else scattered[0]


def model_inputs(input_ids, attention_mask, position_ids=None, *, drop_last=False):
    """Keyword arguments of a HF model (or body) forward over ``[B, T]``
    inputs, without a cache. ``drop_last``: without the last position when
    its output is not read (it predicts no token of the sequence, and no
    other position of a causal model sees it); a one-position input is kept."""
    keep = slice(None, max(input_ids.shape[1] - 1, 1) if drop_last else None)
    inputs = dict(input_ids=input_ids[:, keep], use_cache=False,
                  attention_mask=None if attention_mask is None else attention_mask[:, keep])
    if position_ids is not None:
        inputs["position_ids"] = position_ids[:, keep]
    return inputs


def _empty(rows, return_entropy):
    """Zero scored rows: empty results still attached to the graph, so a loss
    built on them can call backward."""
    empty = rows.float().sum(-1) * 0.0
    return (empty, empty) if return_entropy else empty


def _scatter(values, rows_b, rows_t, batch, seq):
    """``[N]`` values at ``(rows_b, rows_t)`` of a ``[B, T]`` float32 zero tensor
    (differentiable w.r.t. ``values``)."""
    zeros = torch.zeros(batch, seq, dtype=torch.float32, device=values.device)
    return zeros.index_put((rows_b, rows_t), values.float())
