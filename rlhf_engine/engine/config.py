"""The engine's configuration: one flat dataclass, so that
``transformers.HfArgumentParser`` turns it into command-line flags (each
field's ``help`` is its flag's documentation) and a JSON/YAML file into an
instance. Batch sizes count sequences (prompts x samples per prompt)."""
import dataclasses
import math
from typing import Optional

from rlhf_engine.models.lora import LoraOptions
from rlhf_engine.options import option

_CHOICES = {
    "dtype": ("float32", "bfloat16"),
    "old_logprobs": ("recompute", "rollout"),
    "truncated_response": ("as_is", "penalty"),
    "kl_in": ("reward", "loss"),
    "kl_estimator": ("auto", "k1", "k2", "k3"),
    "advantage_estimator": ("gae", "group", "rloo", "dr_grpo"),
    "loss_agg": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"),
    "lr_schedule": ("constant", "linear", "cosine"),
    "critic_init": ("reward", "policy"),
    "rollout_backend": ("engine", "vllm"),
    "tis": ("off", "token", "sequence"),
}

# What each KL placement and estimator optimises, with d = log pi - log ref
# at tokens sampled from pi (the samples held fixed, as in every PPO pass):
#
#   kl_in="reward" (a per-token penalty -kl_coef * k in the reward, then GAE):
#     k1 = d       its expectation is KL(pi || ref), and the policy-gradient
#                  of the penalised return is the gradient of KL(pi || ref):
#                  InstructGPT's objective. The default.
#     k2, k3       refused: as rewards their policy gradient is ~3% of the
#                  KL's near the reference and points away from it further out.
#   kl_in="loss" (kl_coef * k added to the policy loss, differentiated):
#     k1           refused: E_pi[grad d] = 0, the term adds noise and no pull.
#     k2 = d^2/2   gradient E_pi[d grad log pi] = grad KL(pi || ref) (reverse KL).
#     k3 = e^-d - 1 + d   gradient E_pi[(1 - ref/pi) grad log pi]
#                  = grad KL(ref || pi) (forward KL); bounded and low-variance,
#                  veRL's and GRPO's choice. The default in the loss.
KL_DIVERGENCE = {("reward", "k1"): "KL(pi || ref)", ("loss", "k2"): "KL(pi || ref)",
                 ("loss", "k3"): "KL(ref || pi)"}  # the pairs accepted, and what each optimises
KL_DEFAULT = {"reward": "k1", "loss": "k3"}
# Why the other estimators are refused in each placement.
_KL_REFUSED = {
    "reward": "as a per-token reward, its policy gradient is not the KL's (about 3% of it near the reference, "
              "and pointing away from it further out)",
    "loss": "in the loss, k1's expected gradient is exactly zero (it adds noise and no pull toward the reference)",
}

# Values that used to be accepted and are now refused, with why and what to use instead.
_REMOVED = {
    ("truncated_response", "bootstrap"): "it added the critic's value of the cut state to the score of the cut "
                                         "text, counting the score twice (the value already estimates the return "
                                         "including the final score), without the discount, at a state the critic "
                                         "is never trained on; use 'penalty' (a fixed score for cut responses) or "
                                         "'as_is'",
}


@dataclasses.dataclass
class EngineConfig(LoraOptions):
    """Everything one PPO iteration does. Defaults follow InstructGPT where it
    says (KL in the reward, k1, GAE) and common practice elsewhere. The LoRA
    fields (``lora_r`` > 0: adapters on the policy and the critic) come from
    :class:`~rlhf_engine.models.lora.LoraOptions`."""

    # Placement and precision
    device: str = option("auto", "Device for all four models: 'auto' (cuda when available, else cpu), 'cpu', 'cuda:N'.")
    dtype: str = option("float32", "float32, or bfloat16 for mixed precision (bf16 autocast; float32 weights, "
                                   "gradients and optimizer states).")
    seed: int = option(0, "Seed of the engine's generator (sampling and mini-batch shuffling).")
    gradient_checkpointing: bool = option(False, "Recompute activations of the trained models in backward.")
    offload: bool = option(False, "Move what a phase does not use off the device between phases.")
    offload_policy: str = option("", "Per-item overrides of the default offload table, e.g. 'reward=all,ref=score' "
                                     "(see rlhf_engine.engine.offload).")
    shard_frozen: bool = option(False, "Under torch.distributed, shard the reference and reward model with FSDP2 "
                                       "too (default: each rank holds a full copy; the policy and critic are always "
                                       "sharded).")
    concurrent_models: bool = option(True, "On the CPU (2+ torch threads, one process), run the policy's and the "
                                           "critic's forward/backward side by side, each with half of the threads; the "
                                           "results are the same up to float32 rounding.")
    retain_freed_memory: bool = option(True, "On the CPU (Linux, glibc), keep freed memory in malloc's heap for reuse "
                                             "instead of faulting in fresh pages every iteration (a process-wide "
                                             "malloc setting; see rlhf_engine.engine.cpu_allocator).")
    logprob_chunk_size: Optional[int] = option(None, "Rows of logits held at once by linear_token_logprobs "
                                                     "(None: chosen from free memory).")

    # Rollout
    max_new_tokens: int = option(64, "Most tokens sampled per response.")
    temperature: float = option(1.0, "Sampling temperature > 0 (the trainer scores the same tempered distribution; "
                                      "greedy decoding has no sampling distribution for the PPO ratio and the KL).")
    top_p: float = option(1.0, "Nucleus sampling threshold (1.0: off). Responses are then drawn from the filtered "
                                "distribution while the ratio and the KL use the unfiltered one (the objective is "
                                "the policy's); the per-token gap is reported as rollout/filter_kl.")
    top_k: int = option(0, "Top-k sampling (0: off); see top_p.")
    stop_at_eos: bool = option(True, "End a response at EOS; False samples exactly max_new_tokens.")
    samples_per_prompt: int = option(1, "Responses sampled per prompt (the group size of group baselines).")
    rollout_backend: str = option("engine", "Who samples the rollouts: 'engine' (the engine's own sampler, "
                                            "rlhf_engine.engine.rollout) or 'vllm' (one colocated in-process "
                                            "vllm.LLM, weights synced in place before each rollout; needs vLLM "
                                            "installed; no top_k/top_p, one process).")
    vllm_kv_cache_bytes: int = option(2**30, "Size of vLLM's KV cache in bytes (rollout_backend='vllm'); released "
                                             "between rollouts.")
    old_logprobs: str = option("recompute", "Old policy log-probs: 'recompute' (a forward of the policy in the score "
                                            "phase) or 'rollout' (the sampler's own, saving that forward).")

    # Score
    truncated_response: str = option("as_is", "Responses cut at max_new_tokens without EOS: 'as_is' (scored as they "
                                              "are) or 'penalty' (score replaced by truncation_penalty).")
    truncation_penalty: float = option(-1.0, "Score of a truncated response under truncated_response=penalty.")
    score_clip: Optional[float] = option(None, "Clip reward-model scores to [-score_clip, score_clip] (> 0; None: "
                                               "off).")

    # KL control
    kl_in: str = option("reward", "Where the KL to the reference goes: 'reward' (per-token penalty, InstructGPT) "
                                  "or 'loss' (a term of the policy loss).")
    kl_estimator: str = option("auto", "KL estimator, d = log pi - log ref: 'auto' (k1 in the reward, k3 in the loss); "
                                       "in the reward k1 (d: optimises KL(pi||ref)); in the loss k2 (d^2/2: gradient "
                                       "of KL(pi||ref)) or k3 (e^-d - 1 + d, low variance: gradient of KL(ref||pi)). "
                                       "The other pairs do not regularise and are refused.")
    kl_coef: float = option(0.05, "KL coefficient >= 0 (initial value under the adaptive controller, then > 0).")
    kl_target: Optional[float] = option(None, "Target KL per sequence: set to use the adaptive controller of "
                                              "Ziegler et al. (2019); a checkpoint keeps its coefficient, the target "
                                              "and horizon are the config's.")
    kl_horizon: int = option(10000, "Horizon (in sequences) of the adaptive KL controller.")

    # Advantages
    advantage_estimator: str = option("gae", "'gae' (critic), or group baselines without a critic "
                                             "(samples_per_prompt > 1): 'group' (GRPO: score minus the group mean, "
                                             "over the group std), 'rloo' (minus the mean of the other samples) or "
                                             "'dr_grpo' (minus the group mean, no std division).")
    gamma: float = option(1.0, "Discount, in [0, 1].")
    lam: float = option(0.95, "GAE lambda, in [0, 1].")
    whiten_advantages: bool = option(True, "Whiten advantages over the batch's response tokens.")

    # Learn
    ppo_epochs: int = option(1, "Passes over each batch of experience.")
    mini_batch_size: int = option(8, "Sequences per optimizer step.")
    micro_batch_size: Optional[int] = option(None, "Sequences per forward/backward (None: the mini-batch); results "
                                                   "do not depend on it.")
    clip_low: float = option(0.2, "PPO ratio clip below (1 - clip_low), in (0, 1).")
    clip_high: Optional[float] = option(None, "PPO ratio clip above (1 + clip_high), > 0 (None: clip_low).")
    dual_clip: Optional[float] = option(None, "Dual-clip constant c > 1 (None: off).")
    loss_agg: str = option("token-mean", "How token losses become a batch loss.")
    value_clip: float = option(0.2, "Clip of the critic's value change (> 0).")
    lr: float = option(1e-6, "Policy learning rate (AdamW).")
    critic_lr: float = option(5e-6, "Critic learning rate (AdamW).")
    weight_decay: float = option(0.0, "AdamW weight decay of the policy and the critic, applied to weight matrices "
                                      "only (not norms or biases).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.95, "AdamW beta2.")
    adam_eps: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: Optional[float] = option(1.0, "Gradient clipping bound > 0 (None: off; non-finite gradients are "
                                                 "skipped either way).")
    lr_schedule: str = option("constant", "Learning-rate schedule after warm-up.")
    lr_warmup_steps: int = option(0, "Optimizer steps of linear warm-up.")
    total_steps: int = option(0, "Optimizer steps of the linear/cosine schedules (0: no decay).")
    critic_init: str = option("reward", "Critic built from the 'reward' model or the 'policy' (when not given).")
    critic_warmup_iterations: int = option(0, "First iterations that train the critic only (needs a critic: gae).")
    ptx_coef: float = option(0.0, "PPO-ptx: coefficient of the language-modelling loss on pretraining/SFT data.")

    # Sampler-trainer mismatch
    logprob_gap_threshold: float = option(0.1, "rollout/logprob_gap_frac counts the response tokens whose sampler "
                                               "and trainer log-probs differ by more than this (> 0).")
    tis: str = option("off", "Truncated importance sampling against the sampler-trainer mismatch (e.g. vLLM in "
                             "bf16): 'token' weights each token's policy loss by min(pi_old / pi_sampler, tis_cap); "
                             "'sequence' drops (weight 0) the responses whose sequence ratio prod(pi_old / "
                             "pi_sampler) exceeds tis_cap; 'off' (the default).")
    tis_cap: float = option(2.0, "The cap C of tis (>= 1).")

    # Observability
    profile_dir: Optional[str] = option(None, "Write a torch.profiler trace of each step here.")

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if (name, value) in _REMOVED:
                raise ValueError(f"{name}={value!r} is not supported: {_REMOVED[name, value]}")
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        _check_numbers(self)
        self.check_lora()
        _check_combinations(self)
        check_device(self.device)
        from rlhf_engine.engine.offload import OffloadPolicy
        try:
            OffloadPolicy.parse(self.offload_policy, enabled=self.offload)
        except ValueError as error:
            raise ValueError(f"offload_policy={self.offload_policy!r}: {error}; use comma-separated item=phases "
                             f"entries, each item once (e.g. 'reward=all,ref=score')") from None

    @property
    def kl_estimator_used(self):
        """The estimator applied: ``kl_estimator``, or the placement's default under "auto"."""
        return KL_DEFAULT[self.kl_in] if self.kl_estimator == "auto" else self.kl_estimator

    @property
    def kl_divergence(self):
        """The divergence the KL term optimises (its gradient's), e.g. ``"KL(pi || ref)"``."""
        return KL_DIVERGENCE[self.kl_in, self.kl_estimator_used]

    @property
    def uses_critic(self):
        return self.advantage_estimator == "gae"

    @property
    def group_baseline(self):
        """The group-baseline rule (``"group"``, ``"rloo"``, ``"dr_grpo"``), None with GAE."""
        return None if self.uses_critic else self.advantage_estimator

    def to_dict(self):
        return dataclasses.asdict(self)


def _real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


# Rules for numbers: (test, what the test demands).
_INT_1 = (lambda v: _integer(v) and v >= 1, "an integer >= 1")
_INT_0 = (lambda v: _integer(v) and v >= 0, "an integer >= 0")
_NON_NEGATIVE = (lambda v: _real(v) and v >= 0, "a finite number >= 0")
_POSITIVE = (lambda v: _real(v) and v > 0, "a finite number > 0")
_UNIT = (lambda v: _real(v) and 0 <= v <= 1, "in [0, 1]")
_BETA = (lambda v: _real(v) and 0 <= v < 1, "in [0, 1)")


def _noted(rule, note):
    return rule[0], f"{rule[1]} ({note})"


def _optional(rule, note=""):
    """``rule`` for an Optional field: None also passes (``note``: what None means)."""
    return rule[0], f"{rule[1]} or None" + (f" ({note})" if note else "")


# Numeric fields: (name, test, what the test demands). Optional fields pass when None.
_NUMBERS = tuple((name,) + rule for name, rule in {
    "max_new_tokens": _INT_1, "samples_per_prompt": _INT_1, "ppo_epochs": _INT_1, "mini_batch_size": _INT_1,
    "kl_horizon": _INT_1, "micro_batch_size": _optional(_INT_1), "logprob_chunk_size": _optional(_INT_1),
    "seed": _INT_0, "top_k": _noted(_INT_0, "0: off"), "lr_warmup_steps": _INT_0,
    "total_steps": _noted(_INT_0, "0: no decay"), "critic_warmup_iterations": _INT_0,
    "temperature": _noted(_POSITIVE, "greedy decoding has no sampling distribution for the PPO ratio and the KL; "
                                     "use e.g. 0.1"),
    "top_p": (lambda v: _real(v) and 0 < v <= 1, "in (0, 1] (1: off)"),
    "truncation_penalty": (_real, "a finite number"),
    "score_clip": _optional(_POSITIVE, "off"),
    "kl_coef": _noted(_NON_NEGATIVE, "a negative one rewards drifting away from the reference"),
    "kl_target": _optional(_POSITIVE, "fixed coefficient"),
    "gamma": _UNIT, "lam": _UNIT,
    "clip_low": (lambda v: _real(v) and 0 < v < 1, "in (0, 1) (the ratio's lower bound 1 - clip_low must be in "
                                                   "(0, 1))"),
    "clip_high": _optional(_POSITIVE, "clip_low"),
    "dual_clip": _optional((lambda v: _real(v) and v > 1, "a finite number > 1"), "off"),
    "value_clip": _POSITIVE, "lr": _NON_NEGATIVE, "critic_lr": _NON_NEGATIVE, "weight_decay": _NON_NEGATIVE,
    "adam_beta1": _BETA, "adam_beta2": _BETA, "adam_eps": _POSITIVE,
    "max_grad_norm": _optional(_POSITIVE, "off"),
    "ptx_coef": _noted(_NON_NEGATIVE, "0: off"),
    "vllm_kv_cache_bytes": _INT_1, "logprob_gap_threshold": _POSITIVE,
    "tis_cap": (lambda v: _real(v) and v >= 1, "a finite number >= 1"),
}.items())


def _check_numbers(cfg):
    for name, test, demand in _NUMBERS:
        value = getattr(cfg, name)
        if value is None and "or None" in demand:  # an optional field
            continue
        if not test(value):
            raise ValueError(f"{name} must be {demand}, got {value!r}")


# Fields that act only together with another setting: (is it active, what it needs).
_DEPENDENT = {
    "offload_policy": (lambda c: c.offload, "offload=True"),
    "kl_horizon": (lambda c: c.kl_target is not None, "kl_target (the adaptive KL controller)"),
    "critic_init": (lambda c: c.uses_critic, "a critic (advantage_estimator='gae')"),
    "critic_warmup_iterations": (lambda c: c.uses_critic, "a critic (advantage_estimator='gae'): there is "
                                                          "nothing to warm up, and nothing would train"),
    "truncation_penalty": (lambda c: c.truncated_response == "penalty", "truncated_response='penalty'"),
    "vllm_kv_cache_bytes": (lambda c: c.rollout_backend == "vllm", "rollout_backend='vllm'"),
    "tis_cap": (lambda c: c.tis != "off", "tis='token' or 'sequence'"),
}


def _check_combinations(cfg):
    """The fields that interact: refuse the pairs that crash or do nothing, naming the alternative."""
    estimator = cfg.kl_estimator_used
    if (cfg.kl_in, estimator) not in KL_DIVERGENCE:
        usable = " or ".join(e for placement, e in KL_DIVERGENCE if placement == cfg.kl_in)
        other = "loss" if cfg.kl_in == "reward" else "reward"
        raise ValueError(f"kl_in={cfg.kl_in!r} with kl_estimator={estimator!r}: {_KL_REFUSED[cfg.kl_in]}; "
                         f"use kl_estimator={usable} there (or 'auto'), or kl_in={other!r}")
    if not cfg.uses_critic and cfg.samples_per_prompt < 2:
        raise ValueError(f"advantage_estimator={cfg.advantage_estimator!r} (a group baseline) needs "
                         f"samples_per_prompt >= 2, got {cfg.samples_per_prompt}; or use 'gae' (a critic)")
    for name, (active, needs) in _DEPENDENT.items():
        default = cfg.__dataclass_fields__[name].default
        if getattr(cfg, name) != default and not active(cfg):
            raise ValueError(f"{name}={getattr(cfg, name)!r} has no effect without {needs}: set that, or leave "
                             f"{name} at its default ({default!r})")
    if cfg.kl_target is not None and cfg.kl_coef == 0:
        raise ValueError("kl_target with kl_coef=0: the adaptive controller scales the coefficient and can never "
                         "move it from 0; start from kl_coef > 0")
    if cfg.micro_batch_size is not None and cfg.micro_batch_size > cfg.mini_batch_size:
        raise ValueError(f"micro_batch_size={cfg.micro_batch_size} exceeds mini_batch_size={cfg.mini_batch_size}; "
                         f"a micro-batch splits a mini-batch: use micro_batch_size <= {cfg.mini_batch_size} or None")
    _check_rollout_backend(cfg)
    if cfg.lr_schedule != "constant" and cfg.total_steps and cfg.total_steps <= cfg.lr_warmup_steps:
        raise ValueError(f"lr_schedule={cfg.lr_schedule!r} decays over total_steps={cfg.total_steps}, which is not "
                         f"past lr_warmup_steps={cfg.lr_warmup_steps}; raise total_steps or use 'constant'")


def _check_rollout_backend(cfg):
    """The vLLM backend and TIS: refuse what they cannot do, naming why and what to use."""
    if cfg.tis != "off" and cfg.old_logprobs == "rollout":
        raise ValueError(f"tis={cfg.tis!r} with old_logprobs='rollout': the old log-probs are then the sampler's "
                         f"own, the ratio pi_old / pi_sampler is 1 and tis does nothing; use "
                         f"old_logprobs='recompute' or tis='off'")
    if cfg.rollout_backend != "vllm":
        return
    if cfg.top_k or cfg.top_p < 1:
        raise ValueError(f"rollout_backend='vllm' with top_k={cfg.top_k}, top_p={cfg.top_p}: vLLM reports the "
                         f"log-probs of the filtered distribution, not the unfiltered one the engine's ratio, KL "
                         f"and filter_kl use; use top_k=0 and top_p=1, or rollout_backend='engine'")
    from rlhf_engine.engine.vllm_rollout import vllm_missing_reason

    missing = vllm_missing_reason()
    if missing:
        raise ValueError(f"rollout_backend='vllm' needs vLLM: {missing}; or use rollout_backend='engine'")


def check_device(spec):
    """ValueError unless ``spec`` is 'auto', 'cpu', 'cuda' (on a machine with CUDA) or 'cuda:N' (an existing
    GPU): the engine's ``device``, and the stages' (rlhf_engine.pipeline.config)."""
    if spec == "auto":
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r} ({error})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={spec!r}, but this machine has no CUDA device (torch "
                             f"{torch.__version__}); use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={spec!r}, but there are {torch.cuda.device_count()} CUDA devices")
