"""FSDP2: sharding a model's parameters over the ranks, holding them whole
for a block, running a function as a model's forward so that its hooks
fire, and plain (unsharded) values and state dicts from sharded ones. Every
function here is a pass-through for a model that is not sharded."""
import contextlib

import torch

from rlhf_engine.distributed.group import Layout


def decoder_layers(model):
    """The repeated blocks of a HuggingFace model (its ``_no_split_modules``
    classes), the units FSDP2 shards one at a time."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model, where: Layout, device: torch.device, *, reshard_after_forward: bool = True):
    """Shard ``model``'s parameters over the ranks with FSDP2
    (``fully_shard`` on each decoder layer, then the root); gradients are
    *summed* over ranks (callers normalise their losses by global counts).
    Returns the model (now an ``FSDPModule``); an already sharded model
    (e.g. one reference shared by two engines) is returned as it is."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model

    mesh = init_device_mesh(device.type, (where.world_size,))
    units = decoder_layers(model) + [model]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
        unit.set_gradient_divide_factor(1.0)  # each unit's own parameters: sum, not mean
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(model):
    """Hold ``model``'s full parameters on every rank for the block (many
    small forwards, e.g. decoding, without an all-gather each); sharded
    again afterwards. A no-op for unsharded models."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield model
    finally:
        model.set_reshard_after_forward(True)
        for unit in units:
            unit.reshard()


def call_as_forward(model, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run as ``model``'s forward, so that the hooks
    on ``model`` fire around it: for an FSDP2 root, its own parameters
    (embeddings, final norm, heads) are gathered for ``fn`` and their
    gradients reduced in backward. Callers that use a model's parts (its
    body, then its head weight) go through this; for a plain module ``fn``
    is simply called. Outputs that are views are returned as copies (FSDP2
    hooks backward on the outputs, and warns that an in-place change of a view
    would bypass that); they are per-token values, small."""
    if not is_sharded(model):
        return fn(*args, **kwargs)

    def forward(*a, **k):
        return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t._is_view() else t, fn(*a, **k))

    model.forward = forward
    try:
        return model(*args, **kwargs)
    finally:
        del model.forward


def set_gradient_sync(model, enabled: bool) -> None:
    """Skip (``False``) or do the gradient reduce-scatter on the next
    backward: micro-batches before the last accumulate locally."""
    if model is not None and is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly) distributed one: the full value of a
    DTensor (a collective), else the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_state_dict(model) -> dict:
    """The full (unsharded) weights on the CPU on rank 0, ``{}`` on the
    other ranks (every rank must call it: it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
