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

    @property
    def position_ids(self):
        """``[B, T]`` positions counted from each row's first real token."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def response_lengths(self):
        """``[B]`` int64 number of response tokens."""
        return self.response_mask.sum(-1)


@dataclasses.dataclass
class Experience(Rollout):
    """A scored rollout: everything the learn phase needs."""

    old_logprobs: Optional[torch.Tensor] = None  # [B, T] float32: policy log-probs before this iteration's updates
    ref_logprobs: Optional[torch.Tensor] = None  # [B, T] float32: reference policy log-probs
    values: Optional[torch.Tensor] = None  # [B, T] float32: critic values (None without a critic)
    scores: Optional[torch.Tensor] = None  # [B] float32: reward model scores (after the truncation rule)
    rewards: Optional[torch.Tensor] = None  # [B, T] float32: per-token rewards (KL-shaped when KL is in the reward)
    advantages: Optional[torch.Tensor] = None  # [B, T] float32
    returns: Optional[torch.Tensor] = None  # [B, T] float32: advantages + values (critic targets)


def select(batch, index):
    """The rows ``index`` (``[b]`` int64 tensor) of every tensor field of a
    :class:`Rollout` / :class:`Experience`; scalar fields are kept."""
    fields = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        fields[field.name] = value[index] if isinstance(value, torch.Tensor) else value
    return type(batch)(**fields)


def to_device(batch, device):
    """A copy of ``batch`` with every tensor on ``device``."""
    fields = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        fields[field.name] = value.to(device) if isinstance(value, torch.Tensor) else value
    return type(batch)(**fields)
