"""What every op benchmark shares: the machine, peak memory beyond the inputs,
timing through pytest-benchmark, and the session's results.

A benchmark file calls :func:`run` once per (case, candidate, mode) and
:func:`run_copy` once per case; the :class:`Collector` (one per pytest
session, see conftest.py) gathers the records and, at the end of the session,
writes ``results.json``, ``results.md`` and ``results.png`` into
:func:`output_dir`:

* speed-up and memory ratio are against the reference candidate (``eager``)
  of the same (op, case, mode), measured in the same session;
* % of the floor: a case may give a byte model (bytes that must move, per
  mode); the floor is that many bytes at the copy bandwidth measured in the
  same session with a tensor copy of the logits' size (2 x bytes / time:
  one read and one write).
"""
import dataclasses
import json
import math
import os
import platform
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from rlhf_engine import profiling
from rlhf_engine.ops import registry

REFERENCE = "eager"
RESULTS_ROOT = Path(__file__).resolve().parent / "results"
MB = 1e6

# Rounds: warm-up calls, then one call under the memory probe, then
# ceil(budget / duration of one call) timed rounds, clamped to [min, max].
ROUNDS = {
    "cpu": dict(warmup=1, budget_s=2.0, min_rounds=3, max_rounds=10),
    "cuda": dict(warmup=3, budget_s=1.0, min_rounds=10, max_rounds=100),
}


# Machine -------------------------------------------------------------------------

def device():
    """The device benchmarks run on: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name():
    """GPU name (CUDA) or CPU model: where a figure comes from."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model()


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def output_dir():
    """$RLHF_ENGINE_BENCH_OUT, else benchmarks/results/<machine slug>/."""
    return Path(os.environ.get("RLHF_ENGINE_BENCH_OUT") or RESULTS_ROOT / slug(machine_name()))


def _git_commit():
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "name": machine_name(),
        "device": device().type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                    gpu_capability=f"{props.major}.{props.minor}")
    return info


# Measuring -----------------------------------------------------------------------

def peak_memory(fn, dev):
    """:class:`MemoryStats` of one call of ``fn`` (see rlhf_engine.profiling:
    torch's CUDA allocator, or the CPU profiler's allocation events)."""
    return profiling.peak_memory(fn, dev)[1]


@contextmanager
def time_limit(seconds, what):
    """Raise TimeoutError in the main thread if the block runs past ``seconds``."""
    def expire(*_):
        raise TimeoutError(f"{what} took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def engine_backend(op, candidate, dev, dtype):
    """The backend of an ``rlhf_engine[<backend>]`` candidate, or pytest.skip
    with the reason it cannot run here (Triton only runs compiled, on a GPU)."""
    backend = candidate.removeprefix("rlhf_engine[").removesuffix("]")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: Triton kernels are benchmarked compiled, on a GPU")
    reason = registry.unavailable_reason(op, backend, dev, dtype)
    if reason:
        pytest.skip(reason)
    return backend


_INPUTS = {}


def cached_inputs(key, make):
    """``make()`` once per (benchmark module, ``key``); only the latest
    inputs stay alive, so big cases do not pile up in memory."""
    key = (make.__module__, key)
    if key not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[key] = make()
    return _INPUTS[key]


COMPILE_TIMEOUT_S = float(os.environ.get("RLHF_ENGINE_BENCH_COMPILE_TIMEOUT", "120"))
_COMPILE_FAILURES = []  # the first compile failure or timeout skips the later compiled runs


def skip_if_compile_failed():
    """pytest.skip a compiled candidate once an earlier compile failed."""
    if _COMPILE_FAILURES:
        pytest.skip(f"torch.compile skipped after: {_COMPILE_FAILURES[0]}")


def warm_compiled(call, dev, collector, *, op, case, candidate, mode, extra):
    """Run the first (compiling) call of a torch.compile candidate under a time
    limit, outside the timing; its duration goes to ``extra["compile_s"]``. A
    failure or timeout is recorded and skips this and later compiled runs."""
    try:
        with time_limit(COMPILE_TIMEOUT_S, f"torch.compile ({op}, {case}, {mode})"):
            start = time.perf_counter()
            call()
            sync(dev)
            extra["compile_s"] = time.perf_counter() - start
    except Exception as exc:
        _COMPILE_FAILURES.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        collector.skip(op, case, candidate, mode, f"torch.compile failed: {_COMPILE_FAILURES[-1]}")
        pytest.skip(f"torch.compile failed: {_COMPILE_FAILURES[-1]}")


@dataclasses.dataclass
class Record:
    op: str
    case: str
    candidate: str
    mode: str
    median_s: float                   # per call
    min_s: float
    max_s: float
    rounds: int
    calls_per_round: int              # > 1 only for short calls on a GPU
    memory: profiling.MemoryStats     # what one call allocates beyond its inputs
    model_bytes: int | None           # bytes that must move (the byte model), if given
    extra: dict = dataclasses.field(default_factory=dict)


def run(benchmark, collector, *, op, case, candidate, mode, fn, dev, setup=None, model_bytes=None,
        warmup=None, min_rounds=None, extra=None):
    """Warm up, measure the peak memory of one call, time ``fn`` with
    pytest-benchmark and add a :class:`Record`. ``fn`` launches the work (the
    harness synchronizes); ``setup`` (e.g. dropping a gradient) runs before
    every call, outside the timing and the memory probe, except on a GPU when
    calls are so short that a round makes several back-to-back calls
    (``setup`` must then be cheap there, as dropping a gradient is)."""
    cfg = dict(ROUNDS[dev.type])
    cfg.update({k: v for k, v in dict(warmup=warmup, min_rounds=min_rounds).items() if v is not None})
    setup = setup or (lambda: None)

    def call():
        fn()
        sync(dev)

    one_call = None
    for _ in range(cfg["warmup"]):
        setup()
        start = time.perf_counter()
        call()
        one_call = time.perf_counter() - start
    setup()
    start = time.perf_counter()
    memory = peak_memory(fn, dev)
    one_call = one_call or time.perf_counter() - start

    # On a GPU, rounds of at least ~2 ms (one synchronization per round).
    calls = 1 if dev.type != "cuda" else min(100, max(1, math.ceil(2e-3 / one_call)))
    if calls > 1:
        def timed():
            for _ in range(calls):
                setup()
                fn()
            sync(dev)
        timed_setup = None
    else:
        timed, timed_setup = call, setup
    rounds = min(cfg["max_rounds"], max(cfg["min_rounds"], math.ceil(cfg["budget_s"] / (one_call * calls))))

    benchmark.group = f"{op} {case} {mode}"
    benchmark.extra_info.update(dataclasses.asdict(memory), calls_per_round=calls, **(extra or {}))
    benchmark.pedantic(timed, setup=timed_setup, rounds=rounds, iterations=1, warmup_rounds=0)
    if not benchmark.stats:  # --benchmark-disable
        return None
    stats = benchmark.stats.stats
    record = Record(op, case, candidate, mode, stats.median / calls, stats.min / calls, stats.max / calls,
                    stats.rounds, calls, memory, model_bytes, dict(extra or {}))
    collector.add(record)
    return record


def run_copy(benchmark, collector, *, op, case, like, dev):
    """Time ``dst.copy_(like)``: the session's copy bandwidth for this case
    (2 x bytes / median time: one read and one write)."""
    dst = torch.empty_like(like).copy_(like)
    nbytes = like.numel() * like.element_size()
    return run(benchmark, collector, op=op, case=case, candidate="copy", mode="copy",
               fn=lambda: dst.copy_(like), dev=dev, model_bytes=2 * nbytes)


# Results -------------------------------------------------------------------------

class Collector:
    """Records of one pytest session, written to a folder at its end."""

    def __init__(self):
        self.records = []
        self.skipped = []  # (op, case, candidate, mode, reason)

    def add(self, record):
        self.records.append(record)

    def skip(self, op, case, candidate, mode, reason):
        """Note a candidate that did not run (it appears under its case)."""
        self.skipped.append(dict(op=op, case=case, candidate=candidate, mode=mode, reason=reason))

    def _find(self, op, case, candidate, mode):
        for r in self.records:
            if (r.op, r.case, r.candidate, r.mode) == (op, case, candidate, mode):
                return r
        return None

    def copy_bandwidth(self, op, case):
        """Bytes per second of a tensor copy for this case (None if not measured)."""
        r = self._find(op, case, "copy", "copy")
        return r.model_bytes / r.median_s if r else None

    def rows(self):
        """Every measured candidate with its ratios to the reference and its %
        of the floor (None where the reference or the copy is missing)."""
        out = []
        for r in self.records:
            if r.candidate == "copy":
                continue
            ref = self._find(r.op, r.case, REFERENCE, r.mode)
            bandwidth = self.copy_bandwidth(r.op, r.case)
            floor_s = r.model_bytes / bandwidth if bandwidth and r.model_bytes else None
            out.append(dict(
                dataclasses.asdict(r),
                speedup=ref.median_s / r.median_s if ref else None,
                memory_ratio=r.memory.peak_bytes / ref.memory.peak_bytes if ref and ref.memory.peak_bytes else None,
                floor_s=floor_s,
                pct_of_floor=100 * floor_s / r.median_s if floor_s else None,
            ))
        return out

    def write(self, folder=None):
        """Write results.json, results.md and results.png; return the folder."""
        folder = Path(folder or output_dir())
        folder.mkdir(parents=True, exist_ok=True)
        info = machine_info()
        bandwidths = {f"{r.op} {r.case}": r.model_bytes / r.median_s for r in self.records if r.candidate == "copy"}
        doc = {"machine": info, "reference": REFERENCE, "copy_bandwidth_bytes_per_s": bandwidths,
               "records": self.rows(), "skipped": self.skipped}
        (folder / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
        (folder / "results.md").write_text(self.markdown(info))
        try:
            self.plot(folder / "results.png")
        except Exception as exc:  # a missing or broken matplotlib must not lose the numbers
            print(f"[bench] results.png not written: {exc!r}")
        return folder

    def markdown(self, info):
        rows = self.rows()
        lines = [f"# Benchmark results: {info['name']}", "",
                 f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, python {info['python']}, "
                 f"{info['cpu_count']} CPUs ({info['torch_threads']} torch threads), commit {info['git_commit']}, "
                 f"{info['date']}.", "",
                 f"Times are medians. Speed-up and memory ratio are against `{REFERENCE}` in the same run "
                 "(speed-up > 1 is faster; memory ratio < 1 is smaller). Peak memory is what one call allocates "
                 "beyond its inputs (it includes the gradient in fwd+bwd), from torch's allocator (on the CPU through "
                 "the profiler's allocation events). % of floor: the byte model's bytes at the copy bandwidth "
                 "measured in the same run.", ""]
        for op in dict.fromkeys(r["op"] for r in rows):
            lines += [f"## {op}", ""]
            for case in dict.fromkeys(r["case"] for r in rows if r["op"] == op):
                lines += self._case_markdown(op, case, [r for r in rows if (r["op"], r["case"]) == (op, case)])
        return "\n".join(lines) + "\n"

    def _case_markdown(self, op, case, rows):
        notes = list(dict.fromkeys(n for r in rows for n in r["extra"].get("notes", [])))
        bandwidth = self.copy_bandwidth(op, case)
        if bandwidth:
            notes.insert(0, f"Copy bandwidth (a tensor copy of the logits' size): {bandwidth / 1e9:.1f} GB/s.")
        compiles = [f"{r['mode']} {r['extra']['compile_s']:.1f} s" for r in rows if "compile_s" in r["extra"]]
        if compiles:
            notes.append(f"torch.compile's first call (compiling, not timed): {', '.join(compiles)}.")
        fp32_bytes = rows[0]["extra"].get("fp32_copy_bytes")  # set for half-precision logits
        head = ["candidate", "mode", "median ms", "speed-up", "peak MB", "memory ratio", "% of floor"]
        head += ["allocates a float32 N×V?"] if fp32_bytes else []
        lines = [f"### {case}", ""] + [f"- {n}" for n in notes]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            m = r["memory"]
            cells = [r["candidate"], r["mode"], _ms(r["median_s"]), _fmt(r["speedup"], "{:.2f}×"),
                     f"{m['peak_bytes'] / MB:.1f}", _fmt(r["memory_ratio"], "{:.2f}"),
                     _fmt(r["pct_of_floor"], "{:.0f}%")]
            if fp32_bytes:
                cells.append(_fp32_verdict(m, fp32_bytes))
            lines.append("| " + " | ".join(cells) + " |")
        skipped = [s for s in self.skipped if (s["op"], s["case"]) == (op, case)]
        if skipped:
            lines += ["", "Not run:"] + [f"- {s['candidate']} {s['mode']}: {s['reason']}" for s in skipped]
        return lines + [""]

    def plot(self, path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        cases = list(dict.fromkeys((r["op"], r["case"]) for r in rows))
        if not cases:
            return
        fig, axes = plt.subplots(len(cases), 2, figsize=(12, 3.2 * len(cases)), squeeze=False)
        for (op, case), (ax_t, ax_m) in zip(cases, axes):
            case_rows = [r for r in rows if (r["op"], r["case"]) == (op, case)]
            candidates = list(dict.fromkeys(r["candidate"] for r in case_rows))
            modes = list(dict.fromkeys(r["mode"] for r in case_rows))
            width = 0.8 / len(modes)
            for i, mode in enumerate(modes):
                by_candidate = {r["candidate"]: r for r in case_rows if r["mode"] == mode}
                xs = [c + i * width for c in range(len(candidates))]
                times = [by_candidate[c]["median_s"] * 1e3 if c in by_candidate else 0 for c in candidates]
                mems = [by_candidate[c]["memory"]["peak_bytes"] / MB if c in by_candidate else 0 for c in candidates]
                ax_t.bar(xs, times, width, label=mode)
                ax_m.bar(xs, mems, width, label=mode)
            for ax, title in ((ax_t, "median time (ms, log)"), (ax_m, "peak memory beyond inputs (MB)")):
                ax.set_xticks([c + width * (len(modes) - 1) / 2 for c in range(len(candidates))])
                ax.set_xticklabels(candidates, rotation=15, fontsize=8)
                ax.set_title(f"{op} {case}: {title}", fontsize=9)
                ax.legend(fontsize=8)
            ax_t.set_yscale("log")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _fp32_verdict(m, fp32_bytes):
    """Did one call allocate a float32 tensor the size of the (half-precision)
    logits? On the CPU the largest single allocation says; on CUDA only the
    peak is known."""
    largest = m["largest_bytes"]
    if largest is None:
        return "**no** (peak smaller)" if m["peak_bytes"] < fp32_bytes else "unknown (peak larger)"
    return f"**{'yes' if largest >= fp32_bytes else 'no'}** (largest {largest / MB:.1f} MB)"


def _ms(seconds):
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _fmt(value, spec):
    return "—" if value is None else spec.format(value)
