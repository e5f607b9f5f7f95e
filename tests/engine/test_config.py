"""The configuration matrix: every value of every choice field of
EngineConfig, the numeric fields at and beyond the edges of their valid
ranges, and the pairs of fields that interact, either run two PPO steps on a
tiny model (finite metrics, updates applied, the trained weights changed) or
are refused when the config is built, with a message that names the fields
and says what to use instead. No combination may crash inside ``step()`` or
silently do nothing.

The cases are generated from the config module itself (``_CHOICES``,
``_NUMBERS``, ``_REMOVED``, the dataclass fields and their types), so a new
field value is covered automatically; a new field of another kind fails
``test_every_field_is_covered`` until it gets probes in ``OTHER_PROBES``.

The matrix runs on a Llama and on a GPT-2 (stock dropout 0.1 kept on) policy,
each with a HuggingFace sequence-classification reward model (so that
``critic_init="reward"`` has a head to copy)."""
import copy
import dataclasses
import itertools
import math
import re
import typing

import pytest
import torch
from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification)

from rlhf_engine.engine import EngineConfig, RLHFEngine
from rlhf_engine.engine import config as config_module

VOCAB, PAD, EOS, BOS = 24, 0, 1, 2
STEPS = 2  # PPO iterations run per buildable case
PROMPTS = 4
TMP = "<tmp_path>"  # replaced by the test's tmp_path (profile_dir)

# Every case is applied on top of this: tiny, on the CPU, learning rates large enough that one step moves weights.
BASE = dict(device="cpu", max_new_tokens=4, mini_batch_size=4, lr=1e-3, critic_lr=1e-3, seed=0)

FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


# Case generation ----------------------------------------------------------------------


def _optional(name):
    return type(None) in typing.get_args(FIELDS[name].type)


def _base_type(name):
    kind = FIELDS[name].type
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def _number_probes(name):
    """Values of numeric field ``name`` at and beyond the edges of its range.

    From a ladder crossing 0 and 1 (tiny, just below and above 1, non-finite,
    wrong types, None), the field's own test in ``_NUMBERS`` picks: every
    value it refuses (cheap to check), and of those it accepts, the ones next
    to a refused value (the edges), the largest, and a tiny positive and a
    middle value (the rest would repeat a run)."""
    test = {n: t for n, t, _ in config_module._NUMBERS}[name]
    if _base_type(name) is int:
        ladder, extra = [-1, 0, 1, 2], [1.5, True, None]
    else:
        ladder = [-math.inf, -0.5, 0.0, 1e-6, 0.5, 1 - 1e-6, 1.0, 1 + 1e-6, 2.0, math.inf]
        extra = [math.nan, True, None]
    ok = [test(v) for v in ladder]
    keep = [v for i, v in enumerate(ladder)
            if not ok[i] or (i > 0 and not ok[i - 1]) or (i + 1 < len(ladder) and not ok[i + 1])
            or v in (1e-6, 0.5) or i == max(j for j in range(len(ladder)) if ok[j])]
    return keep + extra


BOOLS = [name for name in FIELDS if FIELDS[name].type is bool]
NUMBERS = [name for name, _, _ in config_module._NUMBERS]

# The remaining (free-form string) fields, probed by hand.
OTHER_PROBES = {
    "device": ["cpu", "auto", "cuda", "cuda:7", "tpu", "not a device"],
    "offload_policy": ["", "reward=all,ref=score+learn", "critic_optim=all", "bogus=all", "policy=none",
                       "reward", "ref=sometimes", "reward=all,reward=all"],
    "profile_dir": [None, TMP],
    "lora_r": [0, 2, -1, 1.5, True, None],
    "lora_alpha": [16.0, 0.0, -1.0, float("nan")],
    "lora_dropout": [0.0, 0.1, 1.0, -0.1],
    "lora_target_modules": ["auto", "q_proj,v_proj", "q_proj,,v_proj", 7],
}

# Numeric fields that only act together with another setting: swept with it on (else a value of theirs
# would run but change nothing).
CONTEXT = {
    "truncation_penalty": {"truncated_response": "penalty"},
    "kl_horizon": {"kl_target": 0.1},
    "lr_warmup_steps": {"lr_schedule": "cosine"},
    "total_steps": {"lr_schedule": "cosine"},
}


def choice_cases():
    """Every value of every choice field (and of every bool), one unknown and each removed value."""
    cases = []
    for name, values in config_module._CHOICES.items():
        cases += [{name: v} for v in values]
        cases.append({name: "not-a-choice"})
    cases += [{name: value} for name, value in config_module._REMOVED]
    for name in BOOLS:
        cases += [{name: True}, {name: False}]
    for name, values in OTHER_PROBES.items():
        cases += [{name: v} for v in values]
    return cases


def number_cases():
    return [{**CONTEXT.get(name, {}), name: v} for name in NUMBERS for v in _number_probes(name)]


def pair_cases():
    choices = config_module._CHOICES
    cases = [{"kl_in": p, "kl_estimator": e} for p, e in itertools.product(choices["kl_in"], choices["kl_estimator"])]
    for estimator, truncated, init, warmup in itertools.product(choices["advantage_estimator"],
                                                                 choices["truncated_response"],
                                                                 choices["critic_init"], (0, 1)):
        case = {"advantage_estimator": estimator, "truncated_response": truncated, "critic_init": init,
                "critic_warmup_iterations": warmup}
        if estimator != "gae":
            case["samples_per_prompt"] = 2  # a group baseline needs a group
        cases.append(case)
    cases += [{"dtype": d, "old_logprobs": o} for d, o in itertools.product(choices["dtype"], choices["old_logprobs"])]
    cases += [{"offload": on, "offload_policy": spec} for on, spec in
              itertools.product((True, False), ("reward=all,ref=score+learn", "critic_optim=all"))]
    cases += [
        {"kl_target": 0.1, "kl_coef": 0.0},
        {"kl_target": 0.1, "kl_coef": 1e-6},
        # The adaptive controller over a batch larger than its horizon (ratio n / horizon = 8).
        {"kl_target": 0.1, "kl_horizon": 1, "samples_per_prompt": 2},
        {"micro_batch_size": 4, "mini_batch_size": 4},
        {"micro_batch_size": 5, "mini_batch_size": 4},
        {"lr_schedule": "linear", "total_steps": 2, "lr_warmup_steps": 2},
        {"lr_schedule": "cosine", "total_steps": 3, "lr_warmup_steps": 2},
        {"lr_schedule": "constant", "total_steps": 2, "lr_warmup_steps": 2},
        {"critic_warmup_iterations": STEPS, "advantage_estimator": "gae"},  # the critic alone trains
        {"ptx_coef": 0.5, "critic_warmup_iterations": 1},
        {"ptx_coef": 0.5, "advantage_estimator": "rloo", "samples_per_prompt": 2},
        # Nothing at all would train: no learning rate for the policy, no critic (or none that learns).
        {"lr": 0.0, "critic_lr": 0.0},
        {"lr": 0.0, "advantage_estimator": "group", "samples_per_prompt": 2},
    ]
    return cases


def _key(case):
    """The effective settings of ``case`` (so a case that sets a field to its default repeats another)."""
    defaults = {f.name: f.default for f in FIELDS.values()}
    return tuple(sorted((k, repr(v)) for k, v in {**defaults, **BASE, **case}.items()))


def _case_id(case):
    return ",".join(f"{k}={v!r}" for k, v in case.items())


def _dedupe(cases):
    """Drop the cases whose effective settings repeat an earlier case's."""
    seen, out = set(), []
    for case in cases:
        if _key(case) not in seen:
            seen.add(_key(case))
            out.append(case)
    return out


# Llama: the whole matrix. GPT-2: every choice value and every interacting pair (the numeric sweep
# exercises the config and the PPO math, which do not depend on the model family).
ALL_CASES = _dedupe(choice_cases() + number_cases() + pair_cases())
FAMILY_CASES = _dedupe(choice_cases() + pair_cases())

# Combinations that build and then crash in step() or do nothing, or whose refusal message falls short, as
# case id -> reason; each is marked a strict xfail, so the mark fails once the combination is fixed.
KNOWN = {}  # combinations known to misbehave: none now (each entry is a strict xfail)


# Models ----------------------------------------------------------------------------------


class Tokenizer:
    """The ids the engine needs from a tokenizer (prompts are given as ids)."""

    pad_token_id, eos_token_id = PAD, EOS

    def __len__(self):
        return VOCAB


def _llama():
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                    pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    return LlamaForCausalLM(LlamaConfig(**settings)), LlamaForSequenceClassification(
        LlamaConfig(**settings, num_labels=1))


def _gpt2():
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, n_embd=16, n_inner=32, n_layer=1, n_head=2, n_positions=32,
                    pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)  # stock dropout (0.1) kept
    policy, reward = GPT2LMHeadModel(GPT2Config(**settings)), GPT2ForSequenceClassification(
        GPT2Config(**settings, num_labels=1))
    assert policy.config.resid_pdrop > 0 and reward.config.pad_token_id == PAD
    return policy, reward


FAMILIES = {"llama": _llama, "gpt2": _gpt2}
_TEMPLATES = {}


def fresh_models(family):
    """Untrained (policy, reward model) of ``family``: copies of one template per family."""
    if family not in _TEMPLATES:
        _TEMPLATES[family] = FAMILIES[family]()
    return tuple(copy.deepcopy(m) for m in _TEMPLATES[family])


def prompts(step):
    g = torch.Generator().manual_seed(step)
    return [torch.randint(3, VOCAB, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
            for _ in range(PROMPTS)]


def ptx_batch(rows):
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, VOCAB, (rows, 6), generator=g)
    return ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)


# Checks ----------------------------------------------------------------------------------


def _settings(case, tmp_dir="/nonexistent"):
    return {**BASE, **{k: (f"{tmp_dir}/profile" if v == TMP else v) for k, v in case.items()}}


def _refusal(case):
    """The ValueError message of building ``case``, or None when it builds."""
    try:
        EngineConfig(**_settings(case))
    except ValueError as error:
        return str(error)
    return None


def _named(field, message):
    return re.search(rf"\b{re.escape(field)}\b", message) or field.replace("_", " ") in message


# A refusal says what to do instead: the valid range or choices, or an alternative.
_SUGGESTS = re.compile(r"\b(use|or|must|set|raise|lower|start from|needs?|one of|expected|are)\b")


def check_refusal(case, message):
    """The message names the fields that cause the refusal -- those whose
    return to the default makes the case build -- (at least one field of the
    case when no single one does), and suggests something."""
    necessary = [k for k in case if _refusal({f: v for f, v in case.items() if f != k}) is None]
    missing = [k for k in necessary if not _named(k, message)]
    assert not missing, f"the refusal does not name {missing}: {message!r}"
    assert any(_named(k, message) for k in case), f"the refusal names no field of {sorted(case)}: {message!r}"
    assert _SUGGESTS.search(message), f"the refusal suggests no alternative: {message!r}"


def _snapshot(model):
    return None if model is None else [p.detach().clone() for p in model.parameters()]


def _changed(model, before):
    return any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def _numbers(metrics):
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_case(family, case, tmp_path):
    cfg = EngineConfig(**_settings(case, tmp_path))
    policy, reward = fresh_models(family)
    engine = RLHFEngine(policy, Tokenizer(), cfg, reward_model=reward)
    before = {"policy": _snapshot(engine.policy), "critic": _snapshot(engine.critic)}
    ptx = ptx_batch(engine.updates_per_iteration(PROMPTS)) if cfg.ptx_coef > 0 else None
    for step in range(STEPS):
        metrics = engine.step(prompts(step), ptx_batch=ptx)
        bad = {k: v for k, v in _numbers(metrics).items() if not math.isfinite(v)}
        assert not bad, f"step {step + 1}: non-finite metrics {bad}"
        assert metrics["updates/applied"] > 0, f"step {step + 1}: no update applied ({metrics['updates/skipped']} " \
                                               f"skipped)"
        assert metrics["kl/coef"] >= 0, f"step {step + 1}: negative KL coefficient {metrics['kl/coef']}"
        if cfg.ptx_coef > 0 and step >= cfg.critic_warmup_iterations:
            assert "ptx/loss" in metrics, f"step {step + 1}: ptx_coef > 0 but no ptx loss"
        if cfg.kl_in == "loss" and step >= cfg.critic_warmup_iterations:
            assert "policy/kl_loss" in metrics, f"step {step + 1}: kl_in='loss' but no KL loss"
    policy_trains = cfg.lr > 0 and STEPS > cfg.critic_warmup_iterations
    critic_trains = cfg.uses_critic and cfg.critic_lr > 0
    changed = {"policy": _changed(engine.policy, before["policy"]),
               "critic": engine.critic is not None and _changed(engine.critic, before["critic"])}
    if cfg.lr == 0 and (not cfg.uses_critic or cfg.critic_lr == 0):  # a deliberate dry run (e.g. dropout checks)
        assert not changed["policy"] and not changed["critic"], "learning rates of 0 changed the weights"
        return
    assert changed["policy"] or changed["critic"], "two PPO steps changed no trained weight (nothing trains)"
    if policy_trains:
        assert changed["policy"], f"lr={cfg.lr} > 0 but the policy's weights did not change"
    if critic_trains:
        assert changed["critic"], f"critic_lr={cfg.critic_lr} > 0 but the critic's weights did not change"
    if not policy_trains:
        assert not changed["policy"], "the policy changed though it does not train"


def check_case(family, case, tmp_path):
    message = _refusal(case)
    if message is not None:
        if len(case) == 1:
            (name, value), = case.items()
            assert not (value is None and _optional(name)), f"{name} is Optional but None is refused: {message!r}"
        check_refusal(case, message)
    else:
        run_case(family, case, tmp_path)


def _params(family, cases):
    return [pytest.param(family, case, id=f"{family}-{_case_id(case)}",
                         marks=[pytest.mark.xfail(strict=True, reason=KNOWN[_case_id(case)])]
                         if _case_id(case) in KNOWN else [])
            for case in cases]


# Tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family, case", _params("llama", ALL_CASES) + _params("gpt2", FAMILY_CASES))
def test_config_case(family, case, tmp_path):
    check_case(family, case, tmp_path)


def test_base_config_runs_on_both_families(tmp_path):
    for family in FAMILIES:
        run_case(family, {}, tmp_path)


def test_every_field_is_covered():
    covered = set(config_module._CHOICES) | set(BOOLS) | set(NUMBERS) | set(OTHER_PROBES)
    missing = sorted(set(FIELDS) - covered)
    assert not missing, f"EngineConfig fields without probes in this matrix: {missing}"
    assert not sorted(covered - set(FIELDS)), "probes of fields EngineConfig no longer has"
    for name, choices in config_module._CHOICES.items():
        assert FIELDS[name].default in choices, name
    EngineConfig()  # the defaults build


def test_every_field_has_help():
    for f in dataclasses.fields(EngineConfig):
        text = f.metadata.get("help")
        assert isinstance(text, str) and text.strip(), f"{f.name} has no help text"
