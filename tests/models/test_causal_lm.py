"""rlhf_engine.models.causal_lm_logprobs against the full-logits path:
``model(input_ids, attention_mask=...).logits`` shifted by one and fed to
``rlhf_engine.ops.token_logprobs``, on tiny models built from configs (no
downloads), float32, eval mode, seeded."""
import warnings

import pytest
import torch
import transformers
from torch import nn

from rlhf_engine import ops
from rlhf_engine.models import causal_lm_logprobs, linear_head, positions_from_mask

VOCAB = 1003  # odd
B, T = 3, 11
PADS = (0, 3, 5)  # left padding per row
TOL = dict(rtol=1e-5, atol=1e-5)
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary


@pytest.fixture(autouse=True)
def linear_op(monkeypatch):
    """While ``rlhf_engine.ops.linear_token_logprobs`` has not landed, a stand-in
    with its signature and semantics (full logits, then token_logprobs),
    installed for this test session only."""
    if hasattr(ops, "linear_token_logprobs"):
        return

    def standin(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False,
                chunk_size=None, backend="auto"):
        return ops.token_logprobs(nn.functional.linear(hidden, weight, bias), labels, temperature=temperature,
                                  ignore_index=ignore_index, return_entropy=return_entropy, backend=backend)

    monkeypatch.setattr(ops, "linear_token_logprobs", standin, raising=False)


def _llama_kwargs(**extra):
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **TOKENS, **extra)


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_llama_kwargs(tie_word_embeddings=False)),
    "qwen2-tied": lambda: transformers.Qwen2Config(**_llama_kwargs(tie_word_embeddings=True)),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, **TOKENS),
    # families with a final logit multiplier folded into the temperature
    "cohere-scale": lambda: transformers.CohereConfig(**_llama_kwargs(logit_scale=0.37)),
    "granite-scale": lambda: transformers.GraniteConfig(**_llama_kwargs(logits_scaling=3.0)),
}


def build(name, bias_head=False):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    if bias_head:  # an untied head with a bias: model(...) uses it, so must the helper
        old = model.get_output_embeddings()
        head = nn.Linear(old.in_features, old.out_features, bias=True)
        nn.init.normal_(head.bias, std=0.5)
        model.set_output_embeddings(head)
    return model.float().eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(PADS):
        attn[b, :p] = 0
        ids[b, :p] = 0  # pad id
    score = torch.zeros(B, T, dtype=torch.bool)
    score[:, 6:] = True  # the response
    score[0, 8] = False  # an unscored token inside a response (e.g. a tool output)
    score[2, 10] = False
    return ids, attn, score


def reference(model, ids, attn, score, temperature=1.0, position_ids=None):
    """Full logits -> shift -> token_logprobs, 0.0 where not scored."""
    logits = model(ids, attention_mask=attn, position_ids=position_ids).logits
    labels = torch.where(score[:, 1:], ids[:, 1:], -100)
    logp, ent = ops.token_logprobs(logits[:, :-1], labels, temperature=temperature, return_entropy=True)
    zero = logp.new_zeros(ids.shape[0], 1)
    return torch.cat([zero, logp], 1), torch.cat([zero, ent], 1)


def no_full_logits(model):
    """Make calling the output head an error (the fast path must never do it)."""
    def hook(*_):
        raise AssertionError("the output head was called: full logits materialized")
    return model.get_output_embeddings().register_forward_hook(hook)


FAMILIES = ["llama", "qwen2-tied", "gpt2", "cohere-scale", "granite-scale"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_full_logits(name, temperature):
    model = build(name)
    ids, attn, score = batch()
    with torch.no_grad():
        want_logp, want_ent = reference(model, ids, attn, score, temperature)
        handle = no_full_logits(model)
        try:
            logp, ent = causal_lm_logprobs(model, ids, attn, score, temperature=temperature, return_entropy=True)
            logp_only = causal_lm_logprobs(model, ids, attn, score.long(), temperature=temperature)
        finally:
            handle.remove()
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (B, T)
    torch.testing.assert_close(logp, want_logp, **TOL)
    torch.testing.assert_close(ent, want_ent, **TOL)
    torch.testing.assert_close(logp_only, logp, rtol=0, atol=0)
    unscored = ~score.clone()
    unscored[:, 0] = True
    assert (logp[unscored] == 0).all() and (ent[unscored] == 0).all()
    assert (logp[score] < 0).all()


def test_head_scale_is_folded():
    assert linear_head(build("llama"))[0].scale == 1.0
    assert linear_head(build("cohere-scale"))[0].scale == pytest.approx(0.37)
    assert linear_head(build("granite-scale"))[0].scale == pytest.approx(1 / 3.0)


def test_tied_and_untied_heads():
    gpt2, qwen, llama = build("gpt2"), build("qwen2-tied"), build("llama")
    for tied in (gpt2, qwen):
        assert linear_head(tied)[0].weight is tied.get_input_embeddings().weight
    assert linear_head(llama)[0].weight is not llama.get_input_embeddings().weight


def test_bias_head():
    model = build("llama", bias_head=True)
    head, _ = linear_head(model)
    assert head.bias is not None
    ids, attn, score = batch()
    with torch.no_grad():
        want, want_ent = reference(model, ids, attn, score, 0.8)
        logp, ent = causal_lm_logprobs(model, ids, attn, score, temperature=0.8, return_entropy=True)
    torch.testing.assert_close(logp, want, **TOL)
    torch.testing.assert_close(ent, want_ent, **TOL)


def test_explicit_position_ids():
    """By default the helper matches ``model(ids, attention_mask=...)``, which in
    transformers 5.17 numbers positions 0..T-1 whatever the padding. Positions
    counted from the first real token (as ``generate`` uses) are passed
    through: they change GPT-2 (absolute position embeddings) and leave Llama
    unchanged (RoPE sees only relative positions)."""
    ids, attn, score = batch()
    pos = positions_from_mask(attn)
    assert pos[1].tolist() == [0, 0, 0] + list(range(T - 3))
    for name, changes in (("gpt2", True), ("llama", False)):
        model = build(name)
        with torch.no_grad():
            want, _ = reference(model, ids, attn, score, position_ids=pos)
            logp = causal_lm_logprobs(model, ids, attn, score, position_ids=pos)
            default = causal_lm_logprobs(model, ids, attn, score)
        torch.testing.assert_close(logp, want, **TOL)
        if changes:
            assert not torch.allclose(logp[1:], default[1:], atol=1e-3)  # the padded rows moved
            torch.testing.assert_close(logp[0], default[0], **TOL)  # the unpadded row did not
        else:
            torch.testing.assert_close(logp, default, **TOL)


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    logp, ent = fn()
    w = torch.linspace(-1.0, 2.0, B * T).reshape(B, T)
    ((logp * w).sum() + 0.3 * (ent * w.flip(1)).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama", "gpt2", "cohere-scale"])
def test_gradients_match_full_logits(name):
    model = build(name, bias_head=(name == "llama"))
    ids, attn, score = batch(seed=2)
    want = _grads(model, lambda: reference(model, ids, attn, score, 0.9))
    got = _grads(model, lambda: causal_lm_logprobs(model, ids, attn, score, temperature=0.9, return_entropy=True))
    assert set(got) == set(want)
    head = model.get_output_embeddings()
    names = {n for n, p in model.named_parameters() if p is head.weight or p is head.bias}
    names |= {n for n in want if "layers.0." in n or ".h.0." in n}
    names |= {next(iter(want))}  # the embedding
    assert len(names) >= 4
    for n in sorted(names):
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_nothing_scored():
    model = build("llama")
    ids, attn, score = batch()
    score = torch.zeros_like(score)
    score[:, 0] = True  # column 0 has no predecessor: never scored
    logp, ent = causal_lm_logprobs(model, ids, attn, score, return_entropy=True)
    assert (logp == 0).all() and (ent == 0).all()
    logp.sum().backward()  # still attached to the graph


def test_softcap_falls_back_with_one_warning():
    """Gemma2's final_logit_softcapping (tanh) is not linear * scale: full-logits
    path, warned about once per model."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=64, final_logit_softcapping=5.0, **TOKENS)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    head, reason = linear_head(model)
    assert head is None and "final_logit_softcapping" in reason
    ids, attn, score = batch()
    with torch.no_grad():
        want, want_ent = reference(model, ids, attn, score, 0.7)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logp, ent = causal_lm_logprobs(model, ids, attn, score, temperature=0.7, return_entropy=True)
            causal_lm_logprobs(model, ids, attn, score)
    ours = [w for w in caught if "full-logits path" in str(w.message)]
    assert len(ours) == 1 and "final_logit_softcapping" in str(ours[0].message)
    torch.testing.assert_close(logp, want, **TOL)
    torch.testing.assert_close(ent, want_ent, **TOL)


def test_unknown_scaling_attribute_falls_back():
    """A logit-scaling attribute on a family whose use of it is not known."""
    config = CONFIGS["llama"]()
    config.output_multiplier = 2.0
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    head, reason = linear_head(model)
    assert head is None and "output_multiplier" in reason


@pytest.mark.parametrize("arg", ["input_ids", "input_ids_dtype", "attention_mask", "score_mask", "position_ids",
                                 "temperature"])
def test_bad_inputs(arg):
    model = build("gpt2")
    ids, attn, score = batch()
    kwargs = dict(input_ids=ids, attention_mask=attn, score_mask=score)
    extra = {}
    if arg == "input_ids":
        kwargs["input_ids"] = ids[0]
    elif arg == "input_ids_dtype":
        kwargs["input_ids"] = ids.float()
    elif arg == "attention_mask":
        kwargs["attention_mask"] = attn[:, 1:]
    elif arg == "score_mask":
        kwargs["score_mask"] = score[:2]
    elif arg == "position_ids":
        extra["position_ids"] = torch.arange(T + 1).expand(B, -1)
    else:
        extra["temperature"] = 0.0
    with pytest.raises(ValueError, match=arg.replace("_dtype", "")):
        causal_lm_logprobs(model, kwargs["input_ids"], kwargs["attention_mask"], kwargs["score_mask"], **extra)
