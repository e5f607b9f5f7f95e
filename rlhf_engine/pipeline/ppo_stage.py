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

Every ``eval_every`` iterations a :class:`PolicyProbe` samples the policy on
fixed prompts and records what its judges think (the reward model, the
built-in task's gold judge) and the KL to the reference.

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
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from rlhf_engine import distributed
from rlhf_engine.engine import RLHFEngine
from rlhf_engine.engine.checkpoint import latest_checkpoint
from rlhf_engine.engine.rollout import SamplingParams
from rlhf_engine.models import causal_lm_logprobs
from rlhf_engine.pipeline.data import encode_prompt, read_jsonl
from rlhf_engine.pipeline.evaluate import (Judge, decode_responses, judge_gold, judge_reward_model, map_batches,
                                           sample_prompts)
from rlhf_engine.pipeline.report import read_metrics
from rlhf_engine.pipeline.run import Interrupted, Run, UsageError, load_causal_lm, load_reward_model, load_tokenizer
from rlhf_engine.pipeline.training import global_sums, option


@dataclasses.dataclass
class PPOStageConfig:
    """The PPO loop's options (the engine's own are :class:`~rlhf_engine.engine.EngineConfig`)."""

    prompts_per_iteration: int = option(64, "Prompts per PPO iteration (each sampled samples_per_prompt times).")
    iterations: int = option(0, "PPO iterations (0: one pass over the prompts).")
    save_every: int = option(50, "Write a resumable checkpoint every this many iterations (0: only on Ctrl-C).")
    eval_every: int = option(10, "Probe the policy on the evaluation prompts every this many iterations and after "
                                 "the last (0: never).")

    def __post_init__(self):
        for name, minimum in (("prompts_per_iteration", 1), ("iterations", 0), ("save_every", 0),
                              ("eval_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

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


def train_ppo(run: Run, stage: str, engine, prompt_ids: Sequence[Sequence[int]], config: PPOStageConfig, *,
              probe: Optional[PolicyProbe] = None) -> Dict:
    """Run PPO iterations of ``engine`` as ``stage`` of ``run``, then write
    ``<stage>/model`` (the policy and tokenizer) and the stage's result.

    Args:
        engine: an :class:`~rlhf_engine.engine.RLHFEngine`.
        prompt_ids: the encoded prompts (token-id lists).
        config: :class:`PPOStageConfig`; the prompt order is seeded with
            ``engine.config.seed``.
        probe: measured before the first iteration (recorded as step 0),
            every ``config.eval_every`` iterations and after the last.

    Returns:
        the result: ``iterations``, ``wall_seconds``, ``kl_mean`` and
        ``score_mean`` (means over all iterations of the engine's ``kl/k1``
        and ``reward/score_mean``), ``score_last`` (mean score over the last
        tenth of the iterations) and the last probe's metrics. A finished
        stage is skipped (its result returned; load ``run.model_dir(stage)``).

    Under torch.distributed every rank calls it: each passes its share of
    an iteration's prompts to ``engine.step`` (``prompts_per_iteration``
    must divide by the world size), and Ctrl-C on any rank stops every rank
    at the same iteration.

    Raises:
        Interrupted: after Ctrl-C, once the checkpoint is written.
        UsageError: ``prompts_per_iteration`` does not split over the ranks.
    """
    done = run.skip_if_done(stage)
    if done is not None:
        return done
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    batch = config.prompts_per_iteration
    if batch % run.where.world_size:
        raise UsageError(f"prompts_per_iteration={batch} must be a multiple of the {run.where.world_size} ranks")
    share = distributed.rows_of_rank(batch, run.where)
    root = run.checkpoints(stage)
    total = config.num_iterations(len(prompt_ids))
    start = 0
    if run.resume and latest_checkpoint(root) is not None:
        start = engine.load(root)["iteration"]
        run.log(f"{stage}: resuming from iteration {start}")
    batches = prompt_batches(len(prompt_ids), batch, engine.config.seed, start=start * batch)
    history = run.from_main(_history(run, stage, start) if run.is_main else None)
    began = time.perf_counter()
    if probe is not None and config.eval_every and start == 0:
        run.record(stage, 0, probe(engine.policy))  # the starting point (the SFT model) of the curves
    bar = run.progress(total, stage, initial=start)
    try:
        for iteration in range(start, total):
            if global_sums([float(run.should_stop())], run.device)[0] > 0:
                path = engine.save(root, extra=_position(iteration, batch))
                raise Interrupted(stage, iteration, path)
            metrics = engine.step([list(prompt_ids[i]) for i in next(batches)[share]])
            step = iteration + 1
            if probe is not None and config.eval_every and (step % config.eval_every == 0 or step == total):
                metrics.update(probe(engine.policy))
            run.record(stage, step, metrics)
            history.append(metrics)
            bar.update(1)
            bar.set_postfix({"score": f"{metrics['reward/score_mean']:.3g}", "kl": f"{metrics['kl/k1']:.3g}"},
                            refresh=False)
            if config.save_every and step % config.save_every == 0 and step < total:
                engine.save(root, extra=_position(step, batch))
    finally:
        bar.close()
    run.save_model(stage, engine.policy, engine.tokenizer)
    return run.finish(stage, {"iterations": total, "wall_seconds": time.perf_counter() - began,
                              **summarize(history)})


def _position(iteration: int, batch: int) -> Dict[str, int]:
    return {"iteration": iteration, "prompt_position": iteration * batch}


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
    if probes:
        summary.update({key: value for key, value in probes[-1].items() if key.startswith("probe/")})
    return summary


def run_ppo_command(run: Run, data, stage_config: PPOStageConfig, engine_config) -> Dict:
    """``rlhf-engine ppo``: PPO of the SFT folder ``data.policy`` against
    the reward-model folder ``data.reward_model`` on ``data.prompts``
    (:class:`~rlhf_engine.pipeline.config.PPOData`); the engine places
    (and under torch.distributed shards) the models itself."""
    prompts = read_jsonl(data.prompts, "prompts")
    eval_prompts = read_jsonl(data.eval_prompts, "prompts") if data.eval_prompts else None
    tokenizer = load_tokenizer(data.policy)
    policy, _ = load_causal_lm(data.policy)
    reward_model = load_reward_model(data.reward_model)
    critic = load_reward_model(data.critic) if data.critic else None
    engine = RLHFEngine(policy, tokenizer, engine_config, reward_model=reward_model, critic=critic)
    probe = None
    if eval_prompts is not None:
        judges = {"reward": functools.partial(judge_reward_model, reward_model, tokenizer)}
        if data.gold_judge:
            judges["gold"] = judge_gold
        probe = PolicyProbe(tokenizer, [p.prompt for p in eval_prompts], judges, engine.ref,
                            max_new_tokens=engine_config.max_new_tokens, temperature=engine_config.temperature,
                            seed=engine_config.seed)
    prompt_ids = [encode_prompt(tokenizer, p.prompt) for p in prompts]
    result = train_ppo(run, "ppo", engine, prompt_ids, stage_config, probe=probe)
    return {**result, "model": str(run.model_dir("ppo"))}
