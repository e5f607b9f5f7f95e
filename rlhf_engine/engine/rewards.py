"""Reward sources: the reward model and reward functions, each with a
weight; the score PPO trains on is their weighted sum.

A *reward function* is a Python callable
``fn(prompts, responses) -> scores`` on decoded text, one batch at a time:
``prompts`` and ``responses`` are lists of ``B`` strings, ``scores`` a list
(or 1-D tensor/array) of ``B`` real numbers. A prompt is the policy's
prompt tokens decoded without special tokens, the plain format's separator
(:data:`~rlhf_engine.models.prompts.PLAIN_SEPARATOR`) removed, so a prompt
passed to :meth:`RLHFEngine.step` as a string comes back as that string
(with a chat template: the templated text); a response is its tokens
before the first EOS, decoded without special tokens. A coroutine function
(``async def``) works too: the coroutines of one batch run together on an
asyncio event loop.

A source that raises, or scores a response NaN or infinite, *fails*: its
column is NaN, so the weighted sum is not finite and the engine skips the
iteration's updates (its rule for non-finite losses), reporting the
failure once per source as a :class:`RewardSourceWarning`. A function whose
output is not ``B`` numbers is a bug in it, not a bad sample: ValueError.
"""
import asyncio
import concurrent.futures
import dataclasses
import inspect
import math
import numbers
import re
import warnings
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from rlhf_engine.models.prompts import PLAIN_SEPARATOR
from rlhf_engine.models.scalar_heads import sequence_scores

MODEL = "model"  # the reward model's name among the sources (its metrics: reward/model_mean, reward/model_std)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Names whose metrics would collide with the engine's own reward/* metrics.
RESERVED = ("score", "failed")


class RewardSourceWarning(UserWarning):
    """A reward source failed (raised, or scored a response non-finite): the iteration's updates are skipped."""


@dataclasses.dataclass(frozen=True)
class RewardSource:
    """One term of the reward: ``weight`` x the reward model's score
    (``function`` None) or ``weight`` x ``function``'s score."""

    name: str
    weight: float
    function: Optional[Callable] = None


class SourceScores(NamedTuple):
    """What :func:`score_sources` measured on a batch of ``B`` sequences."""

    per_source: torch.Tensor  # [B, S] float32: each source's scores, in source order (NaN where it raised)
    total: torch.Tensor  # [B] float32: sum over sources of weight x score, accumulated in float64


def build_sources(reward_model, reward_funcs: Optional[Mapping[str, Callable]] = None,
                  reward_weights: Optional[Mapping[str, float]] = None) -> List[RewardSource]:
    """The reward's sources: the reward model (named :data:`MODEL`) when
    given, then ``reward_funcs`` in their order.

    Args:
        reward_model: the reward model or None.
        reward_funcs: ``{name: function}`` (see the module doc); a name is
            letters, digits, ``_``, ``.``, ``-``, not :data:`MODEL` nor one
            of :data:`RESERVED`.
        reward_weights: ``{name: weight}``, finite numbers; a source not
            named weighs 1.0.

    Raises:
        ValueError: no source, a bad name, function or weight, or a weight
            for a source that does not exist.
    """
    funcs = {} if reward_funcs is None else reward_funcs
    if not isinstance(funcs, Mapping):
        raise ValueError(f"reward_funcs must be a mapping {{name: function}}, got {type(funcs).__name__}")
    weights = {} if reward_weights is None else reward_weights
    if not isinstance(weights, Mapping):
        raise ValueError(f"reward_weights must be a mapping {{name: weight}}, got {type(weights).__name__}")
    if reward_model is None and not funcs:
        raise ValueError("the engine needs a reward: pass reward_model, reward_funcs, or both")
    for name, fn in funcs.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == MODEL or name in RESERVED:
            raise ValueError(f"reward function name {name!r}: names are letters, digits, '_', '.' and '-', and not "
                             f"{MODEL!r} (the reward model) nor {' or '.join(map(repr, RESERVED))}")
        if isinstance(fn, torch.nn.Module):
            raise ValueError(f"reward_funcs[{name!r}] is a torch module: pass one reward model as reward_model (the "
                             f"engine places and scores it on the token ids); wrap another in a function of the "
                             f"decoded text")
        if not callable(fn):
            raise ValueError(f"reward_funcs[{name!r}] must be callable as fn(prompts, responses) -> scores, got "
                             f"{type(fn).__name__}")
    names = ([MODEL] if reward_model is not None else []) + list(funcs)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"reward_weights names {unknown}, which are not reward sources (the sources: {names})")
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"reward_weights[{name!r}] must be a finite number, got {weight!r}")
    return [RewardSource(name, float(weights.get(name, 1.0)), funcs.get(name)) for name in names]


def check_tokenizer(tokenizer) -> None:
    """Reward functions read decoded text: refuse a tokenizer that cannot decode."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"reward functions score decoded text, but the tokenizer ({type(tokenizer).__name__}) has "
                         f"no decode(ids, skip_special_tokens=True)")


def decode_rollout(tokenizer, rollout) -> Tuple[List[str], List[str]]:
    """``(prompts, responses)``, one string each per row of ``rollout``
    (a :class:`~rlhf_engine.engine.batch.Rollout`), as the module doc
    describes."""
    width = rollout.prompt_length
    eos = tokenizer.eos_token_id
    prompt_rows, response_rows = [], []
    for ids, keep, response, response_keep in zip(
            rollout.sequences[:, :width].tolist(), rollout.attention_mask[:, :width].tolist(),
            rollout.sequences[:, width:].tolist(), rollout.response_mask[:, width:].tolist()):
        prompt_rows.append([t for t, k in zip(ids, keep) if k])
        tokens = [t for t, k in zip(response, response_keep) if k]
        response_rows.append(tokens[:tokens.index(eos)] if eos in tokens else tokens)
    prompts = _decode(tokenizer, prompt_rows)
    if not getattr(tokenizer, "chat_template", None):  # the plain format: prompt + separator
        prompts = [p[:-len(PLAIN_SEPARATOR)] if p.endswith(PLAIN_SEPARATOR) else p for p in prompts]
    return prompts, _decode(tokenizer, response_rows)


def _decode(tokenizer, rows):
    if callable(getattr(tokenizer, "batch_decode", None)):
        return list(tokenizer.batch_decode(rows, skip_special_tokens=True))
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def score_sources(sources: Sequence[RewardSource], rollout, tokenizer, model=None, reported=None) -> SourceScores:
    """Every source's scores of ``rollout``'s ``B`` sequences and their weighted sum.

    Args:
        sources: from :func:`build_sources`.
        rollout: a :class:`~rlhf_engine.engine.batch.Rollout` (its
            ``sequences``, masks, ``prompt_length``, ``position_ids``).
        tokenizer: decodes the text reward functions read.
        model: the reward model (required when a source is :data:`MODEL`):
            scored on the token ids by
            :func:`~rlhf_engine.models.scalar_heads.sequence_scores`.
        reported: a set of source names whose failure was reported already
            (updated): each source warns once.

    Returns:
        :class:`SourceScores` on the rollout's device.

    Raises:
        ValueError: a function returned something else than ``B`` numbers.
    """
    device = rollout.sequences.device
    columns = {}
    if any(s.function is not None for s in sources):
        columns = function_scores(sources, *decode_rollout(tokenizer, rollout), reported)
    columns = {name: torch.tensor(values, dtype=torch.float64, device=device) for name, values in columns.items()}
    for source in sources:
        if source.function is None:
            if model is None:
                raise ValueError(f"source {source.name!r} is the reward model, but no model was given")
            scores = sequence_scores(model, rollout.sequences, rollout.attention_mask, rollout.position_ids)
            columns[source.name] = scores.float().double()
    per_source = torch.stack([columns[s.name] for s in sources], dim=1)  # [B, S] float64
    weights = torch.tensor([s.weight for s in sources], dtype=torch.float64, device=device)
    total = (per_source * weights).sum(-1)
    return SourceScores(per_source.float(), total.float())


def function_scores(sources: Sequence[RewardSource], prompts: Sequence[str], responses: Sequence[str],
                    reported=None) -> Dict[str, List[float]]:
    """``{name: B floats}`` of every reward function among ``sources`` on
    ``B`` texts: NaN everywhere for a function that raised, its values as
    returned otherwise (a failure warns once per name in ``reported``, a
    set, updated).

    Raises:
        ValueError: a function returned something else than ``B`` numbers.
    """
    reported = set() if reported is None else reported
    funcs = [s for s in sources if s.function is not None]
    outputs = _call_all(funcs, prompts, responses)
    return {s.name: _column(s.name, outputs[s.name], len(prompts), reported) for s in funcs}


def _call_all(funcs, prompts, responses):
    """``{name: output or the exception it raised}``; coroutines run together on one event loop."""
    outputs, pending = {}, {}
    for source in funcs:
        try:
            out = source.function(list(prompts), list(responses))
        except Exception as exc:  # noqa: BLE001 -- a failing reward function skips the iteration, never the run
            out = exc
        (pending if inspect.isawaitable(out) else outputs)[source.name] = out
    if pending:
        outputs.update(zip(pending, _run_coroutines(list(pending.values()))))
    return outputs


def _run_coroutines(awaitables):
    """The results (or exceptions) of ``awaitables``, awaited together; in
    a thread of its own when this thread already runs an event loop."""
    async def gather():
        return await asyncio.gather(*awaitables, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def _column(name, output, batch, reported):
    """A function's ``batch`` scores as floats (NaN everywhere when it raised), validated; failures warn once."""
    if isinstance(output, Exception):
        _report(name, reported, f"raised {type(output).__name__}: {output}")
        return [math.nan] * batch
    values = output.detach().cpu().tolist() if isinstance(output, torch.Tensor) else output
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # a numpy array
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != batch or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        shown = repr(output)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(f"reward function {name!r} must return one number per response (a list of {batch} floats "
                         f"for {batch} responses); it returned {shown}")
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        example = next(v for v in values if not math.isfinite(v))
        _report(name, reported, f"scored {bad} of {batch} responses non-finite (e.g. {example})")
    return [float(v) for v in values]


def _report(name, reported, what):
    if name not in reported:
        reported.add(name)
        warnings.warn(f"reward function {name!r} {what}: the iteration's updates are skipped (this is reported once "
                      f"per function; every skipped update is counted in updates/skipped)", RewardSourceWarning,
                      stacklevel=4)


def fail_whole_batch(scores: torch.Tensor, raw_scores: torch.Tensor) -> torch.Tensor:
    """``scores`` ``[B]``, or all NaN when any of ``raw_scores`` ``[B]`` (the
    weighted sums before clipping) is not finite: a failed source skips
    every update of the iteration, whatever the advantage estimator (no
    host sync)."""
    return torch.where(torch.isfinite(raw_scores).all(), scores, torch.full_like(scores, math.nan))
