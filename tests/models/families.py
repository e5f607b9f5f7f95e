"""Tiny configs of the model families users bring, built from transformers'
own config classes (no downloads): the test matrix of
tests/models/test_families.py, usable by bench/planner helpers too.

Import-light: transformers is imported only when a config is built.

Each family's defaults exercise what sets it apart: sliding windows that
cut a 12-token sequence (Mistral, Qwen2, Qwen3, Gemma3's last layer),
tied and untied embeddings, Gemma's own query scaling, its norms and
soft-capping (Gemma2's final-logit soft-capping on, its attention-logit
cap small enough to matter at this size; the ``gemma2_nocap`` variant has
neither), Phi3's partial rotary embedding and fused qkv, OLMo2's
post-norms, GPT-2's absolute positions. Weights are drawn with std
:data:`INIT`, so that attention is far from uniform.
"""
VOCAB, PAD, EOS, BOS = 64, 0, 1, 2
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 2, 4, 2, 8
WINDOW = 5  # sliding window, shorter than the test sequences
INIT = 0.2  # weights' std: attention far from uniform, so that masks, windows and soft-caps matter

_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                initializer_range=INIT)

# family -> (config class name in transformers, its fields)
FAMILIES = {
    "llama": ("LlamaConfig", dict(_DECODER, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(_DECODER, head_dim=HEAD_DIM, sliding_window=WINDOW, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(_DECODER, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                  tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_DECODER, head_dim=HEAD_DIM, use_sliding_window=True, sliding_window=WINDOW,
                                  max_window_layers=1, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(_DECODER, head_dim=HEAD_DIM, query_pre_attn_scalar=12, sliding_window=WINDOW,
                                    layer_types=["full_attention", "sliding_attention"],
                                    final_logit_softcapping=30.0, attn_logit_softcapping=0.5,  # bites at this size
                                    tie_word_embeddings=True)),
    "gemma2_nocap": ("Gemma2Config", dict(_DECODER, head_dim=HEAD_DIM, query_pre_attn_scalar=12,
                                          sliding_window=WINDOW, final_logit_softcapping=None,
                                          attn_logit_softcapping=None, tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", dict(_DECODER, head_dim=HEAD_DIM, query_pre_attn_scalar=12, sliding_window=WINDOW,
                                        layer_types=["full_attention", "sliding_attention"],
                                        tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(_DECODER, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                               partial_rotary_factor=0.5),
                                tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                                initializer_range=INIT, tie_word_embeddings=True)),
    "olmo2": ("Olmo2Config", dict(_DECODER, tie_word_embeddings=False)),
}


def tiny_config(family, **overrides):
    """A transformers config of ``family`` (a key of :data:`FAMILIES`):
    hidden size 32, 2 layers, vocabulary :data:`VOCAB` with the token ids
    PAD/EOS/BOS, SDPA attention; ``overrides`` are config fields applied last
    (e.g. ``num_labels=1`` for a reward model).

    Raises:
        ValueError: unknown ``family``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    import transformers

    name, fields = FAMILIES[family]
    fields = dict(fields, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, attn_implementation="sdpa")
    fields.update(overrides)
    return getattr(transformers, name)(**fields)


def build(family, kind="causal_lm", seed=0, **overrides):
    """A freshly initialised float32 model of :func:`tiny_config` in eval
    mode: ``kind`` ``"causal_lm"`` or ``"reward"`` (sequence classification,
    ``num_labels=1``), seeded without touching the global RNG."""
    import torch
    import transformers

    if kind not in ("causal_lm", "reward"):
        raise ValueError(f"kind must be 'causal_lm' or 'reward', got {kind!r}")
    auto = transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModelForSequenceClassification
    config = tiny_config(family, **(dict(num_labels=1) if kind == "reward" else {}), **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto.from_config(config).eval()
