"""The engine's configuration: one flat dataclass, so that
``transformers.HfArgumentParser`` turns it into command-line flags (each
field's ``help`` is its flag's documentation) and a JSON/YAML file into an
instance. Batch sizes count sequences (prompts x samples per prompt)."""
import dataclasses
from dataclasses import field
from typing import Optional

_CHOICES = {
    "dtype": ("float32", "bfloat16"),
    "old_logprobs": ("recompute", "rollout"),
    "truncated_response": ("as_is", "penalty", "bootstrap"),
    "kl_in": ("reward", "loss"),
    "kl_estimator": ("k1", "k2", "k3"),
    "advantage_estimator": ("gae", "group"),
    "loss_agg": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"),
    "lr_schedule": ("constant", "linear", "cosine"),
    "critic_init": ("reward", "policy"),
}


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class EngineConfig:
    """Everything one PPO iteration does. Defaults follow InstructGPT where it
    says (KL in the reward, k1, GAE) and common practice elsewhere."""

    # Placement and precision
    device: str = _f("auto", "Device for all four models: 'auto' (cuda when available, else cpu), 'cpu', 'cuda:N'.")
    dtype: str = _f("float32", "float32, or bfloat16 for mixed precision (bf16 autocast; float32 weights, "
                               "gradients and optimizer states).")
    seed: int = _f(0, "Seed of the engine's generator (sampling and mini-batch shuffling).")
    gradient_checkpointing: bool = _f(False, "Recompute activations of the trained models in backward.")
    offload: bool = _f(False, "Move what a phase does not use off the device between phases.")
    offload_policy: str = _f("", "Per-item overrides of the default offload table, e.g. 'reward=all,ref=score' "
                                 "(see rlhf_engine.engine.offload).")
    shard_frozen: bool = _f(False, "Under torch.distributed, shard the reference and reward model with FSDP2 too "
                                   "(default: each rank holds a full copy; the policy and critic are always sharded).")
    concurrent_models: bool = _f(True, "On the CPU (2+ torch threads, one process), run the policy's and the "
                                       "critic's forward/backward side by side, each with half of the threads; the "
                                       "results are the same up to float32 rounding.")
    retain_freed_memory: bool = _f(True, "On the CPU (Linux, glibc), keep freed memory in malloc's heap for reuse "
                                         "instead of faulting in fresh pages every iteration (a process-wide "
                                         "malloc setting; see rlhf_engine.engine.cpu_allocator).")
    logprob_chunk_size: Optional[int] = _f(None, "Rows of logits held at once by linear_token_logprobs "
                                                 "(None: chosen from free memory).")

    # Rollout
    max_new_tokens: int = _f(64, "Most tokens sampled per response.")
    temperature: float = _f(1.0, "Sampling temperature (the trainer scores at the same temperature).")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0: off).")
    top_k: int = _f(0, "Top-k sampling (0: off).")
    stop_at_eos: bool = _f(True, "End a response at EOS; False samples exactly max_new_tokens.")
    samples_per_prompt: int = _f(1, "Responses sampled per prompt (the group size of group baselines).")
    old_logprobs: str = _f("recompute", "Old policy log-probs: 'recompute' (a forward of the policy in the score "
                                        "phase) or 'rollout' (the sampler's own, saving that forward).")

    # Score
    truncated_response: str = _f("as_is", "Responses cut at max_new_tokens without EOS: 'as_is', 'penalty' "
                                          "(score replaced by truncation_penalty) or 'bootstrap' (the critic's "
                                          "value of the cut state added to the score).")
    truncation_penalty: float = _f(-1.0, "Score of a truncated response under truncated_response=penalty.")
    score_clip: Optional[float] = _f(None, "Clip reward-model scores to [-score_clip, score_clip].")

    # KL control
    kl_in: str = _f("reward", "Where the KL to the reference goes: 'reward' (per-token penalty, InstructGPT) "
                              "or 'loss' (a term of the policy loss).")
    kl_estimator: str = _f("k1", "KL estimator: k1 (log-ratio), k2 (squared), k3 (low-variance).")
    kl_coef: float = _f(0.05, "KL coefficient (initial value under the adaptive controller).")
    kl_target: Optional[float] = _f(None, "Target KL per sequence: set to use the adaptive controller of "
                                          "Ziegler et al. (2019).")
    kl_horizon: int = _f(10000, "Horizon (in sequences) of the adaptive KL controller.")

    # Advantages
    advantage_estimator: str = _f("gae", "'gae' (critic) or 'group' (group baselines: samples_per_prompt > 1, "
                                         "no critic).")
    gamma: float = _f(1.0, "Discount.")
    lam: float = _f(0.95, "GAE lambda.")
    whiten_advantages: bool = _f(True, "Whiten advantages over the batch's response tokens.")

    # Learn
    ppo_epochs: int = _f(1, "Passes over each batch of experience.")
    mini_batch_size: int = _f(8, "Sequences per optimizer step.")
    micro_batch_size: Optional[int] = _f(None, "Sequences per forward/backward (None: the mini-batch); results "
                                               "do not depend on it.")
    clip_low: float = _f(0.2, "PPO ratio clip below (1 - clip_low).")
    clip_high: Optional[float] = _f(None, "PPO ratio clip above (None: clip_low).")
    dual_clip: Optional[float] = _f(None, "Dual-clip constant c > 1 (None: off).")
    loss_agg: str = _f("token-mean", "How token losses become a batch loss.")
    value_clip: float = _f(0.2, "Clip of the critic's value change.")
    lr: float = _f(1e-6, "Policy learning rate (AdamW).")
    critic_lr: float = _f(5e-6, "Critic learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.95, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: Optional[float] = _f(1.0, "Gradient clipping (None: off; non-finite gradients are skipped "
                                             "either way).")
    lr_schedule: str = _f("constant", "Learning-rate schedule after warm-up.")
    lr_warmup_steps: int = _f(0, "Optimizer steps of linear warm-up.")
    total_steps: int = _f(0, "Optimizer steps of the linear/cosine schedules (0: no decay).")
    critic_init: str = _f("reward", "Critic built from the 'reward' model or the 'policy' (when not given).")
    critic_warmup_iterations: int = _f(0, "First iterations that train the critic only.")
    ptx_coef: float = _f(0.0, "PPO-ptx: coefficient of the language-modelling loss on pretraining/SFT data.")

    # Observability
    profile_dir: Optional[str] = _f(None, "Write a torch.profiler trace of each step here.")

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("max_new_tokens", "samples_per_prompt", "ppo_epochs", "mini_batch_size", "kl_horizon"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size:
            raise ValueError(f"micro_batch_size must be a positive integer or None, got {self.micro_batch_size!r}")
        for name in ("temperature", "lr", "critic_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.advantage_estimator == "group" and self.samples_per_prompt < 2:
            raise ValueError("advantage_estimator='group' needs samples_per_prompt >= 2")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"kl_target must be > 0 or None, got {self.kl_target!r}")

    @property
    def uses_critic(self):
        return self.advantage_estimator == "gae"

    def to_dict(self):
        return dataclasses.asdict(self)
