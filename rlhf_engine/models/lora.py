"""LoRA adapters (through peft, an optional dependency) on the engine's and
the stages' models.

:class:`LoraOptions` is the one set of fields every config that can train
with LoRA inherits (the engine's :class:`~rlhf_engine.engine.EngineConfig`,
the SFT and reward-model stages' ``TrainConfig``), so the flags are the same
everywhere: ``--lora_r`` (0: off), ``--lora_alpha``, ``--lora_dropout``,
``--lora_target_modules``.

With adapters on, only the adapters (and a scalar model's ``score`` head,
peft's ``modules_to_save``) train; the base weights are frozen and shared:

- the policy's reference is the policy with its adapters disabled;
- the critic is the reward model's backbone with adapters and its own copy of
  the score head (the value head), and the frozen reward model is
  :class:`WithoutAdapters` of the critic: the same backbone and the original
  head, adapters off. Four models on two copies of the base weights.

A PEFT model's parts: :func:`base_model_of` is the HuggingFace model under
the wrapper (its ``base_model`` the body, its ``lm_head`` / ``score`` the
head, LoRA layers inside).
"""
import contextlib
import copy
import dataclasses
import importlib.util
import math
from pathlib import Path

from torch import nn

from rlhf_engine.options import option

# Linear layers never adapted by default: output heads (a LoRA'd head cannot take the fused log-prob path;
# a scalar model's head trains in full instead) and MoE routers.
_NOT_TARGETED = frozenset({"lm_head", "score", "classifier", "embed_out", "output", "gate", "router"})


@dataclasses.dataclass
class LoraOptions:
    """LoRA adapters on the trained models (needs peft: ``pip install peft``)."""

    lora_r: int = option(0, "LoRA rank (0: off, full fine-tuning). > 0 trains low-rank adapters on the "
                            "lora_target_modules (and a reward model's / critic's score head) only; the base weights "
                            "are frozen and shared (the reference is the policy with its adapters disabled).")
    lora_alpha: float = option(16.0, "LoRA scaling numerator: the adapters' update is scaled by lora_alpha / lora_r.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA adapters' input, in [0, 1) (like every dropout, off in "
                                      "the PPO passes).")
    lora_target_modules: str = option("auto", "Comma-separated names of the linear layers to adapt, or 'auto': "
                                              "every linear layer of the model's body (attention and MLP "
                                              "projections: q/k/v/o_proj and gate/up/down_proj for Llama-like "
                                              "models, c_attn/c_proj/c_fc for GPT-2, ...), never the output head.")

    def check_lora(self):
        """ValueError naming the field for a bad LoRA option; ImportError
        when adapters are asked for and peft is missing."""
        r = self.lora_r
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"lora_r must be an int >= 0 (0: LoRA off), got {r!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {alpha!r}")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {dropout!r}")
        target_names(self.lora_target_modules)
        if r == 0:
            for field in dataclasses.fields(LoraOptions)[1:]:
                if getattr(self, field.name) != field.default:
                    raise ValueError(f"{field.name}={getattr(self, field.name)!r} has no effect without lora_r > 0: "
                                     f"set lora_r, or leave {field.name} at its default ({field.default!r})")
        if r > 0 and importlib.util.find_spec("peft") is None:
            raise ValueError(f"lora_r={r} needs the peft package: pip install peft")

    @property
    def lora(self):
        """Whether adapters are on (``lora_r > 0``)."""
        return self.lora_r > 0

    def lora_options(self):
        """The LoRA fields alone, as a :class:`LoraOptions`."""
        return LoraOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoraOptions)})


def target_names(spec):
    """``None`` for ``"auto"``, else the list of module names in the
    comma-separated ``spec``; ValueError for an empty or malformed list."""
    if not isinstance(spec, str):
        raise ValueError(f"lora_target_modules must be 'auto' or comma-separated module names, got {spec!r}")
    if spec.strip() == "auto":
        return None
    names = [name.strip() for name in spec.split(",")]
    if not names or any(not name or not all(c.isalnum() or c in "_." for c in name) for name in names):
        raise ValueError(f"lora_target_modules must be 'auto' or comma-separated module names (e.g. "
                         f"'q_proj,v_proj'), got {spec!r}")
    return names


def _peft():
    try:
        import peft
    except ImportError:
        return None
    return peft


def is_peft(model):
    """Whether ``model`` is a PEFT wrapper (``peft.PeftModel``)."""
    peft = _peft()
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model_of(model):
    """The HuggingFace model under a PEFT wrapper (with the LoRA layers in
    it), ``model`` itself otherwise; a :class:`WithoutAdapters` view gives
    its PEFT model's."""
    if isinstance(model, WithoutAdapters):
        model = model.peft_model
    return model.get_base_model() if is_peft(model) else model


def adapters_context(model):
    """The context a pass of ``model`` runs in: adapters disabled for a
    :class:`WithoutAdapters` view, nothing otherwise."""
    return model.peft_model.disable_adapter() if isinstance(model, WithoutAdapters) else contextlib.nullcontext()


def is_adapter_layer(module):
    """Whether ``module`` carries adapters (a peft tuner layer or a ``modules_to_save`` copy)."""
    peft = _peft()
    if peft is None:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))


def _linear_types():
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear

    return nn.Linear, Conv1D


def default_targets(model):
    """The names (last component) of the linear layers of ``model``'s body:
    the attention and MLP projections of whatever family it is, found by
    module type, without the output head and MoE routers
    (``_NOT_TARGETED``). ``model``: a HuggingFace model."""
    body = getattr(model, "base_model", model)
    linear = _linear_types()
    names = {name.rsplit(".", 1)[-1] for name, module in body.named_modules()
             if isinstance(module, linear) and name}
    names -= _NOT_TARGETED
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers in its body to put LoRA adapters on; "
                         f"name them with lora_target_modules")
    return sorted(names)


def _check_targets(model, names):
    found = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"lora_target_modules names {missing}, which {type(model).__name__} does not have (its "
                         f"linear layers: {', '.join(default_targets(model))})")


def add_lora(model, options, *, scalar=False, seed=0):
    """``model`` (a HuggingFace causal LM, or with ``scalar`` a one-label
    sequence-classification model) wrapped in fresh LoRA adapters: a
    ``peft.PeftModel`` (peft changes ``model`` in place). Only the adapters
    train, and with ``scalar`` a copy of the ``score`` head (the original
    stays, used when the adapters are disabled). The adapters' random init
    is drawn from ``seed`` (the global RNG is left as it was); they start
    as a no-op (peft's ``B = 0``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    if not isinstance(options, LoraOptions) or not options.lora:
        raise ValueError("add_lora needs LoraOptions with lora_r > 0")
    options.check_lora()
    names = target_names(options.lora_target_modules)
    if names is None:
        names = default_targets(model)
    else:
        _check_targets(model, names)
    conv1d = _linear_types()[1]  # GPT-2's layers store their weight transposed (peft's fan_in_fan_out)
    transposed = any(isinstance(m, conv1d) and name.rsplit(".", 1)[-1] in names for name, m in model.named_modules())
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=names, task_type="SEQ_CLS" if scalar else "CAUSAL_LM",
                        modules_to_save=["score"] if scalar else None, fan_in_fan_out=transposed)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def with_adapters(model, options, *, seed=0):
    """``model`` with fresh adapters (:func:`add_lora`; a scalar model, one
    with a ``score`` head, gets a trainable copy of it) when ``options``
    turn LoRA on and it is not a PEFT model already; else ``model``."""
    if not options.lora or is_peft(model):
        return model
    return add_lora(model, options, scalar=getattr(model, "score", None) is not None, seed=seed)


def merged_copy(model):
    """A plain HuggingFace model equal to the PEFT ``model`` with its
    adapters merged in (``model`` is left as it is); ``model`` itself when it
    is not PEFT."""
    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model


def save_lora(model, model_folder, adapter_folder, *, base_path=None):
    """Write the PEFT ``model`` as a merged HuggingFace folder
    ``model_folder`` (``AutoModelFor...from_pretrained`` loads it) and its
    adapters as ``adapter_folder`` (``PeftModel.from_pretrained(base,
    adapter_folder)`` loads them on the base model; ``base_path``, the base
    model's folder, is recorded as its ``base_model_name_or_path``)."""
    merged_copy(model).save_pretrained(model_folder)
    if base_path is not None:
        for config in model.peft_config.values():
            config.base_model_name_or_path = str(base_path)
    model.save_pretrained(adapter_folder)


def trainable_state_dict(model):
    """``{name: tensor}`` of ``model``'s parameters that train (the adapters
    and heads of a PEFT model), detached."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def frozen_parameters(model):
    """``model``'s parameters that do not train (a PEFT model's base weights);
    for a :class:`WithoutAdapters` view, its PEFT model's."""
    if isinstance(model, WithoutAdapters):
        model = model.peft_model
    return [p for p in model.parameters() if not p.requires_grad]


def refuse_distributed(world_size):
    """ValueError: LoRA under torch.distributed (FSDP2) is not supported."""
    if world_size > 1:
        raise ValueError(f"LoRA (lora_r > 0 or a PEFT model) is not supported under torch.distributed "
                         f"({world_size} ranks): the FSDP2 sharding of adapters on frozen shared base weights is "
                         f"not implemented; run LoRA in one process, or full fine-tuning (lora_r=0) with torchrun")


class WithoutAdapters(nn.Module):
    """The PEFT model ``peft_model`` with its adapters disabled, as a frozen
    model of its own (the reward model under a LoRA critic): it holds no
    weights (``peft_model`` is not a submodule, so moving, freezing or
    switching the mode of the view does nothing to it), and every pass
    through :func:`adapters_context` runs ``peft_model`` with its adapters
    off and its original heads. Not thread-safe against a concurrent pass
    of ``peft_model`` itself (disabling is a switch on the shared layers)."""

    def __init__(self, peft_model):
        super().__init__()
        if not is_peft(peft_model):
            raise ValueError(f"WithoutAdapters needs a peft.PeftModel, got {type(peft_model).__name__}")
        object.__setattr__(self, "peft_model", peft_model)

    @property
    def config(self):
        return base_model_of(self.peft_model).config

    def get_input_embeddings(self):
        return self.peft_model.get_input_embeddings()

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def adapter_folder(model_folder):
    """The adapter folder written beside a model folder: ``<stage>/adapter`` for ``<stage>/model``."""
    return Path(model_folder).with_name("adapter")
