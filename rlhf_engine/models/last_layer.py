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

Supported (``PRUNABLE``): the decoder layers of Llama, Mistral, Qwen2,
Qwen3 (per-head q/k norms), Phi3 (fused qkv projection, partial rotary,
residual dropouts), Gemma2 and Gemma3 text (norms around both blocks, their
query scaling and attention-logit soft-capping), and OLMo2 (norms after
both blocks, q/k norms over the projection), with SDPA or eager attention,
causal, not under gradient checkpointing. Sliding windows are kept: the
layer reads the rows ``start:`` of the mask the model built, window
included. Anything else runs in full (``start`` 0): other layer types
(GPT-2's blocks: its body reshapes the last hidden states to the input's
length), flash or flex attention, bidirectional attention;
:func:`describe` says which path a model takes and why. The layer code follows
transformers' for these models (transformers 5.x: decoder layers take
``position_embeddings`` and an already-built mask); a mismatch shows in
tests/models/test_last_layer.py and tests/models/test_families.py.
"""
import contextlib
import sys
import types
from typing import NamedTuple, Optional

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rlhf_engine.models.lora import base_model_of


class Recipe(NamedTuple):
    """How a decoder layer family arranges its blocks.

    ``block``: ``"pre_norm"`` (``h + attn(n1(h))``, ``h + mlp(n2(h))``),
    ``"sandwich"`` (norms before and after each block) or ``"post_norm"``
    (``h + n1(attn(h))``, ``h + n2(mlp(h))``); ``qk_norm``: None,
    ``"head"`` (over each head's ``head_dim``) or ``"projection"`` (over
    the whole q/k projection); ``softcap``: the attention passes the
    module's ``attn_logit_softcapping`` to its kernel."""

    block: str
    qk_norm: Optional[str] = None
    softcap: bool = False


RECIPES = {
    "LlamaDecoderLayer": Recipe("pre_norm"),
    "MistralDecoderLayer": Recipe("pre_norm"),
    "Qwen2DecoderLayer": Recipe("pre_norm"),
    "Qwen3DecoderLayer": Recipe("pre_norm", qk_norm="head"),
    "Phi3DecoderLayer": Recipe("pre_norm"),
    "Gemma2DecoderLayer": Recipe("sandwich", softcap=True),
    "Gemma3DecoderLayer": Recipe("sandwich", qk_norm="head"),
    "Olmo2DecoderLayer": Recipe("post_norm", qk_norm="projection"),
}
# Layer types that cannot be pruned, and why.
_NOT_PRUNABLE = {"GPT2Block": "GPT2Model views its last hidden states at the input's full length"}
PRUNABLE = frozenset(RECIPES)  # the layer types pruned (a test empties it to compare with the full forward)
_ATTENTION = ("sdpa", "eager")


def full_forward_reason(body):
    """Why ``body``'s last decoder layer cannot be pruned (a short
    sentence), or None when it can. Decided from the model's structure and
    settings alone (never from a failed attempt), so a model always takes
    the same path for the same settings."""
    layers = _layers(body)
    if layers is None:
        return f"{type(body).__name__} has no list of decoder layers"
    layer = layers[-1]
    name = type(layer).__name__
    attention = getattr(layer, "self_attn", None)
    if name not in PRUNABLE:
        return f"{name} has no pruned form" + (f" ({_NOT_PRUNABLE[name]})" if name in _NOT_PRUNABLE else "")
    if attention is None:
        return f"{name} has no self-attention module"
    if "forward" in vars(layer):
        return f"{name}.forward is replaced on the instance"
    if recomputes(layer):
        return "gradient checkpointing recomputes the last layer"
    implementation = getattr(attention.config, "_attn_implementation", None)
    if implementation not in _ATTENTION:
        return f"attention implementation {implementation!r} (pruned: {', '.join(_ATTENTION)})"
    if not getattr(attention, "is_causal", True):
        return "bidirectional attention"
    return None


def _layers(body):
    """``body``'s decoder layers (``layers``; GPT-2's ``h``), None when it has none."""
    layers = getattr(body, "layers", getattr(body, "h", None))
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def prunable_layer(body):
    """``body``'s last decoder layer when it can be pruned, else None."""
    return None if full_forward_reason(body) is not None else _layers(body)[-1]


def describe(model):
    """``"pruned"`` when the score passes over ``model`` (a causal LM, a
    seq-cls model or a bare body) prune its last layer, else ``"full
    forward: <reason>"``. A causal LM whose head takes the full-logits path
    (see :func:`rlhf_engine.models.causal_lm.linear_head`) runs in full; a
    PEFT wrapper is described by the model it wraps."""
    model = base_model_of(model)
    body = getattr(model, "base_model", model)
    output_head = getattr(model, "get_output_embeddings", None)
    if body is not model and output_head is not None and output_head() is not None:  # a causal LM
        from rlhf_engine.models.causal_lm import linear_head  # causal_lm imports this module

        _, reason = linear_head(model)
        if reason is not None:
            return f"full forward: full-logits path ({reason})"
    reason = full_forward_reason(body)
    return "pruned" if reason is None else f"full forward: {reason}"


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
    :func:`last_layer_from` ``start``; ``offset`` is the start applied.
    ``hidden`` is None when the output has no ``last_hidden_state`` (the
    module is not a body: e.g. a whole model, whose first output is logits
    -- never guessed from a shape, which a hidden size equal to the
    vocabulary's would fool)."""
    with last_layer_from(body, start) as offset:
        out = body(**inputs)
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state, offset
    return (out[0] if type(out) is tuple else None), offset  # a body's plain tuple (return_dict=False)


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
    layer.forward = types.MethodType(_suffix_forward(RECIPES[type(layer).__name__], start), layer)
    try:
        yield start
    finally:
        vars(layer).pop("forward", None)


def _suffix_forward(recipe, start):
    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        """The decoder layer's forward, output at positions ``start:`` only:
        ``[B, T, H]`` -> ``[B, T - start, H]``."""
        def attend(normed):
            return _suffix_attention(self.self_attn, recipe, normed, attention_mask, position_embeddings, start)

        rest = hidden_states[:, start:]
        if recipe.block == "pre_norm":
            hidden = rest + _dropout(self, "resid_attn_dropout")(attend(self.input_layernorm(hidden_states)))
            return hidden + _dropout(self, "resid_mlp_dropout")(self.mlp(self.post_attention_layernorm(hidden)))
        if recipe.block == "sandwich":
            hidden = rest + self.post_attention_layernorm(attend(self.input_layernorm(hidden_states)))
            return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
        hidden = rest + self.post_attention_layernorm(attend(hidden_states))
        return hidden + self.post_feedforward_layernorm(self.mlp(hidden))
    return forward


def _dropout(layer, name):
    """The layer's residual dropout ``name`` (Phi3's), identity when it has none."""
    return getattr(layer, name, None) or torch.nn.Identity()


def _projections(attention, normed, start):
    """``(query [B, T - start, Hq * D], key [B, T, Hkv * D], value [B, T, Hkv * D])``
    from separate ``q/k/v_proj`` or one fused ``qkv_proj`` (Phi3: query,
    key, value columns in that order)."""
    fused = getattr(attention, "qkv_proj", None)
    if fused is None:
        return attention.q_proj(normed[:, start:]), attention.k_proj(normed), attention.v_proj(normed)
    config = attention.config
    q_size = config.num_attention_heads * attention.head_dim
    kv_size = config.num_key_value_heads * attention.head_dim
    qkv = fused(normed)
    return qkv[:, start:, :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]


def _suffix_attention(attention, recipe, normed, mask, position_embeddings, start):
    """The attention block's output at positions ``start:`` (queries there,
    keys and values everywhere): ``[B, T - start, H]``."""
    modeling = sys.modules[type(attention).__module__]
    batch, length, _ = normed.shape
    query_len = length - start
    head_dim = attention.head_dim
    query, key, value = _projections(attention, normed, start)
    if recipe.qk_norm == "projection":
        query, key = attention.q_norm(query), attention.k_norm(key)
    query = query.view(batch, query_len, -1, head_dim)
    key = key.view(batch, length, -1, head_dim)
    if recipe.qk_norm == "head":
        query, key = attention.q_norm(query), attention.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = value.view(batch, length, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query, _ = modeling.apply_rotary_pos_emb(query, query, cos[:, start:], sin[:, start:])
    _, key = modeling.apply_rotary_pos_emb(key, key, cos, sin)
    extra = {"softcap": attention.attn_logit_softcapping} if recipe.softcap else {}
    out = _attend(attention, query, key, value, mask, start,
                  dropout=attention.attention_dropout if attention.training else 0.0, **extra)
    return attention.o_proj(out)


def _attend(attention, query, key, value, mask, start, **kwargs):
    """``attention``'s kernel (its config's implementation) on queries
    ``[B, heads, T - start, D]`` against keys and values ``[B, kv_heads, T,
    D]`` with the rows ``start:`` of the layer's ``mask``: ``[B, T - start,
    heads * D]``, contiguous."""
    modeling = sys.modules[type(attention).__module__]
    batch, _, query_len, _ = query.shape
    length = key.shape[2]
    if mask is None:  # causal alone; SDPA's causal flag would align it top-left: spelled out
        mask = torch.ones(query_len, length, dtype=torch.bool, device=query.device).tril(start)[None, None]
        if attention.config._attn_implementation == "eager":  # an additive mask
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    else:  # the model's mask, sliding window included: its rows start:
        mask = mask[:, :, start:]
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation,
                                                      modeling.eager_attention_forward)
    out, _ = interface(attention, query, key, value, mask, scaling=attention.scaling, **kwargs)
    return out.reshape(batch, query_len, -1).contiguous()
