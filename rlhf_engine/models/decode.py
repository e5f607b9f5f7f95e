"""A causal LM's decode step on the CPU, made cheaper without changing what
it computes (up to float32 rounding). The sampler (engine/rollout.py) uses
both for its decode loop.

* :func:`decode_linears`: while open, the model's ``nn.Linear`` layers run
  calls of at most ``ops.decode_linear.MAX_ROWS`` rows (float32, CPU, grad
  mode off) through the decode-step kernel instead of MKL's sgemm, which
  packs every weight before a product of a few rows.
* :func:`decode_cache`: a ``DynamicCache`` whose full-attention layers keep
  keys and values in one buffer sized for the whole rollout and hand out
  views of its filled prefix. ``DynamicCache`` concatenates the whole cache
  again at every step (a copy that grows with the sequence; one machine's
  profile in ``benchmarks/results/amd-epyc/notes.md``). A ``StaticCache``
  also avoids the copy but attends over its full
  length at every step.
"""
import contextlib
import functools
import types

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rlhf_engine.ops import decode_linear


@contextlib.contextmanager
def decode_linears(model):
    """Route ``model``'s ``nn.Linear`` calls through
    :func:`rlhf_engine.ops.decode_linear.linear` while the block runs.
    Only float32 layers on the CPU outside CPU autocast are routed (under
    bf16 autocast the trainer computes in bf16, and so must the sampler, or
    their log-probs drift apart); layers whose ``forward`` is
    already replaced on the instance (hooks of other libraries) and
    subclasses of ``nn.Linear`` are left alone."""
    if torch.is_autocast_enabled("cpu"):  # the layers compute in the autocast dtype: leave them to autocast
        yield
        return
    layers = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)
              and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for layer in layers:
        layer.forward = types.MethodType(_decode_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)


def _decode_forward(self, x):
    return decode_linear.linear(x, self.weight, self.bias)


class BufferedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values ``[B, H, capacity,
    D]`` are allocated once, at the first update; ``keys``/``values`` are
    views of the filled prefix. Made for a decode loop that only appends
    (cropping, beam reordering and batch selection are not supported)."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads, _, _ = key_states.shape
            self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
            self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"the decode cache holds {self.capacity} positions; {end} were written")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


def decode_cache(model, capacity):
    """A ``DynamicCache`` for ``model`` whose full-attention layers are
    :class:`BufferedLayer` of ``capacity`` positions (prompt plus new
    tokens); sliding-window and other special layers keep their own type."""
    cache = DynamicCache(config=model.config)
    if cache.layers:
        cache.layers = [BufferedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:
        cache.layer_class_to_replicate = functools.partial(BufferedLayer, capacity)
    return cache
