"""Training checkpoints that a crash can never corrupt, sharded over the
ranks of a torch.distributed run and loadable at any world size.

Layout under ``root``::

    root/latest                    one line: the name of the newest checkpoint
    root/step-00000042/            one complete checkpoint
        tensors/                   ``tensors`` in torch.distributed.checkpoint (DCP) format:
                                   ``.metadata`` and ``__<rank>_<n>.distcp`` files, each rank's shards
        objects.pt                 ``objects`` (torch.save, weights_only-loadable)
        manifest.json              written last: format version, step, entries, files and sizes

A save writes into ``root/.tmp-step-XXXXXXXX-<pid of rank 0>``, fsyncs every
file and folder, renames it into place, fsyncs ``root``, then replaces
``latest`` the same way. A crash at any point (of any rank) leaves every
earlier checkpoint and a ``latest`` that names a complete one (one
exception: see :func:`_swap_in`); leftovers are ``.tmp-*`` entries, which
readers ignore and the next save deletes.

Under an initialised process group, saving is a collective: every rank
writes its own shards (DTensor leaves of FSDP2 models and optimizers) into
the same temporary folder, so all ranks must see one shared file system
under ``root``; rank 0 alone writes ``objects.pt`` and the manifest, renames,
writes ``latest`` and prunes. One run writes to a ``root`` at a time.
Loading into templates reshards to the current world size (DCP); loading
without templates reads every entry whole in one process.
"""
import contextlib
import ctypes
import errno
import json
import os
import random
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from rlhf_engine import distributed

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
OBJECTS = "objects.pt"
TENSORS = "tensors"
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d{8})")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def save_checkpoint(root, step, tensors, objects, *, keep=2):
    """Write checkpoint ``step`` under ``root`` atomically; return its folder.

    ``tensors``: ``{name: state}``, a state being a (nested) dict with str
    keys whose leaves are tensors (any device, dtype, strides), DTensors
    (this rank's shards) or plain values, e.g. ``model.state_dict()`` or
    ``get_model_state_dict``/``get_optimizer_state_dict`` of
    ``torch.distributed.checkpoint.state_dict``. A state's top-level keys
    holding the very same tensor (tied weights) are stored once and come
    back tied. Plain (non-DTensor) tensors and values are taken to be the
    same on every rank: one rank's copy is written.
    ``objects``: rank 0's ``{key: value}`` of plain state (scheduler
    state_dicts, :func:`capture_rng`, counters, config), made only of types
    ``torch.load(weights_only=True)`` accepts; other ranks' are ignored.
    Bad arguments raise ValueError naming the entry before anything is written.

    Under a process group every rank calls it with its own shards; it
    returns on every rank once the checkpoint is complete and durable, and
    raises on every rank when it failed on any (the original error on the
    rank where it happened, a RuntimeError naming that rank elsewhere).

    Guarantees: the folder appears complete or not at all; ``latest`` names it
    only once it is durable; re-saving an existing step swaps the new copy in
    (atomically where the OS can exchange two folders, see :func:`_swap_in`).
    Only then are old checkpoints pruned: this one and the ``keep - 1``
    highest other steps stay; the rest and stale ``.tmp-*`` entries go.
    """
    root = Path(root)
    main = distributed.layout().is_main

    def prepare():
        _check_arguments(step, keep, tensors, objects if main else {})
        if not main:
            return None
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp.name, {name: _entry_layout(state) for name, state in tensors.items()}

    def finish():
        if not main:
            return
        try:
            files = {f"{TENSORS}/{p.name}": p.stat().st_size for p in sorted((tmp / TENSORS).iterdir())}
            _fsync_dir(tmp / TENSORS)
            files[OBJECTS] = _write_objects(tmp / OBJECTS, objects)
            manifest = {"format_version": FORMAT_VERSION, "step": step, "tensors": entries, "files": files}
            _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = root / f"step-{step:08d}"
        _swap_in(tmp, final)
        _fsync_dir(root)
        _write_latest(root, final.name)
        _prune(root, final, keep)

    with distributed.guard(f"saving checkpoint step {step}"):
        tmp_name, entries = _on_every_rank(f"saving checkpoint step {step}", prepare)[0]
        tmp = root / tmp_name
        try:
            with _dcp_failures(f"writing the tensors of checkpoint step {step}"):
                dcp.save(_without_aliases(tensors, entries), storage_writer=dcp.FileSystemWriter(tmp / TENSORS),
                         no_dist=not distributed.layout().distributed)
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _on_every_rank(f"saving checkpoint step {step}", finish)
    return root / f"step-{step:08d}"


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


def load_checkpoint(path, tensors=None):
    """``(tensors, objects)`` of the checkpoint folder ``path``.

    ``tensors`` None: every saved entry read whole onto the CPU in this
    process (no collectives), equal to what was saved bit for bit (DTensors
    as their full tensors), top-level keys in the saved order, tied entries
    as one tensor object (non-contiguous inputs come back contiguous).
    ``tensors`` given: templates ``{name: state}`` (state dicts of the
    models/optimizers as built now, sharded or not, at any world size),
    filled in place (tensors copied into, plain values replaced) and
    returned; under a process group every rank calls it (a collective).
    ``objects`` is read with ``torch.load(weights_only=True)`` on every rank.

    Raises FileNotFoundError when ``path`` does not exist and ValueError
    naming the file when the checkpoint is incomplete or of another format,
    or naming the entries and keys of the templates the checkpoint lacks.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    manifest = _read_manifest(path)
    if manifest is None:
        raise ValueError(f"incomplete checkpoint {path}: {MANIFEST} missing, unreadable or not of format version "
                         f"{FORMAT_VERSION} (pass a step-* folder; latest_checkpoint(root) finds one)")
    problem = _missing_file(path, manifest)
    if problem:
        raise ValueError(f"incomplete checkpoint {path}: {problem}")
    objects = torch.load(path / OBJECTS, map_location="cpu", weights_only=True)
    if tensors is None:
        return _read_whole(path / TENSORS, manifest["tensors"]), objects
    _read_into(path, tensors, manifest["tensors"])
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

def _check_arguments(step, keep, tensors, objects):
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**8:
        raise ValueError(f"step must be an int in [0, 1e8), got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    if not isinstance(tensors, dict) or not isinstance(objects, dict):
        raise ValueError("tensors and objects must be dicts")
    for name, state in tensors.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"tensors: bad entry name {name!r} (letters, digits, _ . -)")
        if not isinstance(state, dict):
            raise ValueError(f"tensors[{name!r}] must be a dict (a state_dict), got a {type(state).__name__}")
        _check_state(state, f"tensors[{name!r}]")
    _check_weights_only(objects, "objects")


def _check_state(state, where):
    """ValueError naming the first non-str dict key (DCP stores keys as
    strings) or leaf ``torch.load(weights_only=True)`` would refuse."""
    if not isinstance(state, dict):
        _check_weights_only(state, where)
        return
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: key {key!r} is not a str")
        _check_state(value, f"{where}[{key!r}]")


def _entry_layout(state):
    """What the manifest records of one entry: its top-level ``keys`` in order
    and its ``aliases`` ``{key: first key holding the very same tensor}``."""
    first, aliases = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and _local(value).numel():
            owner = first.setdefault(_alias_key(value), key)
            if owner != key:
                aliases[key] = owner
    return {"keys": list(state), "aliases": aliases}


def _local(t):
    """This rank's part of ``t``: its local shard for a DTensor, else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def _alias_key(t):
    local = _local(t)
    return (local.device, local.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _without_aliases(tensors, entries):
    """``tensors`` without the keys that alias an earlier key (written once)."""
    return {name: {key: value for key, value in state.items() if key not in entries[name]["aliases"]}
            for name, state in tensors.items()}


def _read_whole(folder, entries):
    """Every entry of the DCP checkpoint ``folder`` as full CPU tensors and
    plain values, rebuilt from its metadata (``entries``: the manifest's)."""
    metadata = dcp.FileSystemReader(folder).read_metadata()
    state = {}
    for fqn, stored in metadata.state_dict_metadata.items():
        is_tensor = isinstance(stored, TensorStorageMetadata)
        value = torch.empty(stored.size, dtype=stored.properties.dtype) if is_tensor else None
        _set_path(state, metadata.planner_data[fqn], value)
    with _dcp_failures(f"reading {folder}"):
        dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    result = {}
    for name, layout in entries.items():
        got = state.get(name, {})
        for key, owner in layout["aliases"].items():
            got[key] = got[owner]
        result[name] = {key: got[key] for key in layout["keys"] if key in got}
    return result


def _set_path(tree, path, value):
    """``tree[path[0]][path[1]]... = value``, creating dicts (str keys) and
    lists (int keys) on the way."""
    node = tree
    for key, next_key in zip(path, path[1:] + (None,)):
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
        if next_key is None:
            node[key] = value
        else:
            if (node[key] if isinstance(node, list) else node.get(key)) is None:
                node[key] = [] if isinstance(next_key, int) else {}
            node = node[key]


def _read_into(path, templates, entries):
    """Fill ``templates`` from the DCP checkpoint in ``path`` (a collective
    under a process group; DCP reshards). A template key that the checkpoint
    stores as an alias is filled from its owner."""
    request, links = {}, []  # links: (name, template key, key in the checkpoint, first to ask for it)
    for name, template in templates.items():
        aliases = entries.get(name, {}).get("aliases", {})
        part = request.setdefault(name, {})
        for key, value in template.items():
            source = aliases.get(key, key)
            links.append((name, key, source, source not in part))
            part.setdefault(source, value)
    folder = path / TENSORS

    def check():
        lacking = [name for name in templates if name not in entries]
        if lacking:
            raise ValueError(f"checkpoint {path} has no {', '.join(map(repr, lacking))} "
                             f"(it has {', '.join(map(repr, entries)) or 'no tensors'})")
        saved = {prefix for p in dcp.FileSystemReader(folder).read_metadata().planner_data.values()
                 for prefix in (p[:i] for i in range(1, len(p) + 1))}
        missing = [".".join(p) for p in _dict_paths(request) if p not in saved]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise ValueError(f"checkpoint {path} lacks {len(missing)} key(s) the templates have: {shown}")

    with distributed.guard(f"loading checkpoint {path}"):
        _on_every_rank(f"loading checkpoint {path}", check)
        with _dcp_failures(f"loading checkpoint {path}"):
            dcp.load(request, storage_reader=dcp.FileSystemReader(folder),
                     no_dist=not distributed.layout().distributed)
    for name, key, source, first in links:
        loaded, target = request[name][source], templates[name]
        if first or not isinstance(target[key], torch.Tensor):
            target[key] = loaded
        elif _alias_key(target[key]) != _alias_key(loaded):
            with torch.no_grad():
                target[key].copy_(loaded)


def _dict_paths(tree, prefix=()):
    """The key paths of ``tree``'s non-dict leaves (through nested dicts)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _dict_paths(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),)


# --- ranks -------------------------------------------------------------------

def _on_every_rank(what, fn):
    """``fn()`` on this rank, then every rank's result in rank order (a
    barrier). When it raised on any rank it raises on every rank: the
    original error where it happened, a RuntimeError naming the failed ranks
    elsewhere. In a world of one: ``[fn()]``."""
    if not distributed.layout().distributed:
        return [fn()]
    try:
        result, error = fn(), None
    except Exception as e:  # reported to the other ranks, then raised
        result, error = None, e
    gathered = distributed.all_gather_object((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    failed = [f"rank {rank}: {message}" for rank, (_, message) in enumerate(gathered) if message]
    if failed:
        raise RuntimeError(f"{what} failed on " + "; ".join(failed))
    return [result for result, _ in gathered]


@contextlib.contextmanager
def _dcp_failures(what):
    """DCP reports a failure on any rank as a CheckpointException (a
    BaseException) on every rank: raise this rank's own error instead, or a
    RuntimeError naming the ranks that failed. Silences DCP's warning that it
    runs in a single process."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    except dcp.CheckpointException as error:
        rank = distributed.layout().rank
        if rank in error.failures:
            raise error.failures[rank][0] from None
        failed = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in sorted(error.failures.items()))
        raise RuntimeError(f"{what} failed on {failed}") from None


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
