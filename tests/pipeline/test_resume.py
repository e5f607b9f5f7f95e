"""--resume by its rules: a damaged newest checkpoint is skipped with one
warning naming it and why; every checkpoint damaged, or nothing to continue,
is an error unless --restart_stage; replayed steps are recorded once
(metrics.jsonl, TensorBoard); options given with --resume apply and are
logged, or are refused; time-based saves bound what a kill -9 loses."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_engine import cli
from rlhf_engine.pipeline.ppo_stage import PPOStageConfig
from rlhf_engine.pipeline.sft import SFTConfig
from rlhf_engine.pipeline.training import TrainConfig, train_loop
from tests.helpers import assert_same_weights, cut, linear_task, rows, saved_steps, sft_args, steps, weights
from tests.ranks import REPO


def ppo_args(workspace):
    return ["ppo", "--policy", str(workspace / "lm"), "--reward_model", str(workspace / "rm"),
            "--prompts", str(workspace / "prompts.jsonl"), "--eval_prompts", str(workspace / "prompts.jsonl"),
            "--prompts_per_iteration", "4", "--iterations", "4", "--eval_every", "2", "--save_every", "1",
            "--max_new_tokens", "4", "--mini_batch_size", "2", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def full_ppo(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "ppo"
    assert cli.main(ppo_args(workspace) + ["--out", str(out)]) == 0
    return out


def truncate(checkpoint):
    """Damage a checkpoint as a full disk or a torn copy does: cut its largest file in half."""
    largest = max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
    return largest


def cut_and_damage_the_newest(args, out, monkeypatch, stage, step, saved):
    """:func:`cut` at ``step``, which leaves the checkpoints ``saved``; then :func:`truncate` the newest."""
    cut(args, out, monkeypatch, stage, step)
    root = out / stage / "checkpoints"
    assert saved_steps(root) == saved
    return root, truncate(root / f"step-{saved[-1]:08d}")


def tb_steps(out, stage, tag):
    """The steps of ``tag`` as TensorBoard shows them (purges applied)."""
    events = EventAccumulator(str(out / "tb" / stage))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def warnings_in(text):
    return [line for line in text.splitlines() if ": warning: " in line]


def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning_and_every_step_recorded_once(
        workspace, full_sft, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    root, damaged = cut_and_damage_the_newest(sft_args(workspace), out, monkeypatch, "sft", 4, [2, 4])
    capsys.readouterr()
    assert cli.main(["sft", "--out", str(out), "--resume"]) == 0
    log = capsys.readouterr().err
    (warning,) = warnings_in(log)
    assert str(root / "step-00000004") in warning and damaged.name in warning and "bytes" in warning, warning
    assert "sft: resuming from step 2" in log
    assert steps(out) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 ran twice, recorded once
    assert [row["loss"] for row in rows(out)] == [row["loss"] for row in rows(full_sft)]
    assert tb_steps(out, "sft", "sft/loss") == [1, 2, 3, 4, 5, 6]  # the purge step hides the first 3 and 4
    assert_same_weights(weights(out / "sft" / "model"), weights(full_sft / "sft" / "model"))


def test_every_checkpoint_damaged_is_an_error_unless_restart_stage(workspace, full_sft, tmp_path, capsys,
                                                                     monkeypatch):
    out = tmp_path / "run"
    cut(sft_args(workspace), out, monkeypatch, "sft", 4)
    root = out / "sft" / "checkpoints"
    for step in (2, 4):
        truncate(root / f"step-{step:08d}")
    capsys.readouterr()
    assert cli.main(["sft", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(warnings_in(err)) == 2 and "Traceback" not in err
    assert "no checkpoint of stage 'sft' is usable (step-00000004, step-00000002" in err and "--restart_stage" in err
    assert steps(out) == [1, 2, 3, 4]  # untouched

    assert cli.main(["sft", "--out", str(out), "--resume", "--restart_stage"]) == 0
    log = capsys.readouterr().err
    assert "--restart_stage: removed the unusable checkpoints" in log and "starting from step 0" in log
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    assert_same_weights(weights(out / "sft" / "model"), weights(full_sft / "sft" / "model"))
    assert cli.main(["sft", "--out", str(tmp_path / "new"), "--restart_stage"]) == 2  # only with --resume


def test_nothing_to_resume_is_an_error_unless_restart_stage(workspace, full_sft, tmp_path, capsys,
                                                            monkeypatch):
    out = tmp_path / "run"
    cut(sft_args(workspace), out, monkeypatch, "sft", 3)
    for path in (out / "sft" / "checkpoints").iterdir():  # as a kill -9 before the first save leaves it
        path.unlink() if path.is_file() else shutil.rmtree(path)
    capsys.readouterr()
    assert cli.main(["sft", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds nothing to continue" in err and "--restart_stage" in err and "Traceback" not in err
    assert cli.main(["sft", "--out", str(out), "--resume", "--restart_stage"]) == 0
    assert "sft: no checkpoint to resume from; starting from step 0" in capsys.readouterr().err
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    assert_same_weights(weights(out / "sft" / "model"), weights(full_sft / "sft" / "model"))


def test_options_given_with_resume_apply_and_are_logged_or_are_refused(workspace, full_sft, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "run"
    cut(sft_args(workspace), out, monkeypatch, "sft", 4)
    config = (out / "config.json").read_text()
    capsys.readouterr()
    assert cli.main(["sft", "--out", str(out), "--resume", "--batch_size", "8", "--seed", "3", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume cannot change batch_size 4 -> 8, seed 0 -> 3" in err
    assert (out / "config.json").read_text() == config  # nothing written
    assert cli.main(["sft", "--out", str(out), "--resume", "--max_steps", "4"]) == 2
    assert "is at step 4, and the run now ends at step 4" in capsys.readouterr().err
    assert (out / "config.json").read_text() == config  # put back

    assert cli.main(["sft", "--out", str(out), "--resume", "--lr", "0.01", "--eval_every", "1"]) == 0
    assert "resume: lr 0.001 -> 0.01, eval_every 2 -> 1" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01
    resumed, full = rows(out), rows(full_sft)
    assert [row["lr"] for row in resumed[:4]] == [row["lr"] for row in full[:4]]
    assert [row["lr"] for row in resumed[4:]] == pytest.approx([10 * row["lr"] for row in full[4:]])
    assert "eval_loss" in resumed[4] and "eval_loss" not in full[4]  # step 5: the new eval cadence


def test_ppo_resume_skips_a_damaged_checkpoint_applies_a_new_lr_and_records_each_iteration_once(
        workspace, full_ppo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cut_and_damage_the_newest(ppo_args(workspace), out, monkeypatch, "ppo", 2, [1, 2])
    capsys.readouterr()
    assert cli.main(["ppo", "--out", str(out), "--resume"]) == 0
    log = capsys.readouterr().err
    assert len(warnings_in(log)) == 1 and "ppo: resuming from iteration 1" in log
    assert steps(out) == [0, 1, 2, 3, 4]  # step 0: the probe of the starting policy
    assert [row.get("reward/score_mean") for row in rows(out)] == [row.get("reward/score_mean")
                                                                   for row in rows(full_ppo)]
    assert_same_weights(weights(out / "ppo" / "model"), weights(full_ppo / "ppo" / "model"))

    again = tmp_path / "lr"
    cut(ppo_args(workspace), again, monkeypatch, "ppo", 2)
    assert cli.main(["ppo", "--out", str(again), "--resume", "--lr", "2e-3", "--iterations", "3"]) == 0
    assert "resume: iterations 4 -> 3, lr 0.001 -> 0.002" in capsys.readouterr().err
    assert [row.get("lr") for row in rows(again)] == [None, 1e-3, 1e-3, 2e-3]


def test_time_based_saves(tmp_path):
    assert TrainConfig().save_every_minutes > 0 and PPOStageConfig().save_every_minutes > 0  # on by default
    model, step, evaluate = linear_task()
    config = TrainConfig(max_steps=4, batch_size=6, save_every_minutes=1e-9)  # due at every step boundary
    train_loop(model, config, 12, step, evaluate, checkpoints=tmp_path / "a")
    assert saved_steps(tmp_path / "a") == [2, 3]  # not after the last step; the two newest kept
    model, step, evaluate = linear_task()
    train_loop(model, TrainConfig(max_steps=4, batch_size=6, save_every_minutes=0), 12, step, evaluate,
               checkpoints=tmp_path / "b")
    assert saved_steps(tmp_path / "b") == []
    with pytest.raises(ValueError, match="save_every_minutes"):
        TrainConfig(save_every_minutes=-1)


def test_kill_9_with_default_cadence_loses_at_most_the_interval_and_records_each_step_once(
        workspace, tmp_path, capsys):
    """A real `kill -9` of a running `rlhf-engine sft` with the defaults (no step-based saves: time-based ones
    only), the interval made short; then --resume."""
    assert SFTConfig().save_every == 0 and SFTConfig().save_every_minutes > 0
    minutes = 0.01
    out = tmp_path / "run"
    args = ["sft", "--model", str(workspace / "lm"), "--train_file", str(workspace / "demos.jsonl"),
            "--batch_size", "4", "--max_steps", "100000", "--save_every_minutes", str(minutes), "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_engine.cli", *args, "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "sft" / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.is_file() and len(steps(out)) >= int(latest.read_text().split("-")[1]) + 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert latest.is_file(), "no checkpoint in time"
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
        proc.stderr.close()
    recorded = {row["step"]: row for row in rows(out)}
    last = max(recorded)

    assert cli.main(["sft", "--out", str(out), "--resume", "--max_steps", str(last + 2)]) == 0
    log = capsys.readouterr().err
    saved = int(log.split("sft: resuming from step ")[1].split()[0])
    assert saved >= 1
    # what the kill lost: the training time after the checkpoint, at most the interval plus the last step
    lost = recorded[last]["elapsed_seconds"] - recorded[saved]["elapsed_seconds"]
    last_step = recorded[last]["elapsed_seconds"] - recorded[last - 1]["elapsed_seconds"]
    assert lost <= 60 * minutes + last_step, (saved, last, lost)
    assert steps(out) == list(range(1, last + 3))  # each step once
