"""Collation for the SFT and reward-model stages: encoded examples to model
batches, deterministic mini-batch order, and the held-out split.

A *row* is ``(prompt_ids, response_ids)``: one model sequence. An SFT
example is one row; a comparison is two rows (chosen, rejected) and a
ranking K rows, each response encoded once.

Two layouts:

- **padded** (:func:`pad_rows`): ``[B, L]`` rows right-padded to the longest,
  with an ``attention_mask``. Works with every attention implementation.
- **packed** (:func:`pack_rows`): all rows concatenated into one ``[1, N]``
  row, no padding, no ``attention_mask``, and ``position_ids`` restarting at
  0 for each example. Transformers' flash-attention path reads the restarts
  as sequence boundaries (``cu_seqlens``) and runs the variable-length
  kernel, so no token attends across examples and no compute goes to
  padding.

The rule (:func:`supports_packing`): pack only when the model's attention
implementation is a flash-attention one. Other implementations (SDPA,
eager) also honour the restarts in transformers 5.x, but by building a
block-diagonal ``[N, N]`` mask over the whole packed row: quadratic in the
batch's total length instead of in each example's, so padding is the faster
layout there.
"""
import math
import random
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

Row = Tuple[Sequence[int], Sequence[int]]  # (prompt_ids, response_ids)

# Attention implementations whose transformers forward turns restarting
# position_ids (with attention_mask None) into a variable-length kernel call.
PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3")


class TokenBatch(NamedTuple):
    """One model batch of rows.

    ``input_ids`` ``[B, L]`` int64; ``attention_mask`` ``[B, L]`` int64 (1 on
    real tokens), None when packed; ``response_mask`` ``[B, L]`` bool: the
    response tokens (EOS included), the SFT loss targets; ``position_ids``
    ``[B, L]`` int64 when packed (restarting per example), else None (the
    model numbers positions itself); ``row_lengths``: the real length of
    each row (prompt + response), in row order.
    """

    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    response_mask: torch.Tensor
    position_ids: Optional[torch.Tensor]
    row_lengths: Tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return sum(self.row_lengths)

    def to(self, device) -> "TokenBatch":
        """This batch with every tensor on ``device``."""
        return self._replace(**{name: getattr(self, name).to(device) for name in
                                ("input_ids", "attention_mask", "response_mask", "position_ids")
                                if getattr(self, name) is not None})


def supports_packing(model) -> bool:
    """True when ``model``'s attention implementation (its config's
    ``_attn_implementation``) runs packed rows without a dense mask."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in PACKING_ATTENTION


def _check_rows(rows: Sequence[Row]) -> None:
    if len(rows) == 0:
        raise ValueError("rows is empty")
    for i, (prompt, response) in enumerate(rows):
        if len(prompt) == 0:
            raise ValueError(f"rows[{i}] has an empty prompt: its first response token needs a context")
        if len(response) == 0:
            raise ValueError(f"rows[{i}] has an empty response")


def pad_rows(rows: Sequence[Row], pad_id: int) -> TokenBatch:
    """The padded layout: ``[B, L]`` rows ``prompt + response + pad...``
    with ``L`` the longest row."""
    _check_rows(rows)
    lengths = tuple(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
    response_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        input_ids[i, :lengths[i]] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        response_mask[i, len(prompt):lengths[i]] = True
    attention_mask = (torch.arange(input_ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
    return TokenBatch(input_ids, attention_mask, response_mask, None, lengths)


def pack_rows(rows: Sequence[Row]) -> TokenBatch:
    """The packed layout: one ``[1, N]`` row, ``N`` the total length, with
    ``position_ids`` counting ``0..len-1`` within each example.

    Only response tokens are loss targets and each example's prompt is
    non-empty, so no target is predicted from the previous example's last
    token.
    """
    _check_rows(rows)
    lengths = tuple(len(p) + len(r) for p, r in rows)
    ids, positions, targets = [], [], []
    for prompt, response in rows:
        ids += list(prompt) + list(response)
        positions += range(len(prompt) + len(response))
        targets += [False] * len(prompt) + [True] * len(response)
    return TokenBatch(torch.tensor([ids], dtype=torch.long), None, torch.tensor([targets], dtype=torch.bool),
                      torch.tensor([positions], dtype=torch.long), lengths)


def collate_rows(rows: Sequence[Row], pad_id: int, packed: bool) -> TokenBatch:
    """:func:`pack_rows` when ``packed``, else :func:`pad_rows`."""
    return pack_rows(rows) if packed else pad_rows(rows, pad_id)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> List[List[int]]:
    """One epoch's mini-batches: a permutation of ``range(n)`` drawn from
    ``generator`` (advancing it), cut into ``ceil(n / batch_size)`` lists,
    the last one shorter when ``batch_size`` does not divide ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def chunks(items: Sequence, size: int) -> List[Sequence]:
    """``items`` cut into consecutive slices of ``size`` (the last one shorter)."""
    return [items[start:start + size] for start in range(0, len(items), size)]


def split_eval(items: Sequence, fraction: float, seed: int) -> Tuple[list, list]:
    """``(train, held_out)``: ``round(fraction * len(items))`` items drawn
    with ``random.Random(seed)`` held out (at least one when ``fraction > 0``
    and at least one left to train on), both in their original order."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    n = len(items)
    count = min(max(round(fraction * n), 1 if fraction > 0 else 0), max(n - 1, 0))
    held = set(random.Random(seed).sample(range(n), count))
    return ([item for i, item in enumerate(items) if i not in held],
            [item for i, item in enumerate(items) if i in held])


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``n`` examples."""
    return math.ceil(n / batch_size)
