"""The memory planner: the bytes one PPO iteration of the engine holds on its
device, per phase (rollout, score, learn), from the models' configs alone.

No weights are read: the models are built on the ``meta`` device (shapes
only) to count their parameters and find their linear layers. For each
phase the plan lists what is on the device (the engine's own offload
table, :func:`rlhf_engine.engine.offload.plan`, decides which models and
optimizer states stay there) and what the phase allocates on top:

- weights: every parameter and buffer, in ``weights_dtype``; under LoRA
  four models on two copies of the base weights (the reference is the
  policy without its adapters, the reward model the critic without its);
- AdamW states: two per trainable parameter, in the parameters' dtype
  (the fused AdamW keeps them so); gradients: one per trainable parameter,
  during learn only (the engine frees them after each optimizer step);
- the autocast weight cache: bf16 copies of the trainable float32 weights
  while ``dtype="bfloat16"`` (torch.autocast caches casts of leaf tensors
  that require grad);
- rollout: the KV cache, ``layers x 2 x kv_heads x head_dim x (prompt +
  new tokens) x batch`` activation-dtype values, one prefill layer's
  activations and the sampler's ``batch x vocab`` buffers;
- score: one layer's activations of a no-grad forward over the whole batch
  and the log-prob op's logits chunk;
- learn: per micro-batch, the activations autograd saves in every layer
  (:func:`saved_per_token`; with gradient checkpointing, each layer's input
  plus one layer recomputed), the log-prob op's chunk buffers and the
  backward's transient gradients; the policy's and the critic's passes
  side by side where the engine runs them so (CPU ``concurrent_models``).

The activation counts are estimates of what autograd saves for a
Llama-style decoder layer (RMSNorm, rotary attention, gated MLP);
tests/test_plan.py checks the whole prediction against the engine's
measured allocations on the CPU, and benchmarks/results/intel-xeon/plan.md
records the agreement. Sizes are bytes; :func:`gib` formats them.
"""
import dataclasses
import json
import re
from pathlib import Path
from typing import Dict

PHASES = ("rollout", "score", "learn")
PRESETS_DOC = "llama-3-8b, qwen2.5-7b (configs written inline: no download)"
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
_GPU_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|GiB|MB|MiB)\s*$", re.IGNORECASE)

# Published shapes of two 7B/8B models (their config.json fields), so that no download is needed.
PRESETS = {
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the plan needs of one model: parameter and buffer counts, the
    decoder's shapes, and the linear layers LoRA may adapt
    (``{last name: [(in, out), ...]}``)."""

    params: int
    buffers: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linears: Dict[str, tuple]
    head_params: int  # the output head's (lm_head or score) parameters


@dataclasses.dataclass(frozen=True)
class Work:
    """One iteration's shapes: ``batch`` sequences (prompts x samples per
    prompt) of ``prompt_tokens`` + ``new_tokens`` tokens."""

    batch: int
    prompt_tokens: int
    new_tokens: int

    def __post_init__(self):
        for name in ("batch", "prompt_tokens", "new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @property
    def tokens(self):
        return self.prompt_tokens + self.new_tokens


# Models: configs and their shapes ------------------------------------------------------


def resolve_config(spec, vocab_size=None):
    """The HuggingFace config ``spec`` names: a model folder (its
    config.json only), a size of :data:`rlhf_engine.models.builders.BENCH_SIZES`
    (with the byte tokenizer's 450-token vocabulary unless the size fixes
    one), or a preset of :data:`PRESETS`. ValueError for anything else."""
    from transformers import AutoConfig, CONFIG_MAPPING

    from rlhf_engine.models.builders import BENCH_SIZES, model_config

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a model must be a folder with a config.json, a size ({', '.join(BENCH_SIZES)}) or a preset "
                         f"({PRESETS_DOC}), got {spec!r}")
    if spec in PRESETS:
        fields = dict(PRESETS[spec])
        return CONFIG_MAPPING[fields.pop("model_type")](**fields)
    if spec in BENCH_SIZES:
        return model_config(spec, _SizeTokenizer(vocab_size or 450))
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(f"{spec!r} is not a model folder with a config.json, a size ({', '.join(BENCH_SIZES)}) or a "
                         f"preset ({PRESETS_DOC})")
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{spec}/config.json cannot be read as a HuggingFace config: {error}") from None


@dataclasses.dataclass(frozen=True)
class _SizeTokenizer:
    """Stands for the byte tokenizer when only its length and special ids matter."""

    length: int
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __len__(self):
        return self.length


def model_shape(config, kind):
    """:class:`ModelShape` of ``config`` built as a causal LM (``kind``
    "causal") or a one-label sequence classifier ("scalar"), on the meta
    device: no memory, no weights read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in ("causal", "scalar"):
        raise ValueError(f"kind must be 'causal' or 'scalar', got {kind!r}")
    config = type(config).from_dict(config.to_dict())
    if kind == "scalar":
        config.num_labels = 1
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
    builder = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = builder.from_config(config)
    linears = {}
    head = model.get_output_embeddings() if kind == "causal" else model.score
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linears.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))
    heads = config.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()), buffers=sum(b.numel() for b in model.buffers()),
        layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=config.vocab_size,
        linears={k: tuple(v) for k, v in linears.items()}, head_params=sum(p.numel() for p in head.parameters()))


def lora_params(shape, r, targets=None):
    """Parameters of rank-``r`` LoRA adapters on ``shape``'s linear layers
    named in ``targets`` (None: every linear layer of the body, as
    :func:`rlhf_engine.models.lora.default_targets`): ``r x (in + out)``
    per adapted layer. ValueError for a target the model does not have."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be an int >= 1 here, got {r!r}")
    from rlhf_engine.models.lora import _NOT_TARGETED

    names = [n for n in shape.linears if n not in _NOT_TARGETED] if targets is None else list(targets)
    missing = [n for n in names if n not in shape.linears]
    if missing:
        raise ValueError(f"lora_target_modules names {missing}, which the model does not have (its linear layers: "
                         f"{', '.join(sorted(shape.linears))})")
    return sum(r * (i + o) for n in names for i, o in shape.linears[n])


# Activations ------------------------------------------------------------------------------


def saved_per_token(shape, tokens=None):
    """Values autograd saves per token in one decoder layer of ``shape``
    (Llama-style): the two RMSNorms' inputs and outputs (4 H), queries,
    keys and values after the rotary embedding and the attention output
    with its projection input (3 H_q + 2 H_kv), the gated MLP's gate, up,
    activation and product (4 I); with ``tokens``, the attention
    probabilities (heads x tokens) of the math attention path too."""
    hq, hkv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    values = 4 * shape.hidden + 3 * hq + 2 * hkv + 4 * shape.intermediate
    return values + (shape.heads * tokens if tokens else 0)


def layer_transient(shape, tokens):
    """Values one no-grad layer forward holds at once per sequence of
    ``tokens`` tokens: the residual stream, the normed input, q/k/v, the
    attention probabilities and the MLP's three intermediate tensors."""
    hq, hkv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_token = 3 * shape.hidden + hq + 2 * hkv + 3 * shape.intermediate + shape.heads * tokens
    return per_token * tokens


def chunk_rows(rows, vocab, chunk_size=None, budget=None):
    """Rows of logits the log-prob op holds at once (its chunk), as
    :func:`rlhf_engine.ops.linear_logprobs.default_chunk_size` picks them
    with ``budget`` bytes (default: its CUDA cap), or ``chunk_size``."""
    from rlhf_engine.ops import linear_logprobs as op

    if chunk_size is not None:
        return max(1, min(chunk_size, rows))
    budget = op._CUDA_BUDGET_BYTES if budget is None else budget
    n = max(1, budget // (vocab * op._BYTES_PER_LOGIT))
    if n > op._ROW_MULTIPLE:
        n -= n % op._ROW_MULTIPLE
    return max(1, min(n, rows))


def logprob_buffers(shape, rows, chunk_size, budget):
    """Bytes of the log-prob op's chunk: logits and their softmax /
    gradient (two ``rows x vocab`` float32 buffers)."""
    from rlhf_engine.ops import linear_logprobs as op

    return 2 * chunk_rows(rows, shape.vocab, chunk_size, budget) * shape.vocab * op._BYTES_PER_LOGIT


def learn_activations(shape, rows, tokens, act_bytes, checkpointing, causal, chunk_size=None, budget=None):
    """Peak bytes of one model's forward and backward on ``rows`` sequences
    of ``tokens`` tokens: the saved activations of every layer (with
    ``checkpointing`` each layer's input, plus one layer's recomputed), the
    head (``causal``: the log-prob chunk buffers and the final hidden
    states; else the values), and the backward's gradient of the widest
    activation (two ``tokens x intermediate`` buffers)."""
    n = rows * tokens
    layer = saved_per_token(shape, tokens) * n * act_bytes
    saved = (shape.layers * shape.hidden * n * act_bytes + layer) if checkpointing else shape.layers * layer
    head = (logprob_buffers(shape, n, chunk_size, budget) + 2 * shape.hidden * n * 4) if causal else 2 * n * 4
    backward = 2 * shape.intermediate * n * act_bytes
    return saved + head + backward


def learn_peak(passes, *, side_by_side, accumulates):
    """Peak bytes of gradients and activations together in an optimizer
    step of ``passes`` ``[(activations A, gradients G)]`` (policy first).
    A backward frees a layer's activations as it writes that layer's
    gradients, so one pass holds about ``max(A, G)`` beyond the gradients
    of the passes before it; with gradient accumulation (micro-batches
    smaller than the mini-batch) a later micro-batch runs with every
    gradient present. ``side_by_side``: the passes run at once."""
    total = sum(g for _, g in passes)
    if accumulates:
        return total + (sum(a for a, _ in passes) if side_by_side else max(a for a, _ in passes))
    if side_by_side:
        return sum(max(a, g) for a, g in passes)
    peak, before = 0, 0
    for a, g in passes:
        peak = max(peak, before + max(a, g))
        before += g
    return peak


# The plan ------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """``items[phase][item]``: bytes on the device per phase; ``peaks``:
    their sums; ``settings``: what was planned."""

    items: Dict[str, Dict[str, int]]
    settings: Dict[str, object]

    @property
    def peaks(self):
        return {phase: sum(items.values()) for phase, items in self.items.items()}

    @property
    def peak(self):
        return max(self.peaks.values())


def plan_memory(policy, reward, config, work, *, critic=None, weights_dtype="float32", device="cuda", budget=None):
    """The :class:`Plan` of one PPO iteration of the engine.

    Args:
        policy, reward: :class:`ModelShape` of the policy (causal) and the
            reward model (scalar).
        critic: the critic's :class:`ModelShape` (scalar); default the
            reward model's (``config.critic_init="reward"``).
        config: the :class:`~rlhf_engine.engine.EngineConfig` (dtype,
            offload, batch sizes, gradient checkpointing, LoRA, ...).
        work: :class:`Work`.
        weights_dtype: the models' own dtype ("float32", the engine's
            default; "bfloat16" for models loaded so, as torchtune runs PPO).
        device: "cuda" (one GPU) or "cpu": on the CPU with
            ``concurrent_models`` the policy's and critic's learn passes
            run side by side, so their activations add up.
        budget: the log-prob op's chunk budget in bytes (default its CUDA cap).
    """
    from rlhf_engine.engine.offload import OffloadPolicy, plan as placement

    if weights_dtype not in _DTYPE_BYTES:
        raise ValueError(f"weights_dtype must be one of {sorted(_DTYPE_BYTES)}, got {weights_dtype!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    critic = reward if critic is None else critic
    wb = _DTYPE_BYTES[weights_dtype]
    act = 2 if config.dtype == "bfloat16" else wb
    lora_r = getattr(config, "lora_r", 0)
    targets = _targets(getattr(config, "lora_target_modules", "auto"))
    uses_critic = config.uses_critic
    labels = {name: f"{name} weights" for name in ("policy", "ref", "reward", "critic")}
    base = {"policy": policy.params + policy.buffers, "ref": policy.params + policy.buffers,
            "reward": reward.params + reward.buffers, "critic": critic.params + critic.buffers if uses_critic else 0}
    if lora_r:
        # Four models on two copies of the base weights: the reference is the policy without its adapters, the
        # reward model the critic without its (whose base is then counted where the critic is placed); a critic
        # from the policy (critic_init="policy") is a third copy.
        policy_trained = lora_params(policy, lora_r, targets)
        critic_trained = lora_params(critic, lora_r, targets) + critic.head_params if uses_critic else 0
        base["policy"] += policy_trained
        base["ref"] = 0
        labels["policy"] = "policy + reference weights (shared)"
        base["critic"] += critic_trained
        if uses_critic and config.critic_init == "reward":
            base["reward"] = 0
            labels["critic"] = "critic + reward weights (shared)"
    else:
        policy_trained, critic_trained = policy.params, critic.params if uses_critic else 0
    weights = {name: count * wb for name, count in base.items()}
    optim = {"policy_optim": 2 * policy_trained * wb, "critic_optim": 2 * critic_trained * wb}
    grads = {"policy": policy_trained * wb, "critic": critic_trained * wb}
    cache = 2 if config.dtype == "bfloat16" and weights_dtype == "float32" else 0
    offload = OffloadPolicy.parse(config.offload_policy, enabled=config.offload)
    batch, tokens = work.batch, work.tokens
    micro = config.micro_batch_size or config.mini_batch_size
    micro = min(micro, batch)
    response_rows = batch * work.new_tokens

    items = {}
    for phase in PHASES:
        on = placement(offload, phase)
        row = {labels[name]: weights[name] for name in ("policy", "ref", "reward", "critic")
               if on[name] and weights[name]}
        row.update({f"{name.replace('_optim', '')} AdamW states": optim[name] for name in optim
                    if on[name] and optim[name]})
        cached = {"rollout": policy_trained, "learn": policy_trained + critic_trained,
                  "score": critic_trained + (policy_trained if config.old_logprobs == "recompute" else 0)}[phase]
        if cache and cached:
            row["autocast bf16 weight cache"] = cache * cached
        items[phase] = row
    # Rollout: KV cache, one prefill layer, the sampler's [B, V] buffers.
    kv = policy.layers * 2 * policy.kv_heads * policy.head_dim * tokens * batch * act
    items["rollout"]["KV cache"] = kv
    items["rollout"]["activations (prefill layer, sampler)"] = (
        layer_transient(policy, work.prompt_tokens) * batch * act + 4 * batch * policy.vocab * 4)
    # Score: no-grad forwards one model after the other; the largest pass.
    score = [layer_transient(policy, tokens) * batch * act + logprob_buffers(policy, response_rows,
                                                                             config.logprob_chunk_size, budget),
             layer_transient(reward, tokens) * batch * act]
    items["score"]["activations (one layer, log-prob chunk)"] = max(score)
    # Learn: gradients, then the micro-batch passes.
    items["learn"]["policy gradients"] = grads["policy"]
    if critic_trained:
        items["learn"]["critic gradients"] = grads["critic"]
    passes = [(learn_activations(policy, micro, tokens, act, config.gradient_checkpointing, True,
                                 config.logprob_chunk_size, budget), grads["policy"])]
    if critic_trained:
        passes.append((learn_activations(critic, micro, tokens, act, config.gradient_checkpointing, False),
                       grads["critic"]))
    accumulates = micro < min(config.mini_batch_size, batch)
    extra = learn_peak(passes, side_by_side=device == "cpu" and config.concurrent_models, accumulates=accumulates)
    items["learn"]["activations (beyond the gradients)"] = max(0, extra - sum(g for _, g in passes))
    settings = dict(batch=batch, prompt_tokens=work.prompt_tokens, new_tokens=work.new_tokens, micro_batch=micro,
                    dtype=config.dtype, weights_dtype=weights_dtype, lora_r=lora_r, offload=config.offload,
                    gradient_checkpointing=config.gradient_checkpointing, device=device,
                    trainable_params=policy_trained + critic_trained)
    return Plan(items, settings)


def _targets(spec):
    from rlhf_engine.models.lora import target_names

    return target_names(spec)


# Formats and the command ---------------------------------------------------------------


def parse_gpu_memory(text):
    """``"80GB"`` (10^9 bytes), ``"80GiB"``, ``"500MB"``, ``"500MiB"`` as bytes; ValueError otherwise."""
    match = _GPU_SIZE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"--gpu_memory must be a size such as 80GB, 80GiB or 24000MB, got {text!r}")
    value, unit = float(match.group(1)), match.group(2).lower()
    scale = {"gb": 10**9, "gib": 2**30, "mb": 10**6, "mib": 2**20}[unit]
    size = int(value * scale)
    if size <= 0:
        raise ValueError(f"--gpu_memory must be > 0, got {text!r}")
    return size


def gib(nbytes):
    """``nbytes`` as GiB with two decimals, e.g. ``"1.50 GiB"``."""
    return f"{nbytes / 2**30:.2f} GiB"


def format_plan(plan, gpu_bytes=None, title=""):
    """The plan as a text table: each phase's items, then the peaks and,
    with ``gpu_bytes``, whether each phase fits."""
    names = [n for phase in PHASES for n in plan.items[phase]]
    names = list(dict.fromkeys(names))
    width = max(len(n) for n in names + ["peak"]) + 2
    lines = [title] if title else []
    lines.append(f"{'':{width}}" + "".join(f"{p:>14}" for p in PHASES))
    for name in names:
        cells = "".join(f"{gib(plan.items[p][name]) if name in plan.items[p] else '-':>14}" for p in PHASES)
        lines.append(f"{name:{width}}" + cells)
    lines.append(f"{'peak':{width}}" + "".join(f"{gib(plan.peaks[p]):>14}" for p in PHASES))
    if gpu_bytes:
        lines.append(f"{'fits ' + gib(gpu_bytes):{width}}" +
                     "".join(f"{'yes' if plan.peaks[p] <= gpu_bytes else 'NO':>14}" for p in PHASES))
    return "\n".join(lines)


# Suggestions: settings that lower the peak, tried in order of how little they change the run.
SUGGESTIONS = (
    ("--offload", dict(offload=True)),
    ("--gradient_checkpointing", dict(gradient_checkpointing=True)),
    ("--micro_batch_size 1", dict(micro_batch_size=1)),
    ("--lora_r 16", dict(lora_r=16)),
    ("--lora_r 16 --offload --gradient_checkpointing", dict(lora_r=16, offload=True, gradient_checkpointing=True)),
)


def suggestions(replan, config, gpu_bytes):
    """``[(flags, Plan)]``: each of :data:`SUGGESTIONS` that changes
    ``config``, re-planned with ``replan(config) -> Plan``, whether it fits
    or not (the caller shows which). Settings the config cannot take
    (e.g. LoRA without its fields) are left out."""
    out = []
    for flags, change in SUGGESTIONS:
        if all(getattr(config, k, None) == v for k, v in change.items()):
            continue
        if any(not hasattr(config, k) for k in change):
            continue
        try:
            out.append((flags, replan(dataclasses.replace(config, **change))))
        except ValueError:
            continue
    return out


def plan_from_specs(policy_spec, reward_spec, config, work, *, weights_dtype="float32", device="cuda",
                    budget=None):
    """:func:`plan_memory` for model specs (:func:`resolve_config`): the
    reward model defaults to the policy's shape; a critic started from the
    policy (``config.critic_init="policy"``) has the policy's body."""
    policy_config = resolve_config(policy_spec)
    reward_config = resolve_config(reward_spec or policy_spec, vocab_size=policy_config.vocab_size)
    if reward_config.vocab_size != policy_config.vocab_size:
        raise ValueError(f"the reward model's vocabulary ({reward_config.vocab_size}) differs from the policy's "
                         f"({policy_config.vocab_size}): the engine feeds every model the policy's token ids")
    policy = model_shape(policy_config, "causal")
    reward = model_shape(reward_config, "scalar")
    critic = model_shape(policy_config, "scalar") if config.critic_init == "policy" else reward
    limit = getattr(policy_config, "max_position_embeddings", None)
    if limit is not None and work.tokens > limit:
        raise ValueError(f"prompt_tokens + max_new_tokens = {work.tokens} exceeds the policy's {limit} positions")
    return plan_memory(policy, reward, config, work, critic=critic, weights_dtype=weights_dtype, device=device,
                       budget=budget)


def run_plan(args):
    """The ``rlhf-engine plan`` command on parsed ``args``: prints the plan,
    the fit for ``--gpu_memory`` and, when it does not fit, the settings
    that do. Returns 0; ValueError for bad options (status 2 in the CLI)."""
    from rlhf_engine.engine import EngineConfig

    gpu = parse_gpu_memory(args.gpu_memory)
    fields = dict(device="cpu", dtype=args.dtype, offload=args.offload, offload_policy=args.offload_policy,
                  max_new_tokens=args.max_new_tokens, samples_per_prompt=args.samples_per_prompt,
                  mini_batch_size=args.mini_batch_size, micro_batch_size=args.micro_batch_size,
                  gradient_checkpointing=args.gradient_checkpointing, logprob_chunk_size=args.logprob_chunk_size,
                  critic_init=args.critic_init)
    if args.lora_r:
        fields.update(lora_r=args.lora_r, lora_target_modules=args.lora_target_modules)
    if args.lora_r and "lora_r" not in EngineConfig.__dataclass_fields__:
        raise ValueError("--lora_r: this engine has no LoRA options")
    if args.prompts < 1:
        raise ValueError(f"--prompts must be an int >= 1, got {args.prompts}")
    config = EngineConfig(**fields)
    work = Work(args.prompts * config.samples_per_prompt, args.prompt_tokens, config.max_new_tokens)

    def replan(cfg):
        return plan_from_specs(args.policy, args.reward_model, cfg, work, weights_dtype=args.weights_dtype,
                               device="cuda")

    plan = replan(config)
    title = (f"policy {args.policy}, reward model {args.reward_model or args.policy}: {work.batch} sequences of "
             f"{work.prompt_tokens}+{work.new_tokens} tokens, micro-batch {plan.settings['micro_batch']}, dtype "
             f"{config.dtype}, weights {args.weights_dtype}, "
             f"{'LoRA r=' + str(args.lora_r) if args.lora_r else 'full fine-tuning'}, "
             f"offload {'on' if config.offload else 'off'}, gradient checkpointing "
             f"{'on' if config.gradient_checkpointing else 'off'}; trainable parameters "
             f"{plan.settings['trainable_params'] / 1e6:.1f} M")
    print(format_plan(plan, gpu, title))
    if plan.peak <= gpu:
        print(f"\nfits one GPU of {gib(gpu)}: peak {gib(plan.peak)}")
        return 0
    print(f"\ndoes NOT fit one GPU of {gib(gpu)}: peak {gib(plan.peak)}; settings that lower it:")
    for flags, option_plan in suggestions(replan, config, gpu):
        verdict = "fits" if option_plan.peak <= gpu else "still too big"
        peaks = ", ".join(f"{p} {gib(v)}" for p, v in option_plan.peaks.items())
        print(f"  {flags:48} peak {gib(option_plan.peak):>11}  {verdict}  ({peaks})")
    return 0


def add_parser(commands):
    """The ``plan`` subcommand on the CLI's subparsers ``commands`` (no torch import: ``--help`` stays fast)."""
    import argparse

    parser = commands.add_parser(
        "plan", help="Memory per phase of a PPO run on one GPU, from the model configs (no weights loaded).",
        description=__doc__.split("\n\n")[0] + " Prints each phase's items, its peak, whether it fits "
                    "--gpu_memory, and settings that make it fit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--policy", required=True,
                        help=f"A model folder (its config.json only), a size (tiny, small, medium) or a preset "
                             f"({PRESETS_DOC}).")
    parser.add_argument("--reward_model", default=None, help="As --policy (default: the policy's shape).")
    parser.add_argument("--critic_init", choices=["reward", "policy"], default="reward",
                        help="The critic's shape: the reward model's or the policy's body.")
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank (0: full fine-tuning).")
    parser.add_argument("--lora_target_modules", default="auto", help="LoRA targets ('auto': every body linear).")
    parser.add_argument("--dtype", choices=sorted(_DTYPE_BYTES), default="float32",
                        help="The engine's compute dtype (bfloat16: autocast over the weights).")
    parser.add_argument("--weights_dtype", choices=sorted(_DTYPE_BYTES), default="float32",
                        help="The dtype the models (and so gradients and AdamW states) are held in.")
    parser.add_argument("--offload", action="store_true", help="The engine's offload (its per-phase table).")
    parser.add_argument("--offload_policy", default="", help="Overrides of the offload table (needs --offload).")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    parser.add_argument("--prompts", type=int, default=8, help="Prompts per iteration.")
    parser.add_argument("--samples_per_prompt", type=int, default=1, help="Responses per prompt.")
    parser.add_argument("--prompt_tokens", type=int, default=16, help="Tokens per (padded) prompt.")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="Tokens per response.")
    parser.add_argument("--mini_batch_size", type=int, default=8, help="Sequences per optimizer step.")
    parser.add_argument("--micro_batch_size", type=int, default=None, help="Sequences per forward/backward.")
    parser.add_argument("--logprob_chunk_size", type=int, default=None, help="Rows of logits held at once.")
    parser.add_argument("--gpu_memory", default="80GB", help="The GPU's memory (e.g. 80GB, 24GiB).")
    parser.set_defaults(run=_run_cli)
    return parser


def _run_cli(args):
    import sys

    try:
        return run_plan(args)
    except ValueError as error:
        print(f"rlhf-engine plan: error: {error}", file=sys.stderr)
        return 2
