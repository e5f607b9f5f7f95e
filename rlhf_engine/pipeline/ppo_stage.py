"""The PPO stage: the engine's iterations over batches of prompts, inside a
run folder.

The policy and the frozen reference start as the SFT model, the reward
model is frozen and the critic starts as a copy of it (the engine's
defaults, see :class:`rlhf_engine.engine.RLHFEngine`). Each iteration takes
the next ``prompts_per_iteration`` prompts of a stream of seeded
permutations of the prompt set (epoch after epoch), so an iteration's
prompts depend only on the seed and the iteration number: a checkpoint
stores the position in that stream (``engine.save(..., extra=...)``) and a
resumed run draws exactly the prompts the uninterrupted run would have.

PPO-ptx (``EngineConfig.ptx_coef > 0``) mixes the language-modelling loss
of SFT demonstrations, encoded as the SFT stage encodes them (loss on the
response tokens), into every policy update. Its rows come from a stream of
their own (seeded permutations, like the prompts'): iteration ``i`` takes
the ``n x r`` rows at position ``i x n x r``, ``n`` the iteration's optimizer
steps (:meth:`~rlhf_engine.engine.RLHFEngine.updates_per_iteration`) and
``r`` = ``ptx_rows_per_step``, and optimizer step ``j`` trains on its own
``r`` of them (:func:`ptx_batches`), so a resumed run continues the stream
exactly too.

Every ``eval_every`` iterations a :class:`PolicyProbe` samples the policy on
fixed prompts and records what its judges think (the reward model, the
built-in task's gold judge) and the KL to the reference, with the models
it uses on the compute device (the engine's ``score`` placement: after a
step with ``offload=True`` the reference and the reward model wait on the
host).

Under torch.distributed the engine shards its models over the ranks and
each rank passes its share of every iteration's prompts
(:func:`rlhf_engine.distributed.rows_of_rank`); checkpoints and the model
folder are collectives, the probe spreads its batches over the ranks.
"""
import dataclasses
import functools
import itertools
import math
import statistics
import time
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from rlhf_engine import distributed
from rlhf_engine.engine import RLHFEngine, rewards
from rlhf_engine.engine.metrics import Trend
from rlhf_engine.engine.rollout import SamplingParams, mix_seed
from rlhf_engine.models import causal_lm_logprobs, lora
from rlhf_engine.options import option
from rlhf_engine.pipeline import batching
from rlhf_engine.pipeline.data import Demonstration, LengthReport, encode_prompt, encode_record, fit_examples
from rlhf_engine.pipeline.evaluate import (Judge, decode_responses, judge_gold, judge_reward_model, map_batches,
                                           sample_prompts)
from rlhf_engine.pipeline.config import reward_funcs, reward_weights
from rlhf_engine.pipeline.report import read_metrics
from rlhf_engine.pipeline.run import (Interrupted, Run, UsageError, check_same_tokenizer, load_causal_lm,
                                      load_reward_model, load_tokenizer)
from rlhf_engine.pipeline.sources import load_records
from rlhf_engine.pipeline.training import SaveClock, check_minutes, global_sums


@dataclasses.dataclass
class PPOStageConfig:
    """The PPO loop's options (the engine's own are :class:`~rlhf_engine.engine.EngineConfig`)."""

    prompts_per_iteration: int = option(64, "Prompts per PPO iteration (each sampled samples_per_prompt times).")
    iterations: int = option(0, "PPO iterations (0: one pass over the prompts).")
    save_every: int = option(50, "Write a resumable checkpoint every this many iterations (0: by time only, see "
                                 "save_every_minutes); one is also written when the run is stopped (Ctrl-C, "
                                 "SIGTERM).")
    save_every_minutes: float = option(10.0, "Also write a resumable checkpoint before the first iteration that "
                                             "starts this many minutes after the last one (0: by iterations only), "
                                             "so that a crash loses at most this much training.")
    eval_every: int = option(10, "Probe the policy on the evaluation prompts every this many iterations and after "
                                 "the last (0: never).")
    ptx_rows_per_step: int = option(0, "PPO-ptx (ptx_coef > 0): demonstrations per optimizer step, each step its "
                                       "own (0: the engine's mini_batch_size); an iteration draws ppo_epochs x "
                                       "mini-batches x this many from a seeded stream.")

    def __post_init__(self):
        for name, minimum in (("prompts_per_iteration", 1), ("iterations", 0), ("save_every", 0),
                              ("eval_every", 0), ("ptx_rows_per_step", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        check_minutes(self.save_every_minutes)

    def num_iterations(self, num_prompts: int) -> int:
        return self.iterations or math.ceil(num_prompts / self.prompts_per_iteration)


def prompt_batches(num_prompts: int, batch_size: int, seed: int, start: int = 0) -> Iterator[List[int]]:
    """Endless lists of ``batch_size`` prompt indices: a stream of
    permutations of ``range(num_prompts)`` drawn from a generator seeded with
    ``seed``, one per epoch, read from position ``start`` on."""
    if num_prompts < 1 or batch_size < 1 or start < 0:
        raise ValueError(f"need num_prompts >= 1, batch_size >= 1, start >= 0; got {num_prompts}, {batch_size}, "
                         f"{start}")
    generator = torch.Generator().manual_seed(seed)
    stream = itertools.chain.from_iterable(torch.randperm(num_prompts, generator=generator).tolist()
                                           for _ in itertools.count())
    stream = itertools.islice(stream, start, None)
    while True:
        yield list(itertools.islice(stream, batch_size))


# PPO-ptx ----------------------------------------------------------------------------------

Row = Tuple[List[int], List[int]]  # (prompt_ids, response_ids), as batching.Row
PTX_STREAM = 0x707478  # "ptx": the PPO-ptx row stream's seed is mix_seed(engine seed, PTX_STREAM)


def encode_ptx(tokenizer, demonstrations: Sequence[Demonstration], max_length: int,
               length_policy: str) -> Tuple[List[Row], LengthReport]:
    """PPO-ptx rows ``(prompt_ids, response_ids)`` of demonstrations, encoded
    exactly as the SFT stage encodes its examples (the prompt format, the
    response ended by EOS, the length policy), and what the length policy did.

    Raises:
        ValueError: a record is not a Demonstration, or the policy drops them all.
    """
    for i, record in enumerate(demonstrations):
        if not isinstance(record, Demonstration):
            raise ValueError(f"ptx data[{i}] must be a Demonstration, got {type(record).__name__}")
    encoded = [encode_record(tokenizer, d) for d in demonstrations]
    for i, example in enumerate(encoded):
        if example.masks is not None:
            raise ValueError(f"ptx data[{i}] is a conversation with several assistant turns: PPO-ptx trains on "
                             f"every response token, so it takes one assistant turn per demonstration")
    examples, report = fit_examples(encoded, max_length, length_policy, option_prefix="ptx_")
    return [(e.prompt_ids, e.responses[0]) for e in examples], report


def ptx_batches(rows: Sequence[Row], pad_id: int, *, updates: int, rows_per_step: int, seed: int,
                where: Optional[distributed.Layout] = None,
                start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless PPO-ptx batches for :meth:`~rlhf_engine.engine.RLHFEngine.step`,
    one per iteration from iteration ``start`` on.

    Iteration ``i`` reads ``updates x rows_per_step`` row indices at position
    ``i x updates x rows_per_step`` of :func:`prompt_batches`' stream over
    ``rows`` seeded with ``mix_seed(seed, PTX_STREAM)``; optimizer step ``j``
    gets the ``j``-th ``rows_per_step`` of them. Under torch.distributed
    (``where``, default: this process's layout) each rank passes its share
    (:func:`~rlhf_engine.distributed.rows_of_rank`) of every step's rows, so
    a step trains on the same rows at any world size.

    Yields:
        ``(ids [M, L] int64, attention_mask [M, L] int64, loss_mask [M, L]
        bool)``, right-padded, ``M = updates x rows_per_step / world size``;
        the loss mask marks the response tokens. Row ``k x updates + j`` is
        step ``j``'s ``k``-th, as the engine reads them (step ``j`` of
        ``updates`` takes rows ``j::updates``).
    """
    if not rows:
        raise ValueError("rows is empty")
    for name, value in (("updates", updates), ("rows_per_step", rows_per_step), ("start", start)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "start" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'start' else 1}, got {value!r}")
    share = distributed.rows_of_rank(rows_per_step, where or distributed.layout())
    per_iteration = updates * rows_per_step
    stream = prompt_batches(len(rows), per_iteration, mix_seed(seed, PTX_STREAM), start=start * per_iteration)
    for indices in stream:
        steps = [indices[j * rows_per_step:(j + 1) * rows_per_step][share] for j in range(updates)]
        local = [steps[j][k] for k in range(len(steps[0])) for j in range(updates)]
        batch = batching.pad_rows([rows[i] for i in local], pad_id)
        yield batch.input_ids, batch.attention_mask, batch.response_mask


def check_ptx_options(ptx_coef: float, ptx_data: bool, stage_config: "PPOStageConfig", prefix: str = "",
                      data_flag: str = "--ptx_data") -> None:
    """Refuse PPO-ptx options that would do nothing or cannot work, before
    anything is loaded: ``ptx_coef > 0`` without ptx data, ptx data (or a
    ``ptx_*`` option) with ``ptx_coef`` 0. ``prefix``: the flags' prefix
    (``ppo_`` in the pipeline); ``ptx_data``: whether ptx data is given.

    Raises:
        ValueError: a one-line usage message naming the flags.
    """
    coef = f"--{prefix}ptx_coef"
    if ptx_coef > 0 and not ptx_data:
        raise ValueError(f"{coef} {ptx_coef} needs PPO-ptx data: give {data_flag} FILE (demonstrations JSONL, "
                         f"the sft command's format), or set {coef} 0")
    if ptx_coef == 0:
        if ptx_data:
            raise ValueError(f"{data_flag} is given but {coef} is 0, so PPO-ptx is off and the data would be "
                             f"ignored: set {coef} > 0 or drop {data_flag}")
        if stage_config.ptx_rows_per_step:
            raise ValueError(f"--{prefix}ptx_rows_per_step is set but {coef} is 0 (PPO-ptx is off): set {coef} > 0 "
                             f"or drop --{prefix}ptx_rows_per_step")


def check_ppo_options(data, stage_config: "PPOStageConfig", engine_config) -> None:
    """``rlhf-engine ppo``'s checks across its option groups (see
    :func:`check_ptx_options`); ValueError: exit 2 before any model loads."""
    check_ptx_options(engine_config.ptx_coef, bool(data.ptx_data), stage_config)
    defaults = {f.name: f.default for f in dataclasses.fields(data)}
    if engine_config.ptx_coef == 0:
        for name in ("ptx_max_length", "ptx_length_policy"):
            if getattr(data, name) != defaults[name]:
                raise ValueError(f"--{name} is set but --ptx_coef is 0 (PPO-ptx is off): set --ptx_coef > 0 or "
                                 f"drop --{name}")


# The PPO loop ------------------------------------------------------------------------------

class PolicyProbe:
    """Sample one response per prompt from a policy and measure it.

    Calling the probe on a policy returns ``probe/<judge>`` (the mean score
    of each judge) and ``probe/kl`` (the mean over responses of the summed
    per-token ``log pi - log ref`` of the sampled tokens, at the sampling
    temperature: a k1 estimate of KL(pi || ref) per response). The same
    ``seed`` every call, so successive probes differ only by the policy.
    Batches are spread over the ranks (each with its own seed, see
    :func:`~rlhf_engine.pipeline.evaluate.map_batches`; sharded models are
    held unsharded meanwhile) and every rank judges all the responses.

    Args:
        tokenizer: the policy's tokenizer.
        prompts: prompt texts (encoded by :func:`~rlhf_engine.pipeline.data.encode_prompt`).
        judges: ``{name: judge(prompts, responses) -> scores}``.
        reference: the frozen reference policy (None: no ``probe/kl``).
        max_new_tokens, temperature: sampling (temperature > 0).
    """

    def __init__(self, tokenizer, prompts: Sequence[str], judges: Dict[str, Judge], reference=None, *,
                 max_new_tokens: int, temperature: float = 1.0, seed: int = 0, batch_size: int = 64):
        if not prompts:
            raise ValueError("prompts is empty")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (the KL is of the sampling distribution), got {temperature!r}")
        self.tokenizer, self.prompts, self.judges, self.reference = tokenizer, list(prompts), dict(judges), reference
        self.params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, temperature=temperature)
        self.seed, self.batch_size = seed, batch_size
        self.encoded = [encode_prompt(tokenizer, p) for p in self.prompts]

    @torch.no_grad()
    def sample(self, policy):
        """``(responses, kls)``: one response text per prompt, and its KL
        estimate (None without a reference)."""
        def batch(prompt_ids, seed):
            rollout = sample_prompts(policy, self.tokenizer, prompt_ids, self.params, seed)
            kls = self._kl(policy, rollout).tolist() if self.reference is not None else [None] * len(prompt_ids)
            return list(zip(decode_responses(self.tokenizer, rollout), kls))

        if self.reference is not None:
            devices = {str(_device_of(policy)), str(_device_of(self.reference))}
            if len(devices) > 1:
                raise ValueError(f"the policy and the reference are on different devices ({sorted(devices)}): "
                                 f"probe them where both are on the compute device (with an engine: "
                                 f"probe_engine, in its score placement)")
        was_training = policy.training
        policy.eval()
        try:
            with distributed.unsharded(policy), distributed.unsharded(self.reference):
                rows = map_batches(batch, self.encoded, self.batch_size, self.seed)
        finally:
            policy.train(was_training)
        return [text for text, _ in rows], ([kl for _, kl in rows] if self.reference is not None else None)

    def _kl(self, policy, rollout) -> torch.Tensor:
        args = (rollout.sequences, rollout.attention_mask, rollout.response_mask)
        kwargs = dict(temperature=self.params.temperature, position_ids=rollout.position_ids)
        log_ratio = causal_lm_logprobs(policy, *args, **kwargs) - causal_lm_logprobs(self.reference, *args, **kwargs)
        return torch.where(rollout.response_mask, log_ratio, 0.0).sum(-1).float().cpu()

    def __call__(self, policy) -> Dict[str, float]:
        responses, kls = self.sample(policy)
        metrics = {f"probe/{name}": statistics.fmean(judge(self.prompts, responses))
                   for name, judge in self.judges.items()}
        if kls is not None:
            metrics["probe/kl"] = statistics.fmean(kls)
        return metrics


def _device_of(model) -> torch.device:
    model = lora.base_model_of(model)  # a WithoutAdapters view holds no weights of its own
    return next(itertools.chain(model.parameters(), model.buffers())).device


def probe_engine(engine, probe: PolicyProbe) -> Dict[str, float]:
    """``probe(engine.policy)`` with the engine's models in its ``score``
    placement (policy, reference, reward model and critic on the compute
    device; see :mod:`rlhf_engine.engine.offload`): after :meth:`step` the
    engine is in ``learn``, where with ``offload=True`` the reference and the
    reward model wait on the host. The next step places the models itself."""
    engine.placement.enter("score")
    return probe(engine.policy)


def train_ppo(run: Run, stage: str, engine, prompt_ids: Sequence[Sequence[int]], config: PPOStageConfig, *,
              probe: Optional[PolicyProbe] = None, ptx_rows: Optional[Sequence[Row]] = None,
              heldout_reward: str = "reward") -> Dict:
    """Run PPO iterations of ``engine`` as ``stage`` of ``run``, then write
    ``<stage>/model`` (the policy and tokenizer) and the stage's result.

    Args:
        engine: an :class:`~rlhf_engine.engine.RLHFEngine`.
        prompt_ids: the encoded prompts (token-id lists).
        config: :class:`PPOStageConfig`; the prompt order is seeded with
            ``engine.config.seed``.
        probe: measured before the first iteration (recorded as step 0),
            every ``config.eval_every`` iterations and after the last, by
            :func:`probe_engine`; its models must be the engine's.
        ptx_rows: PPO-ptx rows (:func:`encode_ptx`), required when
            ``engine.config.ptx_coef > 0`` and refused otherwise: each
            iteration passes :func:`ptx_batches`' next batch to
            ``engine.step``, ``config.ptx_rows_per_step`` (0: the engine's
            ``mini_batch_size``) rows per optimizer step.
        heldout_reward: the probe's judge that scores what the engine
            trains on: on a probed iteration ``probe/reward_gap`` is the
            rollouts' ``reward/score_mean`` minus ``probe/<heldout_reward>``
            (the training prompts' reward before the iteration's updates
            against the evaluation prompts' after them; growing: the policy
            gains on the training prompts only).

    Every iteration's metrics also hold ``kl/growth``, the slope of
    ``kl/k1`` over iterations (:class:`~rlhf_engine.engine.metrics.Trend`,
    replayed from the recorded metrics on a resume), from the second
    iteration on.

    Returns:
        the result: ``iterations``, ``wall_seconds``, ``kl_mean`` and
        ``score_mean`` (means over all iterations of the engine's ``kl/k1``
        and ``reward/score_mean``), ``score_last`` (mean score over the last
        tenth of the iterations), the last probe's metrics and, with
        PPO-ptx, ``ptx_loss_mean`` (of the engine's ``ptx/loss``). A finished
        stage is skipped (its result returned; load ``run.model_dir(stage)``).

    Checkpoints (``<stage>/checkpoints``, :meth:`RLHFEngine.save`) are
    written every ``config.save_every`` iterations, before the first
    iteration that starts ``config.save_every_minutes`` after the last save,
    and on a stop; a resumed run continues from the latest usable one
    (:meth:`Run.resume_point`) with this config's learning rates
    (``engine.config.lr``/``critic_lr``), KL target and iterations.

    Under torch.distributed every rank calls it: each passes its share of
    an iteration's prompts to ``engine.step`` (``prompts_per_iteration``
    must divide by the world size) and of its PPO-ptx rows (so must the rows
    per step), and Ctrl-C (or SIGTERM) on any rank stops every rank at the
    same iteration; every rank takes the same time-based save decisions.

    Raises:
        Interrupted: after Ctrl-C or SIGTERM, once the checkpoint is written.
        UsageError: ``prompts_per_iteration`` or the PPO-ptx rows per step do
            not split over the ranks; ``ptx_rows`` missing with
            ``ptx_coef > 0`` or given with ``ptx_coef`` 0.
    """
    done = run.skip_if_done(stage)
    if done is not None:
        return done
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    batch = config.prompts_per_iteration
    world = run.where.world_size
    if batch % world:
        raise UsageError(f"prompts_per_iteration={batch} must be a multiple of the {world} ranks")
    ptx_coef = engine.config.ptx_coef
    if (ptx_coef > 0) != (ptx_rows is not None):
        raise UsageError(f"ptx_coef={ptx_coef} needs PPO-ptx rows (demonstrations)" if ptx_coef > 0 else
                         "PPO-ptx rows were given but ptx_coef is 0: they would be ignored")
    updates = engine.updates_per_iteration(batch)
    per_step = config.ptx_rows_per_step or engine.config.mini_batch_size
    if ptx_rows is not None and per_step % world:
        raise UsageError(f"PPO-ptx rows per optimizer step ({per_step}: ptx_rows_per_step, or mini_batch_size when "
                         f"it is 0) must be a multiple of the {world} ranks")
    ptx_per_iteration = updates * per_step if ptx_rows is not None else 0
    share = distributed.rows_of_rank(batch, run.where)
    root = run.checkpoints(stage)
    total = config.num_iterations(len(prompt_ids))
    start = 0
    checkpoint = run.resume_point(stage, root, last=total, unit="iteration")
    if checkpoint is not None:
        with warnings.catch_warnings(record=True) as caught:  # what the resumed run changes: into the log
            warnings.simplefilter("always")
            # resume_point verified the checkpoint's files; the configured learning rates and KL settings apply
            start = engine.load(checkpoint, verify=False)["iteration"]
        for warning in caught:
            run.log(f"{stage}: {warning.message}")
    batches = prompt_batches(len(prompt_ids), batch, engine.config.seed, start=start * batch)
    ptx = None
    if ptx_rows is not None:
        ptx = ptx_batches(ptx_rows, engine.pad_id, updates=updates, rows_per_step=per_step, seed=engine.config.seed,
                          where=run.where, start=start)
        run.log(f"{stage}: PPO-ptx (coefficient {ptx_coef}) on {len(ptx_rows)} demonstrations: {per_step} per "
                f"optimizer step, {ptx_per_iteration} per iteration")
    history = run.from_main(_history(run, stage, start) if run.is_main else None)
    kl_trend = Trend()
    for row in history:
        kl_trend.update(row["kl/k1"])
    began = time.perf_counter()
    if probe is not None and config.eval_every and start == 0:
        run.record(stage, 0, probe_engine(engine, probe))  # the starting point (the SFT model) of the curves
    bar = run.progress(total, stage, initial=start)
    position = functools.partial(_position, batch=batch, ptx_per_iteration=ptx_per_iteration)
    clock = SaveClock(config.save_every_minutes)
    try:
        for iteration in range(start, total):
            stop_now, save_now = global_sums([float(run.should_stop()), float(clock.due())], run.device)
            if stop_now > 0:
                path = engine.save(root, extra=position(iteration))
                raise Interrupted(stage, iteration, path, run.stop_signal)
            if save_now > 0:
                engine.save(root, extra=position(iteration))
                clock.saved()
            metrics = engine.step([list(prompt_ids[i]) for i in next(batches)[share]],
                                  None if ptx is None else next(ptx))
            step = iteration + 1
            growth = kl_trend.update(metrics["kl/k1"])
            if growth is not None:
                metrics["kl/growth"] = growth
            if probe is not None and config.eval_every and (step % config.eval_every == 0 or step == total):
                metrics.update(probe_engine(engine, probe))
                if f"probe/{heldout_reward}" in metrics:
                    metrics["probe/reward_gap"] = metrics["reward/score_mean"] - metrics[f"probe/{heldout_reward}"]
            run.record(stage, step, metrics)
            if metrics.get("updates/skipped"):
                run.log(skipped_updates_warning(stage, step, metrics))
            history.append(metrics)
            bar.update(1)
            bar.set_postfix({"score": f"{metrics['reward/score_mean']:.3g}", "kl": f"{metrics['kl/k1']:.3g}"},
                            refresh=False)
            if config.save_every and step % config.save_every == 0 and step < total:
                engine.save(root, extra=position(step))
                clock.saved()
    finally:
        bar.close()
    run.save_model(stage, engine.policy, engine.tokenizer)
    return run.finish(stage, {"iterations": total, "wall_seconds": time.perf_counter() - began,
                              **summarize(history)})


def skipped_updates_warning(stage: str, iteration: int, metrics: Dict) -> str:
    """The log line of an iteration whose engine step skipped optimizer
    updates (``updates/skipped`` > 0): how many, and why."""
    skipped = int(metrics["updates/skipped"])
    updates = skipped + int(metrics.get("updates/applied", 0))
    why = "their loss or gradients were not finite"
    score = metrics.get("reward/score_mean")
    if score is not None and not math.isfinite(score):
        failed = sorted(key[len("reward/"):-len("_mean")] for key, value in metrics.items()
                        if key.startswith("reward/") and key.endswith("_mean") and key != "reward/score_mean"
                        and isinstance(value, float) and not math.isfinite(value))
        named = f"reward source {', '.join(failed)} (the reward model is 'model')" if failed else "a reward source"
        why += f"; reward/score_mean is {score}: {named} failed (raised, or scored a response non-finite)"
    else:
        bad = sorted(key for key, value in metrics.items()
                     if isinstance(value, float) and not math.isfinite(value))
        if bad:
            why += f"; non-finite metrics: {', '.join(bad[:4])}" + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    return (f"{stage}: warning: iteration {iteration} skipped {skipped} of its {updates} updates ({why}): "
            f"{'the weights did not move' if skipped == updates else 'the other updates were applied'}")


def _position(iteration: int, batch: int, ptx_per_iteration: int) -> Dict[str, int]:
    """A checkpoint's ``extra``: the iteration to continue from, and the
    positions it implies in the prompt and PPO-ptx row streams (a resumed
    run reads both streams from there, :func:`prompt_batches`,
    :func:`ptx_batches`)."""
    return {"iteration": iteration, "prompt_position": iteration * batch,
            "ptx_position": iteration * ptx_per_iteration}


def _history(run: Run, stage: str, start: int) -> List[Dict]:
    """The metrics of the stage's first ``start`` iterations, recorded
    before a resume (for the result's means)."""
    return [row for row in read_metrics(run.folder) if row["stage"] == stage and 1 <= row["step"] <= start]


def summarize(history: Sequence[Dict]) -> Dict[str, float]:
    """The result's means over the iterations' metrics (see :func:`train_ppo`)."""
    if not history:
        return {}
    tail = history[-max(len(history) // 10, 1):]
    probes = [row for row in history if any(key.startswith("probe/") for key in row)]
    summary = {"kl_mean": statistics.fmean(row["kl/k1"] for row in history),
               "score_mean": statistics.fmean(row["reward/score_mean"] for row in history),
               "score_last": statistics.fmean(row["reward/score_mean"] for row in tail)}
    ptx = [row["ptx/loss"] for row in history if "ptx/loss" in row]
    if ptx:
        summary["ptx_loss_mean"] = statistics.fmean(ptx)
    if probes:
        summary.update({key: value for key, value in probes[-1].items() if key.startswith("probe/")})
    return summary


def reward_judge(engine, batch_size: int = 32) -> Judge:
    """The engine's reward as a probe's judge: the weighted sum of its
    sources (:mod:`rlhf_engine.engine.rewards`), the reward model scoring
    the sampled token ids (:func:`judge_reward_model`), the functions the
    text, so that ``probe/reward`` is on the scale of ``reward/score_mean``.
    A failing function makes the probe's reward NaN (warned once)."""
    reported = set()

    def judge(prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
        columns = rewards.function_scores(engine.reward_sources, prompts, [str(r) for r in responses], reported)
        if engine.reward is not None:
            columns[rewards.MODEL] = judge_reward_model(engine.reward, engine.tokenizer, prompts, responses,
                                                        batch_size=batch_size)
        return [math.fsum(s.weight * columns[s.name][i] for s in engine.reward_sources) for i in range(len(prompts))]

    return judge


def run_ppo_command(run: Run, data, stage_config: PPOStageConfig, engine_config) -> Dict:
    """``rlhf-engine ppo``: PPO of the SFT folder ``data.policy`` against
    the reward-model folder ``data.reward_model`` and the reward functions
    ``data.reward_funcs`` (weighted by ``data.reward_weights``) on ``data.prompts``
    (:class:`~rlhf_engine.pipeline.config.PPOData`), with PPO-ptx on the
    demonstrations ``data.ptx_data`` when ``ptx_coef > 0``; the engine
    places (and under torch.distributed shards) the models itself."""
    check_ppo_options(data, stage_config, engine_config)  # the CLI checks it before the run folder opens
    def read(path, kind):
        return load_records(path, kind, split=data.split, columns=data.columns)

    prompts = read(data.prompts, "prompts")
    eval_prompts = read(data.eval_prompts, "prompts") if data.eval_prompts else None
    demonstrations = read(data.ptx_data, "demonstrations") if data.ptx_data else None
    tokenizer = load_tokenizer(data.policy, role="--policy")
    ptx_rows = None
    if demonstrations is not None:
        try:
            ptx_rows, report = encode_ptx(tokenizer, demonstrations, data.ptx_max_length, data.ptx_length_policy)
        except ValueError as exc:
            raise UsageError(f"{data.ptx_data}: {exc}") from None
        run.log(f"ppo: PPO-ptx data {data.ptx_data}: {len(ptx_rows)} demonstrations ({report})")
    for role, path in (("--reward_model", data.reward_model), ("--critic", data.critic)):
        if path:  # fed the policy's token ids
            check_same_tokenizer(tokenizer, "--policy", data.policy, role, path)
    policy, _ = load_causal_lm(data.policy, role="--policy")
    reward_model = load_reward_model(data.reward_model, role="--reward_model") if data.reward_model else None
    critic = load_reward_model(data.critic, role="--critic") if data.critic else None
    funcs = reward_funcs(data.reward_funcs)
    engine = RLHFEngine(policy, tokenizer, engine_config, reward_model=reward_model, critic=critic,
                        reward_funcs=funcs, reward_weights=reward_weights(data))
    if funcs:
        run.log(f"ppo: reward = {' + '.join(f'{s.weight:g} x {s.name}' for s in engine.reward_sources)}")
    probe = None
    if eval_prompts is not None:
        model_only = [(s.name, s.weight) for s in engine.reward_sources] == [(rewards.MODEL, 1.0)]
        judges = {"reward": functools.partial(judge_reward_model, reward_model, tokenizer) if model_only
                  else reward_judge(engine)}
        if data.gold_judge:
            judges["gold"] = judge_gold
        reference = engine.ref if engine.ref is not None else lora.WithoutAdapters(engine.policy)  # LoRA: no copy
        probe = PolicyProbe(tokenizer, [p.prompt for p in eval_prompts], judges, reference,
                            max_new_tokens=engine_config.max_new_tokens, temperature=engine_config.temperature,
                            seed=engine_config.seed)
    prompt_ids = [encode_prompt(tokenizer, p.prompt) for p in prompts]
    result = train_ppo(run, "ppo", engine, prompt_ids, stage_config, probe=probe, ptx_rows=ptx_rows)
    return {**result, "model": str(run.model_dir("ppo"))}
