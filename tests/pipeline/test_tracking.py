"""``--report_to`` (rlhf_engine.pipeline.tracking): the metrics, options and
plots read back from where each library stores them, in its local mode
(wandb offline, an MLflow file store, Trackio's local database)."""
import json
import struct
import sys

import pytest

from rlhf_engine import cli
from rlhf_engine.pipeline import tracking
from rlhf_engine.pipeline.config import RunOptions
from rlhf_engine.pipeline.report import PLOTS, read_metrics, report_files, series, write_report
from rlhf_engine.pipeline.run import Run, UsageError
from tests.helpers import cut, sft_args

SKIP = "{} is not installed (pip install {}): its --report_to backend is not tested"


def _need(name):
    module, package = tracking.REQUIRES[name]
    return pytest.importorskip(module, reason=SKIP.format(module, package))


@pytest.fixture(autouse=True)
def local_modes(monkeypatch):
    """No user setting sends anything elsewhere: each library's defaults apply."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # restored after the test: the tracker sets it
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


@pytest.fixture(scope="module")
def trackio_dir(tmp_path_factory):
    """Trackio's database folder (TRACKIO_DIR, read when trackio is first imported); None without trackio."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACKIO_DIR", str(tmp_path_factory.mktemp("trackio")))
        if not tracking._importable("trackio"):
            yield None
            return
        from trackio.utils import TRACKIO_DIR
        yield TRACKIO_DIR


ROWS = [("sft", 1, {"loss": 2.5, "info/name": "x", "bad": None}), ("sft", 2, {"loss": 1.25, "eval_loss": 1.5}),
        ("rm", 1, {"accuracy": 0.75})]


def _record_run(folder, report_to, options=None, resume=False, rows=ROWS):
    options = {"lr": 0.1, "report_to": report_to, **(options or {})}
    with Run(folder, "test", options, resume=resume, progress=False) as run:
        for stage, step, values in rows:
            run.record(stage, step, {"step": step, **values})
        plot = folder / "plot.png"
        plot.write_bytes(b"\x89PNG not really")
        run.log_artifacts([plot])
        run.finish("sft", {"steps": 2})
    return run


def _expected(rows=ROWS):
    """{metric name as the trackers get it: [(step, value), ...]} of ``rows``' numbers."""
    out = {}
    for stage, step, values in rows:
        for key, value in tracking.numbers(values).items():
            out.setdefault(f"{stage}/{key}", []).append((step, value))
    return out


# -- options -----------------------------------------------------------------------------

def test_report_to_is_checked_when_options_are_parsed(monkeypatch):
    assert RunOptions().report_to == "tensorboard,jsonl"
    assert tracking.parse_report_to(" jsonl , tensorboard") == ("jsonl", "tensorboard")
    for value, message in (("tensorboard,neptune", "unknown backend 'neptune'; accepted: jsonl, tensorboard, wandb, "
                                                  "mlflow, trackio"),
                           ("", "an empty name"), ("jsonl,", "an empty name"), ("wandb,wandb", "given twice")):
        with pytest.raises(ValueError, match=message):
            RunOptions(report_to=value)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"--report_to mlflow: the 'mlflow' module is not installed: "
                                         r"pip install mlflow-skinny"):
        RunOptions(report_to="jsonl,mlflow")


def test_a_missing_tracker_package_stops_the_command_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    assert cli.main(["sft", "--train_file", str(tmp_path / "absent.jsonl"), "--out", str(out),
                     "--report_to", "wandb"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not out.exists()


def test_jsonl_alone_writes_no_tensorboard_events_and_is_always_written(tmp_path):
    _record_run(tmp_path / "a", "jsonl")
    assert not (tmp_path / "a" / "tb").exists()
    _record_run(tmp_path / "b", "tensorboard")  # jsonl not listed: written all the same
    assert series(read_metrics(tmp_path / "b"), "sft", "loss") == ([1, 2], [2.5, 1.25])
    assert (tmp_path / "b" / "tb" / "rm").is_dir() and not (tmp_path / "b" / tracking.STATE_FILE).exists()


# -- wandb ------------------------------------------------------------------------------------

def wandb_records(path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``,
    2 bytes, version), then LevelDB-log chunks in 32 KiB blocks (crc32c,
    length, type: full, first, middle, last), each record a ``Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(folder):
    """``(history rows, config, artifact file names)`` of every offline run under ``folder/wandb``, in order."""
    history, config, files = [], {}, []
    for path in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
            elif kind in ("run", "config"):
                items = record.run.config.update if kind == "run" else record.config.update
                config.update({_key(item): json.loads(item.value_json) for item in items})
            elif kind == "artifact":
                files += [entry.path for entry in record.artifact.manifest.contents]
    return history, config, files


def _key(item):
    """A history or config item's key (a key with "/" is stored as its parts)."""
    return item.key or "/".join(item.nested_key)


def _wandb_series(history):
    out = {}
    for row in history:
        stage = next(key.split("/")[0] for key in row if key.endswith("/step"))
        for key, value in row.items():
            if key.startswith(stage + "/") and key != f"{stage}/step":
                out.setdefault(key, []).append((row[f"{stage}/step"], value))
    return out


def test_wandb_offline_run_holds_the_metrics_options_and_plots_and_a_resume_continues_it(tmp_path):
    _need("wandb")
    folder = tmp_path / "run"
    _record_run(folder, "wandb,jsonl")
    run_id = json.loads((folder / tracking.STATE_FILE).read_text())["wandb"]["id"]
    history, config, files = wandb_run(folder)
    assert _wandb_series(history) == _expected()
    assert config["lr"] == 0.1 and config["report_to"] == "wandb,jsonl"
    assert files == ["plot.png"]
    later = [("rm", 2, {"accuracy": 0.875})]
    _record_run(folder, "wandb,jsonl", options={"lr": 0.2}, resume=True, rows=later)
    assert [p.name.endswith(run_id) for p in (folder / "wandb").glob("offline-run-*")] == [True, True]
    history, config, _ = wandb_run(folder)
    assert _wandb_series(history) == _expected(ROWS + later) and config["lr"] == 0.2


# -- MLflow -----------------------------------------------------------------------------------

def mlflow_client(folder):
    _need("mlflow")
    from mlflow.tracking import MlflowClient

    state = json.loads((folder / tracking.STATE_FILE).read_text())["mlflow"]
    assert state["tracking_uri"] == (folder / "mlruns").resolve().as_uri()
    return MlflowClient(tracking_uri=state["tracking_uri"]), state["run_id"]


def test_mlflow_file_store_holds_the_metrics_params_and_plots_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    _need("mlflow")
    folder = tmp_path / "run"
    _record_run(folder, "mlflow")
    client, run_id = mlflow_client(folder)
    for name, points in _expected().items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, name)] == points
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1", "report_to": "mlflow"} and run.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(run_id, "report")] == ["report/plot.png"]
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # as in a new process: the tracker sets it again
    later = [("rm", 2, {"accuracy": 0.875})]
    _record_run(folder, "mlflow", options={"lr": 0.2}, resume=True, rows=later)
    assert mlflow_client(folder)[1] == run_id
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "rm/accuracy")] == [(1, 0.75), (2, 0.875)]
    assert client.get_run(run_id).data.tags["resumed/lr"] == "0.2"


def test_mlflow_marks_a_run_that_fails_and_names_a_store_that_refuses(tmp_path, monkeypatch):
    _need("mlflow")
    folder = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with Run(folder, "test", {"report_to": "mlflow"}, progress=False):
            raise RuntimeError("boom")
    client, run_id = mlflow_client(folder)
    assert client.get_run(run_id).info.status == "FAILED"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://x")
    with pytest.raises(UsageError, match="--report_to mlflow: "):
        Run(tmp_path / "other", "test", {"report_to": "mlflow"}, progress=False).__enter__()


# -- Trackio ----------------------------------------------------------------------------------

def trackio_rows(trackio_dir, folder):
    """``({metric: [(step, value)]}, config, artifact names)`` of the run's rows in Trackio's SQLite database."""
    import sqlite3

    state = json.loads((folder / tracking.STATE_FILE).read_text())["trackio"]
    with sqlite3.connect(trackio_dir / f"{state['project']}.db") as db:
        rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (state["name"],))
        out = {}
        for step, metrics in rows.fetchall():
            for key, value in json.loads(metrics).items():
                out.setdefault(key, []).append((step, value))
        (config,), = db.execute("SELECT config FROM configs WHERE run_name = ?", (state["name"],)).fetchall()
        artifacts = [name for name, in db.execute("SELECT name FROM artifacts ORDER BY id")
                     if name.startswith(state["name"] + "-")]
    return out, json.loads(config), artifacts


def test_trackio_database_holds_the_metrics_and_options_and_a_resume_continues_the_run(tmp_path, trackio_dir,
                                                                                     capsys):
    _need("trackio")
    folder = tmp_path / "run"
    _record_run(folder, "trackio,tensorboard")
    assert capsys.readouterr().out == ""  # Trackio's banner goes to stderr: stdout is the command's result
    metrics, config, artifacts = trackio_rows(trackio_dir, folder)
    assert metrics == _expected() and config["lr"] == 0.1
    assert artifacts == [json.loads((folder / tracking.STATE_FILE).read_text())["trackio"]["name"] + "-plot.png"]
    later = [("rm", 2, {"accuracy": 0.875})]
    _record_run(folder, "trackio", options={"lr": 0.2}, resume=True, rows=later)
    metrics, config, _ = trackio_rows(trackio_dir, folder)
    assert metrics == _expected(ROWS + later) and config["lr"] == 0.2


# -- a command, interrupted and resumed, with every backend installed ----------------------------------

def test_a_resumed_sft_command_continues_each_tracker_run_with_the_jsonl_metrics(workspace, tmp_path, monkeypatch,
                                                                                trackio_dir, capsys):
    names = [name for name in tracking.BACKENDS if tracking.REQUIRES[name] is None or
             tracking._importable(tracking.REQUIRES[name][0])]
    args = sft_args(workspace) + ["--report_to", ",".join(names)]
    out = tmp_path / "run"
    cut(args, out, monkeypatch, "sft", 3)
    capsys.readouterr()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # as in a new process
    assert cli.main(args + ["--out", str(out), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 6  # the trackers' banners stay off stdout
    rows = read_metrics(out)
    steps, loss = series(rows, "sft", "loss")
    assert steps == [1, 2, 3, 4, 5, 6]
    if "mlflow" in names:
        client, run_id = mlflow_client(out)
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "sft/loss")] == \
            list(zip(steps, loss))
        assert client.get_run(run_id).data.params["max_steps"] == "6"
    if "wandb" in names:
        assert _wandb_series(wandb_run(out)[0])["sft/loss"] == list(zip(steps, loss))
    if "trackio" in names:
        assert trackio_rows(trackio_dir, out)[0]["sft/loss"] == list(zip(steps, loss))


def test_the_report_hands_its_plots_and_files_to_the_trackers(tmp_path):
    (tmp_path / "sft_loss.png").write_bytes(b"x")
    (tmp_path / "report.md").write_text("x")
    (tmp_path / "other.png").write_bytes(b"x")
    assert [p.name for p in report_files(tmp_path)] == ["sft_loss.png", "report.md"]
    summary = dict.fromkeys(("rm_accuracy", "win_rate", "win_rate_ci_low", "win_rate_ci_high", "sft_gold",
                             "ppo_gold", "mean_kl", "kl_bound", "wall_seconds"), 0.5)
    handed = []
    write_report(tmp_path, {**summary, "wins": 1, "ties": 0, "losses": 1, "win_n": 2}, artifacts=handed.extend)
    assert sorted(p.name for p in handed) == sorted([*PLOTS.values(), "report.md", "summary.json"])
    assert all(p.is_file() for p in handed)


def test_a_rank_other_than_zero_reports_nothing(tmp_path, monkeypatch):
    """(Checked once under torchrun too: 2 ranks, --report_to mlflow, one MLflow run with each step once; it
    takes a minute here, too long for this file.)"""
    from rlhf_engine import distributed

    monkeypatch.setattr(distributed, "layout", lambda: distributed.Layout(rank=1, world_size=2))
    folder = tmp_path / "run"
    folder.mkdir()
    with Run(folder, "test", {"report_to": ",".join(tracking.BACKENDS)}, progress=False) as run:
        assert not run.is_main
        run.record("sft", 1, {"loss": 1.0})
        run.log_artifacts([])
    assert list(folder.iterdir()) == []
