"""Freed host memory kept for reuse (glibc malloc), so that a CPU run does
not fault in fresh pages for every iteration's activations and gradients.

PyTorch's CPU tensors come from malloc. glibc serves large blocks with mmap
and returns freed memory at the top of its heaps to the OS, adapting both
thresholds as it goes; the kernel then zeroes and maps every page again on
its first write. A PPO iteration takes tens of thousands of page faults
that way, because each PPO step frees and reallocates the models' gradients
and activations. :func:`retain_freed_memory` sets the two thresholds
(``mallopt``): blocks up to ``max_heap_block`` come from the heap, and up to
``keep`` bytes of freed heap memory stay mapped. The faults then mostly go
away, at the same peak resident memory (the memory is reused, not added);
the resident size no longer shrinks after a peak (one machine's numbers:
``benchmarks/results/amd-epyc/notes.md``). It is a process-wide setting,
made once by ``RLHFEngine`` on the CPU (``EngineConfig.retain_freed_memory``).
"""
import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MAX_HEAP_BLOCK = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
KEEP = 1 << 30


def retain_freed_memory(max_heap_block=MAX_HEAP_BLOCK, keep=KEEP):
    """Ask glibc's malloc to serve blocks up to ``max_heap_block`` bytes from
    its heap and to keep up to ``keep`` bytes of freed memory instead of
    returning it to the OS. Returns whether the settings were applied (False
    where the C library is not glibc, or it refused a value)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return (bool(libc.mallopt(M_MMAP_THRESHOLD, int(max_heap_block)))
            and bool(libc.mallopt(M_TRIM_THRESHOLD, int(keep))))
