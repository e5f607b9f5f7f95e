"""Random inputs of the fused ops, shared by the op tests (tests/ops/) and the
op benchmarks (benchmarks/ops/, which import this module; see
benchmarks/conftest.py).

Every generator draws from ``gen`` and builds its tensors on ``gen.device``
(a CPU generator for tests, ``torch.Generator(device)`` for benchmarks).
Floating inputs are drawn in float32 and converted to ``dtype``: the same
values, rounded, at every precision. The defaults are the test regimes; the
benchmarks turn off the edge cases (rows with no valid token, tokens beyond
the KL clamp) that cost nothing to test but are not typical work.
"""
import math

import torch

IGNORE_INDEX = -100  # the ops' default ignore_index


def logprob_pair(gen, shape, spread=0.3):
    """(logprobs, near) float32: log-probs in (-3, 0] and others about
    ``spread`` from them, as a policy and its reference (or its rollout) a
    few steps apart."""
    lp = -torch.rand(shape, generator=gen, device=gen.device) * 3
    return lp, lp + torch.randn(shape, generator=gen, device=gen.device) * spread


def token_mask(gen, shape, masked):
    """bool mask with each position masked (False) with probability ``masked``."""
    return torch.rand(shape, generator=gen, device=gen.device) > masked


def response_mask(gen, rows, cols, *, min_length=0, span=None):
    """[rows, cols] bool: right-padded responses of random length in
    [min_length, cols], with a masked span (a tool output) inside when
    ``span`` is given: an int is that many positions from a random start in
    each row, a (start, stop) pair the same positions in every row."""
    positions = torch.arange(cols, device=gen.device)
    lengths = torch.randint(min_length, cols + 1, (rows, 1), generator=gen, device=gen.device)
    mask = positions < lengths
    if span is None:
        return mask
    if isinstance(span, int):
        starts = torch.randint(0, max(cols, 1), (rows, 1), generator=gen, device=gen.device)
        inside = (positions >= starts) & (positions < starts + span)
    else:
        inside = (positions >= span[0]) & (positions < span[1])
    return mask & ~inside


def ppo_loss_inputs(gen, b, t, *, spread=0.3, masked=0.2, edge_rows=True, clamp_tokens=True):
    """(x, old, target, mask) [B, T] of a PPO loss: log-prob-like ``x``,
    ``old`` about ``spread`` from it, unit-normal targets (advantages or
    returns), a ``masked`` fraction of padding. ``edge_rows``: token [0, 0]
    valid, and when B >= 3 a row of one valid token and a row of none;
    ``clamp_tokens``: two valid tokens of row 0 with ``x - old`` beyond the
    +-20 clamp of the policy loss (when T >= 4)."""
    x, old = logprob_pair(gen, (b, t), spread)
    target = torch.randn(b, t, generator=gen, device=gen.device)
    mask = token_mask(gen, (b, t), masked)
    if edge_rows:
        mask[0, 0] = True
        if b >= 3:
            mask[1] = False
            mask[1, t // 2] = True
            mask[2] = False
    if clamp_tokens and t >= 4:
        old[0, 1] = x[0, 1] + 25
        old[0, 2] = x[0, 2] - 25
        mask[0, 1:3] = True
    return x, old, target, mask


def gae_inputs(gen, b, t, *, masked=0.3, empty_row=True, mask=None):
    """(rewards, values, mask) [B, T]: unit-normal rewards and values, a
    ``masked`` fraction of masked positions (or ``mask(gen, b, t)`` when a
    mask maker is given, e.g. a :func:`response_mask`), and (when B > 1 and
    ``empty_row``) row 1 without any valid position."""
    rewards = torch.randn(b, t, generator=gen, device=gen.device)
    values = torch.randn(b, t, generator=gen, device=gen.device)
    mask = token_mask(gen, (b, t), masked) if mask is None else mask(gen, b, t)
    if empty_row and b > 1:
        mask[1] = False
    return rewards, values, mask


def logits_and_labels(gen, lead, vocab, dtype=torch.float32, *, scale=3.0, offset=0.0, ignored=1):
    """(logits [*lead, V] in ``dtype``, labels [*lead] int64): normal logits
    times ``scale`` plus ``offset``; the first ``ignored`` labels (flattened)
    are IGNORE_INDEX."""
    logits = torch.randn(*lead, vocab, generator=gen, device=gen.device).mul_(scale).add_(offset).to(dtype)
    labels = torch.randint(0, vocab, tuple(lead), generator=gen, device=gen.device)
    labels.view(-1)[:ignored] = IGNORE_INDEX
    return logits, labels


def linear_head_inputs(gen, lead, hidden_size, vocab, dtype=torch.float32, *, bias=True, ignored=1):
    """(hidden [*lead, H], weight [V, H], bias [V] or None, labels [*lead]):
    unit-normal hidden states, a weight of scale 2/sqrt(H) (logits of about
    unit scale times 2); the first ``ignored`` labels are IGNORE_INDEX."""
    hidden = torch.randn(*lead, hidden_size, generator=gen, device=gen.device).to(dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen, device=gen.device).mul_(2 / math.sqrt(hidden_size))
    b = torch.randn(vocab, generator=gen, device=gen.device).to(dtype) if bias else None
    labels = torch.randint(0, vocab, tuple(lead), generator=gen, device=gen.device)
    labels.view(-1)[:ignored] = IGNORE_INDEX
    return hidden, weight.to(dtype), b, labels
