"""The training loop the SFT and reward-model stages share, their common
options, and the encoding of their records.

Optimisation: AdamW (fused; weight decay on matrices only), learning rate
warmed up linearly over ``warmup_ratio`` of the steps then decayed linearly
to 0, gradient-norm clipping, optional bf16 autocast (float32 weights,
gradients and optimizer states).

A stopped loop (``stop()`` returned True) and every ``save_every`` steps
hand a checkpoint of the loop's state to the caller; passing it back as
``resume`` continues the run where it left off: the same mini-batches, the
same learning rates, the same weights as an uninterrupted run (given the
model's weights saved with it).
"""
import collections
import dataclasses
import functools
import itertools
import time
from dataclasses import field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

from rlhf_engine.engine.engine import lr_factor
from rlhf_engine.pipeline import batching
from rlhf_engine.pipeline.data import LENGTH_POLICIES, encode_record, fit_examples


def option(default, help):
    """A dataclass field with its flag's help text (HfArgumentParser)."""
    return field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """What the SFT and reward-model stages share; batch sizes count
    examples (a comparison or a whole ranking is one example)."""

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
    save_every: int = option(0, "Hand a resumable checkpoint to the caller every this many steps (0: only when "
                                "the run is stopped early).")
    seed: int = option(0, "Seed of the held-out split and of the mini-batch order.")
    bf16: bool = option(False, "bfloat16 autocast for the forward passes (weights, gradients and optimizer states "
                               "stay float32).")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_length"):
            _check_int(self, name, 2 if name == "max_length" else 1)
        for name in ("max_steps", "eval_every", "save_every", "seed"):
            _check_int(self, name, 0)
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


def _check_int(config, name, minimum):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# -- the training loop shared by the stages -----------------------------------------------

class StepOutput(NamedTuple):
    """What one mini-batch's forward gives the loop: the ``loss`` to
    minimise (0-d), the real ``tokens`` it read, and scalar ``stats`` to log."""

    loss: torch.Tensor
    tokens: int
    stats: Dict[str, float]


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter (where batches go)."""
    return next(model.parameters()).device


def _optimizer(model, config: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    # Decaying norm gains and biases pulls them towards 0, not towards a prior.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, fused=True), params


def total_steps(num_examples: int, config: TrainConfig) -> int:
    """Optimizer steps of a run on ``num_examples`` training examples."""
    return config.max_steps or config.epochs * batching.steps_per_epoch(num_examples, config.batch_size)


def train_loop(model, config: TrainConfig, num_examples: int, step: Callable[[List[int]], StepOutput],
               evaluate: Callable[[], Dict[str, float]], *, on_step=None, stop=None, checkpoint=None,
               resume: Optional[dict] = None) -> dict:
    """Train ``model`` for :func:`total_steps`, shuffled mini-batches of
    example indices from a generator seeded with ``config.seed``.

    ``step(indices)`` runs the forward of one mini-batch; ``evaluate()``
    returns held-out metrics (named ``eval_*``; called in eval mode without
    gradients, every ``config.eval_every`` steps and after the last).
    ``on_step(metrics)`` gets each step's metrics: ``step``, ``epoch``,
    ``loss``, ``lr``, ``grad_norm``, ``tokens_per_second``, ``elapsed_seconds``,
    ``step``'s stats and, on evaluation steps, the ``eval_*`` metrics and
    ``train_loss`` (mean loss of the last epoch's worth of steps, fewer
    early in the run). ``stop()`` is checked before each step; when it
    returns True the loop returns at once (no final evaluation) with
    ``stopped`` True.

    ``checkpoint(state)`` gets the loop's state (a dict of plain values and
    tensors: step, counters, optimizer and scheduler state) every
    ``config.save_every`` steps before the last and when the loop is
    stopped; the caller saves it with the model's weights. ``resume``: such
    a state; the loop then continues from its step (the caller restores the
    weights), drawing the mini-batches an uninterrupted run would have.

    Returns:
        ``steps``, ``epochs`` (fractional), ``train_loss``, the last
        ``eval_*`` metrics (absent without evaluation), ``tokens_per_second``
        and ``steps_per_second`` (training time only, evaluation excluded),
        ``train_seconds``, ``stopped``.
    """
    optimizer, params = _optimizer(model, config)
    steps = total_steps(num_examples, config)
    factor = functools.partial(lr_factor, warmup=round(config.warmup_ratio * steps), total=steps, schedule="linear")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    per_epoch = batching.steps_per_epoch(num_examples, config.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    autocast = torch.autocast(model_device(model).type, dtype=torch.bfloat16, enabled=config.bf16)
    clip = config.max_grad_norm or float("inf")
    was_training = model.training
    model.train()
    recent_losses = collections.deque(maxlen=per_epoch)
    done, tokens, train_seconds, last_eval, stopped = 0, 0, 0.0, {}, False
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        done, tokens, train_seconds = resume["step"], resume["tokens"], resume["train_seconds"]
        recent_losses.extend(resume["recent_losses"])

    def state():
        return {"step": done, "tokens": tokens, "train_seconds": train_seconds, "recent_losses": list(recent_losses),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    try:
        # the first `done` batches are drawn and skipped so that the generator is where it was
        for indices in itertools.islice(_index_batches(num_examples, config.batch_size, generator), done, steps):
            if stop is not None and stop():
                stopped = True
                break
            start = time.perf_counter()
            with autocast:
                out = step(indices)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = out.loss.item()  # also waits for the device, so the timing is honest
            train_seconds += time.perf_counter() - start
            done += 1
            tokens += out.tokens
            recent_losses.append(loss)
            metrics = {"step": done, "epoch": done / per_epoch, "loss": loss, "lr": lr,
                       "grad_norm": grad_norm.item(), "tokens_per_second": tokens / train_seconds,
                       "elapsed_seconds": train_seconds, **out.stats}
            if done == steps or (config.eval_every and done % config.eval_every == 0):
                last_eval = _run_eval(model, evaluate, autocast)
                metrics.update(last_eval, train_loss=sum(recent_losses) / len(recent_losses))
            if on_step is not None:
                on_step(metrics)
            if checkpoint is not None and config.save_every and done % config.save_every == 0 and done < steps:
                checkpoint(state())
        if stopped and checkpoint is not None:
            checkpoint(state())
    finally:
        model.train(was_training)
    return {"steps": done, "epochs": done / per_epoch,
            "train_loss": sum(recent_losses) / len(recent_losses) if recent_losses else None,
            **last_eval, "tokens_per_second": tokens / train_seconds if train_seconds else 0.0,
            "steps_per_second": done / train_seconds if train_seconds else 0.0,
            "train_seconds": train_seconds, "stopped": stopped}


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
