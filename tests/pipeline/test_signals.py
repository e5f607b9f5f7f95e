"""Signals and concurrency: SIGTERM stops a run like Ctrl-C (a checkpoint at
the step boundary, exit status 143) and the resume is bit-identical; a
second signal stops at once; one process at a time holds a run folder's
lock, and a lock left by a dead process does not block a resume."""
import json
import os
import signal
import subprocess
import sys

import pytest

from rlhf_engine import cli
from rlhf_engine.checkpoint import load_checkpoint
from rlhf_engine.pipeline.run import LOCK_FILE, Run, StoppedNow, UsageError, exit_status
from tests.helpers import assert_same_weights, cut, sft_args, steps, weights


def test_sigterm_writes_a_loadable_checkpoint_exits_143_and_resumes_bit_identically(
        workspace, full_sft, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cut(sft_args(workspace), out, monkeypatch, "sft", 3, signal.SIGTERM)  # asserts the exit status 143
    err = capsys.readouterr().err
    assert "SIGTERM: stopping after the current step and saving a checkpoint" in err
    assert f"resume with: rlhf-engine sft --out {out} --resume" in err and "Traceback" not in err
    checkpoint = out / "sft" / "checkpoints" / "step-00000003"
    assert load_checkpoint(checkpoint)[1]["loop"]["step"] == 3  # complete, checksums verified
    assert cli.main(["sft", "--out", str(out), "--resume"]) == 0
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    assert_same_weights(weights(out / "sft" / "model"), weights(full_sft / "sft" / "model"))


def test_a_second_signal_stops_at_once_and_the_handlers_are_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Run(tmp_path / "run", "test", {}, progress=False) as run:
        signal.raise_signal(signal.SIGTERM)
        assert run.should_stop() and run.stop_signal == signal.SIGTERM
        with pytest.raises(StoppedNow) as stopped:
            signal.raise_signal(signal.SIGTERM)
    assert isinstance(stopped.value, KeyboardInterrupt) and exit_status(stopped.value) == 143
    assert exit_status(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_process_on_a_locked_run_folder_is_refused_naming_the_holder(
        workspace, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cut(sft_args(workspace), out, monkeypatch, "sft", 2)
    config = (out / "config.json").read_text()
    metrics = (out / "metrics.jsonl").read_text()
    # another process holds the lock, as a running rlhf-engine does
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert cli.main(["sft", "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another process (PID {holder.pid})" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert (out / "config.json").read_text() == config and (out / "metrics.jsonl").read_text() == metrics
    finally:
        holder.kill()  # dies holding it: the kernel releases the flock, its PID stays in the file
        holder.wait()
        holder.stdout.close()
    assert (out / LOCK_FILE).read_text() == str(holder.pid)
    assert cli.main(["sft", "--out", str(out), "--resume"]) == 0  # a dead holder's lock is no obstacle
    assert steps(out) == [1, 2, 3, 4, 5, 6]


def test_the_lock_is_held_while_a_run_is_open_and_released_after(tmp_path):
    out = tmp_path / "run"
    with Run(out, "sft", {"lr": 0.1}, progress=False):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(UsageError, match=f"in use by another process \\(PID {os.getpid()}\\)"):
            Run(out, "sft", {"lr": 0.2}, resume=True, progress=False).__enter__()
    assert json.loads((out / "config.json").read_text()) == {"lr": 0.1}  # the refused one wrote nothing
    with Run(out, "sft", {"lr": 0.1}, resume=True, restart_stage=True, progress=False):
        pass  # released on exit
