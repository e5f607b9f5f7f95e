"""One PPO iteration of the engine on the fixed work of
:mod:`rlhf_engine.bench` (tiny and small Llama-style models, float32, 8
prompts x 32 new tokens, 2 epochs x 2 mini-batches), split by phase. The
Qwen3-style medium size (~151M parameters) and the LoRA / bf16 variants are
left to the command line (an iteration takes about a minute on 2 cores):
``rlhf-engine bench ppo --size medium [--lora_r R] [--dtype bfloat16]``.

The reference for this work is TRL's PPO trainer, which is not a dependency
of this project: its numbers come from running it beside this benchmark on
the same machine (issue #5). ``rlhf-engine bench ppo --size tiny|small --json
PATH`` runs the same measurement without pytest; benchmarks/engine/compare_trl.py
runs it beside TRL in alternating pairs.
"""
import statistics

import pytest

import harness
from rlhf_engine.bench import ppo_work

ROUNDS = {"cpu": dict(warmup=1, rounds=3), "cuda": dict(warmup=2, rounds=5)}[harness.device().type]


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_ppo_iteration(benchmark, size):
    engine, batches = ppo_work(size, device=str(harness.device()))
    for _ in range(ROUNDS["warmup"]):
        engine.step(next(batches))
    metrics = []
    benchmark.group = f"ppo iteration {size}"
    benchmark.pedantic(lambda: metrics.append(engine.step(next(batches))), rounds=ROUNDS["rounds"], iterations=1,
                       warmup_rounds=0)
    mean = statistics.fmean
    benchmark.extra_info.update({
        "phases_s": {p: mean(m[f"time/{p}"] for m in metrics) for p in ("rollout", "score", "advantages", "learn")},
        "tokens_per_second": mean(m["tokens_per_second"] for m in metrics),
        "rollout_tokens_per_second": mean(m["rollout_tokens_per_second"] for m in metrics),
        "peak_rss_mib": max(m["memory/peak_rss_mib"] for m in metrics),
        "peak_phase_mib": {p: max(m[f"memory/{p}_mib"] for m in metrics) for p in ("rollout", "score", "learn")},
    })
