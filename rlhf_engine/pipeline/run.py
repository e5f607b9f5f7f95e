"""A run folder, what runs a training stage inside it (:func:`train_stage`),
and loading the model folders a command is given. The commands themselves
live beside their stages: ``run_sft_command`` in :mod:`~rlhf_engine.pipeline.sft`,
``run_rm_command`` in :mod:`~rlhf_engine.pipeline.reward`, ``run_ppo_command``
in :mod:`~rlhf_engine.pipeline.ppo_stage`, ``run_eval_command`` in
:mod:`~rlhf_engine.pipeline.evaluate`.

Layout (``<stage>`` is ``sft``, ``rm``, ``ppo``, ...)::

    config.json              the resolved options (``--config`` reads it back)
    log.txt                  the log, as printed
    metrics.jsonl            one object per line: {"stage", "step", metric: value, ...}
    tb/<stage>/              TensorBoard events, tags "<stage>/<metric>" (--report_to tensorboard, the default)
    tracking.json            the run ids of the wandb, MLflow and Trackio runs (--report_to; a resume continues them)
    wandb/, mlruns/          wandb's offline run, MLflow's file store (--report_to wandb, mlflow; see tracking)
    <stage>/model/           the stage's HF model folder (safetensors) and tokenizer
    <stage>/checkpoints/     resumable checkpoints (rlhf_engine.checkpoint layout)
    <stage>/result.json      the stage's final metrics; written last, it marks the stage done
    .lock                    held (flock) by the process using the folder; holds its PID

One process at a time uses a run folder: it holds an exclusive ``flock`` on
``.lock`` while the :class:`Run` is open (the kernel releases it when the
process dies, so a lock left by a killed run is no obstacle), and a second
one is refused naming the holder's PID.

Ctrl-C (SIGINT) and SIGTERM (what kill, systemd, Slurm and Kubernetes send
before they stop a job) ask the running loop to stop after its current
step: the stage writes a checkpoint and raises :class:`Interrupted`, and the
command exits with 128 + the signal's number (130, 143); a second signal
stops at once (:class:`StoppedNow`, a ``KeyboardInterrupt``).

``--resume`` (the rules, :meth:`Run.__enter__` and :meth:`Run.resume_point`):

* options: those of :data:`RESUMABLE_OPTIONS` (learning rates, the length
  of the run, evaluation and save cadence, KL target and horizon, where and
  how it runs) may differ from the run's ``config.json``: they apply from
  the resumed step on and are logged as changed; any other difference is
  refused (:class:`UsageError`) before anything is written;
* finished stages are skipped; an interrupted one continues from its newest
  usable checkpoint, exactly where it stopped; a damaged newer one is
  skipped with one warning line naming it and why;
* a stage without a checkpoint starts from step 0, said in the log, when
  the run has something else to continue (a finished stage); a run folder
  with nothing to continue (no finished stage, no checkpoint), or a stage
  whose every checkpoint is damaged, is refused unless ``restart_stage``
  (``--restart_stage``) asks to train the stage again from step 0;
* what the stage recorded after the step it resumes from is removed from
  ``metrics.jsonl`` (and purged from its TensorBoard events), so that every
  step is recorded once.

Under torch.distributed every rank opens the same run folder (a shared
filesystem): rank 0 alone writes the records (config, log, metrics,
TensorBoard, progress bars, model folders, results) and decides what is
done; every rank reads checkpoints and model folders, and writes its own
shards of a checkpoint (a collective).
"""
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_engine import distributed
from rlhf_engine.checkpoint import LATEST, latest_checkpoint
from rlhf_engine.models import lora
from rlhf_engine.models.builders import SIZES, build_policy
from rlhf_engine.models.loading import load_pretrained
from rlhf_engine.models.tokenizer import byte_tokenizer
from rlhf_engine.pipeline import batching
from rlhf_engine.pipeline.config import CONFIG_FILE
from rlhf_engine.pipeline.tracking import METRICS_FILE  # noqa: F401 (the run folder's name for it, read by report)
from rlhf_engine.pipeline.tracking import DEFAULT_REPORT_TO, TrackingError, close_trackers, is_number, \
    open_trackers, parse_report_to
from rlhf_engine.pipeline.training import TrainConfig, check_world_size, total_steps
from rlhf_engine.pipeline.vocab import tokenizer_difference

RESULT_FILE = "result.json"
LOG_FILE = "log.txt"
LOCK_FILE = ".lock"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Options a resumed run may change (also with a stage prefix: sft_, rm_, ppo_): they apply from the resumed step on.
RESUMABLE_OPTIONS = frozenset({
    "lr", "critic_lr", "nokl_lr",                                   # learning rates
    "max_steps", "epochs", "iterations", "nokl_iterations",          # the length of the run
    "eval_every", "save_every", "save_every_minutes",                # cadence
    "kl_target", "kl_horizon", "kl_bound",                           # KL control (kl_bound: the report's)
    "out", "device", "threads", "dist_timeout",                      # where and how it runs
    "gradient_checkpointing", "offload", "offload_policy", "profile_dir",
    "report_to",                                                     # where metrics go (rlhf_engine.pipeline.tracking)
})
_STAGE_PREFIXES = ("sft_", "rm_", "ppo_")


def resumable(name: str) -> bool:
    """Whether option ``name`` may change when a run is resumed."""
    return name in RESUMABLE_OPTIONS or any(
        name.startswith(prefix) and name[len(prefix):] in RESUMABLE_OPTIONS for prefix in _STAGE_PREFIXES)


class Interrupted(Exception):
    """A stage stopped on Ctrl-C (or SIGTERM: ``signum``) after saving a checkpoint."""

    def __init__(self, stage: str, step: int, checkpoint: Optional[Path], signum: Optional[int] = None):
        self.stage, self.step, self.checkpoint = stage, step, checkpoint
        self.signum = signum or signal.SIGINT
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"interrupted ({signal.Signals(self.signum).name}) in stage '{stage}' after step "
                         f"{step}{where}")


class StoppedNow(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM (``signum``): stop at once, no checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(exc: BaseException) -> int:
    """The conventional exit status of a run stopped by ``exc`` (an
    :class:`Interrupted` or a ``KeyboardInterrupt``): 128 + the signal's
    number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(getattr(exc, "signum", None) or signal.SIGINT)


class UsageError(ValueError):
    """The command cannot run as asked: the run folder exists without
    --resume or holds nothing to resume, a model folder is missing, ..."""


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bars instead of through them."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def _json_value(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Run:
    """The run folder of one command (see the module doc).

    Use as a context manager: it creates or reopens the folder, locks it
    (one process at a time), writes ``config.json``, opens the log, and
    installs the Ctrl-C and SIGTERM handlers; on exit it restores the
    handlers, closes the files and releases the lock.

    Args:
        folder: the run folder.
        command: the command's name (for the log and the resume hint).
        options: the resolved options, written to ``config.json``.
        resume: continue the run in ``folder`` (it must hold a
            ``config.json`` and something to continue); otherwise
            ``folder`` must be new or empty. Options that differ from the
            folder's ``config.json`` must be :func:`resumable`.
        restart_stage: with ``resume``, a run with nothing to continue, or
            a stage whose every checkpoint is damaged, starts (the stage)
            again from step 0 instead of being refused.
        progress: show progress bars (tqdm, with ETA; rank 0 only).
        device: where the command's models run (this rank's device).
    """

    def __init__(self, folder, command: str, options: Dict, *, resume: bool = False, restart_stage: bool = False,
                 progress: bool = True, device="cpu"):
        self.folder = Path(folder)
        self.command, self.options, self.resume = command, dict(options), resume
        self.restart_stage = restart_stage
        self.device = torch.device(device)
        self.where = distributed.layout()
        self.is_main = self.where.is_main
        self.show_progress = progress and self.is_main
        self._stop_signal = None
        self._previous_handlers = {}
        self._lock_fd = None
        self._trackers = []  # rank 0's (rlhf_engine.pipeline.tracking), from options["report_to"]
        self._config_before = None  # a resumed run's config.json as it was (put back when the resume is refused)
        self.logger = None

    # -- lifetime ------------------------------------------------------------------

    def __enter__(self):
        try:
            opened = self.from_main(self._open_main() if self.is_main else None)
            if isinstance(opened, str):
                raise UsageError(opened)
            self.logger = logging.getLogger(f"rlhf_engine.run.{id(self)}")
            self.logger.propagate = False
            if self.is_main:
                _write_json(self.folder / CONFIG_FILE, self.options)
                self._open_log()
            for signum in STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.log(f"{'resuming' if self.resume else 'starting'} 'rlhf-engine {self.command}' in {self.folder}")
        for message in opened or ():
            self.log(message)
        problem = self.from_main(self._open_trackers() if self.is_main else None)
        if problem is not None:
            try:
                self._refuse(problem)
            finally:
                self.__exit__(None, None, None)
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous_handlers.items():
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, previous if previous is not None else default)
        self._previous_handlers = {}
        trackers, self._trackers = self._trackers, []
        try:
            close_trackers(trackers, failed=bool(exc) and exc[0] is not None)
        except Exception as error:  # noqa: BLE001 (the run's own records are complete: say so, do not fail)
            self.log(f"warning: --report_to: a tracker failed to close ({type(error).__name__}: {error})")
        if self.logger is not None:
            for handler in list(self.logger.handlers):
                handler.close()
                self.logger.removeHandler(handler)
        self._unlock()
        return False

    def _open_main(self):
        """Rank 0's part of opening the folder: a one-line problem (str) when
        it cannot be opened as asked, else the lines to log (the options a
        resume changes, a restart). Holds the folder's lock on success."""
        if self.resume and not (self.folder / CONFIG_FILE).is_file():
            return f"--resume: {self.folder} holds no run to resume (no {CONFIG_FILE})"
        not_empty = (f"run folder {self.folder} is not empty: pass --resume to continue the run in it, "
                     f"or choose another --out")
        def filled():
            return self.folder.exists() and any(path.name != LOCK_FILE for path in self.folder.iterdir())

        if not self.resume and filled():
            return not_empty
        self.folder.mkdir(parents=True, exist_ok=True)
        holder = self._lock()
        if holder is not None:
            return (f"run folder {self.folder} is in use by another process ({holder}): wait for it to end or "
                    f"stop it (Ctrl-C, or kill PID: either saves a checkpoint), then --resume")
        problem, messages = None, []
        if not self.resume:
            problem = not_empty if filled() else None  # filled by another process while we took the lock
        else:
            problem, messages = self._resume_problem()
        if problem is not None:
            self._unlock()
        return problem if problem is not None else messages

    def _resume_problem(self) -> Tuple[Optional[str], List[str]]:
        """``(problem, messages)`` of resuming this folder with ``options``:
        options that may not change, nothing to continue."""
        try:
            saved = json.loads((self.folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"--resume: cannot read {self.folder / CONFIG_FILE} ({exc})", []
        self._config_before = saved
        changed = {name: (saved[name], value) for name, value in self.options.items()
                   if name in saved and saved[name] != value}
        refused = [name for name in changed if not resumable(name)]
        if refused:
            return (f"--resume cannot change {_changes(changed, refused)} (the run's config.json has the former): "
                    f"the resumed run would no longer match its checkpoints and data. Drop these options, or start "
                    f"a new run (another --out). A resume may change: learning rates, max_steps/epochs/iterations, "
                    f"eval_every, save_every(_minutes), kl_target/kl_horizon, device, threads"), []
        messages = [f"resume: {_changes(changed, list(changed))}"] if changed else []
        if not any(any(self.folder.glob(pattern)) for pattern in
                   (f"*/{RESULT_FILE}", "*/checkpoints/step-*", f"*/checkpoints/{LATEST}")):
            if not self.restart_stage:
                return (f"--resume: {self.folder} holds nothing to continue (no stage finished and no checkpoint "
                        f"was written before the run stopped): pass --restart_stage to start it again from step 0, "
                        f"or start a new run (another --out)"), []
            messages.append("--restart_stage: nothing to continue (no stage finished, no checkpoint): starting again "
                            "from step 0")
        return None, messages

    def _lock(self) -> Optional[str]:
        """Take the folder's lock (``.lock``, flock, rank 0); None when
        taken, else who holds it ("PID 123")."""
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            return f"PID {holder}" if holder.isdigit() else "PID unknown"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the file stays (removing it would race a new locker)
            self._lock_fd = None

    def _open_log(self):
        self.logger.setLevel(logging.INFO)
        formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for handler in (logging.FileHandler(self.folder / LOG_FILE, encoding="utf-8"), _TqdmHandler()):
            handler.setFormatter(formatter)
            self.logger.addHandler(handler)

    @staticmethod
    def from_main(value):
        """Rank 0's ``value`` (picklable) on every rank: a collective, and a
        barrier (``value`` itself in a world of one)."""
        return distributed.all_gather_object(value)[0]

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:
            raise StoppedNow(signum)
        self._stop_signal = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.log(f"{name}: stopping after the current step and saving a checkpoint (Ctrl-C or SIGTERM again to "
                 f"stop at once)")

    def should_stop(self) -> bool:
        """True once Ctrl-C was pressed or SIGTERM received: loops check it before each step."""
        return self._stop_signal is not None

    @property
    def stop_signal(self) -> Optional[int]:
        """The signal that asked the run to stop (None: none yet)."""
        return self._stop_signal

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """What Ctrl-C (or ``signum``) does (for callers and tests that stop a run in code)."""
        self._on_signal(signum, None)

    # -- records -------------------------------------------------------------------

    def log(self, message: str) -> None:
        """Log ``message`` (rank 0; other ranks' messages are dropped)."""
        self.logger.info(message)

    def stage_dir(self, stage: str) -> Path:
        """``<folder>/<stage>`` (created by rank 0)."""
        path = self.folder / stage
        if self.is_main:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def _open_trackers(self) -> Optional[str]:
        """Rank 0: open the trackers of ``options["report_to"]``
        (:mod:`~rlhf_engine.pipeline.tracking`) and log the options as the
        run's parameters; the one-line problem when one cannot be opened."""
        try:
            names = parse_report_to(self.options.get("report_to", DEFAULT_REPORT_TO))
            self._trackers = open_trackers(self.folder, names, log=self.log)
            for tracker in self._trackers:
                tracker.log_params(self.options)
        except TrackingError as exc:
            return str(exc)
        return None

    def record(self, stage: str, step: int, metrics: Dict) -> None:
        """Append ``metrics`` (numbers; ``info/*`` strings are kept in the
        JSONL only) to metrics.jsonl, TensorBoard (``tb/<stage>``) and the
        other ``report_to`` trackers at ``step`` (rank 0)."""
        values = {key: _json_value(value) for key, value in metrics.items() if key != "step"}
        for tracker in self._trackers:
            tracker.log_metrics(stage, step, values)

    def log_artifacts(self, paths) -> None:
        """Hand files of the run (the report's plots) to the ``report_to``
        trackers that store files (wandb, MLflow, Trackio; rank 0)."""
        paths = [Path(path) for path in paths]
        for tracker in self._trackers:
            tracker.log_artifacts(paths)

    def _refuse(self, message: str):
        """Raise UsageError(``message``) for a resume refused once the run
        is open, with its config.json as it was (rank 0 writes)."""
        if self.is_main and self._config_before is not None:
            _write_json(self.folder / CONFIG_FILE, self._config_before)
        raise UsageError(message)

    def rewind(self, stage: str, step: int) -> None:
        """Forget what ``stage`` recorded after ``step`` (all of it when
        ``step`` is 0), before it runs again from there: its rows leave
        metrics.jsonl (with a line a killed process left half-written) and
        its TensorBoard writer purges those steps; wandb, MLflow and Trackio
        keep them (rank 0 writes; see :mod:`~rlhf_engine.pipeline.tracking`)."""
        for tracker in self._trackers:
            message = tracker.rewind(stage, step)
            if message:
                self.log(message)

    def resume_point(self, stage: str, root: Path, *, last: int, unit: str = "step") -> Optional[Path]:
        """Where ``stage`` starts: the checkpoint under ``root`` to continue
        from (None: step 0), by the rules of the module doc, logged; what
        the stage recorded after it is forgotten (:meth:`rewind`). None
        when the run does not resume. A collective.

        Raises:
            UsageError: every checkpoint of the stage is damaged (and not
                ``restart_stage``), or it is at ``last`` (the stage's final
                ``unit``, e.g. lowered by a resumed run's options) or past it.
        """
        if not self.resume:
            return None
        found, skipped = self.from_main(find_checkpoint(root) if self.is_main else None)
        for path, why in skipped:
            self.log(f"{stage}: warning: skipping checkpoint {path}: {why}")
        if found is None and skipped:
            names = ", ".join(path.name for path, _ in skipped)
            if not self.restart_stage:
                self._refuse(f"--resume: no checkpoint of stage '{stage}' is usable ({names}: see the warnings): "
                             f"pass --restart_stage to train {stage} again from {unit} 0")
            if self.is_main:  # they would be skipped, with a warning, at every later resume
                shutil.rmtree(root, ignore_errors=True)
            self.from_main(None)
            self.log(f"{stage}: --restart_stage: removed the unusable checkpoints ({names}); starting from {unit} 0")
        elif found is None:
            self.log(f"{stage}: no checkpoint to resume from; starting from {unit} 0")
        else:
            step = checkpoint_step(found)
            if step >= last:
                self._refuse(f"--resume: checkpoint {found} is at {unit} {step}, and the run now ends at {unit} "
                             f"{last}: nothing left to run (options lowered the length of the run?)")
            self.log(f"{stage}: resuming from {unit} {step} ({found})")
        self.rewind(stage, checkpoint_step(found) if found is not None else 0)
        return found

    def progress(self, total: Optional[int], stage: str, initial: int = 0):
        """A tqdm bar (elapsed, ETA, rate) for a stage's loop."""
        return tqdm(total=total, initial=initial, desc=stage, unit="step", dynamic_ncols=True, file=sys.stderr,
                    disable=not self.show_progress, mininterval=0.5)

    def result(self, stage: str) -> Optional[Dict]:
        """The final metrics of ``stage`` when it finished, else None."""
        path = self.folder / stage / RESULT_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def skip_if_done(self, stage: str) -> Optional[Dict]:
        """:meth:`result` as rank 0 reads it (a collective), logging that
        ``stage`` is skipped when it is done."""
        done = self.from_main(self.result(stage) if self.is_main else None)
        if done is not None:
            self.log(f"{stage}: already done, skipped")
        return done

    def finish(self, stage: str, result: Optional[Dict]) -> Dict:
        """Mark ``stage`` done with its final metrics: rank 0's ``result``
        is written, and its JSON-safe copy returned on every rank (a
        collective: every rank's later reads see the stage done; the other
        ranks may pass None)."""
        clean = {key: _json_value(value) for key, value in result.items()} if self.is_main else None
        if self.is_main:
            _write_json(self.stage_dir(stage) / RESULT_FILE, clean)
        clean = self.from_main(clean)
        self.log(f"{stage}: done " + ", ".join(f"{k}={_short(v)}" for k, v in clean.items() if is_number(v)))
        return clean

    def checkpoints(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints"

    def model_dir(self, stage: str) -> Path:
        return self.folder / stage / "model"

    def save_model(self, stage: str, model, tokenizer) -> Path:
        """Write ``model`` (safetensors, full weights even when sharded) and
        ``tokenizer`` as ``<stage>/model``: into a temporary folder first, so
        a half-written folder never has the final name. A collective: every
        rank gathers the weights, rank 0 writes, and every rank returns once
        the folder is in place."""
        final = self.model_dir(stage)
        if lora.is_peft(model):  # one process (LoRA is refused under torch.distributed)
            return self._save_lora_model(final, model, tokenizer)
        state_dict = distributed.full_state_dict(model)
        if self.is_main:
            tmp = final.with_name(f".tmp-model-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.from_main(None)
        return final

    def _save_lora_model(self, final: Path, model, tokenizer) -> Path:
        """A LoRA ``model`` as ``<stage>/model``, merged (a plain HuggingFace
        folder), and its adapters as ``<stage>/adapter`` (loads with
        ``PeftModel.from_pretrained`` on the base model), each written to a
        temporary folder first."""
        adapter = lora.adapter_folder(final)
        tmp, tmp_adapter = (path.with_name(f".tmp-{path.name}-{os.getpid()}") for path in (final, adapter))
        for path in (tmp, tmp_adapter):
            shutil.rmtree(path, ignore_errors=True)
        lora.save_lora(model, tmp, tmp_adapter)
        tokenizer.save_pretrained(tmp)
        for path, target in ((tmp_adapter, adapter), (tmp, final)):
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
        return final


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder (``step-00000042``)."""
    return int(path.name.rsplit("-", 1)[1])


def find_checkpoint(root) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """``(checkpoint, skipped)``: the checkpoint folder under ``root`` a
    resume continues from (:func:`~rlhf_engine.checkpoint.latest_checkpoint`,
    checksums verified; None when there is none), and the unusable entries
    passed over before it, each with what is wrong (the file named)."""
    skipped = []
    found = latest_checkpoint(root, on_skip=lambda path, why: skipped.append((Path(path), why)))
    return found, skipped


def _changes(changed: Dict[str, Tuple], names) -> str:
    return ", ".join(f"{name} {changed[name][0]!r} -> {changed[name][1]!r}" for name in names)


def process_seconds(fallback_start: float) -> float:
    """Wall seconds since this process started (Linux: from /proc, so the
    imports count too), else since ``fallback_start`` (a ``time.perf_counter()``)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - fallback_start


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- the SFT and reward-model stages ------------------------------------------------------

def expected_steps(num_records: int, has_eval_set: bool, config: TrainConfig) -> int:
    """The optimizer steps a stage will run on ``num_records`` training
    records (before the length policy drops any), for the progress bar."""
    held = 0 if has_eval_set else len(batching.split_eval(range(num_records), config.eval_fraction, config.seed)[1])
    return total_steps(max(num_records - held, 1), config)


def train_stage(run: Run, stage: str, model, tokenizer, train_fn: Callable, train_records, eval_records,
                config: TrainConfig, *, postfix: Callable[[dict], dict] = lambda m: {"loss": m["loss"]}) -> Dict:
    """Run ``train_fn`` (:func:`~rlhf_engine.pipeline.sft.train_sft` or
    :func:`~rlhf_engine.pipeline.reward.train_reward_model`) as ``stage`` of
    ``run``: metrics to the run's records, a progress bar, checkpoints every
    ``config.save_every`` steps and ``config.save_every_minutes`` and on
    Ctrl-C or SIGTERM, resumed by the rules of :meth:`Run.resume_point` when
    the run resumes; then ``<stage>/model`` and the result. ``model``
    moves to ``run.device`` (and is sharded over the ranks under
    torch.distributed).

    A finished stage is not run again: its result is returned and ``model``
    is left as given (load ``run.model_dir(stage)``).

    Raises:
        Interrupted: after Ctrl-C or SIGTERM, once the checkpoint is written.
    """
    done = run.skip_if_done(stage)
    if done is not None:
        return done
    try:
        check_world_size(config, run.where)
        if config.lora:
            lora.refuse_distributed(run.where.world_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model = lora.with_adapters(model, config.lora_options(), seed=config.seed).to(run.device)
    root = run.checkpoints(stage)
    steps = expected_steps(len(train_records), eval_records is not None, config)
    latest = run.resume_point(stage, root, last=steps)
    bar = run.progress(steps, stage, initial=checkpoint_step(latest) if latest is not None else 0)

    def on_step(metrics):
        run.record(stage, metrics["step"], metrics)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in postfix(metrics).items()}, refresh=False)
        if "eval_loss" in metrics:
            run.log(f"{stage}: step {metrics['step']}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("eval_")))

    start = time.perf_counter()
    try:
        result = train_fn(model, tokenizer, train_records, eval_records, config, on_step=on_step,
                          stop=run.should_stop, checkpoints=root, resume=latest or False)
    finally:
        bar.close()
    if result["stopped"]:
        raise Interrupted(stage, result["steps"], latest_checkpoint(root, verify=False), run.stop_signal)
    run.log(f"{stage}: length policy '{config.length_policy}' (max_length {config.max_length}): dropped "
            f"{result['dropped']}, truncated {result['truncated']} of "
            f"{result['train_examples'] + result['eval_examples'] + result['dropped']} examples")
    run.save_model(stage, model, tokenizer)
    return run.finish(stage, {**result, "wall_seconds": time.perf_counter() - start})


# -- the sft, rm and eval commands ----------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
def load_causal_lm(spec: str, *, texts=(), vocab_size: int = 450, seed: int = 0, role: str = "model"):
    """``(model, tokenizer)``: a HuggingFace causal LM folder ``spec`` (float32),
    or a new Llama of size ``spec`` (``tiny``/``small``) with a byte-level
    tokenizer learnt from ``texts``. A tokenizer without a pad token pads
    with EOS.

    Raises:
        UsageError: naming ``role`` (the option that named the folder, e.g.
            ``--policy``): no such folder, no tokenizer, or a folder that is
            not a causal LM (a reward model's, or one whose weights would
            leave part of the model freshly initialised).
    """
    if spec in SIZES:
        tokenizer = byte_tokenizer(list(texts), vocab_size)
        return build_policy(spec, tokenizer, seed=seed), tokenizer
    tokenizer = load_tokenizer(spec, role=role)
    return _load_model(AutoModelForCausalLM, spec, role), tokenizer


def load_reward_model(path: str, *, role: str = "reward model"):
    """A reward-model folder as a one-label sequence-classification model
    (float32); a UsageError naming ``role`` for a folder that is missing or
    is not a reward model's (a causal LM's, whose score head would be
    freshly initialised)."""
    return _load_model(AutoModelForSequenceClassification, path, role, num_labels=1)


def load_tokenizer(path: str, *, role: str = "model"):
    """The tokenizer of a model folder (a UsageError naming ``role`` when
    it has none); one without a pad token pads with EOS."""
    check_folder(path, role)
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{role} {path} holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(tokenizer, role: str, path: str, other_role: str, other_path: str) -> None:
    """Refuse (UsageError naming both folders) the model folder
    ``other_path`` when it is to be fed token ids of ``tokenizer`` (the
    one of ``role`` ``path``) and its own tokenizer gives other ids
    (:func:`~rlhf_engine.pipeline.vocab.tokenizer_difference`)."""
    difference = tokenizer_difference(tokenizer, load_tokenizer(other_path, role=other_role))
    if difference is not None:
        raise UsageError(f"{other_role} {other_path} has another tokenizer than {role} {path} ({difference}): "
                         f"it would be fed token ids it does not know")


def _load_model(auto_class, path: str, role: str, **kwargs):
    """:func:`~rlhf_engine.models.loading.load_pretrained` of an existing
    folder, its refusals as one-line usage errors."""
    check_folder(path, role)
    try:
        return load_pretrained(auto_class, path, role, **kwargs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def check_folder(path: str, role: str = "model") -> None:
    if not Path(path).is_dir():
        raise UsageError(f"{role} {path}: no such model folder")
