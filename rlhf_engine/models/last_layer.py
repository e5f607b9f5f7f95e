"""A decoder's last layer computed only where its output is read.

Log-probs of response tokens, a critic's values on the response and a
reward model's score at the last token read the final hidden states at a
suffix of the positions. Every layer but the last must still run at every
position (later positions attend to their keys and values); the last layer
needs the earlier positions' keys and values only. While
:func:`last_layer_from` is open, the last layer computes keys and values at
every position and everything else (queries, attention rows, output
projection, MLP, residuals) from position ``start`` on; the body then
returns ``[B, T - start, H]`` last hidden states, equal (float32 rounding
apart) to the ``start:`` columns of the full forward, gradients included.

On the PPO benchmark's small work (16-token prompts, 32-token responses, 6
layers) this skips a fifth of the last layer's work in every log-prob and
value pass, and nearly all of it in the reward model's.

Supported: Llama, Mistral and Qwen2 decoder layers (``PRUNABLE``) with SDPA
or eager attention and no sliding window, not under gradient checkpointing;
anything else runs in full (``start`` 0). The layer code follows transformers' for these models
(transformers 5.x: decoder layers take ``position_embeddings`` and an
already-built mask); a mismatch shows in tests/models/test_last_layer.py.
"""
import contextlib
import sys
import types

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PRUNABLE = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})
_ATTENTION = ("sdpa", "eager")


def prunable_layer(body):
    """``body``'s last decoder layer when it can be pruned, else None."""
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return None
    layer = layers[-1]
    attention = getattr(layer, "self_attn", None)
    if (type(layer).__name__ not in PRUNABLE or attention is None or "forward" in vars(layer) or recomputes(layer)
            or getattr(attention, "sliding_window", None) is not None
            or getattr(attention.config, "_attn_implementation", None) not in _ATTENTION):
        return None
    return layer


def recomputes(layer):
    """Whether ``layer`` is set up for HuggingFace gradient checkpointing:
    its backward then calls the layer's ``forward`` again, after
    :func:`last_layer_from` has put the original back, so such a layer is
    never pruned (the recompute would see a different function) -- in no
    pass, so that the no-grad passes (PPO's old log-probs and values) and the
    checkpointed training passes compute the same function to the bit."""
    return bool(getattr(layer, "gradient_checkpointing", False))


def last_hidden(body, inputs, start=0):
    """``(hidden, offset)``: ``body(**inputs)``'s last hidden states at
    positions ``offset:`` (``[B, T - offset, H]``, in its dtype), run with
    :func:`last_layer_from` ``start``; ``offset`` is the start applied."""
    with last_layer_from(body, start) as offset:
        out = body(**inputs)
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]), offset


@contextlib.contextmanager
def last_layer_from(body, start):
    """While open, ``body``'s last layer computes its output at positions
    ``>= start`` only. Yields the start applied: ``start``, or 0 when the
    layer is not :func:`prunable_layer` or ``start <= 0`` (the body then
    runs in full)."""
    layer = prunable_layer(body) if start > 0 else None
    if layer is None:
        yield 0
        return
    layer.forward = types.MethodType(_suffix_forward(start), layer)
    try:
        yield start
    finally:
        vars(layer).pop("forward", None)


def _suffix_forward(start):
    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        """The decoder layer's forward, output at positions ``start:`` only:
        ``[B, T, H]`` -> ``[B, T - start, H]``."""
        normed = self.input_layernorm(hidden_states)
        hidden = hidden_states[:, start:] + _suffix_attention(self.self_attn, normed, attention_mask,
                                                              position_embeddings, start)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))
    return forward


def _suffix_attention(attention, normed, mask, position_embeddings, start):
    """The attention block's output at positions ``start:`` (queries there,
    keys and values everywhere): ``[B, T - start, H]``."""
    modeling = sys.modules[type(attention).__module__]
    batch, length, _ = normed.shape
    query_len = length - start
    head_dim = attention.head_dim
    query = attention.q_proj(normed[:, start:]).view(batch, query_len, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    value = attention.v_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query, _ = modeling.apply_rotary_pos_emb(query, query, cos[:, start:], sin[:, start:])
    _, key = modeling.apply_rotary_pos_emb(key, key, cos, sin)
    if mask is None:  # causal alone; SDPA's causal flag would align it top-left: spelled out
        mask = torch.ones(query_len, length, dtype=torch.bool, device=normed.device).tril(start)[None, None]
        if attention.config._attn_implementation == "eager":  # an additive mask
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    else:
        mask = mask[:, :, start:]
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation,
                                                      modeling.eager_attention_forward)
    out, _ = interface(attention, query, key, value, mask, dropout=attention.attention_dropout if attention.training
                       else 0.0, scaling=attention.scaling)
    return attention.o_proj(out.reshape(batch, query_len, -1).contiguous())
