"""rlhf_engine.models.scalar_heads on tiny Llama / Qwen2 / GPT-2 models built
from configs (no downloads), float32, eval mode, seeded. References: HF's
own forward (``output_hidden_states`` and the full head), the same rows
scored alone without padding, and hand-built modules."""
import types

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_engine.models.causal_lm import positions_from_mask
from rlhf_engine.models.scalar_heads import (critic_from, last_real_index, reward_model_from_causal_lm,
                                             scalar_head, sequence_scores, token_values)

VOCAB = 67
PAD, BOS, EOS = 0, 1, 2
P, R = 5, 6  # prompt and response lengths of the test batch
PROMPT_PADS = (0, 2, 4)  # left padding per row
RESPONSE_LENS = (6, 3, 1)  # real response tokens per row (the rest is right padding)
TOL = dict(rtol=1e-5, atol=1e-5)


def _decoder(**extra):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=EOS, **extra)


CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**_decoder(tie_word_embeddings=False), **kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(**_decoder(tie_word_embeddings=True), **kw),
    "gpt2": lambda **kw: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **kw),
}
FAMILIES = sorted(CONFIGS)


def seq_cls(family, seed=0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(CONFIGS[family](num_labels=1)).eval()


def causal_lm(family, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


def make_batch(seed=1, pad_is_eos=False):
    """``[3, P + R]`` ids: left-padded prompts, right-padded responses.
    Real tokens avoid PAD unless ``pad_is_eos``: then every response ends
    with PAD used as EOS (the case HF's pad-token search gets wrong)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, P + R), generator=g)
    attn = torch.zeros(3, P + R, dtype=torch.long)
    for b, (pad, n) in enumerate(zip(PROMPT_PADS, RESPONSE_LENS)):
        attn[b, pad:P + n] = 1
        if pad_is_eos:
            ids[b, P + n - 1] = PAD
    ids[attn == 0] = PAD
    return ids, attn


def last_real(attn):
    return [max(t for t in range(attn.shape[1]) if attn[b, t]) for b in range(attn.shape[0])]


def positions(family, attn):
    return positions_from_mask(attn) if family == "gpt2" else None


@pytest.mark.parametrize("pad_is_eos", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_scores_match_full_head_at_last_real_token(family, pad_is_eos):
    model = seq_cls(family)
    ids, attn = make_batch(pad_is_eos=pad_is_eos)
    pos = positions(family, attn)
    got = sequence_scores(model, ids, attn, position_ids=pos)
    with torch.no_grad():
        out = model(ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
        full = model.score(out.hidden_states[-1])[..., 0]  # [B, T]
    want = torch.stack([full[b, t] for b, t in enumerate(last_real(attn))])
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, want, **TOL)
    if pad_is_eos:  # HF pools at the last non-pad token: before the EOS, not at it
        assert not torch.allclose(out.logits[:, 0], got, **TOL)
    else:  # no real PAD: HF's own pooling picks the same token
        torch.testing.assert_close(got, out.logits[:, 0], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_scores_padding_invariant(family):
    """A padded row scores as the same tokens alone, unpadded."""
    model = seq_cls(family)
    ids, attn = make_batch()
    got = sequence_scores(model, ids, attn, position_ids=positions(family, attn))
    for b in range(3):
        row = ids[b:b + 1, attn[b].bool()]
        alone = sequence_scores(model, row, torch.ones_like(row))
        torch.testing.assert_close(got[b:b + 1], alone, rtol=1e-4, atol=1e-5)


def test_sequence_scores_without_mask_takes_last_position():
    model = seq_cls("llama")
    ids, _ = make_batch()
    with torch.no_grad():
        want = model.score(model.base_model(ids).last_hidden_state[:, -1])[:, 0]
    torch.testing.assert_close(sequence_scores(model, ids, None), want, **TOL)


def test_sequence_scores_gradients_reach_body_and_head():
    model = seq_cls("llama").train()
    ids, attn = make_batch()
    sequence_scores(model, ids, attn).sum().backward()
    assert model.score.weight.grad.abs().sum() > 0
    assert model.base_model.embed_tokens.weight.grad.abs().sum() > 0


class _Scorer(nn.Module):
    """Score = sum of real token ids, returned in the shape ``kind`` asks for."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, input_ids, attention_mask):
        s = (input_ids * attention_mask).sum(-1).to(torch.float64)
        return {"flat": s, "column": s[:, None], "logits": types.SimpleNamespace(logits=s[:, None]),
                "matrix": s[:, None].expand(-1, 2), "tuple": (s,)}[self.kind]


@pytest.mark.parametrize("kind", ["flat", "column", "logits"])
def test_sequence_scores_generic_module(kind):
    ids, attn = make_batch()
    got = sequence_scores(_Scorer(kind), ids, attn, position_ids=positions_from_mask(attn))
    assert got.dtype == torch.float32
    assert got.tolist() == [float(sum(ids[b][attn[b].bool()].tolist())) for b in range(3)]


@pytest.mark.parametrize("kind, message", [("matrix", r"tensor of shape \(3, 2\)"), ("tuple", "a tuple")])
def test_sequence_scores_generic_module_wrong_output(kind, message):
    ids, attn = make_batch()
    with pytest.raises(ValueError, match=message):
        sequence_scores(_Scorer(kind), ids, attn)


def test_input_validation():
    model = seq_cls("llama")
    ids, attn = make_batch()
    with pytest.raises(ValueError, match="attention_mask"):
        sequence_scores(model, ids, attn[:, 1:])
    with pytest.raises(ValueError, match="input_ids"):
        token_values(model, ids.float(), attn)
    with pytest.raises(ValueError, match="position_ids"):
        token_values(model, ids, attn, position_ids=attn[:2])
    attn[1] = 0
    with pytest.raises(ValueError, match="no real token"):
        sequence_scores(model, ids, attn)
    with pytest.raises(ValueError, match="score"):
        token_values(_Scorer("flat"), ids, attn)
    torch.manual_seed(0)
    two = AutoModelForSequenceClassification.from_config(CONFIGS["llama"](num_labels=2))
    with pytest.raises(ValueError, match="2 outputs"):
        sequence_scores(two, ids, attn)


def test_last_real_index():
    attn = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_real_index(attn).tolist() == [2, 0, 3]
    assert last_real_index(attn.bool()).tolist() == [2, 0, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_token_values_alignment(family):
    model = seq_cls(family)
    ids, attn = make_batch()
    pos = positions(family, attn)
    values = token_values(model, ids, attn, position_ids=pos)
    assert values.dtype == torch.float32 and values.shape == ids.shape
    with torch.no_grad():
        hidden = model(ids, attention_mask=attn, position_ids=pos, output_hidden_states=True).hidden_states[-1]
    w = model.score.weight[0]
    for b in range(3):
        assert values[b, 0].item() == 0.0
        for t in range(1, ids.shape[1]):
            torch.testing.assert_close(values[b, t], hidden[b, t - 1] @ w, **TOL)


def test_token_values_are_prefix_scores():
    """The value at ``t`` is the reward-style score of the prefix ending at
    ``t - 1`` (where that position is a real token)."""
    model = seq_cls("llama")
    ids, attn = make_batch()
    values = token_values(model, ids, attn)
    checked = 0
    for t in range(P + 1, P + R):  # every row has a real token before t
        real = attn[:, t - 1].bool()
        torch.testing.assert_close(values[real, t], sequence_scores(model, ids[:, :t], attn[:, :t])[real], **TOL)
        checked += int(real.sum())
    assert checked == sum(min(n, R - 1) for n in RESPONSE_LENS)  # the states before response tokens 2..R


def test_token_values_gradients_and_dtype():
    model = seq_cls("qwen2").train()
    ids, attn = make_batch()
    values = token_values(model, ids, attn)
    (values * attn).sum().backward()
    assert model.score.weight.grad.abs().sum() > 0
    assert model.base_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    half = seq_cls("llama").to(torch.bfloat16)
    out = token_values(half, ids, attn)
    assert out.dtype == torch.float32
    with torch.no_grad():  # the head ran in bf16: its outputs are bf16 values
        assert torch.equal(out, out.to(torch.bfloat16).float())


def _pointers(model):
    return {p.data_ptr() for p in model.parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_critic_from_causal_lm(family):
    lm = causal_lm(family).requires_grad_(False)
    critic = critic_from(lm)
    assert isinstance(critic, AutoModelForSequenceClassification._model_mapping[type(lm.config)])
    assert critic.config.num_labels == 1 and critic.config.pad_token_id == PAD
    assert not critic.training and all(p.requires_grad for p in critic.parameters())
    assert not _pointers(critic) & _pointers(lm)
    lm_body = lm.base_model.state_dict()
    for name, tensor in critic.base_model.state_dict().items():
        assert torch.equal(tensor, lm_body[name]), name
    ids, attn = make_batch()
    values = token_values(critic, ids, attn, position_ids=positions(family, attn))
    assert torch.equal(values, torch.zeros_like(values))
    with torch.no_grad():
        next(critic.base_model.parameters()).add_(1.0)
    assert torch.equal(next(lm.base_model.parameters()), lm_body[next(iter(lm_body))])


def test_critic_from_reward_model():
    rm = seq_cls("llama").requires_grad_(False)
    critic = critic_from(rm)
    assert type(critic) is type(rm) and critic.config.pad_token_id == PAD
    assert all(p.requires_grad for p in critic.parameters()) and not _pointers(critic) & _pointers(rm)
    ids, attn = make_batch()
    torch.testing.assert_close(token_values(critic, ids, attn), token_values(rm, ids, attn), **TOL)
    with torch.no_grad():
        critic.score.weight.add_(1.0)
    assert not torch.equal(critic.score.weight, rm.score.weight)


def test_critic_from_head_init():
    lm = causal_lm("llama")
    state = torch.get_rng_state()
    a, b = critic_from(lm, head_init="normal", seed=3), critic_from(lm, head_init="normal", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.score.weight, b.score.weight)
    assert not torch.equal(a.score.weight, critic_from(lm, head_init="normal", seed=4).score.weight)
    with pytest.raises(ValueError, match="head_init"):
        critic_from(lm, head_init="xavier")
    with pytest.raises(ValueError, match="causal LM"):
        critic_from(_Scorer("flat"))


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_from_causal_lm(family):
    lm = causal_lm(family).train()
    state = torch.get_rng_state()
    rm = reward_model_from_causal_lm(lm, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert rm.training and rm.config.num_labels == 1 and rm.config.pad_token_id == PAD
    assert not _pointers(rm) & _pointers(lm)
    for name, tensor in rm.base_model.state_dict().items():
        assert torch.equal(tensor, lm.base_model.state_dict()[name]), name
    want = torch.randn(1, rm.config.get_text_config().hidden_size,
                       generator=torch.Generator().manual_seed(5)) * lm.config.initializer_range
    assert torch.equal(rm.score.weight, want)
    assert torch.equal(reward_model_from_causal_lm(lm, seed=5).score.weight, want)


def test_from_causal_lm_keeps_dtype():
    lm = causal_lm("llama").to(torch.bfloat16)
    assert {p.dtype for p in critic_from(lm).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in reward_model_from_causal_lm(lm).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path):
    rm = reward_model_from_causal_lm(causal_lm(family), seed=1).eval()
    critic = critic_from(rm)
    ids, attn = make_batch(pad_is_eos=True)
    pos = positions(family, attn)
    for name, model in (("rm", rm), ("critic", critic)):
        model.save_pretrained(tmp_path / name)
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / name).eval()
        assert type(loaded) is type(model) and scalar_head(loaded) is not None
        assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == PAD
        saved = model.state_dict()
        reloaded = loaded.state_dict()
        assert reloaded.keys() == saved.keys() and all(torch.equal(t, saved[k]) for k, t in reloaded.items())
        torch.testing.assert_close(sequence_scores(loaded, ids, attn, position_ids=pos),
                                   sequence_scores(model, ids, attn, position_ids=pos), **TOL)
