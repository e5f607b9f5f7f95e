"""The reward-model stage: a scalar-head model trained on human comparisons
and rankings with the Bradley-Terry loss.

Every training element is one record:

- a comparison (prompt, chosen, rejected, optional margin ``m``) gives one
  pair and the loss ``-log sigmoid(r_chosen - r_rejected - m)``;
- a ranking of K responses gives all K(K-1)/2 pairs (better ranked first)
  and, as in InstructGPT, counts as *one* element whose loss is the mean over
  its pairs, so a prompt with many responses does not outweigh the others
  (and its pairs, highly correlated, do not overfit). Its K responses are
  K rows of the model batch, each scored once.

A batch's loss is the mean of its elements' losses, through
:func:`rlhf_engine.ops.pairwise_reward_loss`. Scores are the head at each
row's last real token (:func:`rlhf_engine.models.scalar_heads.sequence_scores`);
rows are always padded, since pooling needs one row per response.

After training, as InstructGPT does before RL, the scores are normalised
so that held-out demonstrations score 0 on average
(:func:`normalize_scores`): their mean score becomes the model's
``config.score_offset``, which ``sequence_scores`` subtracts, so the saved
model folder carries it to every consumer (the engine, ``eval``, the
probes) whether or not the score head has a bias to fold it into.
"""
import dataclasses
import functools
from collections import defaultdict
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from rlhf_engine import ops
from rlhf_engine.models.prompts import left_pad
from rlhf_engine.models.scalar_heads import reward_model_from_causal_lm, score_offset, sequence_scores
from rlhf_engine.options import option
from rlhf_engine.pipeline import batching
from rlhf_engine.pipeline.config import check_rm_command
from rlhf_engine.pipeline.data import Comparison, Demonstration, Encoded, Ranking
from rlhf_engine.pipeline.run import Run, UsageError, check_folder, load_causal_lm, train_stage
from rlhf_engine.pipeline.sources import load_records
from rlhf_engine.pipeline.training import (StepOutput, TrainConfig, evaluate_sums, model_device, prepare_examples,
                                          split_and_prepare, total_steps, train_loop)


@dataclasses.dataclass
class RMConfig(TrainConfig):
    """The reward-model stage's options (see :class:`TrainConfig`); a batch
    of ``batch_size`` records holds 2 rows per comparison and K per
    ranking."""

    lr: float = option(3e-4, "Peak learning rate of AdamW.")
    normalize_rewards: bool = option(True, "After training, shift the scores so that held-out demonstrations "
                                           "score 0 on average (InstructGPT's normalisation before RL): their mean "
                                           "score is saved as the model's config.score_offset, which every consumer "
                                           "subtracts. Needs the demonstrations (`rm --demonstrations FILE`; the "
                                           "built-in pipeline uses the SFT stage's held-out ones).")


class PairGroup(NamedTuple):
    """The pairs of the batch's elements that have ``pairs_per_element``
    pairs each: row indices ``chosen``/``rejected`` ``[N]`` int64 (better /
    worse response) and ``margin`` ``[N]`` float32 (0 where none)."""

    pairs_per_element: int
    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: torch.Tensor

    @property
    def num_elements(self) -> int:
        return self.chosen.numel() // self.pairs_per_element


class PreferenceBatch(NamedTuple):
    """A mini-batch of comparisons and rankings: ``tokens``, every response
    of every element as one padded row (an element's responses consecutive,
    in record order: chosen then rejected, or best first), and its pairs in
    :class:`PairGroup` s by pairs per element."""

    tokens: batching.TokenBatch
    groups: Tuple[PairGroup, ...]
    num_elements: int

    @property
    def num_pairs(self) -> int:
        return sum(group.chosen.numel() for group in self.groups)

    def to(self, device) -> "PreferenceBatch":
        return PreferenceBatch(self.tokens.to(device), tuple(
            PairGroup(g.pairs_per_element, g.chosen.to(device), g.rejected.to(device), g.margin.to(device))
            for g in self.groups), self.num_elements)


def _element_pairs(example: Encoded) -> List[Tuple[int, int, float]]:
    """``(better, worse, margin)`` response indices of an element's pairs,
    in :func:`rlhf_engine.pipeline.data.expand_ranking`'s order."""
    record = example.record
    if isinstance(record, Comparison):
        return [(0, 1, float(record.margin or 0.0))]
    if isinstance(record, Ranking):
        k = len(example.responses)
        return [(i, j, 0.0) for i in range(k) for j in range(i + 1, k)]
    raise ValueError(f"examples must hold Comparison or Ranking records, got {type(record).__name__}")


def collate_preferences(examples: Sequence[Encoded], pad_id: int) -> PreferenceBatch:
    """A :class:`PreferenceBatch` of encoded comparisons and rankings."""
    if len(examples) == 0:
        raise ValueError("examples is empty")
    rows, pairs = [], defaultdict(list)
    for example in examples:
        element = [(len(rows) + i, len(rows) + j, m) for i, j, m in _element_pairs(example)]
        pairs[len(element)] += element
        rows += [(example.prompt_ids, response) for response in example.responses]
    groups = tuple(PairGroup(size, torch.tensor([c for c, _, _ in group], dtype=torch.long),
                             torch.tensor([r for _, r, _ in group], dtype=torch.long),
                             torch.tensor([m for _, _, m in group], dtype=torch.float32))
                   for size, group in sorted(pairs.items()))
    return PreferenceBatch(batching.pad_rows(rows, pad_id), groups, len(examples))


def preference_loss(scores: torch.Tensor, batch: PreferenceBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, correct)``: the mean over the batch's elements of each
    element's mean pair loss, and the number of pairs whose chosen score is
    above the rejected one (0-d float32 tensors).

    ``scores``: ``[R]``, one per row of ``batch.tokens``.
    """
    if scores.dim() != 1 or scores.shape[0] != batch.tokens.input_ids.shape[0]:
        raise ValueError(f"scores must have shape [{batch.tokens.input_ids.shape[0]}] (one per row), "
                         f"got {tuple(scores.shape)}")
    loss = scores.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.float32, device=scores.device)
    for group in batch.groups:
        # each group's op loss is a mean over its pairs = the mean of its elements' means
        group_loss, stats = ops.pairwise_reward_loss(scores[group.chosen], scores[group.rejected],
                                                     margin=group.margin)
        loss = loss + group_loss * (group.num_elements / batch.num_elements)
        correct = correct + stats["accuracy"] * group.chosen.numel()
    return loss, correct


def score_rows(model, rows: Sequence[batching.Row], pad_id: int) -> torch.Tensor:
    """``[B]`` float32: the reward model's score (:func:`sequence_scores`)
    of each ``(prompt_ids, response_ids)`` row, laid out as the engine
    scores a PPO rollout: prompts left-padded, responses right-padded after
    them, positions counted from each row's first real token. Batched on
    ``model``'s device; gradients as the caller's mode allows."""
    batching._check_rows(rows)  # noqa: SLF001 (the same checks as the other layouts)
    prompt_ids, prompt_mask = left_pad([list(prompt) for prompt, _ in rows], pad_id)
    width = max(len(response) for _, response in rows)
    response_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (_, response) in enumerate(rows):
        response_ids[i, :len(response)] = torch.as_tensor(list(response), dtype=torch.long)
        response_mask[i, :len(response)] = True
    device = model_device(model)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1).to(device)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).to(device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return sequence_scores(model, input_ids, attention_mask, position_ids)


def normalize_scores(model, tokenizer, demonstrations: Sequence[Demonstration], config: RMConfig) -> Dict:
    """Make the held-out ``demonstrations`` score 0 on average: each one's
    ``(prompt, response + EOS)`` is scored by :func:`score_rows` (after
    ``config``'s length policy), and their mean is added to
    ``model.config.score_offset`` (``sequence_scores`` already subtracts
    an offset set before, so the new one accumulates onto it).

    Under torch.distributed the batches are split over the ranks
    (:func:`~rlhf_engine.pipeline.training.evaluate_sums`; a sharded
    ``model`` works) and every rank sets the same offset.

    Returns:
        ``{"reward/offset": the new offset, "reward/offset_examples": the
        number of demonstrations scored}``.
    """
    return _normalize(model, _prepare_demonstrations(tokenizer, demonstrations, config), _pad_id(tokenizer),
                      config.batch_size)


def _prepare_demonstrations(tokenizer, demonstrations, config) -> List[Encoded]:
    examples, _ = prepare_examples(tokenizer, demonstrations, config, (Demonstration,), "demonstrations")
    if not examples:
        raise ValueError("demonstrations is empty: nothing to normalise the scores with")
    return examples


def _normalize(model, examples: Sequence[Encoded], pad_id: int, batch_size: int) -> Dict:
    def measure(chunk):
        scores = score_rows(model, [(example.prompt_ids, example.responses[0]) for example in chunk], pad_id)
        return scores.double().sum(), len(chunk)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total, count = evaluate_sums(batching.chunks(examples, batch_size), measure, model_device(model))
    finally:
        model.train(was_training)
    model.config.score_offset = score_offset(model) + total / count
    return {"reward/offset": model.config.score_offset, "reward/offset_examples": int(count)}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def train_reward_model(model, tokenizer, train_records: Sequence, eval_records: Optional[Sequence],
                       config: RMConfig, *, demonstrations: Optional[Sequence[Demonstration]] = None,
                       on_step: Optional[Callable[[dict], None]] = None,
                       stop: Optional[Callable[[], bool]] = None, checkpoints=None,
                       resume: bool = False) -> dict:
    """Train the scalar-head ``model`` in place on comparisons and rankings.

    Args:
        model: a HF sequence-classification model with ``num_labels=1`` (e.g.
            ``reward_model_from_causal_lm(sft_model)``), on its device.
        tokenizer: the tokenizer the records are encoded with.
        train_records, eval_records: :class:`Comparison` and :class:`Ranking`
            records, mixed freely; ``eval_records`` None holds out
            ``config.eval_fraction`` of the training ones.
        config: :class:`RMConfig`.
        demonstrations: held-out :class:`Demonstration` records (not
            trained on by the SFT model) that :func:`normalize_scores` makes
            score 0 on average after the last step; required when
            ``config.normalize_rewards``, ignored otherwise.
        on_step, stop, checkpoints, resume: see
            :func:`rlhf_engine.pipeline.training.train_loop` (data-parallel
            under torch.distributed; ``model`` is then sharded in place);
            each step's metrics add ``accuracy`` (of the batch's pairs), and
            the last step's the normalisation's ``reward/offset`` and
            ``reward/offset_examples``.

    Returns:
        the loop's metrics with ``eval_loss`` and ``eval_accuracy`` (fraction
        of held-out pairs, every pair of a ranking included, scored chosen >
        rejected; a tie counts as wrong), plus ``train_examples``,
        ``eval_examples``, ``dropped``, ``truncated``, and with
        normalisation ``reward/offset`` and ``reward/offset_examples`` (not
        when stopped early).
    """
    if not isinstance(config, RMConfig):
        raise ValueError(f"config must be an RMConfig, got {type(config).__name__}")
    if config.normalize_rewards and demonstrations is None:
        raise ValueError("normalize_rewards needs held-out demonstrations: pass demonstrations, or set "
                         "normalize_rewards=False")
    train, held, info = split_and_prepare(tokenizer, train_records, eval_records, config, (Comparison, Ranking))
    # encoded up front, so that bad demonstrations fail before training
    demos = _prepare_demonstrations(tokenizer, demonstrations, config) if config.normalize_rewards else None
    device = model_device(model)
    pad_id = _pad_id(tokenizer)

    def forward(examples):
        batch = collate_preferences(examples, pad_id).to(device)
        scores = sequence_scores(model, batch.tokens.input_ids, batch.tokens.attention_mask)
        return batch, preference_loss(scores, batch)

    def step(indices):
        batch, (loss, correct) = forward([train[i] for i in indices])
        return StepOutput(loss * batch.num_elements, batch.num_elements, batch.tokens.num_tokens,
                          {"accuracy": (correct, batch.num_pairs)})

    def evaluate():
        def measure(examples):
            batch, (loss, correct) = forward(examples)
            return loss * batch.num_elements, batch.num_elements, correct, batch.num_pairs

        if not held:
            return {}
        loss_sum, elements, correct, pairs = evaluate_sums(batching.chunks(held, config.batch_size), measure,
                                                           device)
        return {"eval_loss": loss_sum / elements, "eval_accuracy": correct / pairs}

    last_step, normalized = total_steps(len(train), config), {}

    def after_step(metrics):
        if demos is not None and metrics["step"] == last_step:  # the offset goes into the last step's record
            normalized.update(_normalize(model, demos, pad_id, config.batch_size))
            metrics.update(normalized)
        if on_step is not None:
            on_step(metrics)

    metrics = train_loop(model, config, len(train), step, evaluate, on_step=after_step, stop=stop,
                         checkpoints=checkpoints, resume=resume)
    return {**metrics, **info, **normalized}


def run_rm_command(run: Run, data, config) -> Dict:
    """``rlhf-engine rm``: a reward model from the SFT folder ``data.model``,
    trained on comparisons and/or rankings, its scores normalised on the
    held-out demonstrations ``data.demonstrations`` (unless
    ``config.normalize_rewards`` is off)."""
    try:
        check_rm_command(data, config)  # the CLI checks it before the run folder opens
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def read(path, kind):
        return load_records(path, kind, split=data.split, columns=data.columns)

    def records(comparisons, rankings):
        found = read(comparisons, "comparisons") if comparisons else []
        return found + (read(rankings, "rankings") if rankings else [])

    train = records(data.comparisons, data.rankings)
    held = records(data.eval_comparisons, data.eval_rankings) or None
    demonstrations = None
    if config.normalize_rewards:
        demonstrations = read(data.demonstrations, "demonstrations")
        if not demonstrations:
            raise UsageError(f"--demonstrations {data.demonstrations} holds no demonstrations")
    check_folder(data.model, "--model")  # not a size: the reward model starts from an SFT model
    lm, tokenizer = load_causal_lm(data.model, role="--model")
    model = reward_model_from_causal_lm(lm, seed=data.model_seed)
    train_fn = functools.partial(train_reward_model, demonstrations=demonstrations)
    result = train_stage(run, "rm", model, tokenizer, train_fn, train, held, config,
                         postfix=lambda m: {"loss": m["loss"], "acc": m["accuracy"]})
    return {**result, "model": str(run.model_dir("rm"))}
