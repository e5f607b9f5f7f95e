"""Scalar heads: the reward model (one score per sequence) and the critic
(one value per position) as HuggingFace sequence-classification models.

A seq-cls model with ``num_labels=1`` (``AutoModelForSequenceClassification``)
is a body ``model.base_model`` (embeddings, blocks, final norm) plus a linear
head ``model.score`` ``[1, H]`` -- the name Llama, Qwen2 and GPT-2 use -- so
``save_pretrained`` / ``from_pretrained`` need nothing of ours.

We call the body ourselves instead of ``model(...)``: HF pools at the last
token that is not ``pad_token_id``, which is wrong when pad == eos or when a
response is right-padded after a left-padded prompt; we pool at the last
position where ``attention_mask`` is 1, and apply the head only where needed.
"""
import copy

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from rlhf_engine.distributed import call_as_forward
from rlhf_engine.models.last_layer import last_hidden
from rlhf_engine.models.causal_lm import model_inputs
from rlhf_engine.models.lora import adapters_context, base_model_of, is_adapter_layer, merged_copy


def scalar_head(model):
    """``(body, head)`` of a HF seq-cls model with a one-output ``score``
    ``nn.Linear``, or ``None`` for any other module. Under a PEFT wrapper
    (or its :class:`~rlhf_engine.models.lora.WithoutAdapters` view), the
    wrapped model's: LoRA layers in the body, ``head`` peft's wrapper of
    ``score`` (the trained copy, or the original with adapters disabled).

    Raises:
        ValueError: ``model.score`` is linear but has more than one output.
    """
    model = base_model_of(model)
    head = getattr(model, "score", None)
    linear = getattr(head, "original_module", head) if is_adapter_layer(head) else head
    body = getattr(model, "base_model", model)
    if not isinstance(linear, nn.Linear) or not isinstance(body, nn.Module) or body is model:
        return None
    if linear.out_features != 1:
        raise ValueError(f"model.score has {head.out_features} outputs; a scalar head needs num_labels=1")
    return body, head


def _check(input_ids, attention_mask, position_ids):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != input_ids.shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
        if t.device != input_ids.device:
            raise ValueError(f"{name} is on {t.device}, input_ids on {input_ids.device}")


def last_real_index(attention_mask):
    """``[B]`` int64 index of each row's last position where
    ``attention_mask`` ``[B, T]`` is nonzero.

    Raises:
        ValueError: a row of ``attention_mask`` has no real token.
    """
    real = attention_mask.bool()
    if not bool(real.any(-1).all()):
        raise ValueError("attention_mask has a row with no real token")
    positions = torch.arange(real.shape[-1], device=real.device)
    # positions increase, so the largest real one is the last
    return torch.where(real, positions, -1).amax(-1)


def score_offset(model):
    """The constant subtracted from ``model``'s head output: its
    ``config.score_offset`` (the mean score the ``rm`` stage measured on
    held-out demonstrations, so that they score 0 on average, as
    InstructGPT normalises its reward model), 0.0 when not set. It lives in
    the config, so a saved model folder carries it to every consumer, and a
    critic copied from the reward model starts on the same scale."""
    offset = getattr(getattr(model, "config", None), "score_offset", None)
    return 0.0 if offset is None else float(offset)


def sequence_scores(model, input_ids, attention_mask, position_ids=None):
    """One scalar per sequence: the reward model's score.

    Args:
        model: a HF seq-cls model with ``num_labels=1`` (head ``model.score``),
            or any module that ``model(input_ids=..., attention_mask=...)``
            maps to a ``[B]`` / ``[B, 1]`` tensor or an output whose
            ``.logits`` is ``[B]`` / ``[B, 1]``.
        input_ids: ``[B, T]`` int token ids (left-padded prompt, right-padded
            response, or any padding).
        attention_mask: ``[B, T]`` 0/1 or bool; None means no padding.
        position_ids: optional ``[B, T]``, passed to a seq-cls model's body
            (GPT-2 needs them with left padding: see ``positions_from_mask``);
            a generic module gets only ``input_ids`` and ``attention_mask``.

    Returns:
        ``[B]`` float32: for a seq-cls model, the head applied to the hidden
        state at each row's last real token (last position where
        ``attention_mask`` is 1), minus :func:`score_offset`; differentiable
        w.r.t. the parameters.

    Raises:
        ValueError: wrong shapes/devices, a row with no real token, or a
            generic module that returned something else.
    """
    _check(input_ids, attention_mask, position_ids)
    batch = input_ids.shape[0]
    parts = scalar_head(model)
    if parts is None:
        return _generic_scores(model, input_ids, attention_mask, batch) - score_offset(model)
    body, head = parts

    inputs = model_inputs(input_ids, attention_mask, position_ids)

    def scores():
        if attention_mask is None:
            hidden, _ = last_hidden(body, inputs, input_ids.shape[1] - 1)
            rows = hidden[:, -1]
        else:
            last = last_real_index(attention_mask)
            hidden, offset = last_hidden(body, inputs, int(last.min()))
            rows = hidden[torch.arange(batch, device=hidden.device), last - offset]
        return head(rows).squeeze(-1).float() - score_offset(model)

    with adapters_context(model):
        return call_as_forward(model, scores)


def _generic_scores(model, input_ids, attention_mask, batch):
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    if isinstance(out, torch.Tensor):
        scores, what = out, f"a tensor of shape {tuple(out.shape)}"
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        scores, what = out.logits, f"{type(out).__name__} with logits of shape {tuple(out.logits.shape)}"
    else:
        scores, what = None, f"a {type(out).__name__}"
    if scores is not None and tuple(scores.shape) in ((batch,), (batch, 1)):
        return scores.reshape(batch).float()
    raise ValueError(f"model must return scores of shape [B] or [B, 1] (B={batch}), as a tensor or as .logits; "
                     f"it returned {what}")


def token_values(model, input_ids, attention_mask, position_ids=None, *, from_position=1):
    """The critic's value of every state: ``values[:, t]`` is the head
    applied to the hidden state at ``t - 1`` (the state that predicts token
    ``t``), ``values[:, 0] = 0``.

    Args:
        model: a HF seq-cls model with ``num_labels=1`` (head ``model.score``).
        input_ids, attention_mask, position_ids: ``[B, T]``, as for
            :func:`sequence_scores`.
        from_position: the first ``t`` whose value is wanted (e.g. the first
            response column); earlier values may come back as 0, and the
            model's last layer then skips those positions.

    Returns:
        ``[B, T]`` float32 (head applied in the body's dtype, minus
        :func:`score_offset`, as the reward model's scores), differentiable
        w.r.t. the parameters. Positions outside the response are not zeroed:
        masking is the caller's.

    Raises:
        ValueError: wrong shapes/devices, or ``model`` is not a seq-cls model
            with a scalar ``score`` head.
    """
    _check(input_ids, attention_mask, position_ids)
    parts = scalar_head(model)
    if parts is None:
        raise ValueError(f"model must be a sequence-classification model with a linear `score` head, "
                         f"got {type(model).__name__}")
    body, head = parts

    # values[:, t] needs the hidden state at t - 1: the last position's is never used.
    seq = input_ids.shape[1]
    inputs = model_inputs(input_ids, attention_mask, position_ids, drop_last=True)
    start = min(max(int(from_position) - 1, 0), max(seq - 2, 0))

    def values():
        hidden, offset = last_hidden(body, inputs, start)
        out = head(hidden[:, :seq - 1 - offset]).squeeze(-1).float() - score_offset(model)
        return nn.functional.pad(out, (offset + 1, 0))

    with adapters_context(model):
        return call_as_forward(model, values)


def critic_from(model, *, head_init="zero", seed=0):
    """A new trainable critic (seq-cls, ``num_labels=1``) on the device and
    in the dtype of ``model``, sharing no storage with it.

    Args:
        model: a seq-cls reward model (deep-copied, head included) or a HF
            causal LM (its body weights copied into a fresh seq-cls model).
        head_init: for a causal LM source, ``"zero"`` (initial values are 0)
            or ``"normal"`` (``N(0, config.initializer_range)`` drawn from
            ``seed``). Ignored for a reward model source, whose head is kept.
        seed: seed of the ``"normal"`` head init.

    Returns:
        the critic, every parameter ``requires_grad``, in the source's
        train/eval mode; its config keeps the source's ``pad_token_id``.
    """
    if head_init not in ("zero", "normal"):
        raise ValueError(f"head_init must be 'zero' or 'normal', got {head_init!r}")
    if scalar_head(model) is not None:
        critic = copy.deepcopy(model)
    else:  # a PEFT causal LM: its body with the adapters merged in
        critic = _seq_cls_from_causal_lm(merged_copy(model), head_init, seed)
    return critic.requires_grad_(True).train(model.training)


def reward_model_from_causal_lm(lm, *, seed=0):
    """A seq-cls model (``num_labels=1``) with ``lm``'s body weights (copied)
    and a fresh head ``N(0, config.initializer_range)`` drawn from ``seed``
    (the global RNG is not touched); on ``lm``'s device and dtype, in its
    train/eval mode."""
    return _seq_cls_from_causal_lm(lm, "normal", seed).train(lm.training)


def _seq_cls_from_causal_lm(lm, head_init, seed):
    body = getattr(lm, "base_model", None)
    config = getattr(lm, "config", None)
    if config is None or not isinstance(body, nn.Module) or body is lm:
        raise ValueError(f"model must be a HuggingFace causal LM with a separate body, got {type(lm).__name__}")
    config = copy.deepcopy(config)
    config.num_labels = 1
    reference = next(body.parameters())
    device = reference.device
    # from_config draws a random init (overwritten below) from the global RNG: keep that RNG as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, dtype=reference.dtype)
    model.base_model.load_state_dict(body.state_dict())
    weight = model.score.weight
    if head_init == "zero":
        init = torch.zeros(weight.shape)
    else:
        generator = torch.Generator().manual_seed(seed)
        std = getattr(config, "initializer_range", 0.02)
        init = torch.randn(weight.shape, generator=generator) * std
    with torch.no_grad():
        weight.copy_(init)
        if model.score.bias is not None:
            model.score.bias.zero_()
    return model
