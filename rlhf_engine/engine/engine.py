"""The lean hybrid engine: policy, reference, reward model and critic on one
device; each PPO iteration samples, scores and learns on them in turn.

    engine = RLHFEngine(policy, tokenizer, EngineConfig(...), reward_model=rm)
    for prompts in loader:
        metrics = engine.step(prompts)          # one PPO iteration
    engine.save("run/checkpoints")              # atomic; engine.load(...) resumes

:meth:`RLHFEngine.step` reads top to bottom: 1. rollout, 2. score,
3. advantages, 4. learn, 5. KL control. The math lives in
:mod:`rlhf_engine.engine.ppo`, the batches in :mod:`rlhf_engine.engine.batch`.
"""
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import math
import time
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from rlhf_engine import distributed, ops
from rlhf_engine.engine import ppo
from rlhf_engine.engine.batch import Experience, map_tensors, pad_to, select
from rlhf_engine.engine.checkpoint import (capture_rng, latest_checkpoint, load_checkpoint, restore_rng,
                                           save_checkpoint)
from rlhf_engine.engine.config import EngineConfig
from rlhf_engine.engine.cpu_allocator import retain_freed_memory
from rlhf_engine.engine.kl_control import KLController
from rlhf_engine.engine.lanes import Lanes
from rlhf_engine.engine.metrics import PhaseRecorder, WeightedMean
from rlhf_engine.engine.offload import OffloadPolicy, Placement
from rlhf_engine.engine.rollout import SamplingParams, mix_seed, row_uniforms, sample
from rlhf_engine.models import causal_lm_logprobs, encode_prompt, positions_from_mask
from rlhf_engine.models.modes import training_without_dropout
from rlhf_engine.models.scalar_heads import critic_from, sequence_scores, token_values

CHECKPOINT_FORMAT = 2  # 2: trained state in torch.distributed.checkpoint format


# Config attributes under which another attention implementation computes a
# different function (the eager path applies them, SDPA does not).
_ATTENTION_SEMANTICS = ("attn_logit_softcapping",)


def select_attention(model, device):
    """Switch ``model`` between the standard attention implementations to the
    fastest one here (flash-attn's kernels when flash-attn is installed and
    the model is on a GPU, else PyTorch SDPA) when that computes the same
    function: the model is on ``eager`` or ``sdpa``, supports the target,
    and sets nothing only the eager path honours (attention logit
    soft-capping, e.g. Gemma 2). Otherwise the user's choice is kept.
    Returns the implementation in use."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    wanted = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    supported = getattr(model, "_supports_flash_attn" if wanted == "flash_attention_2" else "_supports_sdpa", False)
    configs = [config] + [getattr(config, name) for name in ("text_config", "decoder") if hasattr(config, name)]
    semantic = any(getattr(c, attr, None) is not None for c in configs for attr in _ATTENTION_SEMANTICS)
    if current in ("eager", "sdpa") and current != wanted and supported and not semantic:
        model.set_attn_implementation(wanted)
        return wanted
    return current


def lr_factor(step, *, warmup, total, schedule):
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up
    over ``warmup`` steps, then constant, linear or cosine decay to 0 at
    ``total`` (no decay when ``total`` is 0)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min((step - warmup) / (total - warmup), 1.0)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def set_peak_lrs(scheduler, lrs):
    """Make a ``LambdaLR`` restored from a checkpoint continue with the peak
    learning rates ``lrs`` (one per parameter group) under its own lambdas
    at its current step: the rates a run configured with ``lrs`` uses from
    here (a resumed run's configured ``lr`` applies, not the checkpoint's).
    With the checkpoint's own rates it changes nothing (the same products)."""
    scheduler.base_lrs = [float(lr) for lr in lrs]
    last = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, base, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, last):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = last  # what get_last_lr() reports (torch keeps it there)


def left_pad(sequences, pad_id):
    """``list[list[int]]`` -> ``(ids [B, P] int64, mask [B, P] bool)``, left-padded."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = True
    return ids, mask


def _frozen(model):
    model.eval().requires_grad_(False)
    return model


def _fingerprint(model):
    """A float64 checksum of a model's full parameters (frozen models' are
    checked on load; all of them agree across ranks at start)."""
    if model is None:
        return None
    with torch.no_grad():
        return float(sum(distributed.local_value(p).double().abs().sum() for p in model.parameters()))


def _vocabulary(model):
    """Rows of ``model``'s input embedding table, None when it has none we can read."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embeddings, "num_embeddings", None)


def _check_vocabularies(tokenizer, models):
    """Every model reads the policy's token ids: refuse one whose embedding
    table has another size than the policy's (another tokenizer: its scores
    would be of other tokens) or cannot hold the tokenizer's ids."""
    sizes = {name: _vocabulary(m) for name, m in models.items() if m is not None}
    sizes = {name: size for name, size in sizes.items() if size is not None}
    policy = sizes.get("policy")
    for name, size in sizes.items():
        if policy is not None and size != policy:
            raise ValueError(f"the {name}'s vocabulary has {size} entries, the policy's {policy}: it was built for "
                             f"another tokenizer, and the engine feeds every model the policy's token ids. Use a "
                             f"{name} trained with the policy's tokenizer (or resize_token_embeddings to match if "
                             f"they share one)")
    count = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if count is not None and policy is not None and count > policy:
        raise ValueError(f"the tokenizer has {count} tokens, the policy's embedding table {policy} rows")


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


class RLHFEngine:
    """PPO with a per-token KL penalty on four colocated models.

    Under torch.distributed (a process group initialised, e.g. by
    :func:`rlhf_engine.distributed.init` under torchrun) every rank builds
    the engine from the same models and config; the policy and critic are
    sharded with FSDP2 (the reference and reward model too with
    ``config.shard_frozen``), each rank passes its own, equally many, prompts
    to :meth:`step`, and the iteration is that of the global batch: the same
    sampled tokens (per-sequence random streams), whitening, mini-batches,
    loss normalisation and metrics as one process given all the prompts.

    Args:
        policy: the HuggingFace causal LM to train (a PEFT model with LoRA
            adapters works: its reference is then the policy with adapters
            disabled, not a copy).
        tokenizer: its tokenizer (pad and EOS ids; encodes string prompts).
        config: :class:`EngineConfig`.
        reward_model: ``AutoModelForSequenceClassification`` with one label,
            or any module returning a scalar per sequence; frozen.
        ref_model: the frozen reference (default: a frozen copy of ``policy``
            as given, or the adapter-disabled policy under LoRA).
        critic: a sequence-classification model used per token (default:
            built from the reward model or the policy, ``config.critic_init``).
    """

    def __init__(self, policy, tokenizer, config=None, *, reward_model, ref_model=None, critic=None):
        self.config = cfg = config or EngineConfig()
        self.layout = distributed.layout()
        self.device = distributed.device_for(self.layout, cfg.device)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token")

        # Models: the policy and critic train; the reference and reward model are frozen.
        self.policy = policy
        self.lora_reference = ref_model is None and hasattr(policy, "disable_adapter")
        self.ref = None if self.lora_reference else _frozen(ref_model or copy.deepcopy(policy))
        self.reward = _frozen(reward_model)
        self.critic = None
        if cfg.uses_critic:
            self.critic = critic if critic is not None else critic_from(reward_model if cfg.critic_init == "reward"
                                                                        else policy)
        _check_vocabularies(tokenizer, {"policy": policy, "reference": self.ref, "reward model": self.reward,
                                        "critic": self.critic})
        self.attn_implementation = select_attention(policy, self.device)
        for model in (self.ref, self.reward, self.critic):
            if model is not None and hasattr(model, "set_attn_implementation"):
                select_attention(model, self.device)
        if cfg.gradient_checkpointing:
            for name, model in (("policy", self.policy), ("critic", self.critic)):
                if model is not None and not getattr(model, "supports_gradient_checkpointing", False):
                    raise ValueError(f"gradient_checkpointing=True, but the {name} ({type(model).__name__}) does "
                                     f"not support HuggingFace gradient checkpointing; set it to False")
                if model is not None:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # Eval mode outside the learn passes (which train without dropout: models.modes), so that
        # every pass -- rollout, score, learn -- computes the same function of the weights.
        modules = {"policy": self.policy, "ref": self.ref, "reward": self.reward, "critic": self.critic}
        modules = {k: m.to(self.device).eval() for k, m in modules.items() if m is not None}
        self._fingerprints = {"ref": _fingerprint(self.ref), "reward": _fingerprint(self.reward)}
        if self.layout.distributed:
            modules = self._shard(modules)

        # Optimizers, schedules and controllers.
        self.optimizers = {"policy": self._adamw(self.policy, cfg.lr)}
        if self.critic is not None:
            self.optimizers["critic"] = self._adamw(self.critic, cfg.critic_lr)
        factor = functools.partial(lr_factor, warmup=cfg.lr_warmup_steps, total=cfg.total_steps,
                                   schedule=cfg.lr_schedule)
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in self.optimizers.items()}
        self.kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, eos_token_id=self.eos_id,
                                       pad_token_id=self.pad_id, temperature=cfg.temperature, top_p=cfg.top_p,
                                       top_k=cfg.top_k, stop_at_eos=cfg.stop_at_eos)
        self.iteration = 0
        self.skipped_updates = 0
        self.lanes = Lanes(cfg.concurrent_models and self.device.type == "cpu" and not self.layout.distributed
                           and torch.get_num_threads() > 1)
        if cfg.retain_freed_memory and self.device.type == "cpu":
            retain_freed_memory()

        # Placement: everything starts on the device; offload moves what a phase does not use.
        self.placement = Placement(self.device, policy=OffloadPolicy.parse(cfg.offload_policy, enabled=cfg.offload),
                                   modules=modules,
                                   optimizers={f"{k}_optim": o for k, o in self.optimizers.items()})

    def _shard(self, modules):
        """Check that every rank starts from the same config and weights, then
        shard the trained models (and the frozen ones with ``shard_frozen``)."""
        cfg = self.config
        distributed.check_agreement("the engine config", cfg.to_dict())
        trained = {k: _fingerprint(modules[k]) for k in ("policy", "critic") if k in modules}
        distributed.check_agreement("the starting weights (parameter checksums)", {**self._fingerprints, **trained})
        if cfg.offload:
            raise NotImplementedError("offload=True with FSDP-sharded models (world size > 1) is not supported yet")
        sharded = ("policy", "critic") + (("ref", "reward") if cfg.shard_frozen else ())
        for name in sharded:
            if name in modules:
                modules[name] = distributed.shard(modules[name], self.layout, self.device)
        return modules

    @classmethod
    def from_pretrained(cls, policy_path, reward_model_path, config=None, *, critic_path=None, tokenizer_path=None):
        """Build from HuggingFace model folders or hub names."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        def load(auto, path, what, **kwargs):
            model, info = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **kwargs)
            if info.get("missing_keys"):
                missing = sorted(info["missing_keys"])
                raise ValueError(f"{path} is not a {what} folder: loading it would initialise "
                                 f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} at random")
            return model

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or policy_path)
        policy = load(AutoModelForCausalLM, policy_path, "causal LM (policy)")
        reward = load(AutoModelForSequenceClassification, reward_model_path, "reward model", num_labels=1)
        critic = load(AutoModelForSequenceClassification, critic_path, "critic", num_labels=1) if critic_path else None
        return cls(policy, tokenizer, config, reward_model=reward, critic=critic)

    def _adamw(self, model, lr):
        cfg = self.config
        kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                      weight_decay=cfg.weight_decay)
        # The fused AdamW is one kernel per step instead of a dozen passes over every state tensor.
        return torch.optim.AdamW(_trainable(model), fused=True, **kwargs)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.dtype == "bfloat16")

    # One PPO iteration ---------------------------------------------------------------

    def step(self, prompts, ptx_batch=None):
        """Run one PPO iteration on ``prompts`` and return its metrics.

        Args:
            prompts: a list of strings (encoded by
                :func:`rlhf_engine.models.encode_prompt`: the chat template
                or the plain format the ``sft`` stage trains on), a list of
                token-id lists, or a ``(ids [B, P], mask [B, P])``
                left-padded pair.
            ptx_batch: for PPO-ptx (``config.ptx_coef > 0``, where it is
                required), this iteration's pretraining/SFT rows
                ``(ids [M, L], attention_mask [M, L], loss_mask [M, L])``,
                left- or right-padded; ``loss_mask`` marks the tokens whose
                log-likelihood is maximised. Every optimizer step trains on
                rows no other step of the iteration sees: step ``j`` of
                :meth:`updates_per_iteration` ``n`` takes rows ``j::n``, so
                ``M >= n`` (``M = n x rows per step`` uses them all).

        Returns:
            a flat dict of floats (and ``info/*`` strings): see README.
        """
        cfg = self.config
        recorder = PhaseRecorder(self.device)
        profiler = self._profiler()
        start = time.perf_counter()
        prompt_ids, prompt_mask = self._encode(prompts)
        ptx_batch = self._check_ptx(ptx_batch, len(prompt_ids))
        with profiler, distributed.guard(f"PPO iteration {self.iteration + 1}"):
            # 1. Rollout: the policy samples responses to this rank's prompts.
            with recorder.phase("rollout"):
                self.placement.enter("rollout")
                rollout = self._rollout(prompt_ids, prompt_mask)
            # 2. Score: old and reference log-probs, values, reward-model scores; then
            #    every rank holds the global batch (the rest of the iteration is global).
            with recorder.phase("score"):
                self.placement.enter("score")
                exp = self._gather(self._score(rollout))
                score_metrics = self._score_metrics(exp)
                # 3. Advantages: KL-shaped rewards, GAE (or group baselines), whitening.
                exp = self._advantages(exp)
            # 4. Learn: PPO epochs over shuffled mini-batches, each split over the ranks.
            with recorder.phase("learn"):
                self.placement.enter("learn")
                learn_metrics = self._learn(exp, ptx_batch)
            recorder.metrics["time/step"] = time.perf_counter() - start
            phases = self._slowest_rank(recorder.metrics)
        # 5. KL control, then the iteration's metrics.
        self.kl.update(score_metrics["kl/k1"], exp.sequences.shape[0])
        self.iteration += 1
        generated = score_metrics["response/length_mean"] * exp.sequences.shape[0]
        metrics = {"iteration": self.iteration, **score_metrics, **learn_metrics, **phases,
                   "tokens_per_second": generated / phases["time/step"],
                   "rollout_tokens_per_second": generated / phases["time/rollout"],
                   "kl/coef": self.kl.coef, "lr": self.schedulers["policy"].get_last_lr()[0],
                   "updates/skipped_total": self.skipped_updates,
                   "info/attn_implementation": self.attn_implementation}
        return metrics

    def updates_per_iteration(self, num_prompts):
        """Optimizer steps of one :meth:`step` on ``num_prompts`` prompts (the
        global count under torch.distributed): PPO epochs x mini-batches."""
        sequences = num_prompts * self.config.samples_per_prompt
        return self.config.ppo_epochs * math.ceil(sequences / self.config.mini_batch_size)


    def _check_ptx(self, ptx_batch, num_prompts):
        """``ptx_batch`` as three ``[M, L]`` tensors (validated), or None when PPO-ptx is off."""
        cfg = self.config
        if cfg.ptx_coef == 0:
            if ptx_batch is not None:
                raise ValueError("ptx_batch was given but config.ptx_coef is 0: it would be ignored; set ptx_coef > 0 "
                                 "or pass no ptx_batch")
            return None
        if ptx_batch is None:
            raise ValueError(f"config.ptx_coef={cfg.ptx_coef} needs pretraining rows: pass step(prompts, ptx_batch=("
                             f"ids, attention_mask, loss_mask))")
        if not (isinstance(ptx_batch, (tuple, list)) and len(ptx_batch) == 3
                and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in ptx_batch)):
            raise ValueError("ptx_batch must be a tuple of three [M, L] tensors (ids, attention_mask, loss_mask)")
        ids, attn, loss_mask = ptx_batch
        if attn.shape != ids.shape or loss_mask.shape != ids.shape:
            raise ValueError(f"ptx_batch tensors must share one shape; got {tuple(ids.shape)}, {tuple(attn.shape)}, "
                             f"{tuple(loss_mask.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"ptx_batch ids must be integer token ids, got {ids.dtype}")
        steps = self.updates_per_iteration(num_prompts * self.layout.world_size)
        if ids.shape[0] < steps:
            raise ValueError(f"ptx_batch has {ids.shape[0]} rows for the iteration's {steps} optimizer steps (ppo_epochs "
                             f"x mini-batches): every step needs fresh rows; pass at least {steps} (a multiple of "
                             f"{steps} uses them all)")
        return ids.long(), attn.bool(), loss_mask.bool()

    def _slowest_rank(self, phase_metrics):
        """Phase times and peak memories: the largest over the ranks."""
        names = sorted(phase_metrics)
        values = torch.tensor([phase_metrics[n] for n in names], dtype=torch.float64, device=self.device)
        return dict(zip(names, distributed.all_reduce(values, op="max").tolist()))

    def _profiler(self):
        if not self.config.profile_dir:
            return contextlib.nullcontext()
        path = Path(self.config.profile_dir) / f"step-{self.iteration:08d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        return torch.profiler.profile(activities=activities, profile_memory=True,
                                      on_trace_ready=lambda p: p.export_chrome_trace(str(path)))

    def _encode(self, prompts):
        """This rank's prompts as ``(ids [B, P] int64, mask [B, P] bool)``,
        left-padded, checked against the policy's vocabulary and positions.
        Strings go through :func:`rlhf_engine.models.encode_prompt`, the
        format the ``sft`` stage trains on (chat template or plain)."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of prompts (strings or token-id lists) or an (ids, mask) pair, "
                             "not one string (it would be read as one prompt per character)")
        if isinstance(prompts, tuple):
            if len(prompts) != 2 or not all(isinstance(t, torch.Tensor) for t in prompts):
                raise ValueError("a tuple of prompts must be (ids [B, P], mask [B, P]) tensors")
            ids, mask = prompts
            if ids.dim() != 2 or mask.shape != ids.shape or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"prompt ids must be a [B, P] integer tensor and mask of its shape; got {ids.dtype} "
                                 f"{tuple(ids.shape)} and {tuple(mask.shape)}")
            ids, mask = ids.long(), mask.bool()
            if not len(ids) or not bool(mask.any(-1).all()):
                raise ValueError("every prompt needs at least one real token (mask row of all zeros)")
            if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
                raise ValueError("prompts must be left-padded: a mask row has padding after a real token")
        else:
            if not len(prompts):
                raise ValueError("prompts is empty")
            prompts = [encode_prompt(self.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
            if any(len(p) == 0 for p in prompts):
                raise ValueError("a prompt encodes to no tokens")
            ids, mask = left_pad(prompts, self.pad_id)
        vocab = self.policy.get_input_embeddings().num_embeddings
        real = ids[mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
            raise ValueError(f"prompt token ids must be in [0, {vocab}) (the policy's vocabulary); got "
                             f"[{int(real.min())}, {int(real.max())}]")
        positions = getattr(self.policy.config, "max_position_embeddings", None)
        longest = int(mask.sum(-1).max())
        if positions is not None and longest + self.config.max_new_tokens > positions:
            raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={self.config.max_new_tokens} exceeds "
                             f"the policy's {positions} positions (max_position_embeddings): shorten the prompts or "
                             f"lower max_new_tokens")
        return ids, mask

    def _rollout(self, ids, mask):
        """Sample this rank's sequences from its prompts ``ids``/``mask``
        ``[B, P]``. Each sequence draws from its own random stream, keyed by
        the seed, the iteration and its row in the global batch (ranks hold
        consecutive rows), so the tokens do not depend on the world size."""
        k = self.config.samples_per_prompt
        ids, mask = ids.repeat_interleave(k, 0).to(self.device), mask.repeat_interleave(k, 0).to(self.device)
        first = self.layout.rank * len(ids)  # every rank passes as many prompts (checked in _gather)
        uniforms = row_uniforms(mix_seed(self.config.seed, self.iteration), range(first, first + len(ids)),
                                self.config.max_new_tokens, self.device)
        with self._autocast(), distributed.unsharded(self.policy):
            return sample(self.policy, ids, mask, self.sampling, uniforms=uniforms)

    def _gather(self, exp):
        """The global batch on every rank: the ranks' rows in rank order,
        re-padded to common prompt and response widths."""
        if not self.layout.distributed:
            return exp
        widths = torch.tensor([[len(exp.sequences), exp.prompt_length, exp.sequences.shape[1] - exp.prompt_length]],
                              device=self.device)
        rows, prompt_widths, response_widths = distributed.all_gather_rows(widths).T.tolist()
        if len(set(rows)) > 1:
            raise ValueError(f"every rank must pass the same number of prompts to step(); sequences per rank: {rows}")
        exp = pad_to(exp, max(prompt_widths), max(response_widths), self.pad_id)
        return map_tensors(exp, distributed.all_gather_rows)

    @torch.no_grad()
    def _score(self, rollout):
        cfg = self.config
        seq, attn, resp, pos = rollout.sequences, rollout.attention_mask, rollout.response_mask, rollout.position_ids
        with self._autocast():
            if cfg.old_logprobs == "rollout":
                old = rollout.sampler_logprobs
            else:
                old = causal_lm_logprobs(self.policy, seq, attn, resp, temperature=cfg.temperature,
                                         position_ids=pos, chunk_size=cfg.logprob_chunk_size)
            with self._reference() as ref_model:
                ref = causal_lm_logprobs(ref_model, seq, attn, resp, temperature=cfg.temperature, position_ids=pos,
                                         chunk_size=cfg.logprob_chunk_size)
            values = None
            if self.critic is not None:
                values = torch.where(resp, token_values(self.critic, seq, attn, pos,
                                                        from_position=rollout.prompt_length), 0.0)
            raw_scores = sequence_scores(self.reward, seq, attn, pos).float()
        scores = ppo.adjust_scores(raw_scores, rollout.finished, rule=cfg.truncated_response,
                                   penalty=cfg.truncation_penalty, clip=cfg.score_clip)
        return Experience(**{f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)},
                          old_logprobs=old, ref_logprobs=ref, values=values, raw_scores=raw_scores, scores=scores)

    def _score_metrics(self, exp):
        """Scores, KL, lengths and the sampler-trainer gap of a scored batch (one host sync)."""
        old, ref, resp = exp.old_logprobs, exp.ref_logprobs, exp.response_mask
        summary = {
            "reward/score_mean": exp.raw_scores.mean(), "reward/score_std": exp.raw_scores.std(unbiased=False),
            "kl/k1": ppo.sequence_kl(old, ref, resp, "k1").mean(),
            "kl/k3": ppo.sequence_kl(old, ref, resp, "k3").mean(),
            "response/length_mean": exp.response_lengths.float().mean(),
            "response/finished_fraction": exp.finished.float().mean(),
        }
        if self.config.top_k or self.config.top_p < 1:
            summary["rollout/filter_kl"] = exp.filter_kl.sum() / resp.sum().clamp(min=1)
        if self.config.old_logprobs == "recompute":
            gap = (exp.sampler_logprobs - old).abs()
            summary["rollout/logprob_gap_mean"] = gap.sum() / resp.sum().clamp(min=1)
            summary["rollout/logprob_gap_max"] = gap.max()
        names = list(summary)
        values_host = torch.stack([summary[n].float() for n in names]).tolist()
        return dict(zip(names, values_host))

    @contextlib.contextmanager
    def _reference(self):
        """The reference policy: the frozen copy, or the policy with its LoRA adapters disabled."""
        if self.lora_reference:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.ref

    @torch.no_grad()
    def _advantages(self, exp):
        cfg = self.config
        mask = exp.response_mask
        exp.rewards = ppo.token_rewards(exp.scores, exp.old_logprobs, exp.ref_logprobs, mask, kl_coef=self.kl.coef,
                                        estimator=cfg.kl_estimator_used, kl_in_reward=cfg.kl_in == "reward")
        if cfg.advantage_estimator == "gae":
            exp.advantages, exp.returns = ppo.gae_advantages(exp.rewards, exp.values, mask, gamma=cfg.gamma,
                                                             lam=cfg.lam, whiten=cfg.whiten_advantages)
        else:
            exp.advantages, exp.returns = ppo.group_baseline_advantages(exp.rewards.sum(-1), mask,
                                                                        cfg.samples_per_prompt, cfg.group_baseline)
        return exp

    # Learn ---------------------------------------------------------------------------

    def _learn(self, exp, ptx_batch):
        cfg = self.config
        train_policy = self.iteration >= cfg.critic_warmup_iterations
        stats = WeightedMean()
        batch = exp.sequences.shape[0]
        world = self.layout.world_size
        if world > 1 and (batch % cfg.mini_batch_size or cfg.mini_batch_size % world):
            raise ValueError(f"over {world} ranks the global batch ({batch} sequences) must split into whole "
                             f"mini-batches of mini_batch_size={cfg.mini_batch_size}, each a multiple of {world}")
        micro = cfg.micro_batch_size or cfg.mini_batch_size // world
        applied = skipped = 0
        updates = cfg.ppo_epochs * math.ceil(batch / cfg.mini_batch_size)
        # Train as the function that was scored: no dropout (models.modes).
        with training_without_dropout(self.policy), training_without_dropout(self.critic):
            for epoch in range(cfg.ppo_epochs):
                order = torch.randperm(batch, generator=self.shuffle_generator).to(self.device)
                for mini_index in order.split(cfg.mini_batch_size):
                    mini = select(exp, mini_index)
                    normalizer = ppo.loss_normalizer(mini.response_mask, cfg.loss_agg)
                    total_loss = torch.zeros((), device=self.device)
                    sums = {}  # this rank's share of each loss the optimizer step minimises
                    # The first mini-batch is scored before any update: its log-probs are the
                    # trainer's view of the sampler's (the gap when old_logprobs="rollout").
                    record_gap = applied + skipped == 0 and cfg.old_logprobs == "rollout"
                    mine = select(mini, torch.arange(len(mini_index), device=self.device)[
                        distributed.rows_of_rank(len(mini_index), self.layout)])
                    ptx = train_policy and ptx_batch is not None
                    parts = torch.arange(len(mine.sequences), device=self.device).split(micro)
                    for i, micro_index in enumerate(parts):
                        # Sharded gradients are reduced over ranks on each model's last backward only.
                        last = i == len(parts) - 1
                        distributed.set_gradient_sync(self.policy, last and not ptx)
                        distributed.set_gradient_sync(self.critic, last)
                        total_loss = total_loss + self._micro_step(select(mine, micro_index), normalizer, sums,
                                                                   stats, train_policy, record_gap)
                    if ptx:  # this optimizer step's own pretraining rows
                        rows = torch.arange(applied + skipped, len(ptx_batch[0]), updates)
                        total_loss = total_loss + self._ptx_step([t[rows] for t in ptx_batch], micro, stats)
                    for name, share in sums.items():  # over the ranks: the step's loss, once per step
                        stats.add(name, world * share, 1 / world)
                    if self._optimizer_step(total_loss, train_policy):
                        applied += 1
                    else:
                        skipped += 1
        self.skipped_updates += skipped
        metrics = stats.result(reduce=distributed.all_reduce)
        metrics.update({"updates/applied": applied, "updates/skipped": skipped})
        if self.critic is not None:
            metrics["value/explained_variance"] = ppo.explained_variance(exp.values, exp.returns,
                                                                         exp.response_mask).item()
        return metrics

    def _micro_step(self, part, normalizer, sums, stats, train_policy, record_gap):
        """Forward and backward of one micro-batch through the policy and the
        critic (side by side with ``concurrent_models``); returns the
        (detached) loss. Stats with weight None are parts of the mini-batch's
        losses: summed into ``sums``; the others are token-weighted means."""
        results = self.lanes.run(
            (lambda: self._policy_pass(part, normalizer, record_gap)) if train_policy else None,
            (lambda: self._critic_pass(part, normalizer)) if self.critic is not None else None)
        loss = torch.zeros((), device=self.device)
        for result in results:
            if result is not None:
                loss = loss + result[0]
                for name, value, weight in result[1]:
                    if weight is None:
                        sums[name] = sums[name] + value if name in sums else value
                    else:
                        stats.add(name, value, weight)
        return loss

    def _policy_pass(self, part, normalizer, record_gap):
        """The policy's loss on one micro-batch, backward done: ``(loss, [(stat, value, weight)])``."""
        cfg = self.config
        mask = part.response_mask
        tokens = mask.sum()
        with self._autocast():
            logp, entropy = causal_lm_logprobs(self.policy, part.sequences, part.attention_mask, mask,
                                               temperature=cfg.temperature, position_ids=part.position_ids,
                                               return_entropy=True, chunk_size=cfg.logprob_chunk_size)
        pg_loss, pg_stats = ops.ppo_policy_loss(logp, part.old_logprobs, part.advantages, mask,
                                                clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                                dual_clip=cfg.dual_clip, agg=cfg.loss_agg, normalizer=normalizer)
        policy_loss = pg_loss
        stats = [("policy/loss", pg_loss.detach(), None)]
        if cfg.kl_in == "loss":
            kl = ops.kl_penalty(logp, part.ref_logprobs, estimator=cfg.kl_estimator_used)
            kl_loss = self.kl.coef * ppo.masked_agg(kl, mask, cfg.loss_agg, normalizer)
            policy_loss = policy_loss + kl_loss
            stats.append(("policy/kl_loss", kl_loss.detach(), None))
        policy_loss.backward()
        per_token = tokens.clamp(min=1)
        stats += [(f"policy/{name}", value, tokens) for name, value in pg_stats.items()]
        stats.append(("policy/entropy", torch.where(mask, entropy.detach(), 0.0).sum() / per_token, tokens))
        if record_gap:
            gap = torch.where(mask, (logp.detach() - part.sampler_logprobs).abs(), 0.0)
            stats.append(("rollout/logprob_gap_mean", gap.sum() / per_token, tokens))
        return policy_loss.detach(), stats

    def _critic_pass(self, part, normalizer):
        """The critic's clipped value loss on one micro-batch, backward done: ``(loss, [(stat, value, weight)])``."""
        cfg = self.config
        mask = part.response_mask
        tokens = mask.sum()
        with self._autocast():
            values = token_values(self.critic, part.sequences, part.attention_mask, part.position_ids,
                                  from_position=part.prompt_length)
        vf_loss, vf_stats = ops.ppo_value_loss(values, part.values, part.returns, mask, clip=cfg.value_clip,
                                               agg=cfg.loss_agg, normalizer=normalizer)
        vf_loss.backward()
        stats = [("value/loss", vf_loss.detach(), None), ("value/clipfrac", vf_stats["clipfrac"], tokens)]
        return vf_loss.detach(), stats

    def _ptx_step(self, ptx_batch, micro, stats):
        """PPO-ptx: ``ptx_coef`` times the LM loss of one optimizer step's
        pretraining rows, normalised by their token count (so the micro split
        does not matter); positions count from each row's first real token,
        and a token is trained only where a real token precedes it."""
        ids, attn, loss_mask = (t.to(self.device) for t in ptx_batch)
        positions = positions_from_mask(attn)
        loss_mask = loss_mask & attn & torch.nn.functional.pad(attn[:, :-1], (1, 0), value=False)
        normalizer = distributed.all_reduce(loss_mask.sum().float()).clamp(min=1.0)  # all ranks' tokens
        total = torch.zeros((), device=self.device)
        parts = torch.arange(ids.shape[0], device=self.device).split(micro)
        for i, rows in enumerate(parts):
            distributed.set_gradient_sync(self.policy, i == len(parts) - 1)
            with self._autocast():
                logp = causal_lm_logprobs(self.policy, ids[rows], attn[rows], loss_mask[rows],
                                          position_ids=positions[rows], chunk_size=self.config.logprob_chunk_size)
            loss = self.config.ptx_coef * ppo.lm_loss(logp, loss_mask[rows].bool(), normalizer)
            loss.backward()
            total = total + loss.detach()
        # Each rank's total is its share of the global loss: world x share, averaged over ranks, is the sum.
        stats.add("ptx/loss", self.layout.world_size * total / self.config.ptx_coef, 1)
        return total

    def _optimizer_step(self, total_loss, train_policy):
        """Clip and step the trained models' optimizers, unless the loss or a
        gradient is not finite: then the gradients are dropped and nothing
        changes. Returns whether the update was applied (one host sync)."""
        cfg = self.config
        trained = [name for name in self.optimizers if name == "critic" or train_policy]
        params = {n: [p for p in _trainable(self._trained(n)) if p.grad is not None] for n in trained}

        def grad_norm(name):
            return distributed.local_value(torch.nn.utils.get_total_norm([p.grad for p in params[name]]))

        def update(name, norm):
            optimizer = self.optimizers[name]
            if finite:
                # Clipping (only when the norm exceeds the bound) divides the gradients by
                # (norm + 1e-6) / max_grad_norm, as clip_grad_norm_ does, inside the fused
                # AdamW's own pass (its grad_scale, torch.amp.GradScaler's protocol)
                # instead of in a pass of its own over every gradient.
                clip = cfg.max_grad_norm is not None and norm > cfg.max_grad_norm
                if clip:
                    optimizer.grad_scale = torch.tensor((norm + 1e-6) / cfg.max_grad_norm, device=self.device)
                try:
                    optimizer.step()
                finally:
                    vars(optimizer).pop("grad_scale", None)
                self.schedulers[name].step()
            optimizer.zero_grad(set_to_none=True)

        norms = self.lanes.run(*(functools.partial(grad_norm, n) for n in trained))
        # The global loss (a sum over ranks) and global norms: every rank takes the same decision.
        total_loss = distributed.all_reduce(total_loss.float().clone())
        checks = torch.stack([total_loss, *(n.float() for n in norms)]).tolist()
        finite = all(math.isfinite(v) for v in checks)
        self.lanes.run(*(functools.partial(update, n, norm) for n, norm in zip(trained, checks[1:])))
        if not train_policy:
            self.optimizers["policy"].zero_grad(set_to_none=True)
        return finite

    # Checkpoints ---------------------------------------------------------------------

    def state(self, extra=None):
        """``(tensors, objects)``: everything :meth:`load` needs to continue
        exactly. ``tensors`` holds the trained models' and their optimizers'
        state dicts (this rank's shards under FSDP2), ``objects`` plain state."""
        tensors = {}
        for name, optimizer in self.optimizers.items():
            model = self._trained(name)
            tensors[name] = get_model_state_dict(model)
            tensors[f"{name}_optim"] = get_optimizer_state_dict(model, optimizer)
        objects = {
            "format": CHECKPOINT_FORMAT, "iteration": self.iteration, "skipped_updates": self.skipped_updates,
            "config": self.config.to_dict(), "kl": self.kl.state_dict(), "fingerprints": self._fingerprints,
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "rng": capture_rng([self.shuffle_generator]), "extra": extra,
        }
        return tensors, objects

    def _trained(self, name):
        return self.policy if name == "policy" else self.critic

    def save(self, directory, extra=None, keep=2):
        """Write a checkpoint atomically under ``directory`` (a crash mid-write
        leaves the previous one intact); ``extra`` is the caller's own state
        (e.g. its data position), returned by :meth:`load`. Returns the path.
        Under torch.distributed every rank calls it: each writes its shards
        (torch.distributed.checkpoint), into a folder all ranks share."""
        tensors, objects = self.state(extra)
        return save_checkpoint(directory, self.iteration, tensors, objects, keep=keep)  # names a failed rank

    def load(self, directory):
        """Restore the latest complete checkpoint under ``directory`` (or the
        checkpoint folder itself) into this engine, built with the same
        models and config, at any world size; returns the ``extra`` it was
        saved with. Under torch.distributed every rank calls it."""
        directory = Path(directory)
        path = directory if (directory / "manifest.json").exists() else latest_checkpoint(directory)
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {directory}")
        tensors, objects = load_checkpoint(path, self.state()[0])
        if objects.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: checkpoint format {objects.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        for name, saved in objects["fingerprints"].items():
            now = self._fingerprints[name]
            if saved != now:
                raise ValueError(f"{path}: the {name} model differs from the one the checkpoint was saved with "
                                 f"(checksum {now!r} vs {saved!r}); build the engine with the same frozen models")
        for name, optimizer in self.optimizers.items():
            model = self._trained(name)
            set_model_state_dict(model, tensors[name])
            set_optimizer_state_dict(model, optimizer, tensors[f"{name}_optim"])
            self.schedulers[name].load_state_dict(objects["schedulers"][name])
        # The configured learning rates apply from the resumed step on, not the checkpoint's (the same
        # schedule shape at the same step); a change is reported with the KL controller's.
        changed = []
        for name, lr in (("policy", self.config.lr), ("critic", self.config.critic_lr)):
            if name in self.schedulers:
                saved = self.schedulers[name].base_lrs[0]
                if saved != lr:
                    changed.append(f"{'lr' if name == 'policy' else 'critic_lr'} {saved!r} -> {lr!r}")
                set_peak_lrs(self.schedulers[name], [lr] * len(self.optimizers[name].param_groups))
        changed += self.kl.load_state_dict(objects["kl"])
        if changed:
            warnings.warn(f"{path}: the run continues with this config's settings, not the checkpoint's: "
                          f"{'; '.join(changed)}", stacklevel=2)
        restore_rng(objects["rng"], [self.shuffle_generator])
        self.iteration = objects["iteration"]
        self.skipped_updates = objects["skipped_updates"]
        return objects["extra"]
