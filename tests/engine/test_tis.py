"""Truncated importance sampling (config ``tis``) and the sampler-trainer gap
metrics: the pure functions against float64 references written from their
definitions, and the engine's use of them (no vLLM needed)."""
import math

import pytest
import torch

from rlhf_engine import ops
from rlhf_engine.engine import EngineConfig, ppo
from tests.helpers import make_engine, prompts


def _batch(gen, rows=5, cols=7):
    old = -torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 3
    sampler = old + torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.8
    mask = torch.rand(rows, cols, generator=gen) < 0.7
    mask[0] = False  # a row without response tokens
    return old.float(), sampler.float(), mask


def test_token_weights_match_the_definition(gen):
    old, sampler, mask = _batch(gen)
    cap = 1.5
    weights = ppo.tis_weights(old, sampler, mask, mode="token", cap=cap)
    for b in range(old.shape[0]):
        for t in range(old.shape[1]):
            ratio = math.exp(float(old[b, t].double()) - float(sampler[b, t].double()))
            expected = min(ratio, cap) if mask[b, t] else 0.0
            assert abs(float(weights[b, t]) - expected) <= 1e-6 * max(1.0, expected), (b, t)
    assert weights.dtype == torch.float32 and not weights.requires_grad


def test_sequence_weights_mask_whole_responses(gen):
    old, sampler, mask = _batch(gen, rows=16)
    cap = 2.0
    weights = ppo.tis_weights(old, sampler, mask, mode="sequence", cap=cap)
    for b in range(old.shape[0]):
        log_ratio = sum(float(old[b, t].double()) - float(sampler[b, t].double())
                        for t in range(old.shape[1]) if mask[b, t])
        keep = 1.0 if math.exp(log_ratio) <= cap else 0.0
        assert torch.equal(weights[b], torch.where(mask[b], keep, 0.0).float()), b
    assert (weights.sum(-1) == 0).any() and (weights.sum(-1) > 0).any()  # the batch tests both outcomes


def test_weights_refuse_an_unknown_mode(gen):
    old, sampler, mask = _batch(gen)
    with pytest.raises(ValueError, match="mode"):
        ppo.tis_weights(old, sampler, mask, mode="seq", cap=2.0)


def test_equal_logprobs_give_weight_one(gen):
    old, _, mask = _batch(gen)
    for mode in ("token", "sequence"):
        assert torch.equal(ppo.tis_weights(old, old, mask, mode=mode, cap=1.0), mask.float())


def test_weighted_advantages_are_the_weighted_loss(gen):
    """Scaling each token's advantage by its weight w >= 0 is the PPO loss
    weighted per token (the clipped surrogate is positively homogeneous in A),
    dual clip included: compared with a float64 per-token reference."""
    old, sampler, mask = _batch(gen)
    logp = old + 0.3 * torch.randn(old.shape, generator=gen)
    adv = torch.randn(old.shape, generator=gen)
    w = ppo.tis_weights(old, sampler, mask, mode="token", cap=1.5)
    loss, _ = ops.ppo_policy_loss(logp, old, adv * w, mask, clip_low=0.2, dual_clip=3.0, backend="torch")
    ratio = (logp.double() - old.double()).exp()
    a = adv.double()
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    per_token = torch.where(a < 0, torch.minimum(per_token, -a * 3.0), per_token)
    expected = (w.double() * per_token)[mask].sum() / mask.sum()
    assert abs(loss.double() - expected) <= 1e-6 * max(1.0, float(expected.abs()))


def test_gap_fraction(gen):
    old, sampler, mask = _batch(gen)
    threshold = 0.5
    gap = (old.double() - sampler.double()).abs()
    expected = ((gap > threshold) & mask).sum().item() / mask.sum().item()
    assert abs(ppo.logprob_gap_fraction(sampler, old, mask, threshold).item() - expected) < 1e-7
    assert ppo.logprob_gap_fraction(sampler, old, torch.zeros_like(mask), threshold).item() == 0.0


def test_config_refuses_tis_without_a_recomputed_old_policy():
    with pytest.raises(ValueError, match="old_logprobs='recompute'"):
        EngineConfig(tis="token", old_logprobs="rollout")
    with pytest.raises(ValueError, match="tis_cap"):
        EngineConfig(tis_cap=3.0)
    with pytest.raises(ValueError, match="tis_cap"):
        EngineConfig(tis="token", tis_cap=0.5)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_engine_reports_tis_and_gap_metrics(mode):
    engine = make_engine(tis=mode, tis_cap=1.2)
    metrics = engine.step(prompts())
    assert 0.0 <= metrics["rollout/logprob_gap_frac"] <= 1.0
    # The engine's own sampler agrees with the trainer to float32 rounding: every weight is ~1.
    assert abs(metrics["tis/weight_mean"] - 1.0) < 1e-4
    assert metrics["tis/truncated_fraction"] == 0.0
    assert metrics["updates/applied"] > 0


def test_tis_with_identical_logprobs_changes_nothing():
    """With the sampler's log-probs equal to the trainer's (weights 1 exactly), TIS trains bit for bit as without."""
    runs = []
    for mode in ("off", "token"):
        engine = make_engine(tis=mode, **({"tis_cap": 1.0} if mode != "off" else {}))
        score = engine._score

        def exact_sampler(rollout, score=score):  # the sampler's log-probs := the trainer's old ones
            scored = score(rollout)
            first = scored[0] if isinstance(scored, tuple) else scored
            first.sampler_logprobs = first.old_logprobs.clone()
            return scored

        engine._score = exact_sampler
        engine.step(prompts())
        runs.append([p.detach().clone() for p in engine.policy.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
