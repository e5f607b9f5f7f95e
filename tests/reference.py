"""API.md's formulas in plain torch, shared by the op tests (their
independent float64 references) and the op benchmarks (their ``eager``
candidates, in float32). Kept apart from rlhf_engine.ops' own torch
reference on purpose: the tests check the ops against it.

Every function keeps its inputs' dtype and supports autograd.
"""
import torch

NEG_KL_BOUND = 20.0  # API.md: the log-ratio is clamped to +-20 before exp


def policy_token_losses(logprobs, old_logprobs, advantages, clip_low=0.2, clip_high=None, dual_clip=None):
    """Per token [B, T]: (loss, l1, l2, neg_kl, lower) of the PPO policy loss:
    ``neg_kl = clamp(logprobs - old, +-20)``, ``ratio = exp(neg_kl)``,
    ``l1 = -A ratio``, ``l2 = -A clamp(ratio, 1 - clip_low, 1 + clip_high)``,
    ``loss = max(l1, l2)``; with ``dual_clip`` c, tokens with A < 0 are
    bounded by ``-A c`` (``lower``: where that bound applies). A token is
    clipped where ``l2 > l1``."""
    clip_high = clip_low if clip_high is None else clip_high
    neg_kl = torch.clamp(logprobs - old_logprobs, -NEG_KL_BOUND, NEG_KL_BOUND)
    ratio = torch.exp(neg_kl)
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(l1, l2)
    lower = torch.zeros_like(l1, dtype=torch.bool)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        lower = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    return loss, l1, l2, neg_kl, lower
