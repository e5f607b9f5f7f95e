"""The batches one PPO iteration passes between its phases.

Layout shared by every tensor of a batch: ``[B, T]`` with ``B`` sequences
(prompts x samples per prompt) and ``T = P + R`` positions: the prompt
left-padded to ``P`` tokens, then the response right-padded to ``R`` tokens.
Per-token quantities live at the position of the token they are about:
``logprobs[b, t]`` is the log-prob of ``sequences[b, t]`` (predicted from
position ``t - 1``), ``values[b, t]`` the critic's value of the state that
predicts token ``t``, ``rewards[b, t]`` the reward for emitting it. They are
0 outside ``response_mask``.
"""
import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class Rollout:
    """Sampled sequences (output of the rollout phase)."""

    sequences: torch.Tensor  # [B, T] int64: left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # [B, T] bool: real tokens (prompt and response, EOS included)
    response_mask: torch.Tensor  # [B, T] bool: response tokens, EOS included
    sampler_logprobs: torch.Tensor  # [B, T] float32: the sampler's log-prob of each response token
    finished: torch.Tensor  # [B] bool: the response ended with EOS (False: cut at max_new_tokens)
    prompt_length: int  # P
    filter_kl: Optional[torch.Tensor] = None  # [B, T] float32: KL(top-k/top-p filtered || unfiltered) per token

    @property
    def position_ids(self):
        """``[B, T]`` positions counted from each row's first real token."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def response_lengths(self):
        """``[B]`` int64 number of response tokens."""
        return self.response_mask.sum(-1)


@dataclasses.dataclass(kw_only=True)
class Scored(Rollout):
    """A rollout with what the score phase measured on it (output of step 2)."""

    old_logprobs: torch.Tensor  # [B, T] float32: policy log-probs before this iteration's updates
    ref_logprobs: torch.Tensor  # [B, T] float32: reference policy log-probs
    values: Optional[torch.Tensor]  # [B, T] float32: critic values (None without a critic)
    raw_scores: torch.Tensor  # [B] float32: the reward model's scores as given
    scores: torch.Tensor  # [B] float32: reward model scores (after clipping and the truncation rule)


@dataclasses.dataclass(kw_only=True)
class Experience(Scored):
    """A scored rollout with its advantages (output of step 3): everything the learn phase needs."""

    rewards: torch.Tensor  # [B, T] float32: per-token rewards (KL-shaped when KL is in the reward)
    advantages: torch.Tensor  # [B, T] float32
    returns: torch.Tensor  # [B, T] float32: advantages + values (critic targets)


def extend(batch, cls, **fields):
    """A ``cls`` (a subclass of ``batch``'s type) with ``batch``'s fields and
    the new ``fields``: each phase builds its output whole."""
    return cls(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}, **fields)


def map_tensors(batch, fn):
    """A copy of ``batch`` with ``fn(tensor)`` for every tensor field; scalar fields kept."""
    fields = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        fields[field.name] = fn(value) if isinstance(value, torch.Tensor) else value
    return type(batch)(**fields)


def select(batch, index):
    """The rows ``index`` (``[b]`` int64 tensor) of every tensor field of a
    :class:`Rollout`, :class:`Scored` or :class:`Experience`; scalar fields are kept."""
    return map_tensors(batch, lambda t: t[index])


def pad_to(batch, prompt_length, response_length, pad_id):
    """``batch`` re-padded to ``T = prompt_length + response_length``: more
    left padding before the prompts, more right padding after the responses
    (``pad_id`` in ``sequences``, False/0 elsewhere). Positions derive from
    the attention mask, so every model sees the same tokens at the same
    positions."""
    left = prompt_length - batch.prompt_length
    right = response_length - (batch.sequences.shape[1] - batch.prompt_length)
    if left < 0 or right < 0:
        raise ValueError(f"cannot pad a batch of {batch.prompt_length} + "
                         f"{batch.sequences.shape[1] - batch.prompt_length} positions to "
                         f"{prompt_length} + {response_length}")

    def pad(t):
        if t.dim() != 2 or t.shape[1] != batch.sequences.shape[1]:
            return t
        fill = pad_id if t is batch.sequences else 0
        return torch.nn.functional.pad(t, (left, right), value=fill) if t.dtype != torch.bool else \
            torch.nn.functional.pad(t.to(torch.uint8), (left, right)).bool()

    return dataclasses.replace(map_tensors(batch, pad), prompt_length=prompt_length)
