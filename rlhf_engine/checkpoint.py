"""Training checkpoints that a crash can never corrupt and whose damage is
always detected, sharded over the ranks of a torch.distributed run and
loadable at any world size.

Layout under ``root``::

    root/latest                    one line: the name of the newest checkpoint
    root/step-00000042/            one complete checkpoint
        tensors/                   ``tensors`` in torch.distributed.checkpoint (DCP) format:
                                   ``.metadata`` and ``__<rank>_<n>.distcp`` files, each rank's shards
        objects.pt                 ``objects`` (torch.save, weights_only-loadable)
        manifest.json              written last: format version, step, entries, each file's size
                                   and sha256, and a sha256 of the manifest itself

A save writes into ``root/.tmp-step-XXXXXXXX-<pid of rank 0>``, fsyncs every
file and folder, renames it into place, fsyncs ``root``, then replaces
``latest`` the same way. A crash at any point (of any rank) leaves every
earlier checkpoint and a ``latest`` that names a complete one (one
exception: see :func:`_swap_in`); leftovers are ``.tmp-*`` entries, which
readers ignore and the next save deletes. A write that fails (no space left,
a read-only or unwritable folder) removes the unfinished folder and raises
:class:`CheckpointSaveError` saying what happened, where, and which
checkpoint is still the latest.

Damage after the save (flipped, truncated or overwritten bytes, a missing
file, a garbled manifest or ``latest``) is detected before torch reads a
byte: sizes on every check, sha256 checksums when verifying (by default).
Checkpoints of format version 2 (written before checksums) still load, with
a warning, checked by size only.

Under an initialised process group, saving is a collective: every rank
writes its own shards (DTensor leaves of FSDP2 models and optimizers) into
the same temporary folder and hashes them, so all ranks must see one shared
file system under ``root``; rank 0 alone writes ``objects.pt`` and the
manifest, renames, writes ``latest`` and prunes. One run writes to a
``root`` at a time. Loading into templates reshards to the current world
size (DCP), each rank verifying a share of the files; loading without
templates reads and verifies every entry whole in one process.

API (``verify`` compares every file with its checksum, reading it whole;
without it only sizes are checked):

``save_checkpoint(root, step, tensors, objects, *, keep=2) -> Path``
    Raises ValueError for bad arguments (nothing written), CheckpointSaveError
    when a write fails.
``load_checkpoint(path, tensors=None, *, verify=True) -> (tensors, objects)``
    Raises FileNotFoundError when ``path`` is no folder, CheckpointError
    naming the folder and the file when the checkpoint is damaged, incomplete
    or of another format; ValueError when templates do not match.
``latest_checkpoint(root, *, verify=True, on_skip=None) -> Path | None``
    The first usable entry of :func:`list_checkpoints`; ``on_skip(path,
    reason)`` is called for each unusable entry passed over before it (also
    when it returns None). None and no ``on_skip`` call: no checkpoint at all.
``list_checkpoints(root, *, verify=True) -> [CheckpointStatus(path, step, problem)]``
    Every checkpoint in the order resuming tries them: the one ``latest``
    names, then the other ``step-*`` folders, highest step first; ``problem``
    None when usable, else what is wrong, naming the file. A ``latest``
    that is garbled or names a folder that does not exist is an entry of its
    own, first: ``path`` root/latest, ``step`` None (one garbled into the
    name of another existing checkpoint cannot be told). ``[]``: nothing was
    ever saved under ``root``.
``CheckpointError(ValueError)``; ``CheckpointSaveError(CheckpointError, OSError)``,
    whose ``errno`` is the failed write's where known (ENOSPC for a full device).
"""
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from rlhf_engine import distributed

__all__ = ["CheckpointError", "CheckpointSaveError", "CheckpointStatus", "capture_rng", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "restore_rng", "save_checkpoint"]

FORMAT_VERSION = 3  # 3: sha256 of every file and of the manifest; 2: sizes only (still read)
READABLE_FORMATS = (2, 3)
MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest_sha256"  # of the manifest's other fields, as canonical JSON
OBJECTS = "objects.pt"
TENSORS = "tensors"
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d{8})")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_FILE = re.compile(rf"{re.escape(OBJECTS)}|{TENSORS}/(?!\.\.?$)[^/\\]+")  # what a manifest may list
_TORCH_WRITER = re.compile(r"PytorchStreamWriter|inline_container|unexpected pos|\[Errno \d+\]")
_LOW_SPACE = 64 << 20  # free bytes below which a failed write is taken for a full device


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, incomplete, of another
    format) or written (:class:`CheckpointSaveError`); the message names the
    checkpoint folder, the file and what is wrong."""


class CheckpointSaveError(CheckpointError, OSError):
    """A save that failed on some rank (no space left on the device, a
    read-only or unwritable folder, an I/O error); the message says what
    happened, where, and which checkpoint is still the latest (intact).
    Also an OSError; ``errno`` is the failed write's where known (ENOSPC
    for a full device), else None."""


class CheckpointStatus(NamedTuple):
    """An entry of :func:`list_checkpoints`."""
    path: Path  # a step-* folder, or root/latest when the pointer itself is damaged
    step: Optional[int]  # None for root/latest
    problem: Optional[str]  # None: usable; else what is wrong, naming the file


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
    rank where it happened, an error naming that rank elsewhere). A failed
    write (OSError, or torch's writer failing on a full device) raises
    :class:`CheckpointSaveError` on every rank, saying what happened (e.g.
    "no space left on the device"), where, and which checkpoint is still the
    latest; the unfinished folder is removed.

    Guarantees: the folder appears complete or not at all; ``latest`` names it
    only once it is durable; re-saving an existing step swaps the new copy in
    (atomically where the OS can exchange two folders, see :func:`_swap_in`).
    Only then are old checkpoints pruned: this one and the ``keep - 1``
    highest other steps stay; the rest and stale ``.tmp-*`` entries go.
    """
    root = Path(root)
    where = distributed.layout()
    main = where.is_main
    what = f"saving checkpoint step {step}"

    def prepare():
        _check_arguments(step, keep, tensors, objects if main else {})
        if not main:
            return None
        tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
        with _writing(root, step, tmp):
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        return tmp.name, {name: _entry_layout(state) for name, state in tensors.items()}

    def own_files():
        """Size and checksum of each shard file this rank wrote (DCP names them ``__<rank>_<n>.distcp``)."""
        with _writing(root, step, tmp / TENSORS):
            return {f"{TENSORS}/{p.name}": _file_record(p) for p in (tmp / TENSORS).iterdir()
                    if p.name.startswith(f"__{where.rank}_")}

    def finish(written):
        if not main:
            return
        try:
            with _writing(root, step, tmp / TENSORS):
                files = {name: record for part in written for name, record in part.items()}
                for p in (tmp / TENSORS).iterdir():  # .metadata, and any file no rank claimed
                    if f"{TENSORS}/{p.name}" not in files:
                        files[f"{TENSORS}/{p.name}"] = _file_record(p)
                files = dict(sorted(files.items()))
                _fsync(tmp / TENSORS)
            with _writing(root, step, tmp / OBJECTS):
                files[OBJECTS] = _write_objects(tmp / OBJECTS, objects)
            with _writing(root, step, tmp / MANIFEST):
                _write_bytes(tmp / MANIFEST, _manifest_bytes(step, entries, files))
                _fsync(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = root / f"step-{step:08d}"
        with _writing(root, step, final):
            _swap_in(tmp, final)
            _fsync(root)
            _write_latest(root, final.name)
        _prune(root, final, keep)

    with distributed.guard(what):
        tmp_name, entries = _on_every_rank(what, prepare)[0]
        tmp = root / tmp_name
        try:
            with _writing(root, step, tmp / TENSORS), _dcp_failures(f"writing the tensors of checkpoint step {step}"):
                dcp.save(_without_aliases(tensors, entries), storage_writer=dcp.FileSystemWriter(tmp / TENSORS),
                         no_dist=not where.distributed)
            written = _on_every_rank(what, own_files)
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _on_every_rank(what, lambda: finish(written))
    return root / f"step-{step:08d}"


def latest_checkpoint(root, *, verify=True, on_skip=None):
    """The checkpoint to resume from: the folder ``latest`` names if it is
    usable, else the highest usable ``step-*`` folder, else None (also when
    ``root`` does not exist). Usable: complete, and with ``verify`` (reading
    every file of each candidate it checks, in this process) every checksum
    matches.

    ``on_skip(path, reason)`` is called for each entry of
    :func:`list_checkpoints` passed over, in order, before the one returned:
    a damaged or incomplete ``step-*`` folder, or ``root/latest`` when the
    pointer itself is garbled or names a folder that does not exist;
    ``reason`` names the file and what is wrong with it. A None result
    without any ``on_skip`` call means there is no checkpoint at all; with
    calls, every checkpoint is damaged.
    """
    for status in _statuses(Path(root), verify):
        if status.problem is None:
            return status.path
        if on_skip is not None:
            on_skip(status.path, status.problem)
    return None


def list_checkpoints(root, *, verify=True):
    """Every checkpoint under ``root`` as a :class:`CheckpointStatus` ``(path,
    step, problem)``, in the order :func:`latest_checkpoint` tries them (the
    first usable one is what it returns): the folder ``latest`` names, then
    the other ``step-*`` folders, highest step first. ``problem`` is None when
    usable, else what is wrong, naming the file. A garbled ``latest``, or one
    naming a folder that does not exist, comes first as ``(root/latest, None,
    problem)``. ``[]`` when nothing was ever saved under ``root``."""
    return list(_statuses(Path(root), verify))


def load_checkpoint(path, tensors=None, *, verify=True):
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

    Before torch reads anything, every file's size is checked and, with
    ``verify``, its sha256 (each rank a share of the files when loading into
    templates, else all of them here). A checkpoint of format version 2 (no
    checksums) loads with a warning, checked by size only.

    Raises FileNotFoundError when ``path`` does not exist, CheckpointError (a
    ValueError) naming the folder and the file when the checkpoint is
    damaged (checksum mismatch, truncated, missing file, unreadable
    manifest), incomplete or of another format (on every rank, under a
    process group), and ValueError naming the entries and keys of the
    templates the checkpoint lacks.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    where = distributed.layout()
    manifest = None

    def check(share):
        nonlocal manifest
        manifest = _usable(path, verify, share)

    if tensors is None:
        check((0, 1))
    else:  # a collective: each rank verifies a share of the files, all raise if any fails
        with distributed.guard(f"loading checkpoint {path}"):
            _on_every_rank(f"loading checkpoint {path}", lambda: check((where.rank, where.world_size)))
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
    original error where it happened, elsewhere an error naming the failed
    ranks, of the first failed rank's class when that is a CheckpointError,
    else a RuntimeError. In a world of one: ``[fn()]``."""
    if not distributed.layout().distributed:
        return [fn()]
    try:
        result, error = fn(), None
    except Exception as e:  # reported to the other ranks, then raised
        result, error = None, e
    gathered = distributed.all_gather_object((result, None if error is None else (type(error).__name__, str(error))))
    if error is not None:
        raise error
    failed = [(rank, *report) for rank, (_, report) in enumerate(gathered) if report]
    if failed:
        raise _CHECKPOINT_ERRORS.get(failed[0][1], RuntimeError)(f"{what} failed on " + "; ".join(
            f"rank {rank}: " + (message if kind in _CHECKPOINT_ERRORS else f"{kind}: {message}")
            for rank, kind, message in failed))
    return [result for result, _ in gathered]


_CHECKPOINT_ERRORS = {cls.__name__: cls for cls in (CheckpointError, CheckpointSaveError)}


class _RanksFailed(RuntimeError):
    """Other ranks' failures inside a DCP collective, as seen on this rank."""


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
        raise _RanksFailed(f"{what} failed on {failed}") from None


@contextlib.contextmanager
def _writing(root, step, where):
    """Turn a write failing inside the block (an OSError, torch's writer
    failing, another rank's failure inside DCP) into a CheckpointSaveError
    saying what happened, where (``where``: the folder or file being
    written) and which checkpoint under ``root`` is still the latest. Other
    errors (a collective failing) pass through."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not isinstance(error, (OSError, _RanksFailed)) and not _TORCH_WRITER.search(str(error)):
            raise
        reason, code = _write_failure(error, where)
        try:
            previous = latest_checkpoint(root, verify=False)
            kept = (f"the previous checkpoint {previous} is intact" if previous is not None
                    else f"there is no earlier checkpoint under {root}")
        except OSError:
            kept = f"the checkpoints under {root} are untouched"
        target = getattr(error, "filename", None) or where
        failure = CheckpointSaveError(f"cannot save checkpoint step {step} under {root}: {reason} (writing {target}); "
                                      f"{kept}")
        failure.errno = code
        raise failure from error


def _write_failure(error, where):
    """``(reason, errno)`` of a failed write: the errno's meaning when it has
    one (also from another rank's message), else "no space left" when the
    device of ``where`` is (nearly) full (errno ENOSPC), else the error's
    first line."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    code = getattr(error, "errno", None)
    if code is None and (match := re.search(r"\[Errno (\d+)\]", str(error))):
        code = int(match.group(1))
    meaning = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "no space left on the device",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}
    if code in meaning:
        return f"{meaning[code]} ({text})", code
    free = _free_bytes(Path(where))
    if free is not None and free < _LOW_SPACE:
        return f"no space left on the device ({free} bytes free; {text})", errno.ENOSPC
    if "unexpected pos" in text:  # torch's writer after a short write, errno lost
        return (f"a write came up short ({text}): the device may be full or over quota, "
                f"or a file size limit was reached"), code
    return text, code


def _free_bytes(path):
    """Bytes free to this user on the device holding ``path`` (or its nearest existing parent), or None."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


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
    _fsync(path)
    return _file_record(path)


# --- files and folders -----------------------------------------------------

def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)
    _fsync(path)


def _fsync(path):
    """Flush the file ``path`` to disk, or make the entries of the folder
    ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_record(path):
    """``{"size", "sha256"}`` of the file ``path``, read whole (sha256: about
    1 GB/s where the CPU has SHA instructions)."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return {"size": size, "sha256": digest.hexdigest()}




def _write_latest(root, name):
    tmp = root / f".tmp-{LATEST}-{os.getpid()}"
    _write_bytes(tmp, f"{name}\n".encode())
    os.replace(tmp, root / LATEST)
    _fsync(root)


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
    return sorted((status.step, status.path) for status in _statuses(root, verify=False)
                  if status.step is not None and status.problem is None)


def _statuses(root, verify):
    """The :class:`CheckpointStatus` of each checkpoint under ``root``, lazily,
    in the order :func:`list_checkpoints` documents."""
    if not root.is_dir():
        return
    name, problem = _read_latest(root)
    steps = sorted(((int(m.group(1)), root / m.group(0)) for m in map(_STEP_DIR.fullmatch, os.listdir(root)) if m),
                   reverse=True)
    named = [entry for entry in steps if entry[1].name == name]
    if name is not None and not named:
        problem = f"{LATEST} names {name}, which does not exist"
    if problem is not None:
        yield CheckpointStatus(root / LATEST, None, problem)
    for step, path in named + [entry for entry in steps if entry not in named]:
        yield CheckpointStatus(path, step, _inspect(path, verify)[1])


def _read_latest(root):
    """``(name, problem)``: the checkpoint ``root/latest`` names, or what is
    wrong with it; ``(None, None)`` when there is no ``latest``."""
    try:
        data = (root / LATEST).read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as error:
        return None, f"{LATEST} unreadable ({error.strerror})"
    name = data.decode("ascii", "replace").strip()
    if not _STEP_DIR.fullmatch(name):
        return None, f"{LATEST} holds {data[:40]!r}, not the name of a checkpoint (damaged)"
    return name, None


def _usable(path, verify, share=(0, 1)):
    """The manifest of checkpoint folder ``path`` once :func:`_inspect` finds
    nothing wrong (warning when it has no checksums), else CheckpointError."""
    manifest, problem = _inspect(path, verify, share)
    if problem == f"{MANIFEST} missing":
        raise CheckpointError(f"incomplete checkpoint {path}: {problem} "
                              f"(pass a step-* folder; latest_checkpoint(root) finds one)")
    if problem is not None:
        raise CheckpointError(f"damaged checkpoint {path}: {problem}")
    if verify and manifest["format_version"] < 3:
        warnings.warn(f"checkpoint {path} has no checksums (format version {manifest['format_version']}, "
                      f"saved by an earlier rlhf_engine): its files are checked by size only", stacklevel=3)
    return manifest


def _inspect(path, verify, share=(0, 1)):
    """``(manifest, problem)`` of checkpoint folder ``path``: ``problem`` None
    when its manifest is sound and every file has its size (and with
    ``verify`` its checksum, for the files of ``share`` ``(rank, ranks)``:
    every ``ranks``-th in sorted order from ``rank``), else what is wrong,
    naming the file (the manifest then None)."""
    manifest, problem = _read_manifest(path)
    if problem is not None:
        return None, problem
    files = manifest["files"]
    for name, record in files.items():
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            return None, f"{name} missing"
        except OSError as error:
            return None, f"{name} unreadable ({error.strerror})"
        if size != record["size"]:
            return None, f"{name} has {size} bytes, the manifest says {record['size']} (truncated or overwritten)"
    rank, ranks = share
    for name in sorted(files)[rank::ranks] if verify else ():
        if "sha256" not in files[name]:  # format 2
            continue
        try:
            actual = _file_record(path / name)["sha256"]
        except OSError as error:
            return None, f"{name} unreadable ({error.strerror})"
        if actual != files[name]["sha256"]:
            return None, f"{name} does not match its sha256 checksum (its bytes changed after the save)"
    return manifest, None


def _manifest_bytes(step, entries, files):
    body = {"format_version": FORMAT_VERSION, "step": step, "tensors": entries, "files": files}
    return json.dumps({**body, MANIFEST_CHECKSUM: _manifest_checksum(body)}, indent=1).encode()


def _manifest_checksum(body):
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_manifest(path):
    """``(manifest, problem)``: the manifest of checkpoint folder ``path``
    with ``files`` as ``{name: {"size": n[, "sha256": hex]}}`` (format 2's
    sizes converted), or None and what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None, f"{MANIFEST} missing"
    except OSError as error:
        return None, f"{MANIFEST} unreadable ({error.strerror})"
    except ValueError:  # not UTF-8, not JSON
        return None, f"{MANIFEST} is not valid JSON (damaged)"
    if not isinstance(manifest, dict):
        return None, f"{MANIFEST} is not a checkpoint manifest (damaged)"
    stored = manifest.pop(MANIFEST_CHECKSUM, None)
    if stored is not None and stored != _manifest_checksum(manifest):
        return None, f"{MANIFEST} does not match its own sha256 checksum (damaged)"
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS:
        return None, (f"{MANIFEST} is of format version {version!r}; this rlhf_engine reads versions "
                      f"{', '.join(map(str, READABLE_FORMATS))}")
    try:
        files = manifest["files"]
        if version == 2:
            files = {name: {"size": size} for name, size in files.items()}
        sound = (stored is not None or version == 2) and isinstance(manifest["tensors"], dict) and all(
            _FILE.fullmatch(name) and isinstance(record["size"], int) for name, record in files.items()) and {
            OBJECTS, f"{TENSORS}/.metadata"} <= set(files)
    except (KeyError, TypeError, AttributeError):
        sound = False
    if not sound:
        return None, f"{MANIFEST} is not a checkpoint manifest of format version {version} (damaged)"
    manifest["files"] = files
    return manifest, None
