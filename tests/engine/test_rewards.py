"""Reward functions beside the reward model (rlhf_engine.engine.rewards) and
the reward-hacking diagnostics of every iteration's metrics."""
import math
import warnings

import pytest
import torch

from rlhf_engine.engine import EngineConfig, RLHFEngine
from rlhf_engine.engine.metrics import Trend, reference_length
from rlhf_engine.engine.rewards import RewardSourceWarning, build_sources
from tests.helpers import EOS, PAD, TARGET, TargetCount, prompts, tiny_policy

SETTINGS = dict(max_new_tokens=8, stop_at_eos=False, mini_batch_size=4, ppo_epochs=2, lr=3e-3, critic_lr=3e-3,
                critic_init="policy", kl_coef=0.05, seed=0)


class TextTokenizer:
    """The toy world's ids as text: id ``i`` is the letter ``chr(ord('A') + i)``; PAD and EOS are special."""

    pad_token_id, eos_token_id = PAD, EOS

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("A") + i) for i in ids if not (skip_special_tokens and i in (PAD, EOS)))


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


TARGET_LETTER = chr(ord("A") + TARGET)


def count_target(prompts, responses):
    """A reward function: how many target letters each response holds."""
    return [float(r.count(TARGET_LETTER)) for r in responses]


def engine_with(reward_model=None, funcs=None, weights=None, **overrides):
    settings = {**SETTINGS, **overrides}
    if settings.get("advantage_estimator", "gae") != "gae":
        del settings["critic_init"]  # no critic to build
    return RLHFEngine(tiny_policy(), TextTokenizer(), EngineConfig(**settings),
                      reward_model=reward_model, reward_funcs=funcs, reward_weights=weights)


def response_tokens(scored):
    """Each row's response token ids before its first EOS."""
    response = torch.where(scored.response_mask, scored.sequences, PAD)[:, scored.prompt_length:].tolist()
    return [[t for t in row[:row.index(EOS)] if t != PAD] if EOS in row else [t for t in row if t != PAD]
            for row in response]


def captured_score(engine):
    """Record what every ``engine._score`` returns (the Scored batch and per-source scores)."""
    seen = []
    score = engine._score

    def wrapper(rollout):
        out = score(rollout)
        seen.append(out)
        return out

    engine._score = wrapper
    return seen


def test_weighted_sum_of_a_model_and_a_function_is_exact():
    engine = engine_with(TargetCount(), {"count": count_target}, {"model": 0.75, "count": -0.5})
    seen = captured_score(engine)
    metrics = engine.step(prompts())
    scored, per_source = seen[0]
    # Independently: the model's score and the function's, from the sampled tokens, in float64.
    seq, attn = scored.sequences, scored.attention_mask
    model = ((seq == TARGET) & attn).double().sum(-1) / 8.0
    function = torch.tensor([float(row.count(TARGET)) for row in response_tokens(scored)], dtype=torch.float64)
    # TargetCount counts the whole sequence and prompts never hold TARGET, so both count the response.
    assert function.sum() > 0, "the toy policy sampled no target token: the test would not see the function"
    expected = (0.75 * model.float().double() - 0.5 * function).float()
    assert torch.equal(scored.raw_scores, expected)
    assert torch.equal(per_source[:, 0], model.float()) and torch.equal(per_source[:, 1], function.float())
    assert metrics["reward/score_mean"] == pytest.approx(expected.double().mean().item(), abs=1e-6)
    assert metrics["reward/model_mean"] == pytest.approx(model.mean().item(), abs=1e-6)
    assert metrics["reward/count_mean"] == pytest.approx(function.mean().item(), abs=1e-6)
    assert metrics["reward/count_std"] == pytest.approx(function.std(unbiased=False).item(), abs=1e-6)
    assert metrics["reward/failed"] == 0 and metrics["updates/applied"] == 4


def test_reward_model_alone_scores_as_before():
    engine = engine_with(TargetCount())
    seen = captured_score(engine)
    metrics = engine.step(prompts())
    scored, per_source = seen[0]
    assert per_source.shape == (len(scored.sequences), 1)
    assert torch.equal(scored.raw_scores, TargetCount()(scored.sequences, scored.attention_mask))
    assert metrics["reward/model_mean"] == metrics["reward/score_mean"]


def test_functions_only_train_with_a_critic_from_the_policy():
    engine = engine_with(None, {"count": count_target}, lr=1e-2)
    before = params(engine.policy)
    metrics = engine.step(prompts())
    assert engine.reward is None and "reward/model_mean" not in metrics
    assert metrics["updates/applied"] == 4
    assert any(not torch.equal(value, before[name]) for name, value in params(engine.policy).items())


def test_functions_only_refuse_a_critic_from_the_reward_model():
    with pytest.raises(ValueError, match="critic_init='reward'.*critic_init='policy'"):
        engine_with(None, {"count": count_target}, critic_init="reward")


@pytest.mark.parametrize("failure", ["raise", "nan", "inf"])
def test_a_failing_function_skips_the_iteration_and_the_run_continues(failure):
    calls = []

    def flaky(prompts, responses):
        calls.append(len(responses))
        if len(calls) <= 2:
            if failure == "raise":
                raise RuntimeError("judge offline")
            return [math.nan if failure == "nan" else math.inf] + [0.0] * (len(responses) - 1)
        return count_target(prompts, responses)

    # A group baseline: without the whole-batch rule a single bad row would skip only its group's updates.
    engine = engine_with(TargetCount(), {"flaky": flaky}, advantage_estimator="rloo", samples_per_prompt=2,
                         score_clip=5.0)
    before = params(engine.policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = engine.step(prompts(n=4)), engine.step(prompts(n=4, seed=1))
    reports = [w for w in caught if issubclass(w.category, RewardSourceWarning)]
    assert len(reports) == 1, [str(w.message) for w in caught]  # once per function
    assert "'flaky'" in str(reports[0].message)
    assert ("judge offline" if failure == "raise" else "non-finite") in str(reports[0].message)
    for metrics in (first, second):
        assert metrics["updates/skipped"] == 4 and metrics["updates/applied"] == 0
        assert metrics["reward/failed"] == 1 and math.isnan(metrics["reward/flaky_mean"]) == (failure != "inf")
    assert second["updates/skipped_total"] == 8
    for name, value in params(engine.policy).items():
        assert torch.equal(value, before[name]), name
    third = engine.step(prompts(n=4, seed=2))  # the function recovers: the run trains on
    assert third["updates/applied"] == 4 and third["reward/failed"] == 0
    assert any(not torch.equal(value, before[name]) for name, value in params(engine.policy).items())


def test_async_functions_run_together():
    import asyncio

    running = []

    async def slow_count(prompts, responses):
        running.append(1)
        await asyncio.sleep(0.01)
        assert len(running) == 2, "the two coroutines did not overlap"
        return count_target(prompts, responses)

    async def length(prompts, responses):
        running.append(1)
        await asyncio.sleep(0.01)
        return [len(r) for r in responses]

    engine = engine_with(None, {"count": slow_count, "length": length}, {"length": 0.0})
    seen = captured_score(engine)
    metrics = engine.step(prompts())
    scored, per_source = seen[0]
    lengths = [len(row) for row in response_tokens(scored)]
    assert metrics["reward/length_mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert torch.equal(scored.raw_scores, per_source[:, 0])  # weight 0: logged, not rewarded


def test_functions_read_the_decoded_prompt_and_response():
    seen = []

    def record(prompts, responses):
        seen.append((prompts, responses))
        return [0.0] * len(prompts)

    engine = engine_with(None, {"record": record}, samples_per_prompt=2)
    batch = [[10, 11], [12, 13, 14]]
    engine.step(batch)
    texts, responses = seen[0]
    tokenizer = TextTokenizer()
    assert texts == [tokenizer.decode(p) for p in batch for _ in range(2)]
    assert all(len(r) <= 8 and "B" not in r for r in responses)  # EOS (B) never in a response's text


@pytest.mark.parametrize("output, match", [
    ([1.0], r"'bad' must return one number per response \(a list of 8 floats"),
    (["good"] * 8, "'bad' must return one number per response"),
    ([True] * 8, "'bad' must return one number per response"),
    (None, "it returned None"),
])
def test_bad_outputs_are_refused_naming_the_function(output, match):
    engine = engine_with(None, {"bad": lambda p, r: output})
    with pytest.raises(ValueError, match=match):
        engine.step(prompts())


def test_tensor_outputs_are_accepted():
    engine = engine_with(None, {"t": lambda p, r: torch.ones(len(r))})
    assert engine.step(prompts())["reward/t_mean"] == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(reward_model=None), "needs a reward"),
    (dict(reward_funcs=[count_target]), "must be a mapping"),
    (dict(reward_funcs={"score": count_target}), "reward function name 'score'"),
    (dict(reward_funcs={"model": count_target}), "reward function name 'model'"),
    (dict(reward_funcs={"a b": count_target}), "reward function name 'a b'"),
    (dict(reward_funcs={"f": 3}), r"reward_funcs\['f'\] must be callable"),
    (dict(reward_funcs={"f": TargetCount()}), "is a torch module"),
    (dict(reward_model=TargetCount(), reward_weights={"gold": 1.0}), r"names \['gold'\], which are not"),
    (dict(reward_model=TargetCount(), reward_weights={"model": math.nan}), r"reward_weights\['model'\] must be"),
])
def test_bad_sources_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_sources(kwargs.get("reward_model"), kwargs.get("reward_funcs"), kwargs.get("reward_weights"))


def test_a_tokenizer_without_decode_is_refused_with_functions():
    from tests.helpers import Tokenizer

    with pytest.raises(ValueError, match="no decode"):
        RLHFEngine(tiny_policy(), Tokenizer(), EngineConfig(**SETTINGS), reward_funcs={"count": count_target})


# Diagnostics -------------------------------------------------------------------------------

def test_diagnostics_are_in_every_iteration():
    engine = engine_with(TargetCount(), max_new_tokens=6, stop_at_eos=True)
    seen = captured_score(engine)
    first = engine.step(prompts())
    engine.step(prompts(seed=1))  # a second iteration runs with the diagnostics too
    scored, _ = seen[0]
    assert first["response/truncated_fraction"] == pytest.approx(1 - first["response/finished_fraction"])
    mask = scored.response_mask
    entropy = -(scored.sampler_logprobs.double() * mask).sum() / mask.sum()
    assert first["rollout/entropy"] == pytest.approx(entropy.item(), rel=1e-5)
    # Before any update the policy is the reference: every importance weight is 1.
    assert first["response/ref_length_ess"] == pytest.approx(1.0, abs=1e-4)
    assert first["response/ref_length_mean"] == pytest.approx(first["response/length_mean"])
    assert first["response/length_ratio"] == pytest.approx(1.0)


def test_reference_length_reweights_by_the_likelihood_ratio():
    # Two responses of 1 and 3 tokens; the reference likes the long one e^2 times more than the sampler.
    mask = torch.tensor([[True, False, False], [True, True, True]])
    sampler = torch.tensor([[-1.0, 0, 0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.0, 0, 0], [-1.0, 0.0, 0.0]])
    length, ess = reference_length(sampler, ref, mask)
    w = torch.tensor([1.0, math.exp(2.0)], dtype=torch.float64)
    w = w / w.sum()
    assert length.item() == pytest.approx((w * torch.tensor([1.0, 3.0], dtype=torch.float64)).sum().item())
    assert ess.item() == pytest.approx(1 / (2 * (w ** 2).sum().item()))


def test_trend_is_the_bias_corrected_average_change():
    trend = Trend(decay=0.5)
    assert trend.update(1.0) is None
    assert trend.update(3.0) == pytest.approx(2.0)
    # average 0.5 * 1 + 0.5 * 2 = 1.5 after the changes 2 and 1; corrected by 1 - 0.25
    assert trend.update(4.0) == pytest.approx((0.5 * 0.5 * 2 + 0.5 * 1) / 0.75)
    assert trend.update(math.nan) is None
