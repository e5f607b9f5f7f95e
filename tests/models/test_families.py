"""The model families users bring (tests/models/families.py), each tiny,
float32, seeded: log-probs through the pruned last layer and the fused head
equal a float64 log-softmax of the model's own logits (gradients equal to
the unpruned body's); the reward model's score and the critic's values
read the right positions (HF's own seq-cls forward, and a float64 head on
the full forward's hidden states); one SFT step, one reward-model step and
two PPO steps of the engine run with finite metrics, full and LoRA; and
``last_layer.describe`` (the engine's ``info/last_layer``) names the path
each family takes."""
import math
import warnings

import pytest
import torch

from rlhf_engine.models import last_layer
from rlhf_engine.models.causal_lm import causal_lm_logprobs, positions_from_mask
from rlhf_engine.models.last_layer import describe
from rlhf_engine.models.scalar_heads import reward_model_from_causal_lm, sequence_scores, token_values
from rlhf_engine.optim import adamw
from tests import helpers
from tests.helpers import assert_close
from tests.models.families import EOS, FAMILIES, PAD, build

NAMES = sorted(FAMILIES)
P, R = 5, 7  # prompt and response columns of the test batch
PROMPT_PADS = (0, 2, 4)  # left padding per row
RESPONSE_LENS = (7, 4, 1)  # real response tokens per row (then right padding)
TOL = 1e-5  # float32 model against float64 reference

# What describe() says of each family's causal LM and reward model.
GPT2_FULL = "full forward: GPT2Block has no pruned form (GPT2Model views its last hidden states at the input's"
CAUSAL_FULL = {"gemma2": "full forward: full-logits path (final_logit_softcapping=30.0", "gpt2": GPT2_FULL}
REWARD_FULL = {"gpt2": GPT2_FULL}


def make_batch(seed=0):
    """``[3, P + R]`` ids (real tokens avoid PAD), attention mask (left-padded
    prompts, right-padded responses) and the response mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (3, P + R), generator=g)
    attn = torch.zeros(3, P + R, dtype=torch.long)
    for b, (pad, n) in enumerate(zip(PROMPT_PADS, RESPONSE_LENS)):
        attn[b, pad:P + n] = 1
    ids[attn == 0] = PAD
    response = attn.bool().clone()
    response[:, :P] = False
    return ids, attn, response


def expected(family, table):
    return table.get(family, "pruned")


def logprobs(model, ids, attn, response, pos):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the full-logits path warns once per model
        return causal_lm_logprobs(model, ids, attn, response, position_ids=pos, return_entropy=True)


def assert_logprobs_equal_the_full_logits(model, ids, attn, response, pos):
    """causal_lm_logprobs (and its entropy) against a float64 log-softmax of
    ``model(...).logits`` at the response tokens."""
    logp, entropy = logprobs(model, ids, attn, response, pos)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.double()[:, :-1].log_softmax(-1)
    ref = torch.zeros(ids.shape, dtype=torch.float64)
    ref[:, 1:] = full.gather(-1, ids[:, 1:, None])[..., 0]
    ref_entropy = torch.zeros(ids.shape, dtype=torch.float64)
    ref_entropy[:, 1:] = -(full.exp() * full).sum(-1)
    assert_close(logp, ref * response, TOL, "logprobs")
    assert_close(entropy, ref_entropy * response, TOL, "entropy")


@pytest.mark.parametrize("family", NAMES)
def test_logprobs_equal_the_full_logits(family, monkeypatch):
    model = build(family)
    ids, attn, response = make_batch()
    pos = positions_from_mask(attn)
    assert describe(model).startswith(expected(family, CAUSAL_FULL))
    assert_logprobs_equal_the_full_logits(model, ids, attn, response, pos)

    # gradients: the pruned last layer against the same call with pruning off
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        (logprobs(model, ids, attn, response, pos)[0] * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    pruned = grads()
    monkeypatch.setattr(last_layer, "PRUNABLE", frozenset())
    full_grads = grads()
    assert pruned.keys() == full_grads.keys() and pruned
    for name, g in full_grads.items():
        assert_close(pruned[name], g.double(), TOL, name)


@pytest.mark.parametrize("family", NAMES)
def test_scores_and_values_read_the_right_positions(family):
    model = build(family, "reward")
    ids, attn, _ = make_batch()
    pos = positions_from_mask(attn)
    assert describe(model).startswith(expected(family, REWARD_FULL))
    with torch.no_grad():
        scores = sequence_scores(model, ids, attn, position_ids=pos)
        values = token_values(model, ids, attn, position_ids=pos, from_position=P)
        pooled = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, 0]  # HF: last non-pad token
        hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state.double()
    head = model.score.weight.double()[0]
    last = [P + n - 1 for n in RESPONSE_LENS]
    assert_close(scores, torch.stack([hidden[b, t] @ head for b, t in enumerate(last)]), TOL, "scores")
    assert_close(scores, pooled.double(), TOL, "scores against HF's pooling")
    assert_close(values[:, P:], hidden[:, P - 1:-1] @ head, TOL, "values")  # values[:, t]: state t - 1


@pytest.mark.parametrize("family", NAMES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "no_mask"])
def test_pruned_last_layer_equals_the_full_forward(family, impl, padded):
    """The last hidden states from column 4 on: pruned (where the family
    has a pruned form) against the full forward, sliding windows cutting
    the sequence, each attention implementation's mask."""
    body = build(family, attn_implementation=impl).base_model
    ids, attn, _ = make_batch()
    inputs = dict(input_ids=ids, attention_mask=attn if padded else None,
                  position_ids=positions_from_mask(attn) if padded else None)
    with torch.no_grad():
        full = body(**inputs).last_hidden_state
        with last_layer.last_layer_from(body, 4) as offset:
            part = body(**inputs).last_hidden_state
    assert offset == (0 if family == "gpt2" else 4)
    assert_close(part, full[:, offset:].double(), 1e-6, "last hidden states")


def test_full_forward_reasons():
    """A model whose last layer cannot be pruned runs in full, and
    describe() says why."""
    flash = build("llama")
    flash.config._attn_implementation = "flash_attention_2"
    checkpointed = build("qwen3").train()
    checkpointed.gradient_checkpointing_enable()
    cases = [(flash, "attention implementation 'flash_attention_2' (pruned: sdpa, eager)"),
             (checkpointed, "gradient checkpointing recomputes the last layer"),
             (build("gemma3", "reward", use_bidirectional_attention=True), "bidirectional attention"),
             (helpers.TargetCount(), "TargetCount has no list of decoder layers")]
    for model, reason in cases:
        assert describe(model) == f"full forward: {reason}"
        with last_layer.last_layer_from(getattr(model, "base_model", model), 3) as offset:
            assert offset == 0


def changed(model, before):
    return any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", NAMES)
def test_one_sft_step_and_one_reward_model_step(family):
    from rlhf_engine.pipeline.batching import pad_rows
    from rlhf_engine.pipeline.data import Comparison, Encoded
    from rlhf_engine.pipeline.reward import collate_preferences, preference_loss
    from rlhf_engine.pipeline.sft import sft_loss

    policy = build(family).train()
    rows = [([3, 4, 5], [6, 7, EOS]), ([8, 9], [10, EOS]), ([11], [12, 13, 14, EOS])]
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = adamw(policy, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = sft_loss(policy, pad_rows(rows, PAD))
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and changed(policy, before)

    reward_model = reward_model_from_causal_lm(policy, seed=1).train()
    before = {n: p.detach().clone() for n, p in reward_model.named_parameters()}
    examples = [Encoded(Comparison("p", "a", "b"), prompt, [response, [20, EOS]]) for prompt, response in rows]
    batch = collate_preferences(examples, PAD)
    optimizer = adamw(reward_model, lr=1e-2)
    scores = sequence_scores(reward_model, batch.tokens.input_ids, batch.tokens.attention_mask)
    loss, _ = preference_loss(scores, batch)
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and changed(reward_model, before)


def two_ppo_steps(family, **overrides):
    from rlhf_engine.engine import EngineConfig, RLHFEngine

    assert (helpers.PAD, helpers.EOS) == (PAD, EOS)
    settings = dict(max_new_tokens=6, stop_at_eos=False, mini_batch_size=4, ppo_epochs=1, lr=1e-3, critic_lr=1e-3,
                    critic_init="reward", seed=0)
    settings.update(overrides)
    engine = RLHFEngine(build(family), helpers.Tokenizer(), EngineConfig(**settings),
                        reward_model=build(family, "reward", seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = [engine.step(helpers.prompts(4, seed=i)) for i in range(2)]
    for metrics in history:
        numbers = {k: v for k, v in metrics.items() if not k.startswith("info/")}
        bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
        assert not bad, f"non-finite metrics: {bad}"
        assert metrics["updates/skipped_total"] == 0
    return engine, history[-1]


@pytest.mark.parametrize("family", NAMES)
@pytest.mark.parametrize("lora_r", [0, 8], ids=["full", "lora"])
def test_two_ppo_steps(family, lora_r):
    """Full fine-tuning and LoRA (rank 8): two PPO steps with finite
    metrics; under LoRA the trained adapters (no longer zero) are in the
    log-probs, which still equal the PEFT model's own full logits."""
    engine, metrics = two_ppo_steps(family, lora_r=lora_r)
    assert metrics["info/last_layer"] == describe(engine.policy)
    assert metrics["info/last_layer"].startswith(expected(family, CAUSAL_FULL))
    if lora_r:
        assert type(engine.policy).__name__.startswith("Peft")
        assert any(p.abs().sum() > 0 for n, p in engine.policy.named_parameters() if "lora_B" in n)
        ids, attn, response = make_batch()
        engine.policy.eval()
        assert_logprobs_equal_the_full_logits(engine.policy, ids, attn, response, positions_from_mask(attn))
