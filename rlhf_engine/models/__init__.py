"""Model-side helpers: HuggingFace causal LMs, their output heads, log-probs."""
from rlhf_engine.models.logprobs import LinearHead, causal_lm_logprobs, linear_head, positions_from_mask

__all__ = ["LinearHead", "causal_lm_logprobs", "linear_head", "positions_from_mask"]
