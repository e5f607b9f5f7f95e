"""The rollout sampler (rlhf_engine.engine.rollout.sample) against
``model.generate`` on the same model, prompts and sampling settings.

Both draw exactly ``NEW`` tokens per prompt at temperature 1 with top-k and
top-p off (generate: ``do_sample=True, top_k=0, top_p=1.0,
min_new_tokens=max_new_tokens``; the sampler: ``stop_at_eos=False``), from
float32 Llama models with random weights built from configs, ``B`` prompts
of exactly ``P`` tokens.

A model-level call does not fit harness.run (an op's byte model, its results
files), so this file times with pytest-benchmark directly. The machine is
shared and its load drifts over seconds, so the two are interleaved: before
every timed round of the sampler (pytest-benchmark's numbers), a round of
generate runs in the untimed ``setup`` and is timed by hand. Both medians, both
minimums and the speed-up (generate's median / the sampler's) go to
``extra_info`` and to the table printed at the end of the module (``-s``).

On the CPU each case also runs with one torch thread: on a small shared
machine a decode step of a tiny model is many short parallel regions, and a
thread that loses its core to another process stalls every one of them.

``test_rollout_vllm`` (where vLLM is installed, e.g. ``.venv-vllm``: see
scripts/vllm_env.sh) adds the engine's vLLM backend
(rlhf_engine/engine/vllm_rollout.py) on the same models and prompts: its
start-up, the per-rollout weight sync and the rollout itself reported
separately, interleaved with the engine's sampler and ``generate``; then
whole PPO iterations of the PPO benchmark's work (rlhf_engine/bench.py) with
each backend, sync time apart. Printed at the end of the module (``-s``).
"""
import math
import statistics
import time
from typing import NamedTuple

import pytest
import torch
import transformers

import harness
from rlhf_engine.engine.rollout import SamplingParams, sample
from rlhf_engine.engine.vllm_rollout import vllm_missing_reason

DEV = harness.device()
B, P, NEW = 8, 16, 32
VOCAB, PAD, EOS = 450, 0, 2
# Timed rounds: ceil(budget / one call), clamped to [min, max].
ROUNDS = {"cpu": dict(warmup=1, budget_s=8.0, min_rounds=3, max_rounds=15),
          "cuda": dict(warmup=3, budget_s=2.0, min_rounds=10, max_rounds=50)}[DEV.type]
THREADS = sorted({1, torch.get_num_threads()}) if DEV.type == "cpu" else [torch.get_num_threads()]


class Case(NamedTuple):
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def build(self):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=self.hidden, num_hidden_layers=self.layers,
                                          num_attention_heads=self.heads, num_key_value_heads=self.heads,
                                          intermediate_size=self.intermediate, max_position_embeddings=P + NEW,
                                          pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
        return transformers.LlamaForCausalLM(config).to(DEV).eval()


CASES = [Case("tiny", 128, 2, 4, 1024), Case("small", 512, 6, 8, 1536)]
_results = {}  # (case, threads) -> extra_info of the test
_vllm_results = {}  # case -> medians of the vLLM comparison


def inputs(case):
    def make():
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, VOCAB, (B, P), generator=g).to(DEV)
        return case.build(), ids, torch.ones_like(ids, dtype=torch.bool)
    return harness.cached_inputs(case.name, make)


def generate_fn(model, ids, mask):
    def call():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask.long(), do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=PAD,
                                  eos_token_id=EOS)
    return call


def sample_fn(model, ids, mask):
    params = SamplingParams(max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD, stop_at_eos=False)
    generator = torch.Generator(device=DEV).manual_seed(0)
    return lambda: sample(model, ids, mask, params, generator=generator).sequences


def timed(call):
    """Seconds of one synchronized call; the call's output shape is checked."""
    start = time.perf_counter()
    out = call()
    harness.sync(DEV)
    seconds = time.perf_counter() - start
    assert out.shape == (B, P + NEW)  # both make exactly NEW tokens
    return seconds


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    lines = [f"rollout, B={B}, P={P}, {NEW} new tokens, float32, {harness.machine_name()} "
             "(ms per rollout, interleaved rounds):"]
    for (case, threads), r in _results.items():
        lines.append(f"  {case:6s} {threads} thread(s)  generate median {r['generate_median_s'] * 1e3:8.1f} "
                     f"min {r['generate_min_s'] * 1e3:8.1f}   rlhf_engine median {r['median_s'] * 1e3:8.1f} "
                     f"min {r['min_s'] * 1e3:8.1f}   speed-up {r['speedup_vs_generate']:.2f}x "
                     f"(of minimums {r['speedup_of_min']:.2f}x)")
    for case, r in _vllm_results.items():
        lines.append(f"  {case:6s} vLLM: start-up {r['startup_s']:.1f} s, "
                     f"sync median {r['sync_median_s'] * 1e3:.1f} ms; "
                     f"rollout median ms: vllm {r['vllm_median_s'] * 1e3:.1f}, rlhf_engine "
                     f"{r['engine_median_s'] * 1e3:.1f}, generate {r['generate_median_s'] * 1e3:.1f}; PPO iteration "
                     f"s (sync excluded): vllm {r['ppo_vllm_s']:.2f} (+ sync {r['ppo_vllm_sync_s'] * 1e3:.1f} ms), "
                     f"rlhf_engine {r['ppo_engine_s']:.2f}")
    print("\n" + "\n".join(lines))


@pytest.fixture
def threads(request):
    """Run the test with ``request.param`` torch threads, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("case,threads", [pytest.param(c, t, id=f"{c.name}-{t}thread") for c in CASES
                                          for t in THREADS], indirect=["threads"])
def test_rollout(benchmark, case, threads):
    model, ids, mask = inputs(case)
    reference, candidate = generate_fn(model, ids, mask), sample_fn(model, ids, mask)
    for _ in range(ROUNDS["warmup"]):
        timed(reference)
        timed(candidate)
    one_round = timed(reference) + timed(candidate)
    rounds = min(ROUNDS["max_rounds"], max(ROUNDS["min_rounds"], math.ceil(ROUNDS["budget_s"] / one_round)))
    reference_s = []

    def run_candidate():
        candidate()
        harness.sync(DEV)

    benchmark.group = f"rollout {case.name} {threads} thread(s)"
    benchmark.pedantic(run_candidate, setup=lambda: reference_s.append(timed(reference)), rounds=rounds, iterations=1,
                       warmup_rounds=0)
    if not benchmark.stats:  # --benchmark-disable
        return
    stats = benchmark.stats.stats
    info = dict(torch_threads=threads, median_s=stats.median, min_s=stats.min,
                generate_median_s=statistics.median(reference_s), generate_min_s=min(reference_s))
    info.update(speedup_vs_generate=info["generate_median_s"] / stats.median,
                speedup_of_min=info["generate_min_s"] / stats.min)
    benchmark.extra_info.update(info)
    _results[(case.name, threads)] = info


# On a GPU the comparison that matters: Qwen2.5-0.5B's body (hidden 896, 24 layers, 14 heads, MLP 4864: about
# 0.36B parameters) as a Llama with this file's 450-token vocabulary (Qwen's 151,936 would add 0.14B).
HALF_B = Case("0.5b", 896, 24, 14, 4864)
VLLM_CASES = CASES + ([HALF_B] if DEV.type == "cuda" else [])


@pytest.mark.skipif(vllm_missing_reason() is not None, reason=vllm_missing_reason() or "")
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in VLLM_CASES])
def test_rollout_vllm(case):
    """vLLM beside the engine's sampler and generate (interleaved rounds, the torch threads as they are)."""
    from rlhf_engine.bench import ppo_work
    from rlhf_engine.engine.vllm_rollout import VLLMRollout

    model, ids, mask = inputs(case)
    params = SamplingParams(max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD, stop_at_eos=False)
    vllm = VLLMRollout(model, device=DEV, dtype="float32", kv_cache_bytes=256 << 20, seed=0)
    try:
        vllm.sync(model)
        calls = {"vllm": lambda: vllm.sample(ids, mask, params, seeds=range(B)).sequences,
                 "engine": sample_fn(model, ids, mask), "generate": generate_fn(model, ids, mask)}
        for call in calls.values():
            timed(call)
        times = {name: [] for name in calls}
        sync_s = []
        for _ in range(ROUNDS["min_rounds"] + 2):
            sync_s.append(vllm.sync(model))
            for name, call in calls.items():
                times[name].append(timed(call))
        info = {f"{name}_median_s": statistics.median(t) for name, t in times.items()}
        info.update(startup_s=vllm.startup_seconds, sync_median_s=statistics.median(sync_s))
    finally:
        vllm.close()
    if case.name not in ("tiny", "small"):  # the PPO work is defined at these sizes (rlhf_engine/bench.py)
        _vllm_results[case.name] = dict(info, ppo_vllm_s=math.nan, ppo_vllm_sync_s=math.nan, ppo_engine_s=math.nan)
        return
    size = case.name
    for backend in ("engine", "vllm"):
        extra = {"vllm_kv_cache_bytes": 256 << 20} if backend == "vllm" else {}
        engine, batches = ppo_work(size, rollout_backend=backend, **extra)
        runs = [engine.step(next(batches)) for _ in range(3)][1:]  # the first (start-up) excluded
        info[f"ppo_{backend}_s"] = statistics.fmean(m["time/step"] - m.get("time/sync", 0.0) for m in runs)
        if backend == "vllm":
            info["ppo_vllm_sync_s"] = statistics.fmean(m["time/sync"] for m in runs)
            engine.vllm.close()
    _vllm_results[case.name] = info
