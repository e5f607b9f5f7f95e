"""Where a run's metrics go (``--report_to``): one :class:`Tracker` per
backend, each through its library's own client, the library imported only
when it is chosen.

Backends (``--report_to`` takes a comma-separated list of them):

* ``jsonl``: ``metrics.jsonl`` in the run folder, one object per line
  (``{"stage", "step", metric: value, ...}``). Always written, listed or not:
  ``--resume`` and the built-in pipeline's report read it.
* ``tensorboard``: event files under ``tb/<stage>/``, tags ``<stage>/<metric>``.
* ``wandb``: Weights & Biases, offline unless ``WANDB_MODE`` says otherwise
  (upload later with ``wandb sync <run>/wandb/offline-run-*``); its files
  under ``<run>/wandb/`` unless ``WANDB_DIR`` is set; project ``rlhf-engine``
  unless ``WANDB_PROJECT`` is set. Each stage has its own x axis
  (``<stage>/step``), as wandb's own steps only increase.
* ``mlflow``: an MLflow run in ``MLFLOW_TRACKING_URI``, or by default a file
  store in ``<run>/mlruns`` (``mlflow ui --backend-store-uri <run>/mlruns``;
  MLflow 3 asks for ``MLFLOW_ALLOW_FILE_STORE=true`` to read it). Experiment
  ``rlhf-engine`` unless ``MLFLOW_EXPERIMENT_NAME`` is set. ``mlflow-skinny``
  is enough.
* ``trackio``: a Trackio run in its local database (``TRACKIO_DIR``, by
  default ``$HF_HOME/trackio``; ``trackio show --project rlhf-engine``).

One tracker run per command (not per stage): metrics are named
``<stage>/<metric>`` at the stage's step; the resolved options are the
run's parameters (wandb config, MLflow params, Trackio config); the built-in
pipeline's report (plots, ``report.md``, ``summary.json``) is logged as
artifacts. Only rank 0 reports (:class:`~rlhf_engine.pipeline.run.Run`
opens trackers there alone).

``--resume`` continues the same tracker run: its id is kept in
``<run>/tracking.json``. Steps a stage repeats after the checkpoint it
resumes from are removed from ``metrics.jsonl`` and purged from TensorBoard;
wandb, MLflow and Trackio keep both values of a repeated step (their
clients cannot delete points): the later one is the resumed run's.
"""
import contextlib
import importlib
import importlib.util
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "tracking.json"
DEFAULT_REPORT_TO = "tensorboard,jsonl"
PROJECT = "rlhf-engine"
# backend -> (module imported, pip package to install)
REQUIRES = {
    "jsonl": None,
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "trackio": ("trackio", "trackio"),
}
BACKENDS = tuple(REQUIRES)
MLFLOW_PARAMS_PER_CALL = 100  # MLflow's limit of params per log_batch


class TrackingError(ValueError):
    """A tracker cannot be used as asked (its package is missing, its store refuses the run)."""


def parse_report_to(value: str) -> Tuple[str, ...]:
    """The backends of a ``--report_to`` value (comma-separated, in order).

    Raises:
        TrackingError: an empty list, an unknown or repeated name (the
            message lists the accepted ones), or a backend whose package
            is not installed (the message names the pip package).
    """
    if not isinstance(value, str):
        raise TrackingError(f"report_to must be a comma-separated list of {', '.join(BACKENDS)}, got {value!r}")
    names = tuple(name.strip() for name in value.split(","))
    if not value.strip() or "" in names:
        raise TrackingError(f"report_to {value!r}: an empty name; give a comma-separated list of "
                            f"{', '.join(BACKENDS)} (jsonl is always written)")
    for name in names:
        if name not in REQUIRES:
            raise TrackingError(f"report_to: unknown backend {name!r}; accepted: {', '.join(BACKENDS)}")
        if names.count(name) > 1:
            raise TrackingError(f"report_to {value!r}: {name!r} is given twice")
        check_installed(name)
    return names


def check_installed(name: str) -> None:
    """TrackingError naming the pip package when backend ``name``'s library is absent (nothing is imported)."""
    required = REQUIRES[name]
    if required is not None and not _importable(required[0]):
        raise TrackingError(f"--report_to {name}: the {required[0]!r} module is not installed: "
                            f"pip install {required[1]}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # imported without a spec
        return True


def _import(name: str):
    """Backend ``name``'s module, or TrackingError naming its pip package."""
    module, package = REQUIRES[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackingError(f"--report_to {name}: cannot import {module!r} ({exc}): pip install {package}") from None


def is_number(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numbers(values: Mapping) -> Dict[str, float]:
    """The numeric entries of ``values`` (bools, strings and None left out)."""
    return {key: value for key, value in values.items() if is_number(value)}


class Tracker:
    """Where metrics go. ``values`` are JSON-safe (numbers, None for
    non-finite, ``info/*`` strings)."""

    def log_params(self, params: Mapping) -> None:
        """The run's resolved options (once per process; a resume logs the changed ones)."""

    def log_metrics(self, stage: str, step: int, values: Mapping) -> None:
        """``values`` of ``stage`` at ``step``."""

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Files of the run (the report's plots)."""

    def rewind(self, stage: str, step: int) -> Optional[str]:
        """Forget what ``stage`` logged after ``step`` (all of it when 0)
        where the backend can; a line to log when something was removed."""
        return None

    def close(self, failed: bool = False) -> None:
        """Flush and end (``failed``: the command did not finish)."""


class JsonlTracker(Tracker):
    """``metrics.jsonl``: one line per record; :meth:`rewind` removes rows (and a half-written line)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / METRICS_FILE

    def log_metrics(self, stage, step, values):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")

    def rewind(self, stage, step):
        if not self.path.is_file():
            return None
        kept, dropped, broken = [], 0, 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                broken += 1
                continue
            if row.get("stage") == stage and (step == 0 or row.get("step", 0) > step):
                dropped += 1
            else:
                kept.append(line + "\n")
        if not (dropped or broken):
            return None
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)
        return (f"{stage}: removed from {METRICS_FILE} the {dropped} row(s) recorded after step {step}"
                + (f" and {broken} unreadable line(s)" if broken else "") + ": they are recorded again")


class TensorBoardTracker(Tracker):
    """One SummaryWriter per stage (``tb/<stage>``), opened at its first
    record; after :meth:`rewind` it purges the forgotten steps."""

    def __init__(self, folder: Path):
        self.root = Path(folder) / "tb"
        self._writers, self._purge_steps = {}, {}

    def log_metrics(self, stage, step, values):
        writer = self._writer(stage)
        for key, value in numbers(values).items():
            writer.add_scalar(f"{stage}/{key}", value, step)

    def _writer(self, stage):
        if stage not in self._writers:
            from torch.utils.tensorboard import SummaryWriter  # slow to import: only once something is recorded

            self._writers[stage] = SummaryWriter(log_dir=str(self.root / stage),
                                                 purge_step=self._purge_steps.get(stage))
        return self._writers[stage]

    def rewind(self, stage, step):
        self._purge_steps[stage] = step + 1 if step else 0
        writer = self._writers.pop(stage, None)
        if writer is not None:  # the next record opens a writer that purges
            writer.close()
        return None

    def close(self, failed=False):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


@contextlib.contextmanager
def _quiet_stdout():
    """A library's banner to stderr: the command's stdout carries its JSON result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class WandbTracker(Tracker):
    """A wandb run (offline unless ``WANDB_MODE`` is set), continued on resume by its stored id."""

    def __init__(self, folder: Path, state: Dict, log: Callable[[str], None]):
        wandb = _import("wandb")
        run_id = state.get("id") or secrets.token_hex(4)
        state["id"] = run_id
        kwargs = {"mode": "offline"} if not os.environ.get("WANDB_MODE") else {}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(folder)
        if not os.environ.get("WANDB_PROJECT"):
            kwargs["project"] = PROJECT
        with _quiet_stdout():
            self.run = wandb.init(id=run_id, name=Path(folder).name, resume="allow",
                                  settings=wandb.Settings(console="off", silent=True), **kwargs)
        self._stages = set()
        where = getattr(self.run, "dir", None)
        if getattr(self.run, "offline", False) and where:
            log(f"wandb: offline run {run_id}; upload with: wandb sync {Path(where).parent}")

    def log_params(self, params):
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, stage, step, values):
        if stage not in self._stages:  # the stage's own x axis: wandb's step only increases
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        self.run.log({**{f"{stage}/{key}": value for key, value in numbers(values).items()}, f"{stage}/step": step})

    def log_artifacts(self, paths):
        wandb = sys.modules["wandb"]
        artifact = wandb.Artifact(f"report-{self.run.id}", type="report")
        for path in paths:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, failed=False):
        with _quiet_stdout():
            self.run.finish(exit_code=1 if failed else 0)
            sys.modules["wandb"].teardown()  # finish() returns before wandb's service has written the run file


class MlflowTracker(Tracker):
    """An MLflow run (``MLFLOW_TRACKING_URI``, else a file store in
    ``<run>/mlruns``) through ``MlflowClient``, continued on resume by its
    stored id. Params cannot change in MLflow: options a resume changes are
    set as tags ``resumed/<option>``."""

    def __init__(self, folder: Path, state: Dict, log: Callable[[str], None]):
        mlflow = _import("mlflow")
        from mlflow.tracking import MlflowClient

        uri = (os.environ.get("MLFLOW_TRACKING_URI") or state.get("tracking_uri")
               or (Path(folder).resolve() / "mlruns").as_uri())
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores otherwise
        self.entities = mlflow.entities
        try:
            self.client = MlflowClient(tracking_uri=uri)
            run_id = state.get("run_id")
            if run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                run_id = self.client.create_run(experiment_id, run_name=Path(folder).name).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
            self.logged = dict(self.client.get_run(run_id).data.params)
        except mlflow.exceptions.MlflowException as exc:
            raise TrackingError(f"--report_to mlflow: tracking store {uri}: {exc}") from None
        state.update(run_id=run_id, tracking_uri=uri)
        self.run_id = run_id
        log(f"mlflow: run {run_id} in {uri}")

    def log_params(self, params):
        text = {key: json.dumps(value) if not isinstance(value, str) else value for key, value in params.items()}
        new = [self.entities.Param(key, value) for key, value in text.items() if key not in self.logged]
        changed = [self.entities.RunTag(f"resumed/{key}", value) for key, value in text.items()
                   if key in self.logged and self.logged[key] != value]
        for start in range(0, max(len(new), len(changed)), MLFLOW_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[start:start + MLFLOW_PARAMS_PER_CALL],
                                  tags=changed[start:start + MLFLOW_PARAMS_PER_CALL])
        self.logged.update((p.key, p.value) for p in new)

    def log_metrics(self, stage, step, values):
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(_mlflow_key(f"{stage}/{key}"), float(value), now, step)
                   for key, value in numbers(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifacts(self, paths):
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), "report")

    def close(self, failed=False):
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _mlflow_key(key: str) -> str:
    """``key`` with the characters MLflow refuses in names replaced by ``_``
    (it takes letters, digits, ``_ - . / :`` and spaces)."""
    return "".join(c if c.isalnum() or c in "_-./: " else "_" for c in key)


class TrackioTracker(Tracker):
    """A Trackio run in its local database, continued on resume by its stored name."""

    def __init__(self, folder: Path, state: Dict, log: Callable[[str], None]):
        trackio = _import("trackio")
        self.name = state.get("name") or f"{Path(folder).name}-{secrets.token_hex(3)}"
        self.project = state.get("project") or PROJECT
        state.update(name=self.name, project=self.project)
        self.trackio, self._params, self._open_run = trackio, {}, None
        log(f"trackio: run {self.name} of project {self.project} (trackio show --project {self.project})")

    def _run(self):
        """The Trackio run, opened with the params (Trackio takes its config at init)."""
        if self._open_run is None:
            with _quiet_stdout():
                self._open_run = self.trackio.init(project=self.project, name=self.name, config=self._params,
                                                   resume="allow", embed=False)
        return self._open_run

    def log_params(self, params):
        self._params = dict(params)
        self._run()

    def log_metrics(self, stage, step, values):
        self._run().log({f"{stage}/{key}": value for key, value in numbers(values).items()}, step=step)

    def log_artifacts(self, paths):
        run = self._run()
        for path in paths:
            run.log_artifact(str(path), name=f"{self.name}-{Path(path).name}", type="report")

    def close(self, failed=False):
        self._run()
        with _quiet_stdout():
            self.trackio.finish()  # the current run, ours (its atexit hook would finish it again)


_EXTERNAL = {"wandb": WandbTracker, "mlflow": MlflowTracker, "trackio": TrackioTracker}


def _open_external(name: str, folder: Path, state: Dict, log: Callable[[str], None]) -> Tracker:
    """Backend ``name``'s tracker; what its library raises, as a TrackingError naming the backend."""
    try:
        return _EXTERNAL[name](folder, state, log)
    except TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 (each library has its own errors: one line naming the backend)
        raise TrackingError(f"--report_to {name}: cannot start the run ({type(exc).__name__}: {exc})") from exc


def open_trackers(folder, names: Iterable[str], *, log: Callable[[str], None]) -> List[Tracker]:
    """The trackers of ``names`` (:func:`parse_report_to`'s; ``jsonl`` is
    added when absent) for run folder ``folder``. External trackers keep
    their run ids in ``folder/tracking.json`` (written here), so that a
    resumed run continues them. ``log``: for the lines saying where they write.

    Raises:
        TrackingError: a backend cannot be imported or opened; the trackers
            already opened are closed.
    """
    folder = Path(folder)
    names = list(names)
    state_path = folder / STATE_FILE
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    trackers = [] if "jsonl" in names else [JsonlTracker(folder)]
    try:
        for name in names:
            if name == "jsonl":
                trackers.append(JsonlTracker(folder))
            elif name == "tensorboard":
                trackers.append(TensorBoardTracker(folder))
            else:
                trackers.append(_open_external(name, folder, state.setdefault(name, {}), log))
    except BaseException:
        close_trackers(trackers, failed=True)
        raise
    if state:
        tmp = state_path.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, state_path)
    return trackers


def close_trackers(trackers: Sequence[Tracker], failed: bool = False) -> None:
    """Close every tracker, each even when another fails; the first error is raised after."""
    error = None
    for tracker in trackers:
        try:
            tracker.close(failed)
        except Exception as exc:  # noqa: BLE001 (the others must still be closed)
            error = error or exc
    if error is not None:
        raise error
