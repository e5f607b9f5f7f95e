"""The ``rlhf-engine`` command.

    rlhf-engine pipeline [--out DIR]     the built-in task end to end: SFT -> reward model -> PPO -> report
    rlhf-engine sft|rm|ppo ...           one stage on your data (JSONL) and models (HuggingFace folders)
    rlhf-engine eval ...                 win rate of one policy over another
    rlhf-engine bench ppo                end-to-end benchmark
    rlhf-engine plan --policy P          memory per phase on one GPU (no weights loaded)

``rlhf-engine COMMAND --help`` lists a command's options and defaults.
Options come from the defaults, then ``--config FILE`` (YAML or JSON), then
the flags (flags win). Every command writes a run folder (``--out``), one
process at a time; Ctrl-C or SIGTERM saves a checkpoint and exits with
status 130 or 143; ``--resume`` continues.
Every option is checked when the command's options are built, before the
run folder opens or any model loads: a bad value, bad data or a run folder
that cannot be written exits with status 2 and one line naming the option
(or the file, line and field).

Under ``torchrun --nproc_per_node=N rlhf-engine COMMAND ...`` the command
runs data-parallel on N ranks (torch.distributed: NCCL on GPUs, gloo on
CPUs), with results that do not depend on N; rank 0 writes the run folder.
Ranks started with different options, or a rank that dies or stops
responding for ``--dist_timeout`` seconds, end the command on every rank
with a one-line message (status 2 and 1).
"""
import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple


def _bench(args):
    problem = (f"--iterations must be an int >= 1, got {args.iterations}" if args.iterations < 1 else
               f"--warmup must be an int >= 0, got {args.warmup}" if args.warmup < 0 else
               args.json and writable_problem(Path(args.json).parent, "--json", args.json))
    if problem:
        return _error("bench", problem)
    from rlhf_engine.bench import ppo_work_config, run_ppo_bench

    overrides = {"dtype": args.dtype, "lora_r": args.lora_r}
    try:  # the engine's own checks, before any model is built
        ppo_work_config(**overrides)
    except ValueError as error:
        return _error("bench", f"{error} (--dtype / --lora_r)")
    report = run_ppo_bench(args.size, iterations=args.iterations, warmup=args.warmup, **overrides)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def writable_problem(folder, flag: str, value: str) -> Optional[str]:
    """Why files cannot be written into ``folder`` (created if missing), the
    folder of option ``flag`` given as ``value``; None when they can. Checks
    the folder, or its nearest existing parent: a folder, writable, not on a
    read-only file system. Creates nothing."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = "is not a folder"
    elif _read_only(existing):
        problem = "is on a read-only file system"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable (permission denied)"
    else:
        return None
    return f"{flag} {value}: cannot write into the folder {folder}: {existing} {problem}"


def _read_only(path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class Command:
    """A command whose options are dataclasses: ``types()`` (RunOptions
    first); ``handler()`` returns ``run(run, *configs) -> result``, where
    ``configs`` are the parsed options after RunOptions, or the one object
    ``prepare()(*options)`` makes of them. ``check()(*options)`` raises
    ValueError for options that are each valid but do not go together, or
    name what is not there (a model folder, prompts the gold judge cannot
    score): exit 2 before the run folder opens or any model loads. ``defaults``
    and ``presets()``: see :func:`rlhf_engine.pipeline.config.parse_command`."""

    help: str
    types: Callable[[], tuple]
    handler: Callable[[], Callable]
    prepare: Optional[Callable[[], Callable]] = None
    check: Optional[Callable[[], Callable]] = None
    defaults: Mapping[str, object] = dataclasses.field(default_factory=dict)
    presets: Callable[[], Mapping[str, Tuple[str, Mapping]]] = dict
    device_option: str = "device"  # the option naming the device the command runs on


# Imports stay inside the lambdas: `rlhf-engine bench` and `--help` do not pay for what they do not use.
def _sft_types():
    from rlhf_engine.pipeline.config import RunOptions, SFTData
    from rlhf_engine.pipeline.sft import SFTConfig

    return RunOptions, SFTData, SFTConfig


def _rm_types():
    from rlhf_engine.pipeline.config import RMData, RunOptions
    from rlhf_engine.pipeline.reward import RMConfig

    return RunOptions, RMData, RMConfig


def _ppo_types():
    from rlhf_engine.engine import EngineConfig
    from rlhf_engine.pipeline.config import PPOData, RunOptions
    from rlhf_engine.pipeline.ppo_stage import PPOStageConfig

    return RunOptions, PPOData, PPOStageConfig, EngineConfig


def _eval_types():
    from rlhf_engine.pipeline.config import EvalOptions, RunOptions

    return RunOptions, EvalOptions


def _pipeline_types():
    from rlhf_engine.pipeline import builtin
    from rlhf_engine.pipeline.config import RunOptions

    return (RunOptions, *builtin.OPTION_TYPES)


def _pipeline_presets():
    from rlhf_engine.pipeline import builtin

    return {"quick": ("A smoke test of every stage in seconds: tiny data and a few steps (overrides the defaults; "
                      "--config and flags still win). Its numbers mean nothing.", builtin.QUICK)}


def _handler(module, name):
    def load():
        import importlib

        return getattr(importlib.import_module(module), name)
    return load


COMMANDS: Dict[str, Command] = {
    "sft": Command("Supervised fine-tuning on demonstrations.", _sft_types,
                   _handler("rlhf_engine.pipeline.sft", "run_sft_command"),
                   check=_handler("rlhf_engine.pipeline.config", "check_sft_command")),
    "rm": Command("Reward model from comparisons and rankings.", _rm_types,
                  _handler("rlhf_engine.pipeline.reward", "run_rm_command"),
                  check=_handler("rlhf_engine.pipeline.config", "check_rm_command")),
    "ppo": Command("PPO of an SFT model against a reward model.", _ppo_types,
                   _handler("rlhf_engine.pipeline.ppo_stage", "run_ppo_command"),
                   check=_handler("rlhf_engine.pipeline.config", "check_ppo_command")),
    "pipeline": Command("The built-in task end to end (SFT -> RM -> PPO -> evaluation -> report); no download.",
                        _pipeline_types, _handler("rlhf_engine.pipeline.builtin", "run_pipeline"),
                        prepare=_handler("rlhf_engine.pipeline.builtin", "stage_configs"),
                        defaults={"threads": 1}, presets=_pipeline_presets, device_option="ppo_device"),
    "eval": Command("Win rate of one policy over another, judged by a reward model or the gold judge.",
                    _eval_types, _handler("rlhf_engine.pipeline.evaluate", "run_eval_command"),
                    check=_handler("rlhf_engine.pipeline.config", "check_eval_command")),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="rlhf-engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        # the command's own parser (rlhf_engine.pipeline.config) reads its options
        commands.add_parser(name, help=command.help, add_help=False)
    bench = commands.add_parser("bench", help="End-to-end benchmarks.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("work", choices=["ppo"], help="What to benchmark: one PPO iteration (rlhf_engine.bench).")
    bench.add_argument("--size", choices=["tiny", "small", "medium"], default="tiny", help="Model size of the work.")
    bench.add_argument("--iterations", type=int, default=3, help="Measured iterations (after the warm-up).")
    bench.add_argument("--warmup", type=int, default=1, help="Warm-up iterations, not measured.")
    bench.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                       help="The engine's dtype: bfloat16 is bf16 autocast on float32 weights.")
    bench.add_argument("--lora_r", type=int, default=0,
                       help="LoRA rank of the policy's and critic's adapters (the engine's default alpha and target "
                            "modules); 0: full fine-tuning.")
    bench.add_argument("--json", default=None, help="Write the report here as JSON.")
    bench.set_defaults(run=_bench)
    from rlhf_engine import plan  # imports no torch until the command runs

    plan.add_parser(commands)
    return parser


def _error(name: str, message: str, status: int = 2, *, name_rank: bool = True) -> int:
    """Print ``message`` as the command's one-line error (naming this rank
    under torch.distributed unless ``name_rank`` is False); ``status``."""
    from rlhf_engine import distributed

    where = distributed.layout()
    rank = f" (rank {where.rank})" if where.distributed and name_rank else ""
    print(f"rlhf-engine {name}: error{rank}: {message}", file=sys.stderr)
    return status


def run_command(name: str, argv) -> int:
    """Parse ``argv`` for command ``name``, run it in its run folder and
    print its result as JSON (rank 0); returns the exit status (0, 2 on bad
    data or options or ranks that disagree on them, 1 when another rank
    failed, 130 on Ctrl-C, 143 on SIGTERM).

    Under torchrun every rank runs this: it joins the process group
    (``--dist_timeout``), checks that every rank resolved the same options,
    and leaves the group at the end."""
    from rlhf_engine.pipeline.config import parse_command

    command = COMMANDS[name]
    try:
        (run_options, *options), resolved = parse_command(
            command.types(), argv, prog=f"rlhf-engine {name}", description=command.help,
            command_defaults=command.defaults, presets=command.presets())
        if command.check:
            command.check()(*options)
        configs = (command.prepare()(*options),) if command.prepare else tuple(options)
    except ValueError as exc:
        return _error(name, str(exc))
    import torch
    from transformers.utils import logging as hf_logging

    from rlhf_engine import distributed

    hf_logging.disable_progress_bar()  # transformers' own bars (loading, saving weights) would bury ours
    if run_options.threads:
        torch.set_num_threads(run_options.threads)
    where = distributed.init(timeout_s=run_options.dist_timeout, device=resolved[command.device_option])
    try:
        with distributed.guard(f"rlhf-engine {name}"):
            distributed.check_agreement("options", resolved)
            return _run_in_folder(name, command, run_options, configs, resolved,
                                  distributed.device_for(where, resolved[command.device_option]))
    except distributed.DisagreementError as exc:
        return _error(name, str(exc))
    except distributed.RankFailureError as exc:
        return _error(name, str(exc), status=1, name_rank=False)  # the message names this rank
    finally:
        distributed.shutdown()


def _run_in_folder(name, command, run_options, configs, resolved, device) -> int:
    from rlhf_engine import distributed
    from rlhf_engine.pipeline.data import DataError
    from rlhf_engine.pipeline.run import Interrupted, Run, UsageError, exit_status

    main = distributed.layout().is_main
    # every rank writes into rank 0's folder (a default name holds the time)
    out = distributed.all_gather_object(run_options.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")[0]
    # a folder rank 0 cannot write: one line on every rank before any work starts
    problem = distributed.all_gather_object(writable_problem(out, "--out", out) if main else None)[0]
    if problem is not None:
        return _error(name, problem)
    resume_hint = f"resume with: rlhf-engine {name} --out {out} --resume"
    try:
        with contextlib.ExitStack() as stack:
            try:
                run = stack.enter_context(Run(out, name, resolved, resume=run_options.resume,
                                              restart_stage=run_options.restart_stage, device=device))
            except OSError as exc:  # the run folder, its config.json, log or TensorBoard files cannot be written
                return _error(name, f"--out {out}: cannot write the run folder ({exc.strerror or exc}"
                                    f"{': ' + str(exc.filename) if exc.filename else ''})")
            result = command.handler()(run, *configs)
    except (DataError, UsageError) as exc:
        return _error(name, str(exc))
    except Interrupted as exc:
        if main:
            print(f"rlhf-engine {name}: {exc}; {resume_hint}", file=sys.stderr)
        return exit_status(exc)
    except KeyboardInterrupt as exc:
        if main:
            print(f"rlhf-engine {name}: interrupted; finished stages are kept in {out}; {resume_hint}",
                  file=sys.stderr)
        return exit_status(exc)
    if main:
        print(json.dumps({key: value for key, value in result.items() if key != "examples"}, indent=2))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in COMMANDS:
        return run_command(args.command, rest)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
