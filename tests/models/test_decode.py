"""rlhf_engine.models.decode: the decode-step linear routing and the
buffered KV cache give a model's decode step the outputs it has without them
(float32 rounding apart), and leave the model as they found it."""
import pytest
import torch
import transformers
from torch import nn
from transformers import DynamicCache

from rlhf_engine import _native
from rlhf_engine.models.decode import BufferedLayer, decode_cache, decode_linears
from rlhf_engine.ops import decode_linear
from tests.helpers import assert_close

TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      **TOKENS)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def decode_logits(model, ids, cache, steps=4):
    """Logits of a prefill and ``steps`` greedy decode steps, ``[steps + 1, B, V]``."""
    out = []
    with torch.inference_mode():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            logits = model(input_ids=logits.argmax(-1)[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        out.append(logits)
    return torch.stack(out)


@pytest.mark.skipif(_native.CPU_ERROR is not None, reason=str(_native.CPU_ERROR))
def test_decode_linears_route_small_calls_and_restore():
    model = llama()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    calls = []
    original = decode_linear._run
    try:
        decode_linear._run = lambda *args: calls.append(args[0].shape) or original(*args)
        ids = torch.randint(3, 50, (3, 7))
        expected = decode_logits(model, ids, DynamicCache(config=model.config))
        with decode_linears(model):
            assert all("forward" in vars(m) for m in linears)
            got = decode_logits(model, ids, DynamicCache(config=model.config))
    finally:
        decode_linear._run = original
    assert not any("forward" in vars(m) for m in linears)
    # 7 linears per layer and the head, in each of the 4 single-token steps; the 21-row prefill is too big
    assert len(calls) == 4 * (7 * 2 + 1) and all(shape[:-1] == (3, 1) for shape in calls)
    assert_close(got, expected.double(), 1e-6, "logits")


def test_decode_linears_leave_replaced_forwards_alone_and_restore_on_error():
    model = llama()
    hooked = model.lm_head
    hooked.forward = lambda x: torch.zeros(*x.shape[:-1], 50)
    with pytest.raises(RuntimeError, match="boom"):
        with decode_linears(model):
            assert vars(hooked)["forward"] is not None and vars(hooked)["forward"].__name__ == "<lambda>"
            raise RuntimeError("boom")
    assert "forward" in vars(hooked)  # still the outside library's
    assert not any("forward" in vars(m) for m in model.modules() if type(m) is nn.Linear and m is not hooked)


def test_buffered_cache_matches_dynamic_cache():
    model = llama()
    ids = torch.randint(3, 50, (2, 6))
    cache = decode_cache(model, capacity=6 + 5)
    assert all(isinstance(layer, BufferedLayer) for layer in cache.layers)
    got = decode_logits(model, ids, cache)
    expected = decode_logits(model, ids, DynamicCache(config=model.config))
    assert_close(got, expected.double(), 1e-6, "logits")
    layer = cache.layers[0]
    assert cache.get_seq_length() == 6 + 4 and layer.keys.shape[-2] == 10
    assert layer.keys.data_ptr() == layer.key_buffer.data_ptr()  # a view, no copy


def test_buffered_cache_refuses_overflow():
    layer = BufferedLayer(capacity=3)
    layer.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    with pytest.raises(RuntimeError, match="holds 3 positions; 4 were written"):
        layer.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))


def test_decode_linears_route_only_float32_cpu_layers():
    model = llama().to(torch.bfloat16)
    with decode_linears(model):
        assert not any("forward" in vars(m) for m in model.modules())
