"""Training checkpoints that a crash can never corrupt.

Layout under ``root``::

    root/latest                    one line: the name of the newest checkpoint
    root/step-00000042/            one complete checkpoint
        <name>.safetensors         one per entry of ``tensors`` (a state_dict)
        objects.pt                 ``objects`` (torch.save, weights_only-loadable)
        manifest.json              written last: format version, step, files and sizes

A save writes into ``root/.tmp-step-XXXXXXXX-<pid>``, fsyncs every file and
the folder, renames it into place, fsyncs ``root``, then replaces ``latest``
the same way. A crash at any point leaves every earlier checkpoint and a
``latest`` that names a complete one (one exception: see :func:`_swap_in`);
leftovers are ``.tmp-*`` entries, which readers ignore and the next save
deletes. One process writes to a ``root`` at a time (rank 0 under
torch.distributed).
"""
import ctypes
import errno
import json
import os
import random
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OBJECTS = "objects.pt"
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d{8})")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_LAYOUT_KEY = "rlhf_engine.layout"


def save_checkpoint(root, step, tensors, objects, *, keep=2):
    """Write checkpoint ``step`` under ``root`` atomically; return its folder.

    ``tensors``: ``{name: {key: Tensor}}``, each written to ``<name>.safetensors``
    (any device, dtype, strides; tied entries stay tied on load).
    ``objects``: ``{key: value}`` of plain state (optimizer/scheduler
    state_dicts, :func:`capture_rng`, counters, config), made only of types
    ``torch.load(weights_only=True)`` accepts (ValueError naming the entry
    otherwise, before anything is written).

    Guarantees: the folder appears complete or not at all; ``latest`` names it
    only once it is durable; re-saving an existing step swaps the new copy in
    (atomically where the OS can exchange two folders, see :func:`_swap_in`).
    Only then are old checkpoints pruned: this one and the ``keep - 1``
    highest other steps stay; the rest and stale ``.tmp-*`` entries go.
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**8:
        raise ValueError(f"step must be an int in [0, 1e8), got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    if not isinstance(tensors, dict) or not isinstance(objects, dict):
        raise ValueError("tensors and objects must be dicts")
    for name, state in tensors.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"tensors: bad file name {name!r} (letters, digits, _ . -)")
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                  for k, t in state.items()):
            raise ValueError(f"tensors[{name!r}] must be a dict of str -> Tensor")
    _check_weights_only(objects, "objects")

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {}
        for name, state in tensors.items():
            files[f"{name}.safetensors"] = _write_tensors(tmp / f"{name}.safetensors", state)
        files[OBJECTS] = _write_objects(tmp / OBJECTS, objects)
        manifest = {"format_version": FORMAT_VERSION, "step": step, "tensors": list(tensors), "files": files}
        _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _swap_in(tmp, final)
    _fsync_dir(root)
    _write_latest(root, final.name)
    _prune(root, final, keep)
    return final


def latest_checkpoint(root):
    """The folder ``latest`` names if it is complete, else the highest complete
    ``step-*`` folder, else None (also when ``root`` does not exist)."""
    root = Path(root)
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        name = ""
    if _STEP_DIR.fullmatch(name) and _is_complete(root / name):
        return root / name
    steps = _complete_steps(root)
    return steps[-1][1] if steps else None


def load_checkpoint(path):
    """``(tensors, objects)`` of the checkpoint folder ``path``, on the CPU.

    ``tensors`` equals what was saved bit for bit, keys in the saved order,
    tied entries as one tensor object (non-contiguous inputs come back
    contiguous). ``objects`` is read with ``torch.load(weights_only=True)``.
    Raises FileNotFoundError when ``path`` does not exist and ValueError
    naming the file when the checkpoint is incomplete or of another format.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    manifest = _read_manifest(path)
    if manifest is None:
        raise ValueError(f"incomplete checkpoint {path}: {MANIFEST} missing or unreadable "
                         f"(pass a step-* folder; latest_checkpoint(root) finds one)")
    problem = _missing_file(path, manifest)
    if problem:
        raise ValueError(f"incomplete checkpoint {path}: {problem}")
    tensors = {name: _read_tensors(path / f"{name}.safetensors") for name in manifest["tensors"]}
    objects = torch.load(path / OBJECTS, map_location="cpu", weights_only=True)
    return tensors, objects


def capture_rng(generators=()):
    """State of every random number generator a run uses, weights_only-loadable:
    Python ``random``, NumPy's global generator (if NumPy imports), torch CPU,
    each CUDA device (when CUDA is available) and each of ``generators``."""
    version, words, gauss = random.getstate()
    state = {
        "python": [version, list(words), gauss],
        "numpy": None,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    return state


def restore_rng(state, generators=()):
    """Put back a :func:`capture_rng` state: afterwards every generator yields
    the numbers it yielded after the capture. ``generators`` are matched by
    position (ValueError on a different count); CUDA states are restored when
    CUDA is available (ValueError on a different device count)."""
    generators = list(generators)
    if len(generators) != len(state["generators"]):
        raise ValueError(f"generators: {len(generators)} given, the state has {len(state['generators'])}")
    cuda = torch.cuda.is_available() and state["cuda"]
    if cuda and len(state["cuda"]) != torch.cuda.device_count():
        raise ValueError(f"state: {len(state['cuda'])} CUDA RNG states for {torch.cuda.device_count()} devices")
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    torch.set_rng_state(state["torch"])
    if cuda:
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    if state["numpy"] is not None:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# --- tensors ---------------------------------------------------------------

def _write_tensors(path, state):
    """Write ``state`` to one safetensors file; return its size in bytes.

    safetensors stores each key's bytes once and rejects overlapping
    storage, so exact aliases (tied weights) are written once and recorded
    in the metadata, and other tensors that share storage are cloned."""
    first, aliases = {}, {}
    for key, t in state.items():
        owner = first.setdefault(_alias_key(t), key) if t.numel() else key
        if owner != key:
            aliases[key] = owner
    storages, flat = set(), {}
    for key, t in state.items():
        if key in aliases:
            continue
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        flat[key] = t
    layout = json.dumps({"order": list(state), "aliases": aliases})
    safetensors.torch.save_file(flat, path, metadata={_LAYOUT_KEY: layout})
    return _fsync_file(path)


def _alias_key(t):
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _read_tensors(path):
    with safe_open(path, framework="pt", device="cpu") as f:
        layout = json.loads(f.metadata()[_LAYOUT_KEY])
        stored = {key: f.get_tensor(key) for key in f.keys()}
    aliases = layout["aliases"]
    return {key: stored[aliases.get(key, key)] for key in layout["order"]}


# --- objects ---------------------------------------------------------------

_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.Size)
_CONTAINERS = (dict, OrderedDict, list, tuple, set)


def _check_weights_only(obj, where):
    """ValueError naming the first entry ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, torch.Tensor) or type(obj) in _LEAVES:
        return
    if type(obj) not in _CONTAINERS:
        raise ValueError(f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) "
                         f"cannot read; store plain types (e.g. .tolist(), float(...))")
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        if isinstance(obj, dict):
            _check_weights_only(key, f"{where} key {key!r}")
        _check_weights_only(value, f"{where}[{key!r}]")


def _write_objects(path, objects):
    with open(path, "wb") as f:
        torch.save(objects, f)
    return _fsync_file(path)


# --- files and folders -----------------------------------------------------

def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return _fsync_file(path)


def _fsync_file(path):
    """Flush ``path`` to disk; return its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _fsync_dir(path):
    """Make the entries of folder ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(root, name):
    tmp = root / f".tmp-{LATEST}-{os.getpid()}"
    _write_bytes(tmp, f"{name}\n".encode())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _swap_in(tmp, final):
    """Move the complete folder ``tmp`` to ``final``; a previous ``final`` ends up
    in a ``.tmp-*`` folder (deleted by the pruning). Replacing a folder is one
    atomic exchange on Linux; elsewhere it takes two renames, and a crash
    between them leaves both copies of this step only in ``.tmp-*`` folders
    (other steps intact)."""
    if not final.exists():
        os.replace(tmp, final)
    elif not _exchange(tmp, final):
        displaced = tmp.with_name(tmp.name + "-old")
        os.replace(final, displaced)
        os.replace(tmp, final)


def _exchange(a, b):
    """Atomically swap paths ``a`` and ``b`` (renameat2 RENAME_EXCHANGE);
    False where the C library or file system does not support it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _prune(root, final, keep):
    """Delete stale ``.tmp-*`` entries and all complete checkpoints but
    ``final`` and the ``keep - 1`` highest other steps."""
    for entry in root.glob(".tmp-*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    others = [path for _, path in _complete_steps(root) if path != final]
    for path in others[: max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)


def _complete_steps(root):
    """``[(step, folder)]`` of the complete checkpoints under ``root``, ascending."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and _is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _read_manifest(path):
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return None
    return manifest


def _missing_file(path, manifest):
    """What is missing from checkpoint ``path`` (a message), or None."""
    for name, size in manifest["files"].items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} missing"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
    return None


def _is_complete(path):
    manifest = _read_manifest(path)
    return manifest is not None and _missing_file(path, manifest) is None
