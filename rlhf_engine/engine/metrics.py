"""Per-phase time and peak memory, cheap enough to record every iteration.

On CUDA the peak is the caching allocator's high-water mark of the phase
(``torch.cuda.max_memory_allocated`` after a reset). On the CPU it is the
process's peak resident set size during the phase: Linux keeps it as
``VmHWM`` and lets a process reset it (writing ``5`` to
``/proc/self/clear_refs``); where that is not possible the process's
lifetime peak (``getrusage``) is reported instead
(:func:`rlhf_engine.profiling.rss_peak_mib`)."""
import contextlib
import math
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


# Reward-hacking diagnostics, always on: a few reductions of tensors the score phase has anyway.

class Trend:
    """The slope of a series: an exponential moving average (``decay``) of
    its change per step, bias-corrected as Adam's moments are, so that the
    first slopes are not pulled towards 0. :meth:`update` returns None until
    two finite values were seen; a non-finite value is skipped."""

    def __init__(self, decay=0.9):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay, self.last, self.average, self.count = decay, None, 0.0, 0

    def update(self, value):
        if not math.isfinite(value):
            return None
        if self.last is None:
            self.last = value
            return None
        change, self.last = value - self.last, value
        self.count += 1
        self.average = self.decay * self.average + (1 - self.decay) * change
        return self.average / (1 - self.decay ** self.count)

    def state_dict(self):
        return {"decay": self.decay, "last": self.last, "average": self.average, "count": self.count}

    def load_state_dict(self, state):
        self.decay, self.last, self.average, self.count = (state[k] for k in ("decay", "last", "average", "count"))


def reference_length(policy_logprobs, ref_logprobs, response_mask):
    """The reference policy's mean response length, estimated from the
    policy's samples by self-normalised importance sampling: each response
    weighs ``exp(sum_t ref_logprobs - policy_logprobs)`` (the reference's
    likelihood over the sampling policy's, at the sampling temperature), so
    no sample is drawn from the reference. Consistent as the batch grows
    without top-k/top-p filtering (the log-probs are the unfiltered
    distribution's); noisy when the policy has moved far, which the
    effective sample size says.

    Args:
        policy_logprobs, ref_logprobs: ``[B, T]`` float, 0 outside the response.
        response_mask: ``[B, T]`` bool.

    Returns:
        ``(length [], ess [])`` float64 0-d tensors: the estimate (tokens) and
        the effective sample size as a fraction of ``B``,
        ``(sum w)^2 / (B sum w^2)`` in ``(0, 1]`` (1: the policy is the reference).
    """
    mask = response_mask.bool()
    log_ratio = torch.where(mask, ref_logprobs.double() - policy_logprobs.double(), 0.0).sum(-1)
    weights = torch.softmax(log_ratio, dim=0)
    length = (weights * mask.sum(-1).double()).sum()
    ess = 1.0 / (weights.shape[0] * (weights ** 2).sum())
    return length, ess
