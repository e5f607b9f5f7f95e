"""The process group: this process's place in it (:class:`Layout`), its
setup and teardown from torchrun's environment, the collectives the engine
and the pipeline need (no-ops in a world of one), and :func:`guard`, which
turns a collective's failure into a :class:`RankFailureError` naming the
rank that failed (from :mod:`rlhf_engine.distributed.heartbeat`)."""
import contextlib
import dataclasses
import datetime
import json
import os

import torch
import torch.distributed as dist

from rlhf_engine.distributed import heartbeat


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
    heartbeat._Heartbeat.start(timeout_s)
    return layout()


def shutdown() -> None:
    """Leave the process group cleanly (the other ranks do not count this
    rank as dead once it has said so)."""
    heartbeat._Heartbeat.stop()
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


# Failures ------------------------------------------------------------------------------


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
        dead = heartbeat.failed_ranks()
        if not dead:
            raise
        me = dist.get_rank()
        silent = heartbeat.describe(dead, 4 * heartbeat.HEARTBEAT_SECONDS)
        raise RankFailureError(f"rank {me}: {what} failed: {silent} "
                               f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from error
