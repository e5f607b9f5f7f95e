"""Small Llama-style models built locally from a config (no downloads):
the policy (causal LM) and the reward model (sequence classification,
``num_labels=1``), seeded without touching the global RNG."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

# The engine benchmark's model sizes (keep in step with it).
SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1536),
}


def llama_config(size, tokenizer, **overrides):
    """A ``LlamaConfig`` of one of :data:`SIZES` for ``tokenizer``: vocabulary
    ``len(tokenizer)``, its pad/bos/eos ids, 512 positions, untied
    embeddings, SDPA attention; ``overrides`` are config fields applied last.

    Raises:
        ValueError: unknown ``size``, or a tokenizer without pad/bos/eos tokens.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    ids = {name: getattr(tokenizer, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)}")
    fields = dict(SIZES[size], vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                  attn_implementation="sdpa", **ids)
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_policy(size, tokenizer, seed=0, dtype=torch.float32, **overrides):
    """A freshly initialised ``LlamaForCausalLM`` of :func:`llama_config`
    (``overrides`` go to it), the same for the same ``seed`` whatever the
    dtype (initialised in float32, then cast), on the CPU."""
    return _build(LlamaForCausalLM, llama_config(size, tokenizer, **overrides), seed, dtype)


def build_reward_model(size, tokenizer, seed=0, dtype=torch.float32, **overrides):
    """A freshly initialised ``LlamaForSequenceClassification`` with
    ``num_labels=1`` and the tokenizer's ``pad_token_id``; otherwise as
    :func:`build_policy`."""
    return _build(LlamaForSequenceClassification, llama_config(size, tokenizer, num_labels=1, **overrides), seed,
                  dtype)


def _build(model_class, config, seed, dtype):
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):  # the global CPU RNG is restored on exit
        torch.manual_seed(seed)
        model = model_class(config)
    return model.to(dtype)
