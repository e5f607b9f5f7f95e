"""Command-line configuration: dataclasses parsed by ``transformers.HfArgumentParser``,
layered so that every value has one documented source.

Precedence, lowest first: the dataclass defaults, a command's own defaults
(e.g. one torch thread for the built-in pipeline), a preset flag's values
(``--quick``), the ``--config`` file (YAML or JSON: a flat mapping of option
names to values, the format of a run folder's ``config.json``), then the
flags on the command line. ``--resume`` without ``--config`` reads the run
folder's ``config.json`` as the file layer, so a resumed run keeps its
options.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from transformers import HfArgumentParser

from rlhf_engine.models.tokenizer import MIN_VOCAB_SIZE
from rlhf_engine.options import check_int, option
from rlhf_engine.pipeline import task
from rlhf_engine.pipeline.data import LENGTH_POLICIES, DataError
from rlhf_engine.pipeline.tracking import BACKENDS, DEFAULT_REPORT_TO, parse_report_to

CONFIG_FILE = "config.json"
# Flags about this invocation only: never written to config.json, never read from it.
INVOCATION_ONLY = ("config", "resume", "restart_stage")


def _check_device(value) -> None:
    """'auto', 'cpu', 'cuda' (on a machine with CUDA) or 'cuda:N' (an existing GPU), as the engine's ``device``."""
    if value != "auto":
        from rlhf_engine.engine.config import check_device  # imports the engine (and torch): only when needed

        check_device(value)


@dataclasses.dataclass
class RunOptions:
    """Where a command writes its run folder and how it uses the machine."""

    out: str = option("", "Run folder: config.json, metrics.jsonl, TensorBoard events (tb/), log.txt, checkpoints "
                          "and model folders (default: runs/<command>-<date>-<time>).")
    resume: bool = option(False, "Continue the run in --out from its checkpoints (options come from its config.json "
                                 "unless --config is given; flags still win, and only learning rates, the run's "
                                 "length, eval/save cadence, KL target/horizon, device and threads may change).")
    restart_stage: bool = option(False, "With --resume: when there is nothing to continue (no stage finished, no "
                                        "checkpoint) or every checkpoint of the interrupted stage is damaged, train "
                                        "that stage again from step 0 instead of stopping with an error.")
    threads: int = option(0, "torch CPU threads (0: torch's default, one per core).")
    dist_timeout: float = option(600.0, "Under torchrun: seconds a collective waits for the other ranks before "
                                        "the command fails naming the rank that stopped responding.")
    report_to: str = option(DEFAULT_REPORT_TO, f"Where metrics go, comma-separated: {', '.join(BACKENDS)}. "
                                               "metrics.jsonl is always written (--resume and the report read it); "
                                               "wandb runs offline unless WANDB_MODE is set, mlflow writes a file "
                                               "store in the run folder unless MLFLOW_TRACKING_URI is set, trackio "
                                               "its local database. The options are the run's parameters.")

    def __post_init__(self):
        if self.restart_stage and not self.resume:
            raise ValueError("--restart_stage only applies with --resume")
        check_int(self, "threads", 0)
        if isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, (int, float)) or \
                not 0 < self.dist_timeout < float("inf"):
            raise ValueError(f"dist_timeout must be a number of seconds > 0, got {self.dist_timeout!r}")
        parse_report_to(self.report_to)


def _required(obj, *names):
    for name in names:
        if not getattr(obj, name):
            raise ValueError(f"--{name} is required")


# The data options every command that reads data shares (rlhf_engine.pipeline.sources).
SPLIT_HELP = ("The split of every data source of the command: a DatasetDict folder's split (needed when it has "
              "several), or for .parquet/.csv/.json/.jsonl files a datasets split expression (default 'train', e.g. "
              "'train[:1000]'; a .jsonl file is then read by datasets, its errors naming rows instead of lines).")
COLUMNS_HELP = ("Column mapping of every data source of the command: NAME=COLUMN,... reads the standard name NAME "
                "(prompt, completion, response, chosen, rejected, messages, text, margin, responses) from the "
                "dataset's COLUMN, e.g. 'prompt=question,completion=answer'.")


def _check_source_options(obj) -> None:
    from rlhf_engine.pipeline.sources import parse_columns

    if not isinstance(obj.split, str):
        raise ValueError(f"split must be a string, got {obj.split!r}")
    parse_columns(obj.columns)


@dataclasses.dataclass
class SFTData:
    """What ``rlhf-engine sft`` trains and on which data."""

    model: str = option("tiny", "The causal LM to fine-tune: a HuggingFace model folder (with its tokenizer), or "
                                "'tiny'/'small' for a new Llama of that size (rlhf_engine.models.builders) with a "
                                "byte-level tokenizer learnt from the training data.")
    train_file: str = option("", "Demonstrations: JSONL ({\"prompt\": ..., \"response\": ...} per line), or any "
                                  "source and shape of README 'Data formats' (parquet, CSV, a datasets folder; "
                                  "TRL's prompt-completion, text and messages).")
    eval_file: str = option("", "Held-out demonstrations JSONL (default: eval_fraction of train_file).")
    vocab_size: int = option(450, "Vocabulary of a new model's byte-level tokenizer.")
    model_seed: int = option(0, "Seed of a new model's initialisation.")
    device: str = option("auto", "Where the models run: 'auto' (this rank's GPU when CUDA is available, else the "
                                 "CPU), 'cpu', 'cuda' or 'cuda:N'.")
    split: str = option("", SPLIT_HELP)
    columns: str = option("", COLUMNS_HELP)

    def __post_init__(self):
        _required(self, "model", "train_file")
        _check_source_options(self)
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or \
                self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (the 3 special tokens and the 256 "
                             f"bytes of the byte-level tokenizer), got {self.vocab_size!r}")
        check_int(self, "model_seed", 0)
        _check_device(self.device)


@dataclasses.dataclass
class RMData:
    """What ``rlhf-engine rm`` trains and on which data."""

    model: str = option("", "The SFT model folder the reward model starts from (its body, and a new scalar head).")
    comparisons: str = option("", "Comparisons JSONL: {\"prompt\", \"chosen\", \"rejected\"[, \"margin\"]} "
                                  "per line.")
    rankings: str = option("", "Rankings JSONL: {\"prompt\", \"responses\": [best, ..., worst]} per line.")
    eval_comparisons: str = option("", "Held-out comparisons JSONL (with or instead of eval_rankings; default: "
                                       "eval_fraction of the training records).")
    eval_rankings: str = option("", "Held-out rankings JSONL.")
    demonstrations: str = option("", "Held-out demonstrations JSONL (e.g. the SFT stage's eval_file), scored after "
                                     "training to normalise the rewards (see normalize_rewards).")
    model_seed: int = option(0, "Seed of the new scalar head's initialisation.")
    device: str = option("auto", "Where the models run: 'auto' (this rank's GPU when CUDA is available, else the "
                                 "CPU), 'cpu', 'cuda' or 'cuda:N'.")
    split: str = option("", SPLIT_HELP)
    columns: str = option("", COLUMNS_HELP)

    def __post_init__(self):
        _required(self, "model")
        _check_source_options(self)
        if not (self.comparisons or self.rankings):
            raise ValueError("--comparisons or --rankings (or both) is required")
        check_int(self, "model_seed", 0)
        _check_device(self.device)


@dataclasses.dataclass
class PPOData:
    """The models and prompts of ``rlhf-engine ppo``."""

    policy: str = option("", "The SFT model folder: the policy starts from it and it is the frozen reference.")
    reward_model: str = option("", "The reward model folder (frozen); optional with --reward_funcs.")
    reward_funcs: str = option("", "Reward functions beside (or instead of) the reward model, comma-separated "
                                   "'module:function' (importable; fn(prompts, responses) -> list of floats on the "
                                   "decoded text, async allowed; e.g. rlhf_engine.pipeline.task:gold_reward). The "
                                   "score is the weighted sum of the sources (see --reward_weights).")
    reward_weights: str = option("", "Comma-separated weights, one per reward source in order: the reward model "
                                     "first when given, then the --reward_funcs (default: all 1.0).")
    critic: str = option("", "A critic model folder (default: initialised from the reward model, or with "
                             "--critic_init policy from the policy).")
    prompts: str = option("", "Prompts: JSONL ({\"prompt\": ...} per line), or any source and shape of README "
                                "'Data formats' (a string or a conversation).")
    eval_prompts: str = option("", "Prompts JSONL on which the policy is probed (reward-model score, KL to the "
                                   "reference) every eval_every iterations (default: no probe).")
    gold_judge: bool = option(False, "Also probe with the built-in task's gold judge (for its prompts only).")
    ptx_data: str = option("", "PPO-ptx data, required when --ptx_coef > 0 and refused otherwise: demonstrations "
                               "JSONL ({\"prompt\": ..., \"response\": ...} per line, the sft command's format; "
                               "plain text is not accepted), encoded as the sft stage encodes them, the language-"
                               "modelling loss on the response tokens.")
    ptx_max_length: int = option(128, "PPO-ptx: most tokens of prompt + response per demonstration (as sft's "
                                      "--max_length).")
    ptx_length_policy: str = option("truncate", "PPO-ptx: demonstrations longer than ptx_max_length: 'truncate' "
                                                "or 'drop' (as sft's --length_policy).")
    split: str = option("", SPLIT_HELP)
    columns: str = option("", COLUMNS_HELP)

    def __post_init__(self):
        _required(self, "policy", "prompts")
        _check_source_options(self)
        if not (self.reward_model or self.reward_funcs):
            raise ValueError("--reward_model or --reward_funcs (or both) is required")
        reward_weights(self)  # the names and weights parse (the functions are imported by check_ppo_command)
        check_int(self, "ptx_max_length", 2)
        if self.ptx_length_policy not in LENGTH_POLICIES:
            raise ValueError(f"ptx_length_policy must be one of {LENGTH_POLICIES}, got {self.ptx_length_policy!r}")
        if self.gold_judge and not self.eval_prompts:
            raise ValueError("--gold_judge probes the policy on --eval_prompts, which is not given: give "
                             "--eval_prompts FILE (prompts of the built-in task) or drop --gold_judge")


def _reward_func_specs(spec: str) -> Dict[str, Tuple[str, str]]:
    """``{name: (module, attribute)}`` of ``--reward_funcs`` (``module:function,...``), named by the function's
    attribute name; ValueError naming the flag for a malformed entry or a name given twice."""
    specs = {}
    for entry in (e.strip() for e in spec.split(",")) if spec.strip() else ():
        module, sep, attribute = entry.partition(":")
        if not (sep and module and attribute) or not re.fullmatch(r"[\w.]+", module + attribute):
            raise ValueError(f"--reward_funcs {entry!r}: each entry is 'module:function' (an importable module and "
                             f"a function in it, e.g. rlhf_engine.pipeline.task:gold_reward)")
        name = attribute.rpartition(".")[2]
        if name in specs:
            raise ValueError(f"--reward_funcs names two functions {name!r}: reward sources need distinct names "
                             f"(their metrics are reward/<name>_mean)")
        specs[name] = (module, attribute)
    return specs


def reward_weights(data: "PPOData") -> Dict[str, float]:
    """``{source name: weight}`` of ``--reward_weights`` (one per source: the reward model, named ``model``,
    first when given, then the functions); {} when not given. ValueError naming the flag."""
    names = (["model"] if data.reward_model else []) + list(_reward_func_specs(data.reward_funcs))
    if not data.reward_weights.strip():
        return {}
    try:
        weights = [float(w) for w in data.reward_weights.split(",")]
    except ValueError:
        raise ValueError(f"--reward_weights {data.reward_weights!r} must be comma-separated numbers") from None
    if len(weights) != len(names) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--reward_weights {data.reward_weights!r}: give {len(names)} finite numbers, one per reward "
                         f"source in order ({', '.join(names)})")
    return dict(zip(names, weights))


def reward_funcs(spec: str) -> Dict[str, object]:
    """``--reward_funcs``' functions by name, imported; ValueError naming the entry that does not import or is not
    callable."""
    import importlib

    funcs = {}
    for name, (module, attribute) in _reward_func_specs(spec).items():
        try:
            fn = importlib.import_module(module)
            for part in attribute.split("."):
                fn = getattr(fn, part)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"--reward_funcs {module}:{attribute}: {type(exc).__name__}: {exc}") from None
        if not callable(fn):
            raise ValueError(f"--reward_funcs {module}:{attribute} is a {type(fn).__name__}, not a function")
        funcs[name] = fn
    return funcs


@dataclasses.dataclass
class EvalOptions:
    """``rlhf-engine eval``: the win rate of one policy over another."""

    policy_a: str = option("", "Model folder of the policy whose win rate is measured.")
    policy_b: str = option("", "Model folder of the policy it is compared with.")
    prompts: str = option("", "Prompts: JSONL ({\"prompt\": ...} per line), or any source and shape of README "
                                "'Data formats' (a string or a conversation).")
    judge: str = option("gold", "'gold' (the built-in task's gold judge, for its prompts) or a reward model folder.")
    max_new_tokens: int = option(64, "Most tokens sampled per response.")
    temperature: float = option(1.0, "Sampling temperature (0: greedy).")
    seed: int = option(0, "Seed of the sampling (the same for both policies).")
    batch_size: int = option(32, "Prompts sampled at once.")
    device: str = option("auto", "Where the models run: 'auto' (this rank's GPU when CUDA is available, else the "
                                 "CPU), 'cpu', 'cuda' or 'cuda:N'.")
    split: str = option("", SPLIT_HELP)
    columns: str = option("", COLUMNS_HELP)

    def __post_init__(self):
        _required(self, "policy_a", "policy_b", "prompts", "judge")
        _check_source_options(self)
        check_int(self, "max_new_tokens", 1)
        check_int(self, "seed", 0)
        check_int(self, "batch_size", 1)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        _check_device(self.device)


# -- the commands' checks before the run folder opens (``check`` of rlhf_engine.cli.Command) ----------------------

def check_model_folder(flag: str, path: str, sizes: Sequence[str] = ()) -> None:
    """Refuse (ValueError) a ``path`` given as ``flag`` that is not a folder
    (nor one of ``sizes``, the names of new models a flag also takes); what
    the folder holds is checked when it is loaded."""
    if path in sizes:
        return
    if not Path(path).is_dir():
        also = f" (nor a new model's size: one of {sorted(sizes)})" if sizes else ""
        raise ValueError(f"{flag} {path}: no such model folder{also}")


def check_gold_prompts(path: str, flag: str, instead: str, *, split: str = "", columns: str = "") -> None:
    """Refuse (:class:`~rlhf_engine.pipeline.data.DataError`, naming the
    file, line or row and field) prompts in ``path`` (any source of
    :func:`~rlhf_engine.pipeline.sources.load_records`, read with ``split``
    and ``columns``) that are not the built-in task's: the gold judge, asked
    for by ``flag``, scores no others. ``instead``: what to do about it."""
    from rlhf_engine.pipeline.sources import load_records

    def check(record):
        if not isinstance(record.prompt, str):
            raise DataError(f"is a conversation, not a prompt of the built-in task, the only prompts the gold judge "
                            f"({flag}) can score: {instead}", field="prompt")
        try:
            task.check_prompt(record.prompt)
        except ValueError:
            shown = record.prompt if len(record.prompt) <= 40 else record.prompt[:37] + "..."
            raise DataError(f"{shown!r} is not a prompt of the built-in task ('<family>: <word>' or "
                            f"'count <letter>: <word>', family one of {', '.join(task.FAMILIES)}), the only "
                            f"prompts the gold judge ({flag}) can score: {instead}", field="prompt") from None

    load_records(path, "prompts", split=split, columns=columns, check=check)


def check_sft_command(data: SFTData, config) -> None:
    """``rlhf-engine sft``: ``--model`` is a new model's size or a model folder."""
    from rlhf_engine.models.builders import SIZES

    check_model_folder("--model", data.model, sizes=tuple(SIZES))


def check_rm_command(data: RMData, config) -> None:
    """``rlhf-engine rm``'s checks across its option groups; ValueError:
    exit 2 before the run folder opens."""
    if config.normalize_rewards and not data.demonstrations:
        raise ValueError("--normalize_rewards (on by default) needs held-out demonstrations: pass --demonstrations "
                         "FILE (e.g. the SFT stage's eval_file), or --normalize_rewards false")


def check_ppo_command(data: PPOData, stage_config, engine_config) -> None:
    """``rlhf-engine ppo``: the PPO-ptx options
    (:func:`~rlhf_engine.pipeline.ppo_stage.check_ppo_options`), the model
    folders, and with ``--gold_judge`` the evaluation prompts."""
    from rlhf_engine.pipeline.ppo_stage import check_ppo_options

    check_ppo_options(data, stage_config, engine_config)
    for flag in ("policy", "reward_model", "critic"):
        if getattr(data, flag):
            check_model_folder(f"--{flag}", getattr(data, flag))
    if data.reward_funcs:
        from rlhf_engine.engine.rewards import build_sources

        # the sources' names and weights as the engine will check them (the model is a stand-in here)
        build_sources(bool(data.reward_model) or None, reward_funcs(data.reward_funcs), reward_weights(data))
    if not data.reward_model and not data.critic and engine_config.uses_critic and \
            engine_config.critic_init == "reward":
        raise ValueError("no --reward_model to start the critic from (reward functions only): give --critic_init "
                         "policy, a --critic folder, or a group baseline (--advantage_estimator rloo, group or "
                         "dr_grpo)")
    if data.gold_judge:
        check_gold_prompts(data.eval_prompts, "--gold_judge", "drop --gold_judge (the reward model still probes "
                                                                "the policy)", split=data.split, columns=data.columns)


def check_eval_command(options: EvalOptions) -> None:
    """``rlhf-engine eval``: the model folders, and with ``--judge gold``
    (the default) the prompts."""
    for flag in ("policy_a", "policy_b"):
        check_model_folder(f"--{flag}", getattr(options, flag))
    if options.judge == "gold":
        check_gold_prompts(options.prompts, "--judge gold", "give --judge RM_DIR (a reward model folder)",
                           split=options.split, columns=options.columns)
    else:
        check_model_folder("--judge", options.judge)


def prefixed(cls, prefix: str, name: Optional[str] = None, **defaults):
    """A dataclass with one field ``prefix + f`` per field ``f`` of the
    dataclass ``cls`` (same type and help), so that two stages' options can
    share one command line; ``defaults`` (unprefixed names) replace ``cls``'s
    defaults. :func:`unprefixed` builds the ``cls`` instance back."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(defaults) - names)
    if unknown:
        raise ValueError(f"defaults: {cls.__name__} has no field {unknown[0]!r}")
    fields = []
    for f in dataclasses.fields(cls):
        default = defaults.get(f.name, f.default)
        fields.append((prefix + f.name, f.type, dataclasses.field(default=default, metadata=f.metadata)))
    return dataclasses.make_dataclass(name or f"{prefix.strip('_').title()}{cls.__name__}", fields)


def unprefixed(obj, cls, prefix: str):
    """The ``cls`` instance whose fields are ``obj``'s ``prefix + name`` fields.

    Raises:
        ValueError: ``cls`` refuses the values; its message names the
            options as the command line does (``sft_batch_size must be
            ...``, ``ppo_device='cuda', ...``).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    try:
        return cls(**{name: getattr(obj, prefix + name) for name in names})
    except ValueError as exc:
        raise ValueError(prefix_option_names(str(exc), names, prefix)) from None


def prefix_option_names(message: str, names: Sequence[str], prefix: str) -> str:
    """``message`` with the option ``names`` it starts with (``name must
    ...``, ``--name ...``) or sets (``name=value``) given ``prefix``."""
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(^(?:--)?|(?<![\w-])--|(?<![\w-])(?=(?:{alternatives})=))({alternatives})\b")
    return pattern.sub(lambda m: f"{m.group(1)}{prefix}{m.group(2)}", message)


def option_names(dataclass_types: Iterable[type]) -> Tuple[str, ...]:
    """Every field name of ``dataclass_types``, in order."""
    return tuple(f.name for cls in dataclass_types for f in dataclasses.fields(cls))


def load_config_file(path, allowed: Sequence[str]) -> Dict[str, object]:
    """The options of a YAML or JSON config file (chosen by its extension:
    ``.json``, else YAML, a superset of JSON).

    Raises:
        ValueError: the file cannot be read or parsed, is not a mapping, or
            names an option outside ``allowed`` (the message names the file
            and the key).
    """
    path = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"config file {path}: cannot read ({exc.strerror})") from None
    values = _parse_text(text, path)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path}: expected a mapping of option names to values, "
                         f"got {type(values).__name__}")
    for key in values:
        if key in INVOCATION_ONLY:
            raise ValueError(f"config file {path}: option {key!r} is only accepted as a flag")
        if key not in allowed:
            raise ValueError(f"config file {path}: unknown option {key!r}")
    return values


def _parse_text(text: str, path: str):
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path}: not valid JSON ({exc})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path}: not valid YAML ({exc})") from None


def build_parser(dataclass_types: Sequence[type], *, prog: str, description: str,
                 presets: Optional[Mapping[str, Tuple[str, Mapping[str, object]]]] = None) -> HfArgumentParser:
    """The ``HfArgumentParser`` of a command: one flag per dataclass field
    (``--help`` shows each one's help and default), plus ``--config FILE``
    and one boolean flag per preset (``{flag: (help, values)}``)."""
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)

    def one_line_error(message):  # as every other bad option: one line, status 2 (not the whole usage)
        parser.exit(2, f"{prog}: error: {message} (`{prog} --help` lists the options)\n")

    parser.error = one_line_error
    _accept_none(parser, dataclass_types)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of options (a flat mapping of option names to values); "
                             "flags given on the command line win over it.")
    for flag, (help_text, _) in (presets or {}).items():
        parser.add_argument(f"--{flag}", action="store_true", help=help_text)
    return parser


def _accept_none(parser, dataclass_types: Sequence[type]) -> None:
    """Let the flag of every ``Optional`` number take ``None`` (any case),
    the value its help text offers for "off" (argparse's own type would
    refuse the word)."""
    optional = set()
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = typing.get_args(hints[f.name])
            if type(None) in args and any(a in (int, float) for a in args):
                optional.add(f.name)
    for action in parser._actions:  # noqa: SLF001 (argparse exposes no public list)
        if action.dest in optional and callable(action.type):
            action.type = _or_none(action.type)


def _or_none(convert):
    def parse(text):
        return None if text.strip().lower() == "none" else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def parse_command(dataclass_types: Sequence[type], argv: Sequence[str], *, prog: str, description: str,
                  command_defaults: Optional[Mapping[str, object]] = None,
                  presets: Optional[Mapping[str, Tuple[str, Mapping[str, object]]]] = None):
    """Parse ``argv`` into one instance of each of ``dataclass_types`` with
    the layering of the module doc. One of the types must be
    :class:`RunOptions` (its ``out`` and ``resume`` locate the file layer on
    resume).

    Returns:
        ``(instances, resolved)``: the instances in order, and the flat
        ``{option: value}`` of every field except :data:`INVOCATION_ONLY`
        (what goes to the run folder's ``config.json``).

    Raises:
        ValueError: a bad config file, or an option value a dataclass
            rejects. (argparse reports a flag it cannot parse itself, with
            SystemExit 2.)
    """
    argv = list(argv)
    allowed = option_names(dataclass_types)
    parser = build_parser(dataclass_types, prog=prog, description=description, presets=presets)
    layers = dict(command_defaults or {})
    known, _ = _pre_parser(presets).parse_known_args(argv)
    for flag, (_, values) in (presets or {}).items():
        if getattr(known, flag):
            layers.update(values)
    config_path = known.config
    if config_path is None and known.resume and known.out:
        saved = Path(known.out) / CONFIG_FILE
        config_path = saved if saved.is_file() else None
    if config_path is not None:
        layers.update(load_config_file(config_path, allowed))
    parser.set_defaults(**layers)
    parsed = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    instances = tuple(parsed[:len(dataclass_types)])
    resolved = {name: value for obj in instances for name, value in dataclasses.asdict(obj).items()
                if name not in INVOCATION_ONLY}
    return instances, resolved


def _pre_parser(presets):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--out", default="")
    pre.add_argument("--resume", nargs="?", const="true", default="false",
                     type=lambda v: v.lower() in ("true", "1", "yes", "y"))
    for flag in presets or {}:
        pre.add_argument(f"--{flag}", action="store_true")
    return pre
