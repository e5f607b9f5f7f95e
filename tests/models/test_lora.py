"""LoRA helpers (rlhf_engine.models.lora) and PEFT models in the log-prob and
scalar-head paths: default targets per family, adapters that start as a
no-op, log-probs of a PEFT policy on the fused path against a float64
full-logits reference (a hidden size equal to the vocabulary's included),
a LoRA'd output head's fallback and its reason, LoRA dropout off in
training without dropout, and the merged + adapter folders."""
import warnings

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from rlhf_engine.models import causal_lm_logprobs, lora
from rlhf_engine.models.modes import training_without_dropout

peft = pytest.importorskip("peft")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def llama(vocab=40, **overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **{**SMALL, **overrides})).eval()


def gpt2(vocab=40, dropout=0.0):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                      bos_token_id=0, eos_token_id=1)).eval()


def batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    score = torch.zeros_like(ids, dtype=torch.bool)
    score[:, 4:] = True
    return ids, mask, score


def reference_logprobs(model, ids, mask, score):
    """float64 log-softmax of the model's own full logits, gathered: ``[B, T]``, 0 where not scored."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    out = torch.zeros(ids.shape, dtype=torch.float64)
    out[:, 1:] = logp
    return torch.where(score, out, 0.0)


def perturbed(model):
    """``model`` with every trainable (adapter) parameter moved, so the adapters do something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("build, want", [
    (llama, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    (lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=40, **SMALL)), ["down_proj", "gate_proj", "k_proj", "o_proj",
                                                                    "q_proj", "up_proj", "v_proj"]),
    (lambda: Phi3ForCausalLM(Phi3Config(vocab_size=40, pad_token_id=0, **SMALL)),
     ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    (gpt2, ["c_attn", "c_fc", "c_proj"]),
], ids=["llama", "qwen2", "phi3", "gpt2"])
def test_default_targets_are_the_attention_and_mlp_projections(build, want):
    assert lora.default_targets(build()) == want


def test_add_lora_trains_adapters_only_and_starts_as_a_no_op():
    ids, mask, score = batch(40)
    want = causal_lm_logprobs(llama(), ids, mask, score)
    model = lora.add_lora(llama(), lora.LoraOptions(lora_r=4), seed=3)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert torch.equal(causal_lm_logprobs(model, ids, mask, score), want)
    again = lora.add_lora(llama(), lora.LoraOptions(lora_r=4), seed=3)
    for a, b in zip(lora.trainable_state_dict(model).values(), lora.trainable_state_dict(again).values()):
        assert torch.equal(a, b)  # the adapters' init is seeded
    with pytest.raises(ValueError, match="does not have"):
        lora.add_lora(llama(), lora.LoraOptions(lora_r=4, lora_target_modules="q_proj,nope"))


@pytest.mark.parametrize("vocab", [40, 32], ids=["hidden<vocab", "hidden==vocab"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_policy_takes_the_fused_path_and_is_exact(family, vocab):
    base = llama(vocab) if family == "llama" else gpt2(vocab)
    model = perturbed(lora.add_lora(base, lora.LoraOptions(lora_r=4)))
    ids, mask, score = batch(vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full-logits path warns
        got = causal_lm_logprobs(model, ids, mask, score)
    want = reference_logprobs(model, ids, mask, score)
    assert (got.double() - want).abs().max() < 1e-5


def test_a_lora_output_head_takes_the_full_logits_path_with_the_reason():
    model = perturbed(lora.add_lora(llama(), lora.LoraOptions(lora_r=4, lora_target_modules="q_proj,lm_head")))
    ids, mask, score = batch(40)
    with pytest.warns(UserWarning, match="output head carries LoRA adapters"):
        got = causal_lm_logprobs(model, ids, mask, score)
    assert (got.double() - reference_logprobs(model, ids, mask, score)).abs().max() < 1e-5


def test_lora_dropout_is_off_when_training_without_dropout():
    model = perturbed(lora.add_lora(gpt2(dropout=0.1), lora.LoraOptions(lora_r=4, lora_dropout=0.5)))
    ids, mask, score = batch(40)
    want = causal_lm_logprobs(model.eval(), ids, mask, score)
    model.train()
    with training_without_dropout(model):
        assert torch.equal(causal_lm_logprobs(model, ids, mask, score), want)
    assert not torch.equal(causal_lm_logprobs(model, ids, mask, score), want)  # dropout is on in plain training


def test_save_lora_writes_a_merged_folder_and_an_adapter_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    base = gpt2()
    base.save_pretrained(tmp_path / "base")
    model = perturbed(lora.add_lora(base, lora.LoraOptions(lora_r=4)))
    lora.save_lora(model, tmp_path / "model", tmp_path / "adapter", base_path=tmp_path / "base")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                             tmp_path / "adapter").eval()
    assert not lora.is_peft(merged) and lora.is_peft(model)  # the live model is still the PEFT one
    ids, mask, score = batch(40)
    want = causal_lm_logprobs(model, ids, mask, score)
    for other in (merged, adapted):
        torch.testing.assert_close(causal_lm_logprobs(other, ids, mask, score), want, rtol=1e-5, atol=1e-5)


def test_options_validation():
    with pytest.raises(ValueError, match="lora_r must be"):
        lora.LoraOptions(lora_r=1.5).check_lora()
    with pytest.raises(ValueError, match="lora_dropout"):
        lora.LoraOptions(lora_r=2, lora_dropout=-0.1).check_lora()
    assert lora.target_names(" q_proj , v_proj") == ["q_proj", "v_proj"]
    assert lora.target_names("auto") is None


def test_without_adapters_scores_the_base_model():
    ids, mask, score = batch(40)
    want = causal_lm_logprobs(llama(), ids, mask, score)
    model = perturbed(lora.add_lora(llama(), lora.LoraOptions(lora_r=4)))
    view = lora.WithoutAdapters(model)
    assert not list(view.parameters())  # a view: no weights of its own
    assert torch.equal(causal_lm_logprobs(view, ids, mask, score), want)
    assert not torch.equal(causal_lm_logprobs(model, ids, mask, score), want)  # the adapters are back on after
    with pytest.raises(ValueError, match="needs a peft.PeftModel"):
        lora.WithoutAdapters(llama())
