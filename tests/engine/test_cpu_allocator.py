"""engine.cpu_allocator: with freed memory retained, a loop that frees and
reallocates tensors of a few MB (as each PPO step does with activations and
gradients) stops faulting in fresh pages. It runs in its own process: the
setting is process-wide."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

# glibc adapts its thresholds to what the process freed so far (import-time
# history included), so the child first pins them at their starting values
# (128 KiB): every churn then faults its pages in, until the settings change.
LOOP = """
import ctypes, resource, torch
from rlhf_engine.engine import cpu_allocator
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(cpu_allocator.M_MMAP_THRESHOLD, 128 * 1024) and libc.mallopt(cpu_allocator.M_TRIM_THRESHOLD, 128 * 1024)
def churn():
    for _ in range(10):
        tensors = [torch.ones(256 * 1024 * (1 + i % 8)) for i in range(32)]  # 1-8 MB each, 144 MB in all
        del tensors
def faults():
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
pinned = faults()
assert cpu_allocator.retain_freed_memory()
print(pinned, faults())
"""


def test_retained_memory_is_reused_without_page_faults():
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    pinned, retained = map(int, out.stdout.split()[-2:])
    # glibc's starting thresholds: every page of the 144 MB, ten times over (~370,000 faults); retained: none.
    assert pinned > 100_000, (pinned, retained)
    assert retained < 1_000, (pinned, retained)


def test_the_engine_applies_it_on_the_cpu_only_when_asked(monkeypatch):
    from rlhf_engine.engine import engine as engine_module
    from tests.helpers import make_engine
    calls = []
    monkeypatch.setattr(engine_module, "retain_freed_memory", lambda: calls.append(True) or True)
    make_engine()
    make_engine(retain_freed_memory=False)
    assert calls == [True]
