"""models.last_layer: the pruned last layer gives the full forward's hidden
states (and parameter gradients) at the positions it keeps, for each
supported architecture, attention implementation and mask; anything else
runs in full; and the callers (log-probs, values, scores) are unchanged."""
import pytest
import torch
import transformers

from rlhf_engine.models import causal_lm_logprobs, sequence_scores, token_values
from rlhf_engine.models import last_layer
from rlhf_engine.models.last_layer import last_layer_from
from tests.helpers import assert_close

SIZES = dict(vocab_size=50, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}
LEFT_PADDED = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0] * 3 + [1] * 8, [1] * 11])


def build(name, impl, cls=transformers.AutoModelForCausalLM, **extra):
    torch.manual_seed(0)
    return cls.from_config(CONFIGS[name](**SIZES, **extra), attn_implementation=impl)


def hidden_and_grads(body, ids, mask, start, weights):
    body.zero_grad(set_to_none=True)
    with last_layer_from(body, start) as offset:
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    (hidden * weights[:, offset:]).sum().backward()
    return offset, hidden, {n: p.grad.clone() for n, p in body.named_parameters()}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [True, False], ids=["left_padded", "no_mask"])
def test_pruned_layer_matches_the_full_forward(name, impl, padded):
    body = build(name, impl).model
    ids = torch.randint(1, 50, (3, 11))
    mask = LEFT_PADDED if padded else None
    weights = torch.randn(3, 11, 48)
    weights[:, :4] = 0  # the same loss both ways: on the kept positions
    _, full, full_grads = hidden_and_grads(body, ids, mask, 0, weights)
    offset, part, grads = hidden_and_grads(body, ids, mask, 4, weights)
    assert offset == 4 and part.shape == (3, 7, 48)
    assert_close(part, full[:, 4:].detach().double(), 1e-6, "hidden")
    for n, g in full_grads.items():
        if g.abs().max() > 0:
            assert_close(grads[n], full_grads[n].double(), 1e-5, n)
    assert "forward" not in vars(body.layers[-1])


def test_other_models_run_in_full():
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4,
                                                                                  vocab_size=50))
    flash = build("llama", "sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    for body in (gpt2.transformer, flash.model):  # sliding windows are pruned: tests/models/test_families.py
        with last_layer_from(body, 3) as offset:
            assert offset == 0
    with last_layer_from(build("llama", "sdpa").model, 0) as offset:
        assert offset == 0


def test_layer_restored_after_an_error():
    body = build("llama", "sdpa").model
    with pytest.raises(RuntimeError, match="boom"):
        with last_layer_from(body, 2):
            assert "forward" in vars(body.layers[-1])
            raise RuntimeError("boom")
    assert "forward" not in vars(body.layers[-1])


def test_callers_equal_with_and_without_pruning(monkeypatch):
    """Log-probs, values from the response on, and scores at the last real
    token: the pruned path against the same calls with pruning switched off."""
    policy = build("llama", "sdpa")
    critic = build("llama", "sdpa", cls=transformers.AutoModelForSequenceClassification, num_labels=1)
    ids = torch.randint(1, 50, (3, 11))
    attn = LEFT_PADDED.clone()
    attn[1, -2:] = 0  # a right-padded response too
    response = torch.zeros_like(attn, dtype=torch.bool)
    response[:, 6:] = attn[:, 6:].bool()

    def run():
        return (causal_lm_logprobs(policy, ids, attn, response), token_values(critic, ids, attn, from_position=6),
                sequence_scores(critic, ids, attn))

    pruned = run()
    monkeypatch.setattr(last_layer, "PRUNABLE", frozenset())
    full = run()
    assert_close(pruned[0], full[0].double(), 1e-6, "logprobs")
    assert torch.equal(pruned[1][:, :6], torch.zeros(3, 6))
    assert_close(pruned[1][:, 6:], full[1][:, 6:].double(), 1e-6, "values")
    assert_close(pruned[2], full[2].double(), 1e-6, "scores")
