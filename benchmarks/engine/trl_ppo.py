"""TRL's PPO trainer on the engine benchmark's fixed work (issue #5), the
reference side of ``rlhf-engine bench ppo``.

The work is :mod:`rlhf_engine.bench`'s, built with this project's builders:
the policy of ``--size`` (tiny / small: Llama-style; medium: Qwen3-style,
~151M parameters, 32768-row vocabulary), the byte-level tokenizer, the reward
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

Variants: ``--lora_r R`` passes TRL ``peft_config=LoraConfig(r=R)`` with the
engine's default alpha (16) and dropout (0) on the engine's default target
modules for the model (every linear layer of the body: q/k/v/o_proj and
gate/up/down_proj; :func:`rlhf_engine.models.lora.default_targets`). TRL puts
the adapters on the policy only: its reference is the policy with the
adapters disabled, but its value model stays a separate, fully trained model
and its reward model a separate frozen one. The engine's LoRA puts adapters on
the policy *and* the critic (plus a trainable copy of the critic's score
head), and its reward model is the critic with its adapters off (two copies
of the base weights instead of TRL's three). ``--bf16`` sets TRL's
``bf16=True`` and, since TRL's PPO trainer makes its own ``Accelerator``
without a precision (and transformers 5's ``TrainingArguments`` no longer
passes ``bf16`` on through the environment, so ``bf16=True`` alone leaves
everything in float32), ``ACCELERATE_MIXED_PRECISION=bf16``, as
``accelerate launch --mixed_precision bf16`` sets it: accelerate's bf16
autocast on the CPU. Accelerate wraps the forward of the prepared
policy-and-value wrapper only, so the PPO updates' forwards run under
autocast, while sampling (``policy.generate``) and the
reference / value / reward scoring passes call the models directly and run
in float32 (the report's ``work`` records, per iteration, whether autocast
was on in the policy's forwards with and without gradient). The engine's
``dtype="bfloat16"`` autocasts every phase; both keep float32 weights and
optimizer states.

Phases (``phases``, mean seconds, as the engine's): ``rollout`` is the
iteration's start (the previous iteration's end) to the end of TRL's
``batch_generation`` (timed by wrapping that module function for the run);
``score`` from there to the first policy forward with gradient (reference,
value and reward passes, TRL's ``gc.collect()``, KL-shaped rewards, GAE and
whitening: the engine's ``score`` + ``advantages``); ``learn`` from there to
the iteration's end.

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
from trl.experimental.ppo import ppo_trainer as ppo_module  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, ProgressCallback, TrainerCallback  # noqa: E402

from rlhf_engine.bench import NEW_TOKENS, PROMPT_TOKENS, PROMPTS, ppo_work_config, prompt_batches  # noqa: E402
from rlhf_engine.profiling import rss_peak_mib  # noqa: E402
from rlhf_engine.models.builders import build_policy, build_reward_model  # noqa: E402
from rlhf_engine.models.lora import default_targets  # noqa: E402
from rlhf_engine.models.scalar_heads import critic_from  # noqa: E402
from rlhf_engine.models.tokenizer import byte_tokenizer  # noqa: E402


def prompt_ids(tokenizer, batches):
    """``[batches * 8, 16]``: the engine benchmark's first ``batches`` prompt batches."""
    return torch.cat(list(itertools.islice(prompt_batches(tokenizer), batches)))


def ppo_config(iterations, output_dir, bf16=False):
    """TRL's ``PPOConfig`` for the work, ``iterations`` iterations of 8
    prompts; ``bf16``: accelerate's bf16 autocast (module docstring)."""
    cfg = ppo_work_config()
    return PPOConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", eval_strategy="no",
        num_sample_generations=0, disable_tqdm=True, use_cpu=True, bf16=bf16, fp16=False,
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
    """Per iteration: the ``perf_counter`` stamps of its end, of the end of
    its generation and of its first policy forward with gradient; the shapes
    (``"BxT"``) of the policy's forwards with gradient and the count of those
    without, whether autocast was on in either kind, the reward model's input
    shapes, the pad tokens sampled into responses (TRL ends a response at its
    first pad token: masks only, the forwards keep their shapes) and the
    optimizer steps; and the 1-minute load average when the measurement
    starts (after ``warmup`` iterations)."""

    def __init__(self, warmup):
        self.warmup, self.loadavg_start = warmup, None
        self.stamps, self.iterations, self.current = [], [], self._fresh()

    @staticmethod
    def _fresh():
        return {"policy_train_inputs": [], "policy_no_grad_forwards": 0, "reward_inputs": [],
                "response_pad_tokens": 0, "optimizer_steps": 0,
                "autocast": {"policy_grad": False, "policy_no_grad": False}, "_generated": None, "_learn": None}

    def attach(self, policy, reward_model, optimizer):
        """Hooks on ``policy`` (the model TRL trains: a PEFT model with
        LoRA), the reward model's body and the optimizer."""
        policy.register_forward_pre_hook(self._policy_forward, with_kwargs=True)
        reward_model.model.register_forward_pre_hook(self._reward_forward, with_kwargs=True)
        optimizer.register_step_post_hook(self._optimizer_step)

    @contextlib.contextmanager
    def timing_generation(self):
        """Within: TRL's ``batch_generation`` stamps its end (the module
        function is wrapped, then restored)."""
        original = ppo_module.batch_generation

        def timed(*args, **kwargs):
            result = original(*args, **kwargs)
            self.current["_generated"] = time.perf_counter()
            return result

        ppo_module.batch_generation = timed
        try:
            yield
        finally:
            ppo_module.batch_generation = original

    def _policy_forward(self, module, args, kwargs):
        autocast = torch.is_autocast_enabled("cpu")
        if torch.is_grad_enabled():
            if self.current["_learn"] is None:
                self.current["_learn"] = time.perf_counter()
            self.current["policy_train_inputs"].append(_shape(kwargs["input_ids"]))
            self.current["autocast"]["policy_grad"] |= autocast
        else:
            self.current["policy_no_grad_forwards"] += 1
            self.current["autocast"]["policy_no_grad"] |= autocast

    def _reward_forward(self, module, args, kwargs):
        self.current["reward_inputs"].append(_shape(kwargs["input_ids"]))
        self.current["response_pad_tokens"] += int((~kwargs["attention_mask"][:, PROMPT_TOKENS:]).sum())

    def _optimizer_step(self, optimizer, args, kwargs):
        self.current["optimizer_steps"] += 1

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark_measurement()
        self.stamps.append(time.perf_counter())

    def _mark_measurement(self):
        if len(self.iterations) == self.warmup:
            self.loadavg_start = os.getloadavg()[0]

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())
        begin, generated, learn = self.stamps[-2], self.current.pop("_generated"), self.current.pop("_learn")
        if generated is None or learn is None:
            raise RuntimeError("an iteration ended without a generation or a policy forward with gradient")
        self.current["phases"] = {"rollout": generated - begin, "score": learn - generated,
                                  "learn": self.stamps[-1] - learn}
        self.iterations.append(self.current)
        self.current = self._fresh()
        self._mark_measurement()

    def seconds(self):
        """Seconds of each finished iteration."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def _shape(t):
    return "x".join(map(str, t.shape))


@contextlib.contextmanager
def _environment(**values):
    """Within: ``os.environ`` updated with ``values``, restored on exit."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def lora_config(policy, r):
    """TRL's ``peft_config``: LoRA of rank ``r`` with the engine's default
    alpha and dropout on the engine's default target modules of ``policy``."""
    from peft import LoraConfig

    cfg = ppo_work_config(lora_r=r)
    return LoraConfig(r=r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=default_targets(policy), task_type="CAUSAL_LM")


def trainable_parameters(model):
    """Count of ``model``'s parameters that train."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_trl_ppo_bench(size, iterations=3, warmup=1, lora_r=0, bf16=False):
    """Run TRL's PPO trainer on the work (``lora_r`` > 0: LoRA of that rank
    on the policy; ``bf16``: TRL's bf16); the report dict (module
    docstring)."""
    tokenizer = byte_tokenizer()
    policy = build_policy(size, tokenizer, seed=0)
    reward = build_reward_model(size, tokenizer, seed=1)
    critic = critic_from(reward)
    peft_config = lora_config(policy, lora_r) if lora_r else None
    total = warmup + iterations
    dataset = Dataset.from_dict({"input_ids": prompt_ids(tokenizer, total).tolist()})
    recorder = WorkRecorder(warmup)
    # TRL prints progress to stdout; stdout is kept for the report.
    with tempfile.TemporaryDirectory() as output_dir, contextlib.redirect_stdout(sys.stderr), \
            _environment(ACCELERATE_MIXED_PRECISION="bf16" if bf16 else "no"):
        trainer = PPOTrainer(args=ppo_config(total, output_dir, bf16=bf16), processing_class=tokenizer, model=policy,
                             ref_model=None, reward_model=reward, value_model=critic, train_dataset=dataset,
                             callbacks=[recorder], peft_config=peft_config)
        for printer in (PrinterCallback, ProgressCallback):  # console output only
            trainer.remove_callback(printer)
        recorder.attach(trainer.policy_model, reward, trainer.optimizer.optimizer)
        trained = {"policy": trainable_parameters(trainer.policy_model), "critic": trainable_parameters(critic)}
        build_peak = rss_peak_mib()
        with recorder.timing_generation():
            trainer.train()
    seconds = recorder.seconds()
    if len(seconds) != total:
        raise RuntimeError(f"expected {total} iterations, TRL ran {len(seconds)}")
    measured = seconds[warmup:]
    work = recorder.iterations[warmup:]
    per_iteration = statistics.fmean(measured)
    return {
        "framework": "trl",
        "size": size,
        "lora_r": lora_r,
        "bf16": bf16,
        "iterations": iterations,
        "warmup": warmup,
        "seconds_per_iteration": per_iteration,
        "iteration_seconds": measured,
        "phases": {p: statistics.fmean(w["phases"][p] for w in work) for p in ("rollout", "score", "learn")},
        "tokens_per_second": PROMPTS * NEW_TOKENS / per_iteration,
        "peak_rss_mib": rss_peak_mib(),
        "build_peak_rss_mib": build_peak,
        "trainable_parameters": trained,
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": {"start": recorder.loadavg_start, "end": os.getloadavg()[0]},
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "work": work,
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
    parser.add_argument("--size", choices=["tiny", "small", "medium"], default="tiny",
                        help="Model size of the work.")
    parser.add_argument("--lora_r", type=int, default=0,
                        help="LoRA rank of TRL's peft_config on the policy (module docstring); 0: full fine-tuning.")
    parser.add_argument("--bf16", action="store_true", help="TRL's bf16=True (bf16 autocast of the PPO updates).")
    parser.add_argument("--iterations", type=int, default=3, help="Measured iterations (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=1, help="Warm-up iterations, not measured.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--json", default=None, help="Write the report here as JSON.")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    if args.lora_r < 0:
        parser.error(f"--lora_r must be an int >= 0 (0: full fine-tuning), got {args.lora_r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = run_trl_ppo_bench(args.size, iterations=args.iterations, warmup=args.warmup, lora_r=args.lora_r,
                               bf16=args.bf16)
    check_work(report)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
