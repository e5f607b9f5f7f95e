"""rlhf_engine.engine.rollout.sample against independent references: greedy
tokens against ``model.generate``, sampler log-probs against the trainer's
``causal_lm_logprobs``, EOS handling against an unstopped run with the same
seed, top-k/top-p sets and sampling frequencies against float64 computations.
Tiny models built from configs (no downloads), float32."""
import dataclasses

import pytest
import torch
import transformers
from torch import nn

from rlhf_engine.engine.batch import Rollout
from rlhf_engine.engine.rollout import SamplingParams, next_token, sample
from rlhf_engine.models import causal_lm_logprobs, positions_from_mask

VOCAB = 64
PAD, EOS = 0, 2
TOKENS = dict(bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
PADS = (0, 2, 5, 3)  # left padding per row: prompts of different lengths
P = 7

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, **TOKENS),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, **TOKENS),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            **TOKENS),
}


def build(name):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def prompts(pads=PADS, length=P, vocab=VOCAB):
    """Left-padded ``[B, length]`` prompts (pad id on the padding) and their mask."""
    ids = torch.randint(3, vocab, (len(pads), length), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]
    return ids.masked_fill(~mask, PAD), mask


def params(**kw):
    return SamplingParams(**{**dict(max_new_tokens=10, eos_token_id=None, pad_token_id=PAD), **kw})


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def fixed_logits_model(logits):
    """A Llama whose logits are ``logits`` ``[V]`` at every position, whatever
    the input (final norm zeroed, a bias-only head)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(logits), hidden_size=8, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=128, pad_token_id=PAD)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.lm_head = nn.Linear(8, len(logits), bias=True)
        model.lm_head.weight.zero_()
        model.lm_head.bias.copy_(torch.as_tensor(logits, dtype=torch.float32))
    return model


def generate(model, ids, mask, max_new_tokens, eos):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=PAD)


def expected_truncation(full, eos, prompt_len):
    """What stopping at EOS must make of an unstopped rollout ``full`` with the
    same seed: ``(tokens, response mask, finished)`` of the response part."""
    tokens = full.sequences[:, prompt_len:]
    is_eos = tokens == eos
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    alive = ~seen_before
    finished = is_eos.any(-1)
    last = int(alive.sum(-1).max())  # every row done after this many steps
    return tokens.masked_fill(~alive, PAD)[:, :last], alive[:, :last], finished


# Greedy against generate ------------------------------------------------------------

@pytest.mark.parametrize("family", list(CONFIGS))
def test_greedy_matches_generate(family):
    model = build(family)
    ids, mask = prompts()
    free = sample(model, ids, mask, params(temperature=0.0, max_new_tokens=12))
    responses = free.sequences[:, P:]
    assert free.sequences.shape == (len(PADS), P + 12)
    absent = next(t for t in range(3, VOCAB) if not (responses == t).any())
    torch.testing.assert_close(free.sequences, generate(model, ids, mask, 12, absent), rtol=0, atol=0)

    eos = int(responses[0, 3])  # row 0 stops at step 3 (or earlier): others may stop, or run on
    stopped = sample(model, ids, mask, params(temperature=0.0, max_new_tokens=12, eos_token_id=eos))
    assert stopped.finished[0] and stopped.response_lengths[0] <= 4
    torch.testing.assert_close(stopped.sequences, generate(model, ids, mask, 12, eos), rtol=0, atol=0)


# Log-probs against the trainer's --------------------------------------------------

@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_k=20, top_p=0.9), dict(temperature=1.3),
                                      dict(temperature=0.0)], ids=["tempered-filtered", "tempered", "greedy"])
def test_logprobs_match_trainer(family, settings):
    model = build(family)
    ids, mask = prompts()
    rollout = sample(model, ids, mask, params(max_new_tokens=12, eos_token_id=5, **settings), generator=seeded())
    temperature = settings["temperature"] or 1.0  # greedy reports temperature-1 log-probs
    ref = causal_lm_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.response_mask,
                             position_ids=positions_from_mask(rollout.attention_mask), temperature=temperature)
    assert rollout.sampler_logprobs.dtype == torch.float32
    assert (rollout.sampler_logprobs[~rollout.response_mask] == 0).all()
    assert (rollout.sampler_logprobs[rollout.response_mask] < 0).all()
    torch.testing.assert_close(rollout.sampler_logprobs, ref.detach(), rtol=1e-5, atol=1e-6)


# The Rollout contract ------------------------------------------------------------

def test_rollout_layout_and_types():
    model = build("llama")
    ids, mask = prompts()
    rollout = sample(model, ids, mask.long(), params(max_new_tokens=9, eos_token_id=7), generator=seeded())
    assert isinstance(rollout, Rollout) and rollout.prompt_length == P
    b, t = rollout.sequences.shape
    assert (b, t) == (len(PADS), P + rollout.response_lengths.max().item())
    assert rollout.sequences.dtype == torch.int64 and rollout.finished.dtype == torch.bool
    assert rollout.attention_mask.dtype == torch.bool and rollout.response_mask.dtype == torch.bool
    torch.testing.assert_close(rollout.sequences[:, :P], ids, rtol=0, atol=0)
    torch.testing.assert_close(rollout.attention_mask[:, :P], mask, rtol=0, atol=0)
    assert not rollout.response_mask[:, :P].any()
    torch.testing.assert_close(rollout.attention_mask[:, P:], rollout.response_mask[:, P:], rtol=0, atol=0)
    # Plain tensors, not inference tensors: the trainer's forward saves them for backward.
    for field in dataclasses.fields(rollout):
        value = getattr(rollout, field.name)
        assert not isinstance(value, torch.Tensor) or not value.is_inference(), field.name


def test_restores_train_and_eval_modes():
    model = build("llama").train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    before = [m.training for m in model.modules()]
    ids, mask = prompts()
    sample(model, ids, mask, params(max_new_tokens=3), generator=seeded())
    assert [m.training for m in model.modules()] == before
    model.eval()
    sample(model, ids, mask, params(max_new_tokens=3), generator=seeded())
    assert not any(m.training for m in model.modules())


# EOS --------------------------------------------------------------------------

EOS_LOGITS = [0.0] * 12  # token 2 (EOS) made likely or rare below


@pytest.mark.parametrize("eos_logit,all_finish", [(1.5, True), (-2.0, False)], ids=["all-finish", "some-cut"])
def test_eos_stopping_against_unstopped_run(eos_logit, all_finish):
    logits = list(EOS_LOGITS)
    logits[EOS] = eos_logit
    model = fixed_logits_model(logits)
    ids, mask = prompts(pads=(0, 1, 2, 3, 0, 2, 4, 1), length=5, vocab=len(logits))
    max_new = 30 if all_finish else 8
    full = sample(model, ids, mask, params(max_new_tokens=max_new, eos_token_id=EOS, stop_at_eos=False),
                  generator=seeded(3))
    stopped = sample(model, ids, mask, params(max_new_tokens=max_new, eos_token_id=EOS), generator=seeded(3))
    tokens, alive, finished = expected_truncation(full, EOS, 5)
    steps = tokens.shape[1]
    assert bool(finished.all()) == all_finish and (steps < max_new) == all_finish
    assert stopped.sequences.shape == (8, 5 + steps)
    torch.testing.assert_close(stopped.sequences[:, 5:], tokens, rtol=0, atol=0)
    torch.testing.assert_close(stopped.response_mask[:, 5:], alive, rtol=0, atol=0)
    torch.testing.assert_close(stopped.attention_mask[:, 5:], alive, rtol=0, atol=0)
    torch.testing.assert_close(stopped.finished, finished, rtol=0, atol=0)
    torch.testing.assert_close(stopped.sampler_logprobs, full.sampler_logprobs[:, :5 + steps] * stopped.response_mask,
                               rtol=0, atol=0)


def test_stop_at_eos_false_runs_max_new_tokens():
    logits = list(EOS_LOGITS)
    logits[EOS] = 1.5
    model = fixed_logits_model(logits)
    ids, mask = prompts(pads=(0, 2, 4, 3), length=5, vocab=len(logits))
    rollout = sample(model, ids, mask, params(max_new_tokens=20, eos_token_id=EOS, stop_at_eos=False),
                     generator=seeded(4))
    responses = rollout.sequences[:, 5:]
    assert responses.shape == (4, 20)
    assert (responses[:, :-1] == EOS).any(), "EOS should have been sampled mid-response"
    assert rollout.response_mask[:, 5:].all() and rollout.attention_mask[:, 5:].all()
    torch.testing.assert_close(rollout.finished, responses[:, -1] == EOS, rtol=0, atol=0)


def test_no_eos_never_stops():
    model = build("gpt2")
    ids, mask = prompts()
    rollout = sample(model, ids, mask, params(max_new_tokens=6, temperature=2.0), generator=seeded())
    assert rollout.sequences.shape == (len(PADS), P + 6)
    assert rollout.response_mask[:, P:].all() and not rollout.finished.any()


# Top-k / top-p ----------------------------------------------------------------

def test_top_k_one_and_tiny_top_p_are_greedy():
    model = build("qwen2")
    ids, mask = prompts()
    greedy = sample(model, ids, mask, params(temperature=0.0, eos_token_id=5))
    top1 = sample(model, ids, mask, params(top_k=1, eos_token_id=5), generator=seeded())
    nucleus = sample(model, ids, mask, params(top_p=1e-6, temperature=0.8, eos_token_id=5), generator=seeded())
    for other in (top1, nucleus):
        torch.testing.assert_close(other.sequences, greedy.sequences, rtol=0, atol=0)
        torch.testing.assert_close(other.response_mask, greedy.response_mask, rtol=0, atol=0)
    # At temperature 1 the unfiltered log-probs are greedy's.
    torch.testing.assert_close(top1.sampler_logprobs, greedy.sampler_logprobs, rtol=0, atol=0)


def allowed_set(logits, temperature, top_k, top_p, slack=0.0):
    """``[N, V]`` bool: the tokens top-k then top-p allow, in float64. With
    ``slack``, tokens within ``slack`` of the top-p boundary count as allowed
    (float32 and float64 may round them either way); top-k keeps ties."""
    scaled = logits.double() / temperature
    sorted_desc = scaled.sort(-1, descending=True).values
    allowed = scaled >= sorted_desc[:, top_k - 1:top_k] if top_k else torch.ones_like(scaled, dtype=torch.bool)
    probs = torch.softmax(scaled.masked_fill(~allowed, float("-inf")), -1)
    order = probs.argsort(-1, descending=True)
    sorted_probs = probs.gather(-1, order)
    before = (sorted_probs.cumsum(-1) - sorted_probs).gather(-1, order.argsort(-1))
    return allowed & (before < top_p + slack)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (12, 0.8), (40, 0.3)])
def test_top_k_top_p_stay_in_the_allowed_set(gen, top_k, top_p):
    logits = torch.randn(4000, 40, generator=gen) * 3
    sp = params(temperature=0.9, top_k=top_k, top_p=top_p)
    tokens, logp, _ = next_token(logits, sp, gen)
    allowed = allowed_set(logits, 0.9, top_k, top_p, slack=1e-5)
    assert allowed.gather(-1, tokens[:, None]).all()
    # The log-probs are the unfiltered tempered ones.
    torch.testing.assert_close(logp, (logits / 0.9).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1))
    assert (tokens != logits.argmax(-1)).any(), "sampling, not argmax"


# Frequencies --------------------------------------------------------------------

FREQ_LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])


def expected_probs(temperature, top_k, top_p):
    allowed = allowed_set(FREQ_LOGITS[None], temperature, top_k, top_p)[0]
    return torch.softmax((FREQ_LOGITS.double() / temperature).masked_fill(~allowed, float("-inf")), -1)


def assert_frequencies(tokens, probs):
    """Every token's count within 5 binomial standard deviations of ``probs``
    (tokens with probability 0 never drawn)."""
    n = tokens.numel()
    counts = torch.bincount(tokens.flatten(), minlength=len(probs)).double()
    std = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 5 * std + 1e-9).all(), (counts / n, probs)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (0.7, 0, 0.75),
                                                     (1.5, 5, 0.8)])
def test_sampled_frequencies(temperature, top_k, top_p):
    logits = FREQ_LOGITS.expand(200_000, -1)
    tokens, _, _ = next_token(logits, params(temperature=temperature, top_k=top_k, top_p=top_p), seeded(7))
    assert_frequencies(tokens, expected_probs(temperature, top_k, top_p))


def test_sampled_frequencies_through_the_model():
    model = fixed_logits_model(FREQ_LOGITS.tolist())
    ids, mask = prompts(pads=(0,) * 1000, length=2, vocab=len(FREQ_LOGITS))
    rollout = sample(model, ids, mask, params(max_new_tokens=8, temperature=0.6), generator=seeded(8))
    assert_frequencies(rollout.sequences[:, 2:], expected_probs(0.6, 0, 1.0))
    # A uniform sampler, or one ignoring the temperature, fails the same check.
    for wrong in (torch.full((8,), 1 / 8, dtype=torch.float64), expected_probs(1.0, 0, 1.0)):
        with pytest.raises(AssertionError):
            assert_frequencies(rollout.sequences[:, 2:], wrong)


# Reproducibility ----------------------------------------------------------------

def test_same_seed_same_rollout():
    model = build("llama")
    ids, mask = prompts()
    sp = params(max_new_tokens=10, eos_token_id=5, temperature=1.2, top_p=0.95)
    first, second = (sample(model, ids, mask, sp, generator=seeded(11)) for _ in range(2))
    for field in dataclasses.fields(Rollout):
        a, b = getattr(first, field.name), getattr(second, field.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, field.name
    other = sample(model, ids, mask, sp, generator=seeded(12))
    assert not torch.equal(other.sequences, first.sequences)


# Bad inputs -----------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("max_new_tokens", 2.0), ("eos_token_id", -1),
                                         ("pad_token_id", None), ("temperature", -0.1),
                                         ("temperature", float("inf")), ("top_p", 0.0), ("top_p", 1.5),
                                         ("top_k", -1), ("top_k", True), ("stop_at_eos", 1)])
def test_bad_params(field, value):
    with pytest.raises(ValueError, match=field):
        params(**{field: value})


def _bad_inputs():
    """(name the error must mention, overrides of the good arguments)."""
    ids, mask = prompts()
    empty_row = mask.clone()
    empty_row[1] = False
    return [
        ("prompt_ids", dict(prompt_ids=ids.float())),
        ("prompt_ids", dict(prompt_ids=ids[0])),
        ("prompt_ids", dict(prompt_ids=ids.masked_fill(mask, VOCAB))),  # outside the vocabulary
        ("prompt_mask", dict(prompt_mask=mask[:, 1:])),
        ("prompt_mask", dict(prompt_mask=mask.long() * 2)),
        ("prompt_mask", dict(prompt_mask=mask.flip(-1))),  # right-padded
        ("prompt_mask", dict(prompt_mask=empty_row)),
        ("params", dict(params=dict(max_new_tokens=3))),
        ("pad_token_id", dict(params=params(pad_token_id=VOCAB))),
        ("eos_token_id", dict(params=params(eos_token_id=VOCAB + 3))),
        ("generator", dict(generator=7)),
    ]


@pytest.mark.parametrize("name,override", _bad_inputs(), ids=[f"{n}-{i}" for i, (n, _) in enumerate(_bad_inputs())])
def test_bad_inputs(name, override):
    ids, mask = prompts()
    args = dict(prompt_ids=ids, prompt_mask=mask, params=params(), generator=None) | override
    with pytest.raises(ValueError, match=name):
        sample(build("llama"), args["prompt_ids"], args["prompt_mask"], args["params"], generator=args["generator"])
