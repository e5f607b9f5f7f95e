"""What the engine does once, when it is built: checks that the four models
fit together, chooses their attention implementation, and shards them over
the ranks of a torch.distributed run."""
import importlib.util

import torch

from rlhf_engine import distributed
from rlhf_engine.models import lora

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


def frozen(model):
    """``model`` in eval mode without gradients (the reference and the reward model)."""
    model.eval().requires_grad_(False)
    return model


def fingerprint(model, frozen_only=False):
    """A float64 checksum of a model's full parameters (frozen models' are
    checked on load; all of them agree across ranks at start); None for None.
    ``frozen_only``: of its parameters that do not train (a PEFT model's base
    weights); a :class:`~rlhf_engine.models.lora.WithoutAdapters` view
    gives its PEFT model's frozen ones."""
    if model is None:
        return None
    if frozen_only or isinstance(model, lora.WithoutAdapters):
        params = lora.frozen_parameters(model)
    else:
        params = list(model.parameters())
    with torch.no_grad():
        return float(sum(distributed.local_value(p).double().abs().sum() for p in params))


def _vocabulary(model):
    """Rows of ``model``'s input embedding table, None when it has none we can read."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embeddings, "num_embeddings", None)


def check_vocabularies(tokenizer, models):
    """Every model reads the policy's token ids: refuse one whose embedding
    table has another size than the policy's (another tokenizer: its scores
    would be of other tokens) or cannot hold the tokenizer's ids.
    ``models``: ``{name: model or None}``, the policy's name ``"policy"``."""
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


def enable_gradient_checkpointing(models):
    """HuggingFace gradient checkpointing (non-reentrant) on each of
    ``models`` (``{name: model or None}``); ValueError naming a model that
    does not support it."""
    for name, model in models.items():
        if model is not None and not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing=True, but the {name} ({type(model).__name__}) does not "
                             f"support HuggingFace gradient checkpointing; set it to False")
        if model is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard(modules, config, layout, device, fingerprints):
    """Check that every rank starts from the same ``config`` and weights (the
    frozen models' ``fingerprints`` and the trained ones'), then shard the
    trained models (and the frozen ones with ``shard_frozen``) with FSDP2.
    ``modules``: ``{"policy", "ref", "reward", "critic": model}`` (those
    present); returns it with the sharded models."""
    distributed.check_agreement("the engine config", config.to_dict())
    trained = {k: fingerprint(modules[k]) for k in ("policy", "critic") if k in modules}
    distributed.check_agreement("the starting weights (parameter checksums)", {**fingerprints, **trained})
    if config.offload:
        raise NotImplementedError("offload=True with FSDP-sharded models (world size > 1) is not supported yet")
    modules = dict(modules)
    for name in ("policy", "critic") + (("ref", "reward") if config.shard_frozen else ()):
        if name in modules:
            modules[name] = distributed.shard(modules[name], layout, device)
    return modules
