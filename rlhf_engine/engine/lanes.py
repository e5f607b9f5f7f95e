"""Two models' passes side by side on the CPU.

In the learn phase the policy's and the critic's forward and backward are
independent (separate graphs), and so are their optimizer steps. On a CPU whose cores one
model's small matmuls cannot keep busy, running the two at once, each with
half of torch's threads, beats running them one after the other with all of
them (measured on 2 cores, small work: ``benchmarks/results``). The results
are the same up to float32 rounding: only the threads that compute them
change, and MKL splits some products differently on fewer threads.
"""
from concurrent.futures import ThreadPoolExecutor

import torch


class Lanes:
    """Runs zero-argument calls concurrently (``enabled``) or in turn."""

    def __init__(self, enabled):
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="rlhf_engine-lane") if enabled else None

    def run(self, *calls):
        """``[call() or None for each call]`` (a None call gives None). Side by
        side, torch's threads split between them, the caller's grad mode in
        each; in turn when disabled or fewer than two calls are given."""
        live = [c for c in calls if c is not None]
        if self.pool is None or len(live) < 2:
            return [c() if c is not None else None for c in calls]
        grad = torch.is_grad_enabled()
        threads = torch.get_num_threads()

        def lane(call):
            with torch.set_grad_enabled(grad):
                return call()

        torch.set_num_threads(max(1, threads // len(live)))
        try:
            futures = [self.pool.submit(lane, c) if c is not None else None for c in calls]
            return [f.result() if f is not None else None for f in futures]
        finally:
            torch.set_num_threads(threads)
