"""TRL's PPO trainer on the engine benchmark's fixed work (issue #5), the
reference side of ``rlhf-engine bench ppo``.

The work is :mod:`rlhf_engine.bench`'s, built with this project's builders:
the policy of ``--size`` (tiny / small), the byte-level tokenizer, the reward
model, and a critic copied from the reward model (``critic_from``, as the
engine's ``critic_init="reward"``); float32 on the CPU; 8 prompts of 16
tokens drawn as the engine benchmark draws them; exactly 32 new tokens
(``stop_token=None``: no EOS stop), temperature 1, the old log-probs the
sampler's own (the engine's ``old_logprobs="rollout"``); k1 KL in the reward at
0.05; GAE gamma 1, lambda 0.95; advantage whitening (TRL always whitens
advantages; rewards are not whitened); 2 PPO epochs x 2 mini-batches of 4
(``per_device_train_batch_size=8``, ``num_mini_batches=2``, no gradient
accumulation: 4 optimizer steps per iteration, each one forward and
backward of policy and critic on [4, 48] tokens); fused AdamW at the
engine's lr / betas / weight decay, constant schedule. The hyperparameters
are read from :func:`rlhf_engine.bench.ppo_work_config`, so both sides stay
in step. No evaluation, sample generations, saving, or reporting.

Timing: ``PPOTrainer.train`` is one method that runs every iteration; a
callback stamps ``time.perf_counter()`` at ``on_train_begin`` and at each
``on_step_end`` (called once per iteration, after its optimizer steps,
logging and lr-scheduler step). Iteration i takes stamp[i] - stamp[i - 1],
so each interval holds one whole iteration, including TRL's per-iteration
``gc.collect()`` (the previous iteration's tail) and its data loading. The
first ``--warmup`` intervals are excluded. Forward pre-hooks on the policy
and the reward model record the shapes TRL really feeds them and an
optimizer step hook counts the steps (``work`` in the report); they cost
microseconds per call. ``peak_rss_mib`` is the process's VmHWM at the end
(imports, model building, warm-up and measurement), as the engine's bench.

Setup: ``scripts/trl_env.sh`` (default ``/tmp/trlvenv``) makes a separate
venv that sees the project venv's packages (torch, transformers, accelerate,
datasets, peft) through a ``.pth`` file (the same builds) and adds TRL 1.12,
the last release with a PPO trainer (``trl.experimental.ppo``); nothing goes
into ``.venv``. Both sides, one after the other, on the same machine in the same session, with
the same thread count (each report's ``torch_threads`` says what ran)::

    cd /work/main
    OMP_NUM_THREADS=2 .venv/bin/python -m rlhf_engine.cli bench ppo --size tiny --json /tmp/engine_tiny.json
    OMP_NUM_THREADS=2 /tmp/trlvenv/bin/python benchmarks/engine/trl_ppo.py --size tiny --threads 2 \\
        --json /tmp/trl_tiny.json

and ``--size small`` likewise (3 measured iterations after 1 warm-up on
both sides by default). The report also carries the 1-minute load average
at the start and end of the measurement: timings on a loaded machine are
not comparable.
"""
import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the warning on importing trl.experimental
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: rlhf_engine

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402  (TRL 1.12: the last release with it)
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, ProgressCallback, TrainerCallback  # noqa: E402

from rlhf_engine.bench import NEW_TOKENS, PROMPT_TOKENS, PROMPTS, ppo_work_config, prompt_batches  # noqa: E402
from rlhf_engine.profiling import rss_peak_mib  # noqa: E402
from rlhf_engine.models.builders import build_policy, build_reward_model  # noqa: E402
from rlhf_engine.models.scalar_heads import critic_from  # noqa: E402
from rlhf_engine.models.tokenizer import byte_tokenizer  # noqa: E402


def prompt_ids(tokenizer, batches):
    """``[batches * 8, 16]``: the engine benchmark's first ``batches`` prompt batches."""
    return torch.cat(list(itertools.islice(prompt_batches(tokenizer), batches)))


def ppo_config(iterations, output_dir):
    """TRL's ``PPOConfig`` for the work, ``iterations`` iterations of 8 prompts."""
    cfg = ppo_work_config()
    return PPOConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", eval_strategy="no",
        num_sample_generations=0, disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed,
        total_episodes=PROMPTS * iterations, per_device_train_batch_size=PROMPTS, gradient_accumulation_steps=1,
        num_mini_batches=PROMPTS // cfg.mini_batch_size, num_ppo_epochs=cfg.ppo_epochs,
        local_rollout_forward_batch_size=PROMPTS,
        response_length=cfg.max_new_tokens, temperature=cfg.temperature, stop_token=None, stop_token_id=None,
        missing_eos_penalty=None,
        kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam, whiten_rewards=False,
        cliprange=cfg.clip_low, cliprange_value=cfg.value_clip,
        optim="adamw_torch_fused", learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_eps,
    )


class WorkRecorder(TrainerCallback):
    """Per iteration: the ``perf_counter`` stamp at its end, the shapes
    (``"BxT"``) of the policy's forwards with gradient and the count of those
    without (sampling), the reward model's input shapes, the pad tokens
    sampled into responses (TRL ends a response at its first pad token:
    masks only, the forwards keep their shapes) and the optimizer steps."""

    def __init__(self):
        self.stamps, self.iterations, self.current = [], [], self._fresh()

    @staticmethod
    def _fresh():
        return {"policy_train_inputs": [], "policy_no_grad_forwards": 0, "reward_inputs": [],
                "response_pad_tokens": 0, "optimizer_steps": 0}

    def attach(self, policy, reward_model, optimizer):
        policy.register_forward_pre_hook(self._policy_forward, with_kwargs=True)
        reward_model.model.register_forward_pre_hook(self._reward_forward, with_kwargs=True)
        optimizer.register_step_post_hook(self._optimizer_step)

    def _policy_forward(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self.current["policy_train_inputs"].append(_shape(kwargs["input_ids"]))
        else:
            self.current["policy_no_grad_forwards"] += 1

    def _reward_forward(self, module, args, kwargs):
        self.current["reward_inputs"].append(_shape(kwargs["input_ids"]))
        self.current["response_pad_tokens"] += int((~kwargs["attention_mask"][:, PROMPT_TOKENS:]).sum())

    def _optimizer_step(self, optimizer, args, kwargs):
        self.current["optimizer_steps"] += 1

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())
        self.iterations.append(self.current)
        self.current = self._fresh()

    def seconds(self):
        """Seconds of each finished iteration."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def _shape(t):
    return "x".join(map(str, t.shape))


def run_trl_ppo_bench(size, iterations=3, warmup=1):
    """Run TRL's PPO trainer on the work; the report dict (module docstring)."""
    tokenizer = byte_tokenizer()
    policy = build_policy(size, tokenizer, seed=0)
    reward = build_reward_model(size, tokenizer, seed=1)
    critic = critic_from(reward)
    total = warmup + iterations
    dataset = Dataset.from_dict({"input_ids": prompt_ids(tokenizer, total).tolist()})
    recorder = WorkRecorder()
    # TRL prints progress to stdout; stdout is kept for the report.
    with tempfile.TemporaryDirectory() as output_dir, contextlib.redirect_stdout(sys.stderr):
        trainer = PPOTrainer(args=ppo_config(total, output_dir), processing_class=tokenizer, model=policy,
                                 ref_model=None, reward_model=reward, value_model=critic, train_dataset=dataset,
                                 callbacks=[recorder])
        for printer in (PrinterCallback, ProgressCallback):  # console output only
            trainer.remove_callback(printer)
        recorder.attach(policy, reward, trainer.optimizer.optimizer)
        build_peak = rss_peak_mib()
        loadavg_start = os.getloadavg()[0]
        trainer.train()
    seconds = recorder.seconds()
    if len(seconds) != total:
        raise RuntimeError(f"expected {total} iterations, TRL ran {len(seconds)}")
    measured = seconds[warmup:]
    per_iteration = statistics.fmean(measured)
    return {
        "framework": "trl",
        "size": size,
        "iterations": iterations,
        "warmup": warmup,
        "seconds_per_iteration": per_iteration,
        "iteration_seconds": measured,
        "tokens_per_second": PROMPTS * NEW_TOKENS / per_iteration,
        "peak_rss_mib": rss_peak_mib(),
        "build_peak_rss_mib": build_peak,
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": {"start": loadavg_start, "end": os.getloadavg()[0]},
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "work": recorder.iterations[warmup:],
        "config": {k: getattr(trainer.args, k) for k in (
            "batch_size", "mini_batch_size", "num_mini_batches", "num_ppo_epochs", "gradient_accumulation_steps",
            "response_length", "temperature", "stop_token", "stop_token_id", "kl_coef", "kl_estimator", "gamma",
            "lam", "whiten_rewards", "cliprange", "cliprange_value", "vf_coef", "learning_rate", "optim",
            "lr_scheduler_type", "bf16", "gradient_checkpointing")},
    }


def check_work(report):
    """Raise if any measured iteration did other work than the benchmark's:
    reward inputs ``[8, 16 + 32]``, four policy training forwards of
    ``[4, 48]``, four optimizer steps."""
    cfg, length = ppo_work_config(), PROMPT_TOKENS + NEW_TOKENS
    steps = cfg.ppo_epochs * PROMPTS // cfg.mini_batch_size
    expected = {"reward_inputs": [f"{PROMPTS}x{length}"],
                "policy_train_inputs": [f"{cfg.mini_batch_size}x{length}"] * steps, "optimizer_steps": steps}
    for i, work in enumerate(report["work"]):
        wrong = {k: work[k] for k, v in expected.items() if work[k] != v}
        if wrong:
            raise RuntimeError(f"measured iteration {i} did other work than the benchmark's: {wrong}, "
                               f"expected {expected}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny", help="Model size of the work.")
    parser.add_argument("--iterations", type=int, default=3, help="Measured iterations (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=1, help="Warm-up iterations, not measured.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--json", default=None, help="Write the report here as JSON.")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = run_trl_ppo_bench(args.size, iterations=args.iterations, warmup=args.warmup)
    check_work(report)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
