"""Model-side helpers: HuggingFace causal LMs, their output heads, log-probs,
reward models and critics (scalar heads), the byte-level tokenizer and the
small Llama-style models built locally."""
from rlhf_engine.models.logprobs import LinearHead, causal_lm_logprobs, linear_head, positions_from_mask
from rlhf_engine.models.prompts import PLAIN_SEPARATOR, encode_prompt
from rlhf_engine.models.scalar_heads import (critic_from, reward_model_from_causal_lm, score_offset,
                                             sequence_scores, token_values)

__all__ = ["LinearHead", "PLAIN_SEPARATOR", "causal_lm_logprobs", "critic_from", "encode_prompt", "linear_head",
           "positions_from_mask", "reward_model_from_causal_lm", "score_offset", "sequence_scores", "token_values"]
