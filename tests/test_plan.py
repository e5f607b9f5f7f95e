"""The memory planner (rlhf_engine.plan) against hand-computed arithmetic,
real models' parameter counts, and the engine's measured allocations.

What is compared with the engine: on the CPU the engine's own phase metric
(``memory/<phase>_mib``, PhaseRecorder) is the process's peak resident set
size, which includes the interpreter, torch's libraries and freed memory
malloc keeps, so it cannot be compared with a count of tensor bytes. The
agreement test measures what the plan predicts -- the peak of live tensor
bytes in each phase -- with the profiler's allocation events (as
rlhf_engine.profiling.peak_memory does), starting from the bytes of the
models' parameters and buffers and the optimizer states resident when the
iteration starts, and labels the phases by wrapping the engine's
PhaseRecorder. The policy's and critic's learn passes run one after the
other (``concurrent_models=False``): the profiler does not see the
allocations of the engine's side-by-side lane threads.
"""
import contextlib
import dataclasses

import pytest
import torch

from rlhf_engine import plan as planner
from rlhf_engine.bench import NEW_TOKENS, PROMPT_TOKENS, PROMPTS, ppo_work, ppo_work_config
from rlhf_engine.engine import EngineConfig
from rlhf_engine.engine import engine as engine_module
from rlhf_engine.engine.metrics import PhaseRecorder
from rlhf_engine.models.builders import build_policy, build_reward_model
from rlhf_engine.models.tokenizer import byte_tokenizer

MIB = 2**20
CPU_BUDGET = 256 << 20  # the log-prob op's chunk budget on the CPU (rlhf_engine.ops.linear_logprobs)


# Measuring the engine -----------------------------------------------------------------------


class _LabelledPhases(PhaseRecorder):
    """The engine's recorder, each phase also a profiler range ``phase/<name>``."""

    @contextlib.contextmanager
    def phase(self, name):
        with torch.profiler.record_function(f"phase/{name}"), super().phase(name):
            yield


def _resident_bytes(engine):
    """Bytes of the distinct storages of the engine's models and optimizer states."""
    storages = {}
    tensors = [t for m in (engine.policy, engine.ref, engine.reward, engine.critic) if m is not None
               for t in (*m.parameters(), *m.buffers())]
    tensors += [v for o in engine.optimizers.values() for s in o.state.values() for v in s.values()
                if isinstance(v, torch.Tensor)]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def measured_phase_peaks(engine, prompts, monkeypatch):
    """``{phase: peak live tensor bytes}`` of ``engine.step(prompts)``."""
    start = _resident_bytes(engine)
    monkeypatch.setattr(engine_module, "PhaseRecorder", _LabelledPhases)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.step(prompts)
    events = list(prof.profiler.kineto_results.events())
    windows = {e.name()[len("phase/"):]: (e.start_ns(), e.start_ns() + e.duration_ns())
               for e in events if e.name().startswith("phase/")}
    peaks, live = dict.fromkeys(windows, start), start
    for at, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        for phase, (begin, end) in windows.items():
            if begin <= at <= end:
                peaks[phase] = max(peaks[phase], live)
    return peaks


# The small and medium sizes take minutes here: their agreement is recorded in
# benchmarks/results/intel-xeon/plan.md (measured with this function).
@pytest.mark.parametrize("size,overrides", [
    ("tiny", {}),
    ("tiny", {"micro_batch_size": 2, "gradient_checkpointing": True}),
])
def test_plan_agrees_with_the_engine_within_15_percent(size, overrides, monkeypatch):
    overrides = dict(concurrent_models=False, **overrides)
    predicted = planner.plan_from_specs(size, None, ppo_work_config(**overrides),
                                        planner.Work(PROMPTS, PROMPT_TOKENS, NEW_TOKENS), device="cpu",
                                        budget=CPU_BUDGET).peaks
    engine, batches = ppo_work(size, **overrides)
    engine.step(next(batches))  # the optimizer states exist from the first update on
    measured = measured_phase_peaks(engine, next(batches), monkeypatch)
    for phase in planner.PHASES:
        ratio = predicted[phase] / measured[phase]
        assert abs(ratio - 1) <= 0.15, (f"{size} {overrides} {phase}: predicted {predicted[phase] / MIB:.2f} MiB, "
                                        f"measured {measured[phase] / MIB:.2f} MiB")


# The arithmetic -------------------------------------------------------------------------------


def _toy_shape(**fields):
    shape = dict(params=1000, buffers=0, layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4,
                 vocab=50, linears={"q_proj": ((8, 8),) * 2, "v_proj": ((8, 4),) * 2, "up_proj": ((8, 16),) * 2},
                 head_params=400)
    shape.update(fields)
    return planner.ModelShape(**shape)


def test_lora_params_by_hand():
    shape = _toy_shape()
    assert planner.lora_params(shape, 2, ["q_proj"]) == 2 * 2 * (8 + 8)
    assert planner.lora_params(shape, 4) == 2 * 4 * ((8 + 8) + (8 + 4) + (8 + 16))


def test_full_plan_items_by_hand():
    policy, reward = _toy_shape(), _toy_shape(params=600, head_params=8)
    config = EngineConfig(device="cpu", mini_batch_size=2, max_new_tokens=6)
    plan = planner.plan_memory(policy, reward, config, planner.Work(2, 4, 6))
    learn = plan.items["learn"]
    assert learn["policy weights"] == learn["ref weights"] == 1000 * 4
    assert learn["reward weights"] == learn["critic weights"] == 600 * 4
    assert learn["policy AdamW states"] == 2 * 1000 * 4 and learn["critic AdamW states"] == 2 * 600 * 4
    assert learn["policy gradients"] == 1000 * 4 and learn["critic gradients"] == 600 * 4
    # layers x (keys, values) x kv_heads x head_dim x (prompt + new tokens) x batch x float32
    assert plan.items["rollout"]["KV cache"] == 2 * 2 * 1 * 4 * (4 + 6) * 2 * 4
    assert "KV cache" not in plan.items["score"] and "policy gradients" not in plan.items["score"]
    assert plan.peaks["learn"] == sum(learn.values())


def test_lora_plan_shares_the_base_weights():
    shape, reward = _toy_shape(), _toy_shape(params=600, head_params=8)
    adapters, critic_adapters = planner.lora_params(shape, 2), planner.lora_params(reward, 2)
    work = planner.Work(2, 4, 6)
    config = EngineConfig(device="cpu", lora_r=2, max_new_tokens=6)
    learn = planner.plan_memory(shape, reward, config, work).items["learn"]
    assert set(k for k in learn if "weights" in k) == {"policy + reference weights (shared)",
                                                     "critic + reward weights (shared)"}
    assert learn["policy + reference weights (shared)"] == (1000 + adapters) * 4
    # the reward model's base, the critic's adapters and its own value head
    assert learn["critic + reward weights (shared)"] == (600 + critic_adapters + 8) * 4
    assert learn["policy AdamW states"] == 2 * adapters * 4 and learn["critic gradients"] == (critic_adapters + 8) * 4
    # offloaded in rollout, the critic takes the shared base with it
    offloaded = planner.plan_memory(shape, reward, dataclasses.replace(config, offload=True), work)
    assert "critic + reward weights (shared)" not in offloaded.items["rollout"]
    # a critic from the policy's body is a third copy; the reward model keeps its own
    third = planner.plan_memory(shape, reward, dataclasses.replace(config, critic_init="policy"), work,
                                critic=_toy_shape(params=1000, head_params=8)).items["learn"]
    critic_adapters = planner.lora_params(_toy_shape(params=1000, head_params=8), 2)
    assert third["critic weights"] == (1000 + critic_adapters + 8) * 4 and third["reward weights"] == 600 * 4


def test_bf16_autocast_halves_the_kv_cache_and_caches_trained_weights():
    shape = _toy_shape()
    work = planner.Work(2, 4, 6)
    fp32 = planner.plan_memory(shape, shape, EngineConfig(device="cpu", max_new_tokens=6), work)
    bf16 = planner.plan_memory(shape, shape, EngineConfig(device="cpu", max_new_tokens=6, dtype="bfloat16"), work)
    assert bf16.items["rollout"]["KV cache"] * 2 == fp32.items["rollout"]["KV cache"]
    assert bf16.items["learn"]["autocast bf16 weight cache"] == 2 * (1000 + 1000)
    held = planner.plan_memory(shape, shape, EngineConfig(device="cpu", max_new_tokens=6), work,
                               weights_dtype="bfloat16")
    assert held.items["learn"]["policy AdamW states"] == 2 * 1000 * 2


def test_learn_peak_by_hand():
    passes = [(10, 4), (3, 5)]  # (activations, gradients): policy, then critic
    assert planner.learn_peak(passes, side_by_side=False, accumulates=False) == max(10, 4 + 5)
    assert planner.learn_peak(passes, side_by_side=True, accumulates=False) == 10 + 5
    assert planner.learn_peak(passes, side_by_side=False, accumulates=True) == 9 + 10
    assert planner.learn_peak(passes, side_by_side=True, accumulates=True) == 9 + 13


def test_offload_keeps_only_what_each_phase_uses():
    shape = _toy_shape()
    plan = planner.plan_memory(shape, shape, EngineConfig(device="cpu", offload=True, max_new_tokens=6),
                               planner.Work(2, 4, 6))
    assert set(k for k in plan.items["rollout"] if k.endswith("weights")) == {"policy weights"}
    assert "ref weights" not in plan.items["learn"] and "policy AdamW states" not in plan.items["score"]
    assert "policy AdamW states" in plan.items["learn"]


def test_meta_counts_match_built_models():
    tokenizer = byte_tokenizer()
    for size in ("tiny", "medium"):
        config = planner.resolve_config(size)
        built = [build_policy(size, tokenizer), build_reward_model(size, tokenizer)]
        for model, kind in zip(built, ("causal", "scalar")):
            shape = planner.model_shape(config, kind)
            assert shape.params == sum(p.numel() for p in model.parameters())
            assert shape.buffers == sum(b.numel() for b in model.buffers())


def test_lora_counts_match_peft():
    pytest.importorskip("peft")
    from rlhf_engine.models.lora import LoraOptions, add_lora

    tokenizer = byte_tokenizer()
    shape = planner.model_shape(planner.resolve_config("tiny"), "causal")
    options = LoraOptions(lora_r=4)
    model = add_lora(build_policy("tiny", tokenizer), options)
    assert planner.lora_params(shape, 4) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    scalar = add_lora(build_reward_model("tiny", tokenizer), options, scalar=True)
    reward = planner.model_shape(planner.resolve_config("tiny"), "scalar")
    trained = sum(p.numel() for p in scalar.parameters() if p.requires_grad)
    assert planner.lora_params(reward, 4) + reward.head_params == trained


def test_presets_have_the_published_parameter_counts():
    assert planner.model_shape(planner.resolve_config("llama-3-8b"), "causal").params == 8_030_261_248
    assert planner.model_shape(planner.resolve_config("qwen2.5-7b"), "causal").params == 7_615_616_512


# Inputs and the command --------------------------------------------------------------------------


def test_model_folder_reads_config_json_only(tmp_path):
    tokenizer = byte_tokenizer()
    build_policy("tiny", tokenizer).config.save_pretrained(tmp_path)  # no weights written
    assert planner.resolve_config(str(tmp_path)).hidden_size == 128


@pytest.mark.parametrize("call,message", [
    (lambda: planner.resolve_config("nope"), "not a model folder"),
    (lambda: planner.parse_gpu_memory("80XB"), "--gpu_memory"),
    (lambda: planner.parse_gpu_memory("0GB"), "> 0"),
    (lambda: planner.Work(0, 16, 32), "batch must be an int >= 1"),
    (lambda: planner.lora_params(_toy_shape(), 4, ["w_proj"]), "does not have"),
    (lambda: planner.lora_params(_toy_shape(), 0), "lora_r"),
])
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_gpu_memory_units():
    assert planner.parse_gpu_memory("80GB") == 80 * 10**9
    assert planner.parse_gpu_memory("24GiB") == 24 * 2**30
    assert planner.parse_gpu_memory("500 MiB") == 500 * 2**20


def test_cli_plan_fits_and_suggests(capsys):
    from rlhf_engine.cli import main

    assert main(["plan", "--policy", "tiny", "--gpu_memory", "1GB"]) == 0
    assert "fits one GPU" in capsys.readouterr().out
    assert main(["plan", "--policy", "small", "--gpu_memory", "700MB"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "--offload" in out and "fits" in out.split("settings that lower it")[1]
    assert main(["plan", "--policy", "nope"]) == 2
    assert "rlhf-engine plan: error:" in capsys.readouterr().err
    assert main(["plan", "--policy", "tiny", "--micro_batch_size", "16"]) == 2
