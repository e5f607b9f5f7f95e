"""rlhf_engine.models.builders: configs of the benchmark sizes, seeded
builds that leave the global RNG alone, forwards of the tiny size, and
parameter counts against a formula written out here."""
import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from rlhf_engine.models.builders import SIZES, build_policy, build_reward_model, llama_config
from rlhf_engine.models.scalar_heads import sequence_scores
from rlhf_engine.models.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sizes_are_the_benchmark_sizes():
    assert SIZES == {
        "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024),
        "small": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1536),
    }


@pytest.mark.parametrize("size", sorted(SIZES))
def test_llama_config(size, tok):
    config = llama_config(size, tok)
    for name, value in SIZES[size].items():
        assert getattr(config, name) == value
    assert config.vocab_size == len(tok) == 450
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert config.max_position_embeddings == 512 and config.tie_word_embeddings is False
    assert config._attn_implementation == "sdpa"
    assert config.num_key_value_heads == config.num_attention_heads


def test_llama_config_overrides_and_validation(tok):
    config = llama_config("tiny", tok, max_position_embeddings=64, num_key_value_heads=2, hidden_size=64)
    assert (config.max_position_embeddings, config.num_key_value_heads, config.hidden_size) == (64, 2, 64)
    with pytest.raises(ValueError, match="size"):
        llama_config("huge", tok)
    tok_without_pad = byte_tokenizer(vocab_size=260)
    tok_without_pad.pad_token = None
    with pytest.raises(ValueError, match="pad_token_id"):
        llama_config("tiny", tok_without_pad)


def _expected_params(size, vocab, reward):
    """Llama: embeddings; per layer q/k/v/o (no bias), gate/up/down, two
    RMSNorm weights; final norm; untied LM head ``[V, H]`` or score ``[1, H]``."""
    s = SIZES[size]
    h, layers, inter = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    per_layer = 4 * h * h + 3 * h * inter + 2 * h  # kv heads == heads, so k/v are [H, H]
    return vocab * h + layers * per_layer + h + (h if reward else vocab * h)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_parameter_counts(size, tok):
    with torch.device("meta"):  # shapes only: no memory, no init
        policy = LlamaForCausalLM(llama_config(size, tok))
        reward = LlamaForSequenceClassification(llama_config(size, tok, num_labels=1))
    assert sum(p.numel() for p in policy.parameters()) == _expected_params(size, len(tok), reward=False)
    assert sum(p.numel() for p in reward.parameters()) == _expected_params(size, len(tok), reward=True)


def test_tiny_counts_through_the_builders(tok):
    assert sum(p.numel() for p in build_policy("tiny", tok).parameters()) == _expected_params("tiny", 450, False)
    assert sum(p.numel() for p in build_reward_model("tiny", tok).parameters()) == _expected_params("tiny", 450, True)


@pytest.mark.parametrize("build", [build_policy, build_reward_model])
def test_seeded_and_global_rng_untouched(build, tok):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = build("tiny", tok, seed=7), build("tiny", tok, seed=7), build("tiny", tok, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert _same_weights(a, b) and not _same_weights(a, c)
    half = build("tiny", tok, seed=7, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert _same_weights(half, a.to(torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        build("tiny", tok, dtype=torch.int64)


def test_policy_forward(tok):
    policy = build_policy("tiny", tok).eval()
    assert isinstance(policy, LlamaForCausalLM)
    batch = tok(["The garden was quiet.", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = policy(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 450) and torch.isfinite(logits).all()


def test_reward_model_forward(tok):
    rm = build_reward_model("tiny", tok).eval()
    assert isinstance(rm, LlamaForSequenceClassification)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    batch = tok(["The garden was quiet.", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = sequence_scores(rm, batch["input_ids"], batch["attention_mask"])
        hf = rm(**batch).logits[:, 0]  # no real pad tokens and left padding: HF pools at the same token
    assert scores.shape == (2,)
    torch.testing.assert_close(scores, hf, rtol=1e-5, atol=1e-5)
