"""The plain CPU kernels' threads (rlhf_engine/_native.py, csrc/cpu/parallel.cpp):
they run on the caller's torch.get_num_threads(), in one persistent pool."""
import threading

import pytest
import torch

from rlhf_engine import _native
from rlhf_engine.ops import gae

pytestmark = pytest.mark.skipif(_native.CPU_KERNELS_ERROR is not None, reason=str(_native.CPU_KERNELS_ERROR))


def _inputs():
    # 64 rows of 4096: 8 rows per thread at least (kGrainElements = 2^15), so up to 8 threads
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(64, 4096, generator=gen), torch.randn(64, 4096, generator=gen)
    return rewards, values, torch.rand(64, 4096, generator=gen) > 0.2


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_kernels_honour_torch_set_num_threads(restore_threads):
    rewards, values, mask = _inputs()
    results, most = {}, 1
    for n in (1, 2, 4, 3, 1):
        most = max(most, n)
        torch.set_num_threads(n)
        results[n] = gae(rewards, values, mask, gamma=0.99, lam=0.95, backend="cpu")
        threads, width, ran, workers = _native.cpu_threads()
        assert (threads, width) == (n, n)
        assert 1 <= ran <= n
        assert workers >= most - 1  # grown once to the most threads asked for, never shrunk
    for adv, ret in results.values():  # chunks depend on the thread count only, rows never straddle them
        assert torch.equal(adv, results[1][0]) and torch.equal(ret, results[1][1])


def test_pool_is_reused_not_regrown(restore_threads):
    rewards, values, mask = _inputs()
    torch.set_num_threads(2)
    gae(rewards, values, mask, backend="cpu")
    workers = _native.cpu_threads()[3]
    for _ in range(20):
        gae(rewards, values, mask, backend="cpu")
    assert _native.cpu_threads()[3] == workers


def test_small_inputs_stay_on_the_calling_thread(restore_threads):
    torch.set_num_threads(4)
    rewards, values, mask = (t[:2, :16] for t in _inputs())
    gae(rewards, values, mask, backend="cpu")
    assert _native.cpu_threads()[1:3] == (1, 1)


def test_concurrent_callers_each_get_their_result(restore_threads):
    # Two Python threads calling at once (as the engine's side-by-side lanes
    # do) share the pool; each call's result is its own.
    rewards, values, mask = _inputs()
    torch.set_num_threads(2)
    expected = gae(rewards, values, mask, gamma=0.9, lam=0.8, backend="cpu")
    failures = []

    def lane():
        for _ in range(10):
            adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, backend="cpu")
            if not (torch.equal(adv, expected[0]) and torch.equal(ret, expected[1])):
                failures.append("mismatch")

    lanes = [threading.Thread(target=lane) for _ in range(2)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    assert not failures
