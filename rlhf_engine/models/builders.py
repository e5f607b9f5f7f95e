"""Small Llama- and Qwen3-style models built locally from a config (no
downloads): the policy (causal LM) and the reward model (sequence
classification, ``num_labels=1``), seeded without touching the global RNG."""
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3ForSequenceClassification)

# The engine benchmark's model sizes (keep in step with it): Llama ones, ...
SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1536),
}
# ... and Qwen3-style ones: medium is ~151M parameters as a causal LM (untied head), 32768 vocabulary rows.
QWEN3_SIZES = {
    "medium": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
                   head_dim=64, intermediate_size=2048, vocab_size=32768),
}
BENCH_SIZES = (*SIZES, *QWEN3_SIZES)


def llama_config(size, tokenizer, **overrides):
    """A ``LlamaConfig`` of one of :data:`SIZES` for ``tokenizer``: vocabulary
    ``len(tokenizer)``, its pad/bos/eos ids, 512 positions, untied
    embeddings, SDPA attention; ``overrides`` are config fields applied last.

    Raises:
        ValueError: unknown ``size``, or a tokenizer without pad/bos/eos tokens.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return LlamaConfig(**_fields(SIZES[size], tokenizer, overrides))


def qwen3_config(size, tokenizer, **overrides):
    """A ``Qwen3Config`` of one of :data:`QWEN3_SIZES`, as :func:`llama_config`
    but with the size's own vocabulary (32768 rows for ``medium``: ids past
    the tokenizer's are never fed). ValueError also for a tokenizer with
    more tokens than that."""
    if size not in QWEN3_SIZES:
        raise ValueError(f"size must be one of {sorted(QWEN3_SIZES)}, got {size!r}")
    fields = _fields(QWEN3_SIZES[size], tokenizer, overrides)
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"size {size!r} has a {fields['vocab_size']}-token vocabulary; the tokenizer has "
                         f"{len(tokenizer)} tokens")
    return Qwen3Config(**fields)


def model_config(size, tokenizer, **overrides):
    """The config of any of :data:`BENCH_SIZES` (:func:`llama_config` or :func:`qwen3_config`)."""
    if size not in BENCH_SIZES:
        raise ValueError(f"size must be one of {list(BENCH_SIZES)}, got {size!r}")
    return (qwen3_config if size in QWEN3_SIZES else llama_config)(size, tokenizer, **overrides)


def _fields(size_fields, tokenizer, overrides):
    ids = {name: getattr(tokenizer, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)}")
    fields = dict(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                  attn_implementation="sdpa", **ids)
    fields.update(size_fields)
    fields.update(overrides)
    return fields


def build_policy(size, tokenizer, seed=0, dtype=torch.float32, **overrides):
    """A freshly initialised causal LM of :func:`model_config` (``overrides``
    go to it): ``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` for a Qwen3
    size; the same for the same ``seed`` whatever the dtype (initialised in
    float32, then cast), on the CPU."""
    model_class = Qwen3ForCausalLM if size in QWEN3_SIZES else LlamaForCausalLM
    return _build(model_class, model_config(size, tokenizer, **overrides), seed, dtype)


def build_reward_model(size, tokenizer, seed=0, dtype=torch.float32, **overrides):
    """A freshly initialised sequence-classification model with
    ``num_labels=1`` and the tokenizer's ``pad_token_id``; otherwise as
    :func:`build_policy`."""
    model_class = Qwen3ForSequenceClassification if size in QWEN3_SIZES else LlamaForSequenceClassification
    return _build(model_class, model_config(size, tokenizer, num_labels=1, **overrides), seed, dtype)


def _build(model_class, config, seed, dtype):
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):  # the global CPU RNG is restored on exit
        torch.manual_seed(seed)
        model = model_class(config)
    return model.to(dtype)
