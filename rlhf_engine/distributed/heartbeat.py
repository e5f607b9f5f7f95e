"""The heartbeat: every rank bumps its counter in the rendezvous store, so
that a rank whose counter stops moving (killed, crashed, frozen) can be
named; :func:`rlhf_engine.distributed.guard` names it when a collective
fails."""
import contextlib
import os
import sys
import threading
import time

import torch.distributed as dist

HEARTBEAT_SECONDS = 0.5


class _Heartbeat:
    """A daemon thread that bumps this rank's counter in the rendezvous
    store every :data:`HEARTBEAT_SECONDS`. A rank whose counter stops moving
    is dead (killed, crashed, frozen): :func:`~rlhf_engine.distributed.guard`
    names it when a collective fails, and when a collective hangs instead
    (NCCL keeps waiting for a dead peer) the thread itself ends the process after
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
