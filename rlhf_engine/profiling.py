"""Time and peak memory of a callable, on the CPU or a CUDA device.

Used by the demo, the op benchmarks (benchmarks/harness.py) and the ops'
memory tests. The engine's per-phase metrics use only :func:`rss_peak_mib`:
the process's resident set size, cheap enough for every iteration. Here
CPU peak memory comes from the profiler's allocation events (torch keeps no
CPU allocator statistics); CUDA peak memory from the caching allocator.
"""
import dataclasses
import resource
import sys
import time
from typing import Optional

import torch


@dataclasses.dataclass
class MemoryStats:
    """What one call allocated beyond what was allocated before it."""

    peak_bytes: int  # high-water mark of live allocations
    largest_bytes: Optional[int] = None  # largest single allocation (CPU only)


def peak_memory(fn, device="cpu"):
    """Run ``fn()`` once; return (its result, :class:`MemoryStats`)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, MemoryStats(torch.cuda.max_memory_allocated(device) - before)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = largest = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
        largest = max(largest, nbytes)
    return out, MemoryStats(peak, largest)


def median_time(fn, device="cpu", repeats=5, warmup=1):
    """Median wall time of ``fn()`` in seconds (CUDA work synchronised)."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


MIB = 2.0**20


def reset_rss_peak():
    """Restart :func:`rss_peak_mib` from the current resident set size, where
    Linux lets a process reset it (writing ``5`` to ``/proc/self/clear_refs``);
    elsewhere the peak stays the process's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_peak_mib():
    """The process's peak resident set size (MiB) since the last
    :func:`reset_rss_peak` (Linux ``VmHWM``), else its lifetime peak (``getrusage``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / MIB if sys.platform == "darwin" else peak * 1024 / MIB
