"""Scale-out on torch.distributed: the process layout, the collectives the
engine and the pipeline need, FSDP2 sharding, and failures that name the
rank that failed.

Launch with ``torchrun`` (one process per GPU, or per CPU rank with gloo)
and call :func:`init` first; a process started without torchrun is a
world of one and none of this costs anything::

    layout = distributed.init(timeout_s=600)     # NCCL on GPUs, gloo on CPUs
    with distributed.guard("training"):          # a dead rank -> RankFailureError naming it
        ...

Every rank runs the same program on its own rows of the global batch; the
functions here keep global quantities global (sums over ranks) so that
results do not depend on the world size.
"""
import contextlib
import dataclasses
import datetime
import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

HEARTBEAT_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RankFailureError(RuntimeError):
    """A collective failed because another rank died or stopped responding."""


class DisagreementError(ValueError):
    """Ranks were started with different settings."""


def layout() -> Layout:
    """The current layout: from the process group when one is initialised,
    else a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return Layout()
    return Layout(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init(timeout_s: float = 600.0, device: str = "auto") -> Layout:
    """Initialise the default process group from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``):
    NCCL when the ranks run on GPUs, gloo on CPUs; every collective times
    out after ``timeout_s`` seconds. Starts the heartbeat that lets
    :func:`guard` name a dead rank. Without torchrun's variables (or with
    ``WORLD_SIZE=1``) nothing is initialised and a world of one is returned.
    Calling it again returns the current layout."""
    if dist.is_initialized():
        return layout()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Layout()
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_for(Layout(0, world_size, local_rank), device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    _Heartbeat.start(timeout_s)
    return layout()


def shutdown() -> None:
    """Leave the process group cleanly (the other ranks do not count this
    rank as dead once it has said so)."""
    _Heartbeat.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(where: Layout, name: str = "auto") -> torch.device:
    """This rank's device: ``cuda:<local_rank>`` for "auto" or "cuda" when
    CUDA is available, else the CPU; an explicit ``cuda:N`` or ``cpu`` as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", where.local_rank)
    return torch.device(name)


# Collectives (no-ops in a world of one) ------------------------------------------------


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` summed (or ``op="max"``) over the ranks, in place; returned."""
    if layout().distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' ``tensor`` s (same shape on every rank) concatenated along
    dim 0 in rank order: ``[world_size * n, ...]``. Bool tensors travel as
    uint8 (the backends have no bool collectives)."""
    if not layout().distributed:
        return tensor
    if tensor.dtype == torch.bool:
        return all_gather_rows(tensor.to(torch.uint8)).bool()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not layout().distributed:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_agreement(what: str, value) -> None:
    """Raise :class:`DisagreementError` on every rank when ranks hold a
    different ``value`` (a JSON-able settings dict, or any JSON-able value),
    naming the ranks and the keys that differ from rank 0's."""
    values = all_gather_object(json.dumps(value, sort_keys=True, default=str))
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if not differing:
        return
    first = json.loads(values[0])
    details = []
    for r in differing:
        other = json.loads(values[r])
        if isinstance(first, dict) and isinstance(other, dict):
            keys = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            details.append(f"rank {r}: " + ", ".join(f"{k}={other.get(k)!r} (rank 0: {first.get(k)!r})"
                                                     for k in keys))
        else:
            details.append(f"rank {r}: {other!r} (rank 0: {first!r})")
    raise DisagreementError(f"ranks disagree on {what}: " + "; ".join(details))


def rows_of_rank(total: int, where: Layout) -> slice:
    """This rank's contiguous share of ``total`` rows (``total`` must divide
    evenly: every rank then does the same work)."""
    if total % where.world_size:
        raise ValueError(f"{total} rows do not split evenly over {where.world_size} ranks")
    share = total // where.world_size
    return slice(where.rank * share, (where.rank + 1) * share)


# FSDP2 ---------------------------------------------------------------------------------


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


# Failures ------------------------------------------------------------------------------


class _Heartbeat:
    """A daemon thread that bumps this rank's counter in the rendezvous
    store every :data:`HEARTBEAT_SECONDS`. A rank whose counter stops moving
    is dead (killed, crashed, frozen): :func:`guard` names it when a
    collective fails, and when a collective hangs instead (NCCL keeps
    waiting for a dead peer) the thread itself ends the process after
    ``timeout_s`` with the same message. Reading the others' counters is one
    store round trip, done every ``timeout_s / 10`` seconds (and on
    failure), so the store's load grows with the world size, not its square.
    A rank that leaves cleanly sets its counter to -1."""

    _instance = None

    def __init__(self, store, rank, world_size, timeout_s):
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.seen = {r: (-1, time.monotonic()) for r in range(world_size)}  # rank -> (count, when it last moved)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rlhf_engine-heartbeat", daemon=True)

    @classmethod
    def start(cls, timeout_s):
        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError):
            return  # a process group without a store: failures are reported without names
        beat = cls(dist.PrefixStore("rlhf_engine/heartbeat/", store), dist.get_rank(), dist.get_world_size(),
                   timeout_s)
        beat.store.add(str(beat.rank), 1)
        dist.barrier()  # every counter exists before anyone reads them
        cls._instance = beat
        beat.thread.start()

    @classmethod
    def stop(cls):
        beat, cls._instance = cls._instance, None
        if beat is not None:
            beat.stopping.set()
            beat.thread.join(timeout=2 * HEARTBEAT_SECONDS)
            with contextlib.suppress(Exception):
                beat.store.set(str(beat.rank), "-1")

    def _run(self):
        watch_every = max(HEARTBEAT_SECONDS, self.timeout_s / 10)
        watched = time.monotonic()
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.store.add(str(self.rank), 1)
                if time.monotonic() - watched < watch_every:
                    continue
                watched = time.monotonic()
                stale = self.stale_ranks(self.timeout_s)
            except Exception:  # the store's host is gone: guard reports it
                continue
            if stale and not self.stopping.is_set():
                print(f"rlhf_engine: rank {self.rank}: {describe(stale, self.timeout_s)}; exiting",
                      file=sys.stderr, flush=True)
                os._exit(1)

    def stale_ranks(self, seconds):
        """Ranks whose counter has not moved for ``seconds`` (ranks that left cleanly excluded)."""
        now = time.monotonic()
        counts = self.store.multi_get([str(r) for r in range(self.world_size)])
        stale = []
        for r, count in enumerate(int(c) for c in counts):
            if r == self.rank or count == -1:
                continue
            last_count, since = self.seen[r]
            if count != last_count:
                self.seen[r] = (count, now)
            elif now - since > seconds:
                stale.append(r)
        return stale


def describe(ranks, seconds) -> str:
    names = ", ".join(str(r) for r in ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {names} stopped responding (no heartbeat for {seconds:.1f} s)"


def failed_ranks(wait_s: float = 4 * HEARTBEAT_SECONDS):
    """The ranks that stopped their heartbeat, watched for ``wait_s``
    seconds; None when that cannot be known (no heartbeat, or the store on
    rank 0's host is gone, which names rank 0)."""
    beat = _Heartbeat._instance
    if beat is None:
        return None
    try:
        beat.stale_ranks(wait_s)  # refresh what was last seen
        time.sleep(wait_s)
        return beat.stale_ranks(wait_s * 0.75)
    except Exception:
        return [0]


@contextlib.contextmanager
def guard(what: str):
    """Turn a collective's failure inside the block into a
    :class:`RankFailureError` that names the rank(s) that died (from the
    heartbeats); other errors pass through unchanged."""
    try:
        yield
    except (RuntimeError, ConnectionError) as error:
        if isinstance(error, RankFailureError) or not layout().distributed:
            raise
        dead = failed_ranks()
        if not dead:
            raise
        me = dist.get_rank()
        raise RankFailureError(f"rank {me}: {what} failed: {describe(dead, 4 * HEARTBEAT_SECONDS)} "
                               f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from error
