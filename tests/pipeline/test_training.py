"""The shared training loop's gradient checkpointing (``--gradient_checkpointing``
of ``sft`` and ``rm``): on Llama, Qwen2 and GPT-2 (with its dropout on) the
SFT and reward-model losses have the gradients of the run without it
(float32 rounding apart), and a run with it trains to the same losses and
leaves the model as it found it."""
import pytest
import torch
import transformers

from rlhf_engine.models.tokenizer import byte_tokenizer
from rlhf_engine.pipeline.data import Comparison, Demonstration
from rlhf_engine.pipeline import batching
from rlhf_engine.pipeline.data import encode_pair
from rlhf_engine.pipeline.reward import RMConfig, score_rows, train_reward_model
from rlhf_engine.pipeline.sft import SFTConfig, sft_loss, train_sft
from rlhf_engine.pipeline.training import _enable_checkpointing
from tests.helpers import assert_close

FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": (transformers.Qwen2Config, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4)),  # stock dropout 0.1
}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(vocab_size=300)


def model(family, tok, kind):
    config_class, sizes = FAMILIES[family]
    config = config_class(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, num_labels=1, **sizes)
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if kind == "lm" else transformers.AutoModelForSequenceClassification
    return auto.from_config(config)


def run(family, tok, kind, checkpointing):
    m = model(family, tok, kind)
    settings = dict(max_steps=2, batch_size=4, lr=1e-2, eval_fraction=0.0, seed=0,
                    gradient_checkpointing=checkpointing)
    torch.manual_seed(1)  # the dropout masks: recomputation replays them
    if kind == "lm":
        demos = [Demonstration(f"reverse: {w}", w[::-1]) for w in ("abc", "hello", "xyz", "tree", "stone")]
        result = train_sft(m, tok, demos, [], SFTConfig(**settings))
    else:
        pairs = [Comparison(f"sort: {w}", "".join(sorted(w)), w) for w in ("cab", "dcba", "zyx", "qpo", "nml")]
        result = train_reward_model(m, tok, pairs, [], RMConfig(**settings, normalize_rewards=False))
    assert not getattr(m, "is_gradient_checkpointing", False)  # switched off again
    return result, {n: p.detach().clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["lm", "reward"], ids=["sft", "rm"])
def test_checkpointing_trains_like_the_plain_run(tok, family, kind):
    plain_result, _ = run(family, tok, kind, False)
    result, _ = run(family, tok, kind, True)
    assert result["train_loss"] == pytest.approx(plain_result["train_loss"], rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["lm", "reward"], ids=["sft", "rm"])
def test_checkpointing_gives_the_gradients_of_the_plain_run(tok, family, kind):
    rows = [encode_pair(tok, f"reverse: {w}", w[::-1]) for w in ("abc", "hello", "xyz")]
    m = model(family, tok, kind).train()
    grads = []
    for checkpointing in (False, True):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks both times
        with _enable_checkpointing(m) if checkpointing else torch.enable_grad():
            if kind == "lm":
                loss = sft_loss(m, batching.pad_rows(rows, tok.pad_token_id))
            else:
                loss = (score_rows(m, rows, tok.pad_token_id) * torch.tensor([1.0, -2.0, 0.5])).sum()
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        if grad.abs().max() > 0:
            assert_close(grads[1][name], grad.double(), 1e-5, name)
