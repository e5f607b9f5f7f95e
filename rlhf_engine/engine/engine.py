"""The lean hybrid engine: policy, reference, reward model and critic on one
device; each PPO iteration samples, scores and learns on them in turn.

    engine = RLHFEngine(policy, tokenizer, EngineConfig(...), reward_model=rm)
    for prompts in loader:
        metrics = engine.step(prompts)          # one PPO iteration
    engine.save("run/checkpoints")              # atomic; engine.load(...) resumes

:meth:`RLHFEngine.step` reads top to bottom: 1. rollout, 2. score,
3. advantages, 4. learn, 5. KL control; :meth:`RLHFEngine._learn` likewise
for one PPO update. The math lives in :mod:`rlhf_engine.engine.ppo`, the
batches in :mod:`rlhf_engine.engine.batch`, the checks and sharding done
once at construction in :mod:`rlhf_engine.engine.setup`, checkpoints in
:mod:`rlhf_engine.engine.state`.
"""
import contextlib
import copy
import dataclasses
import functools
import math
import time
from pathlib import Path

import torch

from rlhf_engine import distributed, ops
from rlhf_engine.engine import ppo, rewards, setup
from rlhf_engine.engine import state as engine_state
from rlhf_engine.engine.batch import Experience, Scored, extend, map_tensors, pad_to, select
from rlhf_engine.engine.config import EngineConfig
from rlhf_engine.engine.cpu_allocator import retain_freed_memory
from rlhf_engine.engine.kl_control import KLController
from rlhf_engine.engine.lanes import Lanes
from rlhf_engine.engine.metrics import PhaseRecorder, WeightedMean, reference_length
from rlhf_engine.engine.offload import OffloadPolicy, Placement
from rlhf_engine.engine.rollout import SamplingParams, mix_seed, row_uniforms, sample
from rlhf_engine.models import causal_lm_logprobs, encode_prompt, positions_from_mask
from rlhf_engine.models.last_layer import describe as describe_last_layer
from rlhf_engine.models.modes import training_without_dropout
from rlhf_engine.models.prompts import left_pad
from rlhf_engine.models import lora
from rlhf_engine.models.scalar_heads import critic_from, scalar_head, token_values
from rlhf_engine.optim import adamw, clipped_step, lr_factor, trainable_parameters


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
            disabled, not a copy). With ``config.lora_r > 0`` the engine adds
            the adapters (and, with ``critic_init="reward"``, the critic's on
            the reward model's backbone): peft changes the models given in
            place, so pass copies of models used elsewhere (README, LoRA).
        tokenizer: its tokenizer (pad and EOS ids; encodes string prompts).
        config: :class:`EngineConfig`.
        reward_model: ``AutoModelForSequenceClassification`` with one label,
            or any module returning a scalar per sequence; frozen. Optional
            when ``reward_funcs`` are given (the critic then needs
            ``critic_init="policy"`` or ``critic``).
        reward_funcs: ``{name: fn}``, reward functions of the decoded
            prompts and responses, batched (lists of ``B`` strings in, ``B``
            numbers out), ``async def`` allowed: see
            :mod:`rlhf_engine.engine.rewards`. The score is the weighted sum
            of the reward model's score and theirs; each source's mean and
            std are in the metrics (``reward/<name>_mean``, the reward
            model's name ``model``). A function that raises or scores a
            response non-finite skips the iteration's updates (counted in
            ``updates/skipped``, warned once per function).
        reward_weights: ``{name: weight}`` of the sources (``"model"``: the
            reward model); a source not named weighs 1.0.
        ref_model: the frozen reference (default: a frozen copy of ``policy``
            as given, or the adapter-disabled policy under LoRA).
        critic: a sequence-classification model used per token (default:
            built from the reward model or the policy, ``config.critic_init``).
    """

    def __init__(self, policy, tokenizer, config=None, *, reward_model=None, reward_funcs=None, reward_weights=None,
                 ref_model=None, critic=None):
        self.config = cfg = config or EngineConfig()
        self.layout = distributed.layout()
        self.device = distributed.device_for(self.layout, cfg.device)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token")

        # Models: the policy and critic train; the reference and reward model are frozen.
        self.policy = policy = self._with_lora(policy)
        self.lora_reference = ref_model is None and hasattr(policy, "disable_adapter")
        self.ref = None if self.lora_reference else setup.frozen(ref_model or copy.deepcopy(policy))
        self.reward_sources = rewards.build_sources(reward_model, reward_funcs, reward_weights)
        if reward_funcs:
            rewards.check_tokenizer(tokenizer)
        self._reported_sources = set()  # reward functions whose failure was warned about
        self.reward = None if reward_model is None else setup.frozen(reward_model)
        if reward_model is None and cfg.uses_critic and critic is None and cfg.critic_init == "reward":
            raise ValueError("critic_init='reward' builds the critic from the reward model, and there is none (reward "
                             "functions only): set critic_init='policy', pass a critic, or use a group baseline "
                             "(advantage_estimator='rloo', 'group' or 'dr_grpo')")
        self.critic = None
        if cfg.uses_critic:
            self.critic = critic if critic is not None else self._new_critic(reward_model)
        setup.check_vocabularies(tokenizer, {"policy": policy, "reference": self.ref, "reward model": self.reward,
                                             "critic": self.critic})
        self.attn_implementation = setup.select_attention(policy, self.device)
        for model in (self.ref, self.reward, self.critic):
            if model is not None and hasattr(model, "set_attn_implementation"):
                setup.select_attention(model, self.device)
        if cfg.gradient_checkpointing:
            setup.enable_gradient_checkpointing({"policy": self.policy, "critic": self.critic})

        # Eval mode outside the learn passes (which train without dropout: models.modes), so that
        # every pass -- rollout, score, learn -- computes the same function of the weights.
        modules = {"policy": self.policy, "ref": self.ref, "reward": self.reward, "critic": self.critic}
        modules = {k: m.to(self.device).eval() for k, m in modules.items() if m is not None}
        self._fingerprints = {"ref": setup.fingerprint(self.ref if self.ref is not None else self.policy,
                                                    frozen_only=self.ref is None),
                              "reward": setup.fingerprint(self.reward)}
        if self.layout.distributed:
            modules = setup.shard(modules, cfg, self.layout, self.device, self._fingerprints)

        # Optimizers (one AdamW rule: rlhf_engine.optim), schedules and controllers.
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

        # Rollout backend: the engine's sampler, or one colocated vLLM (rlhf_engine.engine.vllm_rollout),
        # started on the first rollout.
        self.vllm = None
        if cfg.rollout_backend == "vllm":
            if self.layout.distributed:
                raise ValueError(f"rollout_backend='vllm' runs one in-process vLLM and is not supported under "
                                 f"torch.distributed ({self.layout.world_size} ranks); use rollout_backend='engine'")
            from rlhf_engine.engine.vllm_rollout import VLLMRollout

            self.vllm = VLLMRollout(self.policy, device=self.device, dtype=cfg.dtype,
                                    kv_cache_bytes=cfg.vllm_kv_cache_bytes, seed=cfg.seed)

    @classmethod
    def from_pretrained(cls, policy_path, reward_model_path, config=None, *, critic_path=None, tokenizer_path=None):
        """Build from HuggingFace model folders or hub names."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from rlhf_engine.models.loading import load_pretrained

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or policy_path)
        policy = load_pretrained(AutoModelForCausalLM, policy_path, "the policy")
        reward = load_pretrained(AutoModelForSequenceClassification, reward_model_path, "the reward model",
                                 num_labels=1)
        critic = (load_pretrained(AutoModelForSequenceClassification, critic_path, "the critic", num_labels=1)
                  if critic_path else None)
        return cls(policy, tokenizer, config, reward_model=reward, critic=critic)

    def _with_lora(self, policy):
        """``policy``, wrapped in fresh LoRA adapters when ``config.lora_r > 0``
        and it is not a PEFT model already (a ready ``PeftModel`` trains its
        own adapters). LoRA is refused under torch.distributed."""
        cfg = self.config
        if cfg.lora and not lora.is_peft(policy):
            policy = lora.add_lora(policy, cfg.lora_options(), seed=cfg.seed)
        if lora.is_peft(policy):
            lora.refuse_distributed(self.layout.world_size)
        return policy

    def _new_critic(self, reward_model):
        """The critic ``config.critic_init`` builds. Under LoRA (``lora_r >
        0``): LoRA adapters and a trainable copy of the score head (the value
        head) on the reward model's backbone, whose frozen reward model is
        then that backbone with the adapters disabled and its own head
        (``self.reward``, a :class:`~rlhf_engine.models.lora.WithoutAdapters`
        view: no second copy); with ``critic_init="policy"``, adapters on a
        seq-cls copy of the policy's (merged) body -- a third copy of the base
        weights, beside the reward model's."""
        cfg = self.config
        if cfg.critic_init == "policy":
            critic = critic_from(self.policy)
            return lora.add_lora(critic, cfg.lora_options(), scalar=True, seed=cfg.seed + 1) if cfg.lora else critic
        if not cfg.lora:
            return critic_from(reward_model)
        if scalar_head(reward_model) is None or lora.is_peft(reward_model):
            raise ValueError(f"lora_r={cfg.lora_r} with critic_init='reward' puts the critic's adapters on the reward "
                             f"model's backbone, which needs a HuggingFace sequence-classification reward model "
                             f"(num_labels=1, a `score` head, not a PEFT model); got {type(reward_model).__name__}: "
                             f"use critic_init='policy' or pass a critic")
        critic = lora.add_lora(reward_model, cfg.lora_options(), scalar=True, seed=cfg.seed + 1)
        self.reward = setup.frozen(lora.WithoutAdapters(critic))
        return critic

    def _adamw(self, model, lr):
        cfg = self.config
        return adamw(model, lr=lr, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
                     eps=cfg.adam_eps)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.dtype == "bfloat16")

    def _trained(self, name):
        return self.policy if name == "policy" else self.critic

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
        recorder = PhaseRecorder(self.device)
        profiler = self._profiler()
        start = time.perf_counter()
        prompt_ids, prompt_mask = self._encode(prompts)
        ptx_batch = self._check_ptx(ptx_batch, len(prompt_ids))
        with profiler, distributed.guard(f"PPO iteration {self.iteration + 1}"):
            # 0. Sync (vLLM backend): the policy's weights into vLLM, in place (its start-up the first time).
            if self.vllm is not None:
                with recorder.phase("sync"):
                    started = self.vllm.llm is None
                    self.vllm.sync(self.policy)
                recorder.metrics["time/vllm_startup"] = self.vllm.startup_seconds if started else 0.0
            # 1. Rollout: the policy samples responses to this rank's prompts.
            with recorder.phase("rollout"):
                self.placement.enter("rollout")
                rollout = self._rollout(prompt_ids, prompt_mask)
            # 2. Score: old and reference log-probs, values, reward-model scores; then
            #    every rank holds the global batch (the rest of the iteration is global).
            with recorder.phase("score"):
                self.placement.enter("score")
                scored, source_scores = self._score(rollout)
                scored, source_scores = self._gather(scored), distributed.all_gather_rows(source_scores)
                # a failed reward source (non-finite sum) skips every update of the iteration
                scored = dataclasses.replace(scored, scores=rewards.fail_whole_batch(scored.scores,
                                                                                     scored.raw_scores))
                score_metrics = self._score_metrics(scored, source_scores)
            # 3. Advantages: KL-shaped rewards, GAE (or group baselines), whitening.
            with recorder.phase("advantages"):
                exp = self._advantages(scored)
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
        return {"iteration": self.iteration, **score_metrics, **learn_metrics, **phases,
                "tokens_per_second": generated / phases["time/step"],
                "rollout_tokens_per_second": generated / phases["time/rollout"],
                "kl/coef": self.kl.coef, "lr": self.schedulers["policy"].get_last_lr()[0],
                "updates/skipped_total": self.skipped_updates,
                "info/attn_implementation": self.attn_implementation,
                "info/last_layer": describe_last_layer(self.policy)}

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

    # 1. Rollout ---------------------------------------------------------------------------

    def _rollout(self, ids, mask):
        """Sample this rank's sequences from its prompts ``ids``/``mask``
        ``[B, P]``. Each sequence draws from its own random stream, keyed by
        the seed, the iteration and its row in the global batch (ranks hold
        consecutive rows), so the tokens do not depend on the world size."""
        k = self.config.samples_per_prompt
        ids, mask = ids.repeat_interleave(k, 0).to(self.device), mask.repeat_interleave(k, 0).to(self.device)
        first = self.layout.rank * len(ids)  # every rank passes as many prompts (checked in _gather)
        if self.vllm is not None:  # per-sequence seeds; the KV cache released until the next sync
            seeds = [mix_seed(self.config.seed, self.iteration, row) for row in range(first, first + len(ids))]
            rollout = self.vllm.sample(ids, mask, self.sampling, seeds)
            self.vllm.release()
            return rollout
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

    # 2. Score -------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, rollout):
        """The policy's (old), the reference's log-probs, the critic's values and
        the reward of this rank's ``rollout``: ``(Scored, per-source scores
        [B, S])``, the scores the weighted sum of the reward sources'
        (:func:`rlhf_engine.engine.rewards.score_sources`)."""
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
            sources = rewards.score_sources(self.reward_sources, rollout, self.tokenizer, self.reward,
                                            self._reported_sources)
        raw_scores = sources.total
        scores = ppo.adjust_scores(raw_scores, rollout.finished, rule=cfg.truncated_response,
                                   penalty=cfg.truncation_penalty, clip=cfg.score_clip)
        return extend(rollout, Scored, old_logprobs=old, ref_logprobs=ref, values=values, raw_scores=raw_scores,
                      scores=scores), sources.per_source

    def _score_metrics(self, scored, source_scores):
        """Scores (the weighted sum's and each source's, ``source_scores``
        ``[B, S]``), KL, lengths, the reward-hacking diagnostics and, when the
        score phase ran the trainer's forward (``old_logprobs="recompute"``),
        the sampler-trainer gap of the global batch (one host sync). With
        ``old_logprobs="rollout"`` the first mini-batch of the learn phase
        measures the gap (:meth:`_policy_pass`)."""
        old, ref, resp = scored.old_logprobs, scored.ref_logprobs, scored.response_mask
        lengths = scored.response_lengths.float()
        ref_length, ref_length_ess = reference_length(old, ref, resp)  # the policy's log-probs, as kl/k1's
        summary = {
            "reward/score_mean": scored.raw_scores.mean(),
            "reward/score_std": scored.raw_scores.std(unbiased=False),
            "reward/failed": (~torch.isfinite(scored.raw_scores).all()).float(),
            **{f"reward/{source.name}_{stat}": fn(source_scores[:, i])
               for i, source in enumerate(self.reward_sources)
               for stat, fn in (("mean", torch.mean), ("std", lambda x: x.std(unbiased=False)))},
            # reward-hacking diagnostics (README): length drift from the reference, entropy, truncation
            "response/length_ratio": lengths.mean() / ref_length.clamp(min=1e-12),
            "response/ref_length_mean": ref_length,
            "response/ref_length_ess": ref_length_ess,
            "response/truncated_fraction": 1 - scored.finished.float().mean(),
            "rollout/entropy": -scored.sampler_logprobs.float().sum() / resp.sum().clamp(min=1),
            "kl/k1": ppo.sequence_kl(old, ref, resp, "k1").mean(),
            "kl/k3": ppo.sequence_kl(old, ref, resp, "k3").mean(),
            "response/length_mean": scored.response_lengths.float().mean(),
            "response/finished_fraction": scored.finished.float().mean(),
        }
        if self.config.top_k or self.config.top_p < 1:
            summary["rollout/filter_kl"] = scored.filter_kl.sum() / resp.sum().clamp(min=1)
        if self._gap_measured_in_score():
            summary["rollout/logprob_gap_mean"], summary["rollout/logprob_gap_max"] = ppo.logprob_gap(
                scored.sampler_logprobs, old, resp)
            summary["rollout/logprob_gap_frac"] = ppo.logprob_gap_fraction(scored.sampler_logprobs, old, resp,
                                                                            self.config.logprob_gap_threshold)
        names = list(summary)
        values_host = torch.stack([summary[n].float() for n in names]).tolist()
        return dict(zip(names, values_host))

    def _gap_measured_in_score(self):
        """Where ``rollout/logprob_gap_*`` is measured: the gap between the
        sampler's log-probs and the trainer's before any update needs a
        forward of the trainer; the score phase runs one over the whole batch
        with ``old_logprobs="recompute"``, else the first mini-batch's policy
        pass is the first (and only its rows are measured)."""
        return self.config.old_logprobs == "recompute"

    @contextlib.contextmanager
    def _reference(self):
        """The reference policy: the frozen copy, or the policy with its LoRA adapters disabled."""
        if self.lora_reference:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.ref

    # 3. Advantages ---------------------------------------------------------------------

    @torch.no_grad()
    def _advantages(self, scored):
        """Per-token rewards (KL-shaped with the KL in the reward), then GAE
        or group baselines: the :class:`Experience` the learn phase trains on."""
        cfg = self.config
        mask = scored.response_mask
        rewards = ppo.token_rewards(scored.scores, scored.old_logprobs, scored.ref_logprobs, mask,
                                    kl_coef=self.kl.coef, estimator=cfg.kl_estimator_used,
                                    kl_in_reward=cfg.kl_in == "reward")
        if cfg.advantage_estimator == "gae":
            advantages, returns = ppo.gae_advantages(rewards, scored.values, mask, gamma=cfg.gamma, lam=cfg.lam,
                                                     whiten=cfg.whiten_advantages)
        else:
            advantages, returns = ppo.group_baseline_advantages(rewards.sum(-1), mask, cfg.samples_per_prompt,
                                                                cfg.group_baseline)
        return extend(scored, Experience, rewards=rewards, advantages=advantages, returns=returns)

    # 4. Learn ---------------------------------------------------------------------------

    def _learn(self, exp, ptx_batch):
        """PPO epochs over shuffled mini-batches of the global batch ``exp``:
        each mini-batch is one optimizer step, its rows split over the ranks
        and this rank's rows into micro-batches."""
        cfg = self.config
        train_policy = self.iteration >= cfg.critic_warmup_iterations
        batch, world = exp.sequences.shape[0], self.layout.world_size
        if world > 1 and (batch % cfg.mini_batch_size or cfg.mini_batch_size % world):
            raise ValueError(f"over {world} ranks the global batch ({batch} sequences) must split into whole "
                             f"mini-batches of mini_batch_size={cfg.mini_batch_size}, each a multiple of {world}")
        micro = cfg.micro_batch_size or cfg.mini_batch_size // world
        steps = cfg.ppo_epochs * math.ceil(batch / cfg.mini_batch_size)
        ptx = train_policy and ptx_batch is not None
        stats = WeightedMean()
        applied = 0
        # Train as the function that was scored: no dropout (models.modes).
        with training_without_dropout(self.policy), training_without_dropout(self.critic):
            for step, mini_index in enumerate(self._mini_batches(batch)):
                # a. This rank's rows of the mini-batch. The first mini-batch is scored before
                #    any update: its log-probs are the trainer's view of the sampler's.
                mini = select(exp, mini_index)
                mine = select(mini, torch.arange(len(mini_index), device=self.device)[
                    distributed.rows_of_rank(len(mini_index), self.layout)])
                normalizer = ppo.loss_normalizer(mini.response_mask, cfg.loss_agg)
                measure_gap = step == 0 and not self._gap_measured_in_score()
                sums = {}  # this rank's share of each loss the optimizer step minimises
                total_loss = torch.zeros((), device=self.device)
                # b. Policy and critic losses, forward and backward, one micro-batch at a time.
                parts = torch.arange(len(mine.sequences), device=self.device).split(micro)
                for i, micro_index in enumerate(parts):
                    # Sharded gradients are reduced over ranks on each model's last backward only.
                    last = i == len(parts) - 1
                    distributed.set_gradient_sync(self.policy, last and not ptx)
                    distributed.set_gradient_sync(self.critic, last)
                    total_loss = total_loss + self._micro_step(select(mine, micro_index), normalizer, sums, stats,
                                                               train_policy, measure_gap)
                # c. PPO-ptx: this optimizer step's own pretraining rows.
                if ptx:
                    rows = torch.arange(step, len(ptx_batch[0]), steps)
                    ptx_loss, ptx_stats = self._ptx_step([t[rows] for t in ptx_batch], micro)
                    total_loss = total_loss + ptx_loss
                    _record(ptx_stats, sums, stats)
                # d. The step's losses over the ranks (world x share, averaged over ranks: the sum).
                for name, share in sums.items():
                    stats.add(name, world * share, 1 / world)
                # e. Clip and step, unless the loss or a gradient is not finite.
                applied += self._optimizer_step(total_loss, train_policy)
        skipped = steps - applied
        self.skipped_updates += skipped
        metrics = stats.result(reduce=distributed.all_reduce)
        metrics.update({"updates/applied": applied, "updates/skipped": skipped})
        if self.critic is not None:
            metrics["value/explained_variance"] = ppo.explained_variance(exp.values, exp.returns,
                                                                         exp.response_mask).item()
        return metrics

    def _mini_batches(self, batch):
        """``[m]`` int64 row indices of each mini-batch of ``batch`` rows, epoch
        after epoch, each epoch in a fresh order from the shuffling generator."""
        for _ in range(self.config.ppo_epochs):
            order = torch.randperm(batch, generator=self.shuffle_generator).to(self.device)
            yield from order.split(self.config.mini_batch_size)

    def _micro_step(self, part, normalizer, sums, stats, train_policy, measure_gap):
        """Forward and backward of one micro-batch through the policy and the
        critic (side by side with ``concurrent_models``); returns the
        (detached) loss and records the passes' stats (:func:`_record`)."""
        results = self.lanes.run(
            (lambda: self._policy_pass(part, normalizer, measure_gap)) if train_policy else None,
            (lambda: self._critic_pass(part, normalizer)) if self.critic is not None else None)
        loss = torch.zeros((), device=self.device)
        for result in results:
            if result is not None:
                loss = loss + result[0]
                _record(result[1], sums, stats)
        return loss

    def _policy_pass(self, part, normalizer, measure_gap):
        """The policy's loss on one micro-batch, backward done: ``(loss, [(stat, value, weight)])``.
        ``measure_gap``: also the sampler-trainer log-prob gap of its tokens."""
        cfg = self.config
        mask = part.response_mask
        tokens = mask.sum()
        with self._autocast():
            logp, entropy = causal_lm_logprobs(self.policy, part.sequences, part.attention_mask, mask,
                                               temperature=cfg.temperature, position_ids=part.position_ids,
                                               return_entropy=True, chunk_size=cfg.logprob_chunk_size)
        advantages = part.advantages
        if cfg.tis != "off":  # truncated importance sampling: each token's loss weighted (a weight >= 0 scales A)
            weights = ppo.tis_weights(part.old_logprobs, part.sampler_logprobs, mask, mode=cfg.tis, cap=cfg.tis_cap)
            advantages = advantages * weights
            truncated = (weights == 0) if cfg.tis == "sequence" else \
                mask & ((part.old_logprobs - part.sampler_logprobs) > math.log(cfg.tis_cap))
            tis_stats = [("tis/weight_mean", weights.sum() / tokens.clamp(min=1), tokens),
                         ("tis/truncated_fraction", (truncated & mask).sum() / tokens.clamp(min=1), tokens)]
        pg_loss, pg_stats = ops.ppo_policy_loss(logp, part.old_logprobs, advantages, mask,
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
        if measure_gap:
            gap_mean, _ = ppo.logprob_gap(part.sampler_logprobs, logp.detach(), mask)
            stats.append(("rollout/logprob_gap_mean", gap_mean, tokens))
            stats.append(("rollout/logprob_gap_frac", ppo.logprob_gap_fraction(
                part.sampler_logprobs, logp.detach(), mask, cfg.logprob_gap_threshold), tokens))
        if cfg.tis != "off":
            stats += tis_stats
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

    def _ptx_step(self, ptx_batch, micro):
        """PPO-ptx: ``ptx_coef`` times the LM loss of one optimizer step's
        pretraining rows, normalised by their token count (so the micro split
        does not matter), backward done: ``(loss, [(stat, value, weight)])``.
        Positions count from each row's first real token, and a token is
        trained only where a real token precedes it."""
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
        return total, [("ptx/loss", self.layout.world_size * total / self.config.ptx_coef, 1)]

    def _optimizer_step(self, total_loss, train_policy):
        """Clip and step the trained models' optimizers, unless the loss or a
        gradient is not finite: then the gradients are dropped and nothing
        changes. Returns whether the update was applied (one host sync)."""
        cfg = self.config
        trained = [name for name in self.optimizers if name == "critic" or train_policy]
        params = {n: [p for p in trainable_parameters(self._trained(n)) if p.grad is not None] for n in trained}

        def grad_norm(name):
            return distributed.local_value(torch.nn.utils.get_total_norm([p.grad for p in params[name]]))

        def update(name, norm):
            optimizer = self.optimizers[name]
            if finite:
                clipped_step(optimizer, norm, cfg.max_grad_norm)
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

    # Checkpoints (rlhf_engine.engine.state) ------------------------------------------------

    def state(self, extra=None):
        """``(tensors, objects)``: everything :meth:`load` needs to continue
        exactly. ``tensors`` holds the trained models' and their optimizers'
        state dicts (this rank's shards under FSDP2), ``objects`` plain state."""
        return engine_state.collect(self, extra)

    def save(self, directory, extra=None, keep=2):
        """Write a checkpoint atomically under ``directory`` (a crash mid-write
        leaves the previous one intact); ``extra`` is the caller's own state
        (e.g. its data position), returned by :meth:`load`. Returns the path.
        Under torch.distributed every rank calls it: each writes its shards
        (torch.distributed.checkpoint), into a folder all ranks share."""
        return engine_state.save(self, directory, extra, keep=keep)

    def load(self, directory, *, verify=True):
        """Restore the latest complete checkpoint under ``directory`` (or the
        checkpoint folder itself) into this engine, built with the same
        models and config, at any world size; returns the ``extra`` it was
        saved with. ``verify=False`` skips checking the files of a folder
        the caller has just verified. Under torch.distributed every rank
        calls it."""
        return engine_state.load(self, directory, verify)


def _record(entries, sums, stats):
    """Fold a pass's ``[(stat, value, weight)]`` into the step: weight None
    marks a part of the mini-batch's loss (summed into ``sums``), the others
    are weighted means (``stats``, a :class:`WeightedMean`)."""
    for name, value, weight in entries:
        if weight is None:
            sums[name] = sums[name] + value if name in sums else value
        else:
            stats.add(name, value, weight)
