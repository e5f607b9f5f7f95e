"""The PPO math of one iteration as small pure functions on ``[B, T]``
tensors (layout in :mod:`rlhf_engine.engine.batch`). Every per-token
quantity goes through :mod:`rlhf_engine.ops`; nothing here touches models."""
import math

import torch

from rlhf_engine import ops


def adjust_scores(scores, finished, *, rule, penalty, clip):
    """Reward-model scores ``[B]`` after the truncated-response rule.

    ``finished`` ``[B]`` bool (ended with EOS). ``rule``: "as_is" or
    "penalty" (the score of a cut response replaced by ``penalty``).
    ``clip``: None or a bound on ``|score|`` applied first."""
    scores = scores.float()
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if rule == "penalty":
        scores = torch.where(finished, scores, torch.full_like(scores, penalty))
    return scores


def token_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef, estimator, kl_in_reward):
    """``[B, T]`` per-token rewards: the score at each row's last response
    token, minus ``kl_coef`` times the per-token KL when the KL penalty lives
    in the reward (InstructGPT). With the KL in the loss the KL is not
    computed here: the rewards are the scores alone."""
    if kl_in_reward:
        return ops.kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator)
    return score_rewards(scores, mask)


def score_rewards(scores, mask):
    """``[B, T]``: each row's score ``[B]`` at its last response token
    (``mask`` ``[B, T]`` bool), 0 elsewhere and in rows without one."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, columns, -1).amax(1)
    return torch.where(columns == last[:, None], scores.float()[:, None], 0.0)


def gae_advantages(rewards, values, mask, *, gamma, lam, whiten):
    """``(advantages, returns)`` ``[B, T]`` by GAE; the advantages whitened
    over the batch's response tokens when ``whiten`` (returns are not: they
    are the critic's targets)."""
    advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten:
        advantages = ops.masked_whiten(advantages, mask)
    return advantages, returns


def group_baselines(scores, group_size, rule):
    """``[N]`` per-sequence advantages of scores laid out as consecutive
    groups of ``group_size`` samples of one prompt. ``rule``:

    - ``"group"`` (GRPO): ``(score - group mean) / (group std + eps)``;
    - ``"dr_grpo"`` (Dr. GRPO): ``score - group mean`` (no std division,
      which would weight easy and hard prompts differently);
    - ``"rloo"`` (REINFORCE leave-one-out): ``score - mean of the group's
      other samples`` ``= (score - group mean) * k / (k - 1)``."""
    centred = ops.group_advantages(scores, group_size, normalize_std=rule == "group")
    return centred * (group_size / (group_size - 1)) if rule == "rloo" else centred


def group_baseline_advantages(scores, mask, group_size, rule="group"):
    """``(advantages, returns)`` ``[B, T]`` from group baselines
    (:func:`group_baselines`): each sequence's score relative to the other
    samples of its prompt (rows ``g * group_size ... (g + 1) * group_size -
    1`` share a prompt), given to every response token. There is no critic,
    so ``returns`` is the same."""
    per_sequence = group_baselines(scores, group_size, rule)
    advantages = torch.where(mask, per_sequence[:, None], 0.0)
    return advantages, advantages


def sequence_kl(logprobs, ref_logprobs, mask, estimator):
    """``[B]`` summed per-token KL estimate of each response."""
    kl = ops.kl_penalty(logprobs, ref_logprobs, estimator=estimator)
    return torch.where(mask, kl, 0.0).sum(-1)


def logprob_gap(sampler_logprobs, trainer_logprobs, mask):
    """``(mean, max)`` 0-d: ``|sampler - trainer|`` log-prob of the response
    tokens ``mask`` ``[B, T]``, the mean over those tokens: how far the
    sampler's view of the policy is from the trainer's (the same weights)."""
    gap = torch.where(mask, (trainer_logprobs - sampler_logprobs).abs(), 0.0)
    return gap.sum() / mask.sum().clamp(min=1), gap.max()


def logprob_gap_fraction(sampler_logprobs, trainer_logprobs, mask, threshold):
    """0-d: the fraction of the response tokens ``mask`` ``[B, T]`` whose
    ``|sampler - trainer|`` log-prob exceeds ``threshold`` (0 with none)."""
    above = mask & ((trainer_logprobs - sampler_logprobs).abs() > threshold)
    return above.sum() / mask.sum().clamp(min=1)


def tis_weights(old_logprobs, sampler_logprobs, mask, *, mode, cap):
    """``[B, T]`` float32 truncated importance-sampling weights of the policy
    loss (0 outside ``mask``), correcting for tokens drawn from the sampler's
    distribution ``pi_sampler`` rather than the trainer's ``pi_old``:

    - ``"token"``: ``min(pi_old / pi_sampler, cap)`` per token;
    - ``"sequence"``: 1 for every token of a response whose sequence ratio
      ``prod_t pi_old / pi_sampler`` is at most ``cap``, 0 for every token of
      the others (masked, not reweighted).

    ``old_logprobs``, ``sampler_logprobs`` ``[B, T]`` log-probs of the same
    tokens; ``cap`` >= 1. Not differentiable (the weights are constants of the loss)."""
    log_ratio = torch.where(mask, old_logprobs.detach().double() - sampler_logprobs.detach().double(), 0.0)
    if mode == "token":
        weights = log_ratio.clamp(max=math.log(cap)).exp()
    elif mode == "sequence":
        keep = log_ratio.sum(-1, keepdim=True) <= math.log(cap)
        weights = keep.expand_as(log_ratio).double()
    else:
        raise ValueError(f"mode must be 'token' or 'sequence', got {mode!r}")
    return torch.where(mask, weights, 0.0).float()


def loss_normalizer(mask, agg):
    """The divisor that makes micro-batch losses sum to their mini-batch's
    loss: valid tokens (token-mean) or rows with a valid token (seq-mean-*),
    as a 0-d float32 tensor (never read on the host)."""
    mask = mask.bool()
    count = mask.sum() if agg == "token-mean" else mask.any(-1).sum()
    return count.float().clamp(min=1.0)


def masked_agg(x, mask, agg, normalizer):
    """``agg`` of ``x`` ``[B, T]`` over ``mask``, divided by ``normalizer``
    (the :func:`loss_normalizer` of the whole mini-batch); differentiable."""
    x = torch.where(mask, x, 0.0)
    if agg in ("token-mean", "seq-mean-token-sum"):
        return x.sum() / normalizer
    tokens = mask.sum(-1).clamp(min=1)
    return (x.sum(-1) / tokens).sum() / normalizer


def lm_loss(logprobs, mask, normalizer):
    """PPO-ptx language-modelling loss: ``-sum(logprobs * mask) / normalizer``."""
    return -torch.where(mask, logprobs, 0.0).sum() / normalizer


def explained_variance(values, returns, mask):
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens (0-d)."""
    mask = mask.bool()
    ret, val = returns[mask].double(), values[mask].double()
    var = ret.var(unbiased=False)
    return (1.0 - (ret - val).var(unbiased=False) / var).float() if ret.numel() > 1 else torch.zeros(())
