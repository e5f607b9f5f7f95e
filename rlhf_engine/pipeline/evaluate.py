"""Evaluation: sample responses from a policy, score them with a judge, and
the win rate of one policy over another with its confidence interval.

A *judge* is any ``judge(prompts, responses) -> list[float]`` (higher is
better): :func:`judge_gold` (the built-in task's gold scorer) or a reward
model through :func:`judge_reward_model` (bind its model and tokenizer with
``functools.partial``).

Sampled responses are :class:`SampledResponse` s: their text, carrying
the token ids the policy sampled. A reward-model judge that shares the
policy's tokenizer scores those ids, as the engine scores a rollout in PPO
(so a probe's ``probe/reward`` is the reward PPO trains on); any other
response, or a judge with another tokenizer, gets the text encoded as in
training.

Under torch.distributed the batches are spread over the ranks
(:func:`map_batches`) and every rank gets every result; each batch is
sampled with its own seed, so the responses do not depend on the world
size.
"""
import functools
import json
import math
import random
import statistics
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

from rlhf_engine import distributed
from rlhf_engine.engine.rollout import SamplingParams, sample
from rlhf_engine.models.prompts import left_pad
from rlhf_engine.pipeline import task
from rlhf_engine.pipeline.data import encode_pair, encode_prompt
from rlhf_engine.pipeline.reward import score_rows
from rlhf_engine.pipeline.run import Run, check_same_tokenizer, load_causal_lm, load_reward_model, load_tokenizer
from rlhf_engine.pipeline.sources import load_records
from rlhf_engine.pipeline.vocab import tokenizer_key

Judge = Callable[[Sequence[str], Sequence[str]], List[float]]

# Two-sided 95% normal quantile.
Z_95 = statistics.NormalDist().inv_cdf(0.975)


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _check_texts(name, texts):
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a list of strings")


def _check_prompts(prompts):
    """Prompts are strings or conversations (lists of messages)."""
    if isinstance(prompts, str) or not all(isinstance(p, (str, list)) for p in prompts):
        raise ValueError("prompts must be a list of prompts (strings or lists of messages)")


def map_batches(fn: Callable[[Sequence, int], list], items: Sequence, batch_size: int, seed: int = 0) -> list:
    """``fn(batch, batch_seed)`` (a list of one result per item) over
    ``items`` cut into batches of ``batch_size``, concatenated in order.

    Each batch has its own seed, drawn from ``random.Random(seed)``, so a
    batch's results do not depend on which rank runs it. Under
    torch.distributed the batches are dealt round robin over the ranks and
    the results gathered on every rank; every rank calls ``fn`` the same
    number of times (a rank without a batch left repeats its last and drops
    the results), so that collectives inside ``fn`` line up.
    """
    _check_batch_size(batch_size)
    batches = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    rng = random.Random(seed)
    seeds = [rng.getrandbits(63) for _ in batches]
    where = distributed.layout()
    mine = list(range(where.rank, len(batches), where.world_size))
    calls = -(-len(batches) // where.world_size)
    results = {}
    for i in mine + [mine[-1] if mine else 0] * (calls - len(mine)):
        out = fn(batches[i], seeds[i])
        if i in mine:
            results[i] = out
    gathered = {i: out for part in distributed.all_gather_object(results) for i, out in part.items()}
    return [result for i in range(len(batches)) for result in gathered[i]]


class SampledResponse(str):
    """A sampled response's text that also carries what was sampled:
    ``prompt_ids`` (the prompt's real tokens), ``response_ids`` (the
    tokens of the rollout's response mask, as the engine scores them: EOS
    only where the sampler produced it) and ``tokenizer_key`` (the
    policy tokenizer's :func:`~rlhf_engine.pipeline.vocab.tokenizer_key`).
    Anything that takes text takes it."""

    def __new__(cls, text: str, prompt_ids: Sequence[int] = (), response_ids: Sequence[int] = (),
                tokenizer_key: Optional[str] = None):
        self = super().__new__(cls, text)
        self.prompt_ids, self.response_ids = tuple(prompt_ids), tuple(response_ids)
        self.tokenizer_key = tokenizer_key
        return self

    def __reduce__(self):  # pickled whole (gathered over the ranks)
        return type(self), (str(self), self.prompt_ids, self.response_ids, self.tokenizer_key)


def decode_responses(tokenizer, rollout) -> List[SampledResponse]:
    """The response of each row of a :class:`~rlhf_engine.engine.rollout.Rollout`:
    as text, its tokens before the first EOS (all of them when it has none)
    decoded without special tokens; as a :class:`SampledResponse`, the
    row's tokens themselves."""
    key = tokenizer_key(tokenizer)
    prompt = slice(None, rollout.prompt_length)
    response = slice(rollout.prompt_length, None)
    responses = []
    for prompt_row, prompt_keep, row, keep in zip(
            rollout.sequences[:, prompt].tolist(), rollout.attention_mask[:, prompt].tolist(),
            rollout.sequences[:, response].tolist(), rollout.response_mask[:, response].tolist()):
        tokens = [t for t, k in zip(row, keep) if k]
        text = tokens[:tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens
        responses.append(SampledResponse(tokenizer.decode(text, skip_special_tokens=True),
                                         [t for t, k in zip(prompt_row, prompt_keep) if k], tokens, key))
    return responses


def sample_prompts(model, tokenizer, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, seed: int):
    """A :class:`~rlhf_engine.engine.rollout.Rollout` of one batch of
    encoded prompts (left-padded), sampled with a generator seeded with
    ``seed`` on the model's device."""
    device = next(model.parameters()).device
    ids, mask = left_pad(list(prompt_ids), tokenizer.pad_token_id)
    return sample(model, ids.to(device), mask.to(device), params,
                  generator=torch.Generator(device).manual_seed(seed))


def generate_responses(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 1.0,
                       seed: int = 0, batch_size: int = 32) -> List[str]:
    """One sampled response per prompt (:func:`decode_responses`: its text, carrying its tokens).

    Prompts are encoded with :func:`~rlhf_engine.pipeline.data.encode_prompt`
    and sampled ``batch_size`` at a time by
    :func:`rlhf_engine.engine.rollout.sample` (``temperature=0``: greedy),
    each batch with its own seed drawn from ``seed`` (:func:`map_batches`:
    spread over the ranks; a sharded ``model`` is held unsharded meanwhile).
    """
    _check_prompts(prompts)
    _check_batch_size(batch_size)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad_token_id")
    params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, temperature=temperature)

    def responses(batch, batch_seed):
        encoded = [encode_prompt(tokenizer, p) for p in batch]
        return decode_responses(tokenizer, sample_prompts(model, tokenizer, encoded, params, batch_seed))

    with torch.no_grad(), distributed.unsharded(model):
        return map_batches(responses, list(prompts), batch_size, seed)


def judge_gold(prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
    """The built-in task's gold score (in [0, 1]) of each response (string prompts only)."""
    _check_pairs(prompts, responses)
    _check_texts("prompts", prompts)
    return [task.gold_score(p, r) for p, r in zip(prompts, responses)]


def judge_reward_model(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                       batch_size: int = 32) -> List[float]:
    """The reward model's score of each (prompt, response), laid out as the
    engine scores a rollout (:func:`~rlhf_engine.pipeline.reward.score_rows`),
    ``batch_size`` rows at a time (spread over the ranks by
    :func:`map_batches`).

    A :class:`SampledResponse` of a policy whose tokenizer gives the same
    ids as ``tokenizer`` is scored on the tokens the policy sampled (a
    response cut at ``max_new_tokens`` has no EOS): the score PPO trains
    on. Any other response is encoded as in training
    (:func:`~rlhf_engine.pipeline.data.encode_pair`: the response ends with
    EOS).
    """
    _check_pairs(prompts, responses)
    _check_batch_size(batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    key = tokenizer_key(tokenizer)
    rows = [(r.prompt_ids, r.response_ids) if isinstance(r, SampledResponse) and r.tokenizer_key == key
            else encode_pair(tokenizer, p, r) for p, r in zip(prompts, responses)]

    def scores(batch, _):
        return score_rows(model, batch, pad_id).tolist()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), distributed.unsharded(model):
            return map_batches(scores, rows, batch_size)
    finally:
        model.train(was_training)


def _check_pairs(prompts, responses):
    _check_prompts(prompts)
    _check_texts("responses", responses)
    if len(prompts) != len(responses):
        raise ValueError(f"responses has {len(responses)} entries for {len(prompts)} prompts")


class WinRate(NamedTuple):
    """How often A beats B: ``rate = (wins + ties / 2) / n`` and its 95%
    Wilson score interval ``[low, high]``."""

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    n: int


def wilson_interval(rate: float, n: int, z: float = Z_95):
    """``(low, high)``: the Wilson score interval of a proportion ``rate``
    observed over ``n`` trials."""
    denominator = 1 + z * z / n
    center = (rate + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> WinRate:
    """The win rate of A over B from paired per-prompt scores.

    Each prompt is a win (A's score higher), a tie (equal; counts half) or a
    loss. The interval is the Wilson score interval applied to the
    tie-adjusted rate with ``n`` prompts: with ties it is a little wider than
    it need be (a tie carries less variance than a coin flip), so it errs on
    the cautious side.
    """
    a, b = [float(s) for s in scores_a], [float(s) for s in scores_b]
    if len(a) != len(b):
        raise ValueError(f"scores_b has {len(b)} entries, scores_a {len(a)}")
    if not a:
        raise ValueError("scores_a is empty")
    if not all(math.isfinite(s) for s in a + b):
        raise ValueError("scores_a and scores_b must be finite")
    wins = sum(x > y for x, y in zip(a, b))
    ties = sum(x == y for x, y in zip(a, b))
    n = len(a)
    rate = (wins + ties / 2) / n
    return WinRate(rate, *wilson_interval(rate, n), wins=wins, ties=ties, losses=n - wins - ties, n=n)


class PolicyComparison(NamedTuple):
    """A's win rate over B, and each prompt's responses and judge scores."""

    win_rate: WinRate
    scores_a: List[float]
    scores_b: List[float]
    responses_a: List[str]
    responses_b: List[str]


def compare_policies(policy_a, policy_b, tokenizer, prompts: Sequence[str], judge: Judge, *, max_new_tokens: int,
                     temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> PolicyComparison:
    """Sample one response per prompt from each policy (same seed), judge
    both, and compute the win rate of ``policy_a`` over ``policy_b``."""
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size)
    responses_a = generate_responses(policy_a, tokenizer, prompts, **kwargs)
    responses_b = generate_responses(policy_b, tokenizer, prompts, **kwargs)
    scores_a, scores_b = list(judge(prompts, responses_a)), list(judge(prompts, responses_b))
    return PolicyComparison(win_rate(scores_a, scores_b), scores_a, scores_b, responses_a, responses_b)


def run_eval_command(run: Run, options) -> Dict:
    """``rlhf-engine eval``: the win rate of ``policy_a`` over ``policy_b``
    on the prompts, judged by the gold judge or a reward model; every
    response and score goes to ``eval/responses.jsonl``. Under
    torch.distributed the sampling batches are spread over the ranks."""
    prompts = [record.prompt for record in load_records(options.prompts, "prompts", split=options.split,
                                                        columns=options.columns)]
    tokenizer = load_tokenizer(options.policy_a, role="--policy_a")
    # both policies are sampled with policy_a's tokenizer; a judge with its own tokenizer scores the text
    check_same_tokenizer(tokenizer, "--policy_a", options.policy_a, "--policy_b", options.policy_b)
    policy_a, _ = load_causal_lm(options.policy_a, role="--policy_a")
    policy_b, _ = load_causal_lm(options.policy_b, role="--policy_b")
    policy_a, policy_b = policy_a.to(run.device), policy_b.to(run.device)
    if options.judge == "gold":
        judge = judge_gold
    else:
        judge = functools.partial(judge_reward_model, load_reward_model(options.judge, role="--judge").to(run.device),
                                  load_tokenizer(options.judge, role="--judge"), batch_size=options.batch_size)
    run.log(f"eval: sampling {len(prompts)} prompts from each policy")
    comparison = compare_policies(policy_a, policy_b, tokenizer, prompts, judge,
                                  max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                  seed=options.seed, batch_size=options.batch_size)
    if run.is_main:
        with open(run.stage_dir("eval") / "responses.jsonl", "w", encoding="utf-8") as f:
            for row in zip(prompts, comparison.responses_a, comparison.scores_a, comparison.responses_b,
                           comparison.scores_b):
                f.write(json.dumps(dict(zip(("prompt", "a", "score_a", "b", "score_b"), row))) + "\n")
    rate = comparison.win_rate
    return run.finish("eval", {"win_rate": rate.rate, "win_rate_ci_low": rate.low, "win_rate_ci_high": rate.high,
                               "wins": rate.wins, "ties": rate.ties, "losses": rate.losses, "n": rate.n,
                               "judge": options.judge})
