"""The end-to-end PPO benchmark: one fixed work definition, timed per phase.

The work (issue #5; TRL's PPO trainer runs the same work beside it):
a Llama-style policy of size *tiny* (hidden 128, 2 layers, 4 heads, MLP 1024)
or *small* (hidden 512, 6 layers, 8 heads, MLP 1536), or a Qwen3-style
*medium* (~151M parameters, hidden 768, 16 layers, 12 query / 4 key-value
heads, MLP 2048, a 32768-row vocabulary: see
:data:`rlhf_engine.models.builders.SIZES`); a byte-level tokenizer
of 450 tokens; a reward model and a critic of the same backbone (the critic
initialised from the reward model); float32 (overrides: ``dtype="bfloat16"``
for bf16 autocast, ``lora_r`` for LoRA adapters on the policy and critic);
8 prompts of exactly 16 tokens (every size);
exactly 32 new tokens per response (no early stop), temperature 1; k1 KL
penalty in the reward with coefficient 0.05; GAE with gamma 1, lambda 0.95;
advantage whitening; old log-probs taken from the rollout (no recomputing
forward); 2 PPO epochs x 2 mini-batches of 4 (4 optimizer steps, each a
forward and backward of policy and critic); AdamW at 3e-6. ``warmup``
iterations (one by default) run first and are excluded from the
measurement.

Reported: ``seconds_per_iteration`` (mean over the measured iterations),
``phases`` (mean seconds of each of ``rollout``, ``score``, ``advantages``
and ``learn``),
``tokens_per_second`` (generated tokens per second of a whole iteration),
``rollout_tokens_per_second`` (during the rollout phase alone),
``peak_rss_mib`` (the largest peak resident set size seen: the process's
peak up to the end of model building, then each phase's peak in the warm-up
and measured iterations; see rlhf_engine/engine/metrics.py),
``loadavg_1min`` (the 1-minute load average at the start and end of the
measured iterations), and ``size``, ``iterations``, ``warmup``,
``iteration_seconds``, ``machine``, ``torch_threads`` and ``config`` (the
engine's settings).
"""
import os
import platform
import statistics

import torch

from rlhf_engine.engine import EngineConfig, RLHFEngine
from rlhf_engine.profiling import rss_peak_mib
from rlhf_engine.models.builders import build_policy, build_reward_model
from rlhf_engine.models.tokenizer import byte_tokenizer

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 16, 32


def ppo_work_config(**overrides):
    """The benchmark's :class:`EngineConfig` (overrides for experiments)."""
    settings = dict(device="cpu", dtype="float32", max_new_tokens=NEW_TOKENS, stop_at_eos=False, temperature=1.0,
                    kl_in="reward", kl_estimator="k1", kl_coef=0.05, gamma=1.0, lam=0.95, whiten_advantages=True,
                    ppo_epochs=2, mini_batch_size=4, lr=3e-6, critic_lr=3e-6, critic_init="reward",
                    old_logprobs="rollout", seed=0)
    settings.update(overrides)
    return EngineConfig(**settings)


def ppo_work(size, **overrides):
    """``(engine, prompt_batches)``: the benchmark's engine at ``size`` and an
    endless source of ``[8, 16]`` prompt-id batches (a fixed seed)."""
    tokenizer = byte_tokenizer()
    policy = build_policy(size, tokenizer, seed=0)
    reward = build_reward_model(size, tokenizer, seed=1)
    engine = RLHFEngine(policy, tokenizer, ppo_work_config(**overrides), reward_model=reward)
    return engine, ((ids, torch.ones_like(ids, dtype=torch.bool)) for ids in prompt_batches(tokenizer))


def prompt_batches(tokenizer):
    """The work's endless stream of ``[8, 16]`` prompt-id batches: uniform
    non-special tokens from a generator seeded with 1234 (TRL's side of the
    comparison draws the same)."""
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(1234)
    while True:
        yield allowed[torch.randint(len(allowed), (PROMPTS, PROMPT_TOKENS), generator=generator)]


def run_ppo_bench(size, iterations=3, warmup=1, **overrides):
    """Run the work; returns the report dict described in the module docstring."""
    engine, batches = ppo_work(size, **overrides)
    build_peak = rss_peak_mib()
    warm = [engine.step(next(batches)) for _ in range(warmup)]
    loadavg_start = os.getloadavg()[0]
    measured = [engine.step(next(batches)) for _ in range(iterations)]
    phases = ("rollout", "score", "advantages", "learn")
    mean = statistics.fmean
    return {
        "size": size,
        "iterations": iterations,
        "warmup": warmup,
        "seconds_per_iteration": mean(m["time/step"] for m in measured),
        "iteration_seconds": [m["time/step"] for m in measured],
        "phases": {p: mean(m[f"time/{p}"] for m in measured) for p in phases},
        "tokens_per_second": mean(m["tokens_per_second"] for m in measured),
        "rollout_tokens_per_second": mean(m["rollout_tokens_per_second"] for m in measured),
        "peak_rss_mib": max([build_peak] + [m["memory/peak_rss_mib"] for m in warm + measured]),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": {"start": loadavg_start, "end": os.getloadavg()[0]},
        "config": {k: v for k, v in engine.config.to_dict().items() if v is not None},
    }
