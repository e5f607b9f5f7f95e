"""Per-phase time and peak memory, cheap enough to record every iteration.

On CUDA the peak is the caching allocator's high-water mark of the phase
(``torch.cuda.max_memory_allocated`` after a reset). On the CPU it is the
process's peak resident set size during the phase: Linux keeps it as
``VmHWM`` and lets a process reset it (writing ``5`` to
``/proc/self/clear_refs``); where that is not possible the process's
lifetime peak (``getrusage``) is reported instead
(:func:`rlhf_engine.profiling.rss_peak_mib`)."""
import contextlib
import time

import torch

from rlhf_engine.profiling import MIB, reset_rss_peak, rss_peak_mib


class PhaseRecorder:
    """Collects ``time/<phase>`` (seconds) and ``memory/<phase>`` (peak MiB)
    for the phases of one iteration, plus ``memory/peak_rss_mib`` (the
    largest CPU peak of the iteration)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.metrics = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name):
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        reset_rss_peak()
        start = time.perf_counter()
        yield
        self._sync()
        self.metrics[f"time/{name}"] = time.perf_counter() - start
        rss = rss_peak_mib()
        self.metrics["memory/peak_rss_mib"] = max(self.metrics.get("memory/peak_rss_mib", 0.0), rss)
        if self.device.type == "cuda":
            self.metrics[f"memory/{name}_mib"] = torch.cuda.max_memory_allocated(self.device) / MIB
        else:
            self.metrics[f"memory/{name}_mib"] = rss


class WeightedMean:
    """Token-weighted means of 0-d device tensors, read on the host once.

    Stats of micro-batches are means over their own valid tokens; weighting
    each by its token count gives the mini-batch's mean, whatever the split."""

    def __init__(self):
        self.sums, self.weights = {}, {}

    def add(self, name, value, weight):
        value = value.detach().float() * weight
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.weights[name] = self.weights.get(name, 0) + weight

    def result(self, prefix="", reduce=None):
        """``{prefix + name: float}`` (one host sync for all of them).
        ``reduce``: sums the sums and weights over ranks in place (e.g.
        :func:`rlhf_engine.distributed.all_reduce`), for global means."""
        if not self.sums:
            return {}
        names = list(self.sums)
        sums = torch.stack([self.sums[n] for n in names])
        weights = torch.stack([torch.as_tensor(self.weights[n], dtype=sums.dtype, device=sums.device)
                               for n in names])
        if reduce is not None:
            both = reduce(torch.cat([sums, weights]))
            sums, weights = both[:len(names)], both[len(names):]
        totals = sums / weights.clamp(min=1)
        return {prefix + n: v for n, v in zip(names, totals.tolist())}
