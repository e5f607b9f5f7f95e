"""The engine's checkpoints: what :meth:`RLHFEngine.save` writes and
:meth:`RLHFEngine.load` restores, through :mod:`rlhf_engine.checkpoint`
(atomic, sharded over the ranks, loadable at any world size).

A checkpoint holds the trained models' and their optimizers' state dicts
(``tensors``) and the plain state that makes a resumed run repeat the saved
one exactly (``objects``): the iteration, the skipped updates, the config,
the KL controller, the frozen models' fingerprints, the schedulers, the
shuffling RNG and the caller's ``extra``."""
import json
import warnings
from pathlib import Path

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from rlhf_engine.checkpoint import capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from rlhf_engine.optim import set_peak_lrs

CHECKPOINT_FORMAT = 2  # 2: trained state in torch.distributed.checkpoint format
# The trained models' parameters that train: a LoRA model's adapters and heads, not its frozen base weights
# (those are checked by fingerprint instead).
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)


def collect(engine, extra=None):
    """``(tensors, objects)``: everything :func:`load` needs to continue
    ``engine`` exactly. ``tensors`` holds the trained models' and their
    optimizers' state dicts (this rank's shards under FSDP2), ``objects``
    plain state."""
    tensors = {}
    for name, optimizer in engine.optimizers.items():
        model = engine._trained(name)
        tensors[name] = get_model_state_dict(model, options=TRAINED_ONLY)
        tensors[f"{name}_optim"] = get_optimizer_state_dict(model, optimizer)
    objects = {
        "format": CHECKPOINT_FORMAT, "iteration": engine.iteration, "skipped_updates": engine.skipped_updates,
        "config": engine.config.to_dict(), "kl": engine.kl.state_dict(), "fingerprints": engine._fingerprints,
        "schedulers": {k: s.state_dict() for k, s in engine.schedulers.items()},
        "rng": capture_rng([engine.shuffle_generator]), "extra": extra,
    }
    return tensors, objects


def save(engine, directory, extra=None, keep=2):
    """Write ``engine``'s checkpoint atomically under ``directory``; returns its path."""
    tensors, objects = collect(engine, extra)
    path = save_checkpoint(directory, engine.iteration, tensors, objects, keep=keep)  # names a failed rank
    engine.checkpoint_bytes = checkpoint_bytes(path)
    return path


def checkpoint_bytes(path):
    """The size in bytes of the checkpoint folder ``path``: its files, as its
    manifest lists them (under LoRA: adapters, heads and their optimizer
    states only)."""
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    return sum(int(entry["size"]) if isinstance(entry, dict) else int(entry) for entry in manifest["files"].values())


def load(engine, directory, verify=True):
    """Restore the latest complete checkpoint under ``directory`` (or the
    checkpoint folder itself) into ``engine``; returns its ``extra``.
    ``verify=False``: the folder's files were verified already (e.g. it was
    chosen by :func:`~rlhf_engine.checkpoint.latest_checkpoint`)."""
    directory = Path(directory)
    if (directory / "manifest.json").exists():
        path = directory
    else:
        path, verify = latest_checkpoint(directory), False  # latest_checkpoint verifies what it picks
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint under {directory}")
    tensors, objects = load_checkpoint(path, collect(engine)[0], verify=verify)
    if objects.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {objects.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    for name, saved in objects["fingerprints"].items():
        now = engine._fingerprints[name]
        if saved != now:
            raise ValueError(f"{path}: the {name} model differs from the one the checkpoint was saved with "
                             f"(checksum {now!r} vs {saved!r}); build the engine with the same frozen models")
    for name, optimizer in engine.optimizers.items():
        model = engine._trained(name)
        set_model_state_dict(model, tensors[name], options=StateDictOptions(ignore_frozen_params=True, strict=False))
        set_optimizer_state_dict(model, optimizer, tensors[f"{name}_optim"])
        engine.schedulers[name].load_state_dict(objects["schedulers"][name])
    # The configured learning rates apply from the resumed step on, not the checkpoint's (the same
    # schedule shape at the same step); a change is reported with the KL controller's.
    changed = []
    for name, lr in (("policy", engine.config.lr), ("critic", engine.config.critic_lr)):
        if name in engine.schedulers:
            saved = engine.schedulers[name].base_lrs[0]
            if saved != lr:
                changed.append(f"{'lr' if name == 'policy' else 'critic_lr'} {saved!r} -> {lr!r}")
            set_peak_lrs(engine.schedulers[name], [lr] * len(engine.optimizers[name].param_groups))
    changed += engine.kl.load_state_dict(objects["kl"])
    if changed:
        warnings.warn(f"{path}: the run continues with this config's settings, not the checkpoint's: "
                      f"{'; '.join(changed)}", stacklevel=3)
    restore_rng(objects["rng"], [engine.shuffle_generator])
    engine.iteration = objects["iteration"]
    engine.skipped_updates = objects["skipped_updates"]
    return objects["extra"]
