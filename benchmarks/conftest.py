"""Benchmark session set-up: collect ``bench_*.py``, pick the device, gather
results and write them at the end of the session (see harness.py).

Run with ``bash scripts/bench.sh`` (or ``python -m pytest benchmarks``);
``pytest tests`` never loads this folder. TRITON_INTERPRET is never set here:
the Triton candidates run only on a GPU. The op benchmarks draw their inputs
with the op tests' generators (tests/inputs.py) and build their ``eager``
policy loss from the tests' reference formulas (tests/reference.py): the
repository root is put on sys.path for them.
"""
import signal
import sys
from pathlib import Path

import pytest

import harness

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.append(ROOT)

COLLECTOR = harness.Collector()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# A timeout's SIGTERM ends the session like Ctrl-C: what was measured is written.
signal.signal(signal.SIGTERM, _interrupt)


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself.
    explicit = parent.session.isinitpath(file_path)
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not explicit:
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    return [f"benchmarks on {harness.device()} ({harness.machine_name()}), "
            f"results to {harness.output_dir()}"]


@pytest.fixture(scope="session")
def device():
    """The GPU when there is one, else the CPU."""
    return harness.device()


@pytest.fixture(scope="session")
def collector():
    return COLLECTOR


def pytest_sessionfinish(session, exitstatus):
    if COLLECTOR.records:
        session.config._rlhf_bench_out = COLLECTOR.write()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    folder = getattr(config, "_rlhf_bench_out", None)
    if folder:
        terminalreporter.write_line(f"[bench] results written to {folder}/results.{{json,md,png}}")
    else:
        terminalreporter.write_line("[bench] no results recorded (nothing written)")
