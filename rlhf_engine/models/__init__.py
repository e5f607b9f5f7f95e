"""Model-side helpers: HuggingFace causal LMs, their output heads, log-probs,
reward models and critics (scalar heads), the byte-level tokenizer and the
small Llama-style models built locally.

The names below load on first use (PEP 562), so importing a torch-free
submodule (``rlhf_engine.models.prompts``) does not import torch.
"""
import importlib

_EXPORTS = {
    "LinearHead": "causal_lm", "causal_lm_logprobs": "causal_lm", "linear_head": "causal_lm",
    "positions_from_mask": "causal_lm",
    "PLAIN_SEPARATOR": "prompts", "encode_prompt": "prompts", "left_pad": "prompts",
    "critic_from": "scalar_heads", "reward_model_from_causal_lm": "scalar_heads", "score_offset": "scalar_heads",
    "sequence_scores": "scalar_heads", "token_values": "scalar_heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
