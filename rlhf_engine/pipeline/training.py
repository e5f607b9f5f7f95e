"""The training loop the SFT and reward-model stages share, their common
options, and the encoding of their records.

Optimisation: AdamW (fused; weight decay on matrices only), learning rate
warmed up linearly over ``warmup_ratio`` of the steps then decayed linearly
to 0, gradient-norm clipping, optional bf16 autocast (float32 weights,
gradients and optimizer states).

A stopped loop (``stop()`` returned True), every ``save_every`` steps and
every ``save_every_minutes`` write a checkpoint (weights, optimizer, loop
state); ``resume`` continues the run where it left off: the same
mini-batches, the same learning rates, the same weights as an
uninterrupted run (with the configured peak learning rate and number of
steps: a resumed run may change them, see :func:`set_peak_lrs`).

Under torch.distributed (``torchrun``) the loop is data-parallel with FSDP2
and its results do not depend on the world size (see :func:`train_loop`).
"""
import collections
import contextlib
import dataclasses
import functools
import itertools
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple, Union

import torch

from rlhf_engine import distributed
from rlhf_engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf_engine.models.lora import LoraOptions, is_peft, refuse_distributed
from rlhf_engine.optim import adamw, lr_factor, set_peak_lrs, trainable_parameters
from rlhf_engine.options import check_int, option
from rlhf_engine.pipeline import batching
from rlhf_engine.pipeline.data import LENGTH_POLICIES, encode_record, fit_examples


@dataclasses.dataclass
class TrainConfig(LoraOptions):
    """What the SFT and reward-model stages share; batch sizes count
    examples (a comparison or a whole ranking is one example). With
    ``lora_r > 0`` (:class:`~rlhf_engine.models.lora.LoraOptions`) the stage
    trains LoRA adapters (and a reward model's head) on its model."""

    epochs: int = option(1, "Passes over the training examples (ignored when max_steps > 0).")
    max_steps: int = option(0, "When > 0, train exactly this many optimizer steps, reshuffling after each pass.")
    batch_size: int = option(32, "Examples per optimizer step.")
    lr: float = option(1e-3, "Peak learning rate of AdamW.")
    warmup_ratio: float = option(0.05, "Fraction of the steps over which the learning rate rises linearly from 0; "
                                       "it then decays linearly to 0 at the last step.")
    weight_decay: float = option(0.0, "AdamW weight decay, applied to weight matrices only (not norms or biases).")
    max_grad_norm: float = option(1.0, "Clip the gradients' global L2 norm to this (0: no clipping).")
    max_length: int = option(128, "Most tokens of prompt + response per example.")
    length_policy: str = option("truncate", "Examples longer than max_length: 'truncate' (keep the response's "
                                            "start and the prompt's end) or 'drop'.")
    eval_fraction: float = option(0.05, "Fraction of the training examples held out for evaluation when no "
                                        "evaluation set is given.")
    eval_every: int = option(0, "Evaluate every this many steps (0: only after the last step).")
    save_every: int = option(0, "Write a resumable checkpoint every this many steps (0: by time only, see "
                                "save_every_minutes); one is also written when the run is stopped early.")
    save_every_minutes: float = option(10.0, "Also write a resumable checkpoint at the first step boundary this many "
                                             "minutes after the last one (0: by steps only), so that a crash loses "
                                             "at most this much training.")
    seed: int = option(0, "Seed of the held-out split and of the mini-batch order.")
    bf16: bool = option(False, "bfloat16 autocast for the forward passes (weights, gradients and optimizer states "
                               "stay float32).")
    gradient_checkpointing: bool = option(False, "Recompute each layer's activations in backward instead of "
                                                 "keeping them (HuggingFace gradient checkpointing, non-reentrant): "
                                                 "less memory, the same gradients, about a third more compute.")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_length"):
            check_int(self, name, 2 if name == "max_length" else 1)
        for name in ("max_steps", "eval_every", "save_every", "seed"):
            check_int(self, name, 0)
        for name in ("lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("warmup_ratio", "eval_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.length_policy not in LENGTH_POLICIES:
            raise ValueError(f"length_policy must be one of {LENGTH_POLICIES}, got {self.length_policy!r}")
        check_minutes(self.save_every_minutes)
        self.check_lora()


def check_minutes(value, name: str = "save_every_minutes") -> None:
    """ValueError unless ``value`` is a finite number of minutes >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number of minutes >= 0, got {value!r}")


class SaveClock:
    """When a loop's time-based checkpoint is due: ``minutes`` (0: never)
    after the start or the last :meth:`saved`."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()


# -- the training loop shared by the stages -----------------------------------------------

class StepOutput(NamedTuple):
    """What one mini-batch's forward gives the loop, for this rank's rows:
    ``loss_sum`` (0-d) the sum of the losses of its ``units`` (the units the
    stage's loss is a mean over: response tokens for SFT, elements for the
    reward model), the real ``tokens`` it read, and ``stats``:
    ``{name: (numerator, denominator)}`` sums, logged as the global ratio
    (e.g. ``accuracy``: correct pairs over pairs)."""

    loss_sum: torch.Tensor
    units: float
    tokens: int
    stats: Dict[str, Tuple[float, float]] = {}


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter (where batches go)."""
    return next(model.parameters()).device


def total_steps(num_examples: int, config: TrainConfig) -> int:
    """Optimizer steps of a run on ``num_examples`` training examples."""
    return config.max_steps or config.epochs * batching.steps_per_epoch(num_examples, config.batch_size)


def check_world_size(config: TrainConfig, where: distributed.Layout) -> None:
    """Raise ValueError unless ``config.batch_size`` splits evenly over the ranks."""
    if config.batch_size % where.world_size:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {where.world_size} ranks "
                         f"(every rank trains on batch_size / ranks examples of each mini-batch)")


def rank_rows(rows: Sequence, where: distributed.Layout) -> Tuple[Sequence, float]:
    """``(this rank's rows, weight)``: the rank's contiguous share of a
    global mini-batch (:func:`rlhf_engine.distributed.rows_of_rank`'s when
    the ranks divide it; as even as possible for an epoch's short last
    batch) and weight 1. A rank whose share is empty gets the first row with
    weight 0: it still runs the forward and backward that the other ranks'
    sharded collectives wait for, and its results count for nothing."""
    n = len(rows)
    share = rows[where.rank * n // where.world_size:(where.rank + 1) * n // where.world_size]
    return (share, 1.0) if len(share) else (rows[:1], 0.0)


def global_sums(values: Sequence, device) -> List[float]:
    """``values`` (numbers or 0-d tensors) summed over the ranks, as floats
    (one float64 all-reduce)."""
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    return distributed.all_reduce(tensor).tolist()


def evaluate_sums(batches: Sequence[Sequence], measure: Callable[[Sequence], Sequence], device) -> List[float]:
    """Sums of ``measure(rows)`` (a list of numbers or 0-d tensors) over
    every global batch, each split over the ranks by :func:`rank_rows`:
    held-out metrics that do not depend on the world size."""
    where = distributed.layout()
    totals = None
    for batch in batches:
        rows, weight = rank_rows(batch, where)
        sums = [torch.as_tensor(v, dtype=torch.float64, device=device) * weight for v in measure(rows)]
        totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
    return global_sums(totals, device) if totals is not None else []


def _state_dicts(model, optimizer) -> Dict[str, dict]:
    """The model's and optimizer's state dicts (DTensor leaves when sharded), as checkpoint tensors: the
    parameters that train only (a LoRA model's adapters and heads, not its frozen base weights)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    return {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def _load_state_dicts(model, optimizer, tensors: Dict[str, dict]) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, tensors["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(model, optimizer, tensors["optimizer"])
    optimizer.zero_grad(set_to_none=True)


def train_loop(model, config: TrainConfig, num_examples: int, step: Callable[[List[int]], StepOutput],
               evaluate: Callable[[], Dict[str, float]], *, on_step=None, stop=None, checkpoints=None,
               resume: Union[bool, str, Path] = False) -> dict:
    """Train ``model`` for :func:`total_steps`, shuffled mini-batches of
    example indices from a generator seeded with ``config.seed``.

    Data-parallel under torch.distributed (:mod:`rlhf_engine.distributed`):
    ``model`` is sharded (FSDP2) over the ranks, every rank draws the same
    mini-batches and trains on its share (:func:`rank_rows`), and the loss
    is normalised by the global number of units, so that the (summed)
    gradients, the logged metrics and the weights do not depend on the
    world size. ``config.batch_size`` must divide by the world size.

    ``step(indices)`` runs the forward of this rank's indices of one
    mini-batch; ``evaluate()`` returns held-out metrics (named ``eval_*``,
    global: see :func:`evaluate_sums`; called in eval mode without
    gradients, every ``config.eval_every`` steps and after the last).
    ``on_step(metrics)`` gets each step's metrics: ``step``, ``epoch``,
    ``loss``, ``lr``, ``grad_norm``, ``tokens_per_second``, ``elapsed_seconds``,
    ``step``'s stats and, on evaluation steps, the ``eval_*`` metrics and
    ``train_loss`` (mean loss of the last epoch's worth of steps, fewer
    early in the run). ``stop()`` is checked before each step (True on any
    rank stops every rank at the same step); then the loop returns at once
    (no final evaluation) with ``stopped`` True.

    ``checkpoints``: a folder (:mod:`rlhf_engine.checkpoint`) that
    gets the model's and optimizer's states (``tensors``, sharded) and the
    loop's counters and scheduler (``objects["loop"]``) every
    ``config.save_every`` steps and at the first step boundary
    ``config.save_every_minutes`` after the last save (every rank decides
    alike), before the last step, and when the loop is stopped; every rank
    writes its shards. ``resume``: True continues from the latest
    checkpoint there, a checkpoint folder from that one, as chosen by
    :func:`~rlhf_engine.checkpoint.latest_checkpoint` (its files verified:
    they are not hashed again) (saved at any world size): its weights, its step, the mini-batches an uninterrupted run
    would have drawn; the learning-rate schedule is this ``config``'s
    (``lr``, and the steps of ``max_steps``/``epochs``), which must leave
    steps to run.

    Returns:
        ``steps``, ``epochs`` (fractional), ``train_loss``, the last
        ``eval_*`` metrics (absent without evaluation), ``tokens_per_second``
        and ``steps_per_second`` (training time only, evaluation excluded;
        tokens of every rank), ``train_seconds``, ``stopped``.
    """
    where = distributed.layout()
    check_world_size(config, where)
    if getattr(config, "lora", False) and not is_peft(model):
        raise ValueError(f"lora_r={config.lora_r} but the model has no LoRA adapters: wrap it first with "
                         f"rlhf_engine.models.lora.with_adapters(model, config.lora_options()) (train_stage does)")
    if is_peft(model):
        refuse_distributed(where.world_size)
    if where.distributed:
        distributed.shard(model, where, model_device(model))
    device = model_device(model)
    optimizer = adamw(model, lr=config.lr, weight_decay=config.weight_decay)
    params = trainable_parameters(model)
    steps = total_steps(num_examples, config)
    factor = functools.partial(lr_factor, warmup=round(config.warmup_ratio * steps), total=steps, schedule="linear")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    per_epoch = batching.steps_per_epoch(num_examples, config.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    clip = config.max_grad_norm or float("inf")
    was_training = model.training
    model.train()
    checkpointing = _enable_checkpointing(model) if config.gradient_checkpointing else contextlib.nullcontext()
    recent_losses = collections.deque(maxlen=per_epoch)
    done, tokens, train_seconds, last_eval, stopped = 0, 0, 0.0, {}, False
    if resume is True:
        latest = latest_checkpoint(checkpoints) if checkpoints is not None else None
    else:
        latest = Path(resume) if resume else None
    if latest is not None:
        # latest_checkpoint, here or the caller's, verified its files
        tensors, objects = load_checkpoint(latest, _state_dicts(model, optimizer), verify=False)
        _load_state_dicts(model, optimizer, tensors)
        state = objects["loop"]
        scheduler.load_state_dict(state["scheduler"])
        set_peak_lrs(scheduler, [config.lr] * len(optimizer.param_groups))
        done, tokens, train_seconds = state["step"], state["tokens"], state["train_seconds"]
        recent_losses.extend(state["recent_losses"])
        if done >= steps:
            raise ValueError(f"checkpoint {latest} is at step {done}, and this run ends at step {steps}: "
                             f"nothing left to train (max_steps/epochs lowered?)")
    clock = SaveClock(config.save_every_minutes if checkpoints is not None else 0)
    agree = stop is not None or clock.seconds > 0  # decisions every rank takes together, one all-reduce a step

    def save():
        state = {"step": done, "tokens": tokens, "train_seconds": train_seconds,
                 "recent_losses": list(recent_losses), "scheduler": scheduler.state_dict()}
        save_checkpoint(checkpoints, done, _state_dicts(model, optimizer), {"loop": state})

    try:
        with checkpointing:
            # the first `done` batches are drawn and skipped so that the generator is where it was
            for indices in itertools.islice(_index_batches(num_examples, config.batch_size, generator), done, steps):
                if agree:
                    stop_now, save_now = global_sums([float(stop is not None and stop()), float(clock.due())],
                                                     device)
                    if stop_now > 0:
                        stopped = True
                        break
                    if save_now > 0:
                        save()
                        clock.saved()
                start = time.perf_counter()
                rows, weight = rank_rows(indices, where)
                with autocast:
                    out = step(rows)
                names = list(out.stats)
                sums = global_sums([v * weight for v in (out.units, out.tokens, out.loss_sum.detach(),
                                                          *(out.stats[k][0] for k in names),
                                                          *(out.stats[k][1] for k in names))], device)
                units, step_tokens, loss_sum = sums[:3]
                (out.loss_sum * (weight / max(units, 1.0))).backward()
                grad_norm = float(distributed.local_value(torch.nn.utils.clip_grad_norm_(params, clip)))
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss = loss_sum / max(units, 1.0)
                train_seconds += time.perf_counter() - start
                done += 1
                tokens += int(step_tokens)
                recent_losses.append(loss)
                stats = {k: sums[3 + i] / sums[3 + len(names) + i] for i, k in enumerate(names)}
                metrics = {"step": done, "epoch": done / per_epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_second": tokens / train_seconds, "elapsed_seconds": train_seconds, **stats}
                if done == steps or (config.eval_every and done % config.eval_every == 0):
                    last_eval = _run_eval(model, evaluate, autocast)
                    metrics.update(last_eval, train_loss=sum(recent_losses) / len(recent_losses))
                if on_step is not None:
                    on_step(metrics)
                if checkpoints is not None and config.save_every and done % config.save_every == 0 and done < steps:
                    save()
                    clock.saved()
            if stopped and checkpoints is not None:
                save()
    finally:
        model.train(was_training)
    return {"steps": done, "epochs": done / per_epoch,
            "train_loss": sum(recent_losses) / len(recent_losses) if recent_losses else None,
            **last_eval, "tokens_per_second": tokens / train_seconds if train_seconds else 0.0,
            "steps_per_second": done / train_seconds if train_seconds else 0.0,
            "train_seconds": train_seconds, "stopped": stopped}


@contextlib.contextmanager
def _enable_checkpointing(model):
    """HuggingFace gradient checkpointing on ``model`` while open (off again
    after, as it was); ValueError for a model that does not support it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; "
                         f"train without it")
    was_on = getattr(model, "is_gradient_checkpointing", False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if not was_on:
            model.gradient_checkpointing_disable()


def _index_batches(n, batch_size, generator):
    """Mini-batches of indices, epoch after epoch, each epoch reshuffled."""
    while True:
        yield from batching.shuffled_batches(n, batch_size, generator)


def _run_eval(model, evaluate, autocast) -> Dict[str, float]:
    model.eval()
    try:
        with torch.no_grad(), autocast:
            return evaluate()
    finally:
        model.train()


def prepare_examples(tokenizer, records: Sequence, config: TrainConfig, record_types: tuple, name: str):
    """Encode ``records`` (each one of ``record_types``) and apply the length
    policy: ``(examples, LengthReport)``.

    Raises:
        ValueError: naming ``name``, for a record of another type, or when
            the length policy drops every record.
    """
    for i, record in enumerate(records):
        if not isinstance(record, record_types):
            raise ValueError(f"{name}[{i}] must be one of {[t.__name__ for t in record_types]}, "
                             f"got {type(record).__name__}")
    examples, report = fit_examples([encode_record(tokenizer, r) for r in records], config.max_length,
                                    config.length_policy)
    if records and not examples:
        raise ValueError(f"{name}: all {len(records)} examples are longer than max_length={config.max_length} "
                         f"(length_policy='drop')")
    return examples, report


def split_and_prepare(tokenizer, train_records, eval_records, config: TrainConfig, record_types: tuple,
                      names=("train_records", "eval_records")):
    """``(train, eval, info)``: the encoded training and held-out examples
    (``config.eval_fraction`` of ``train_records`` when ``eval_records`` is
    None) and their counts (``train_examples``, ``eval_examples``,
    ``dropped``, ``truncated``). ``names``: the two arguments' names in
    error messages."""
    if len(train_records) == 0:
        raise ValueError(f"{names[0]} is empty")
    if eval_records is None:
        train_records, eval_records = batching.split_eval(train_records, config.eval_fraction, config.seed)
    train, train_report = prepare_examples(tokenizer, train_records, config, record_types, names[0])
    held, eval_report = prepare_examples(tokenizer, eval_records, config, record_types, names[1])
    info = {"train_examples": len(train), "eval_examples": len(held),
            "dropped": train_report.dropped + eval_report.dropped,
            "truncated": train_report.truncated + eval_report.truncated}
    return train, held, info
