"""Every accepted data source turned into the pipeline's records
(:mod:`rlhf_engine.pipeline.data`).

Sources (:func:`load_records`):

- a ``.jsonl`` file, read line by line (errors name the 1-based line);
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a
  ``DatasetDict`` whose split ``split`` chooses; one with a single split
  needs none);
- a ``.parquet``, ``.csv``, ``.json`` or ``.jsonl`` file through
  ``datasets.load_dataset`` (``split``: a split expression of ``datasets``,
  default ``train``, e.g. ``train[:1000]``; a ``.jsonl`` file goes this way
  only when ``split`` is given).

Errors of a dataset (not a ``.jsonl`` file read by lines) name the 0-based
row (``row 3``: ``dataset[3]``).

Shapes of a row (TRL's dataset formats and the project's own; the names
are the column names after ``columns``):

================  ============================================================
kind              shapes, tried in this order
================  ============================================================
demonstrations    ``messages`` (a conversation: the prompt is the messages
                  before the first assistant message, the rest, ending with
                  an assistant message, is trained on its assistant turns);
                  ``prompt`` + ``completion`` (or ``response``), strings or
                  conversations; ``text`` (language modelling on all of it)
comparisons       ``prompt`` + ``chosen`` + ``rejected`` (strings or
                  conversations), optional ``margin``; ``chosen`` +
                  ``rejected`` alone: the implicit prompt (below)
rankings          ``prompt`` + ``responses`` (strings)
prompts           ``prompt``; ``messages`` (up to its last non-assistant
                  message); ``chosen`` + ``rejected`` (the implicit prompt)
================  ============================================================

The implicit prompt (HH-RLHF's layout: ``chosen`` and ``rejected`` are
whole conversations sharing their start):

- message lists: the prompt is the longest run of leading messages both
  share that is followed in both by an assistant message; ``chosen`` and
  ``rejected`` are the rest of each;
- strings: the prompt is the shared start up to and including its last
  ``Assistant:`` (:data:`ASSISTANT_MARKER`); the responses are the rest of
  each, kept as written (``" I can help..."``).

Column mapping (``--columns``): ``NAME=COLUMN,...`` reads the standard name
``NAME`` (:data:`NAMES`) from the dataset's ``COLUMN``; a name a kind does
not read is ignored for it, a mapped column a dataset lacks is an error
naming the columns it has.
"""
import os
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from rlhf_engine.pipeline.data import (ASSISTANT, Comparison, DataError, Demonstration, Prompt, Ranking, Record,
                                       check_conversation, read_jsonl, record_from_object)

# The standard column names: TRL's (completion) and the project's (response) for the same thing.
NAMES = ("prompt", "completion", "response", "chosen", "rejected", "messages", "text", "margin", "responses")
READS = {"demonstrations": ("prompt", "completion", "response", "messages", "text"),
         "comparisons": ("prompt", "chosen", "rejected", "margin"),
         "rankings": ("prompt", "responses"),
         "prompts": ("prompt", "messages", "chosen", "rejected")}
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
ASSISTANT_MARKER = "Assistant:"


def parse_columns(text: str) -> Dict[str, str]:
    """``"prompt=question,completion=answer"`` -> ``{"prompt": "question",
    "completion": "answer"}`` ("" -> ``{}``).

    Raises:
        ValueError: an entry is not ``NAME=COLUMN``, a name is not one of
            :data:`NAMES` or is given twice.
    """
    if not isinstance(text, str):
        raise ValueError(f"columns must be a string NAME=COLUMN,..., got {text!r}")
    columns = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, column = (part.strip() for part in entry.partition("="))
        if not sep or not name or not column:
            raise ValueError(f"columns: {entry!r} is not NAME=COLUMN (e.g. prompt=question)")
        if name not in NAMES:
            raise ValueError(f"columns: unknown name {name!r} in {entry!r}: the names are {', '.join(NAMES)}")
        if name in columns:
            raise ValueError(f"columns: {name!r} is mapped twice")
        columns[name] = column
    return columns


# -- rows to records -------------------------------------------------------------------------

def _rename(field: Optional[str], names: Mapping[str, Tuple[str, int]]) -> Optional[str]:
    """A record's field (``response[2].content``) as the row names it:
    ``names[record_field] = (row_field, index_offset)``."""
    if field is None:
        return None
    head, rest = field, ""
    for i, ch in enumerate(field):
        if ch in "[.":
            head, rest = field[:i], field[i:]
            break
    if head not in names:
        return field
    name, offset = names[head]
    if offset and rest.startswith("["):
        index, _, tail = rest[1:].partition("]")
        rest = f"[{int(index) + offset}]{tail}"
    return name + rest


def _build(cls, values: dict, names: Mapping[str, Tuple[str, int]] = ()) -> Record:
    try:
        return cls(**values)
    except DataError as exc:
        raise DataError(exc.problem, field=_rename(exc.field, dict(names))) from None


def _conversation(value, field: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {type(value).__name__}", field=field)
    check_conversation(value, field)
    return value


def _roles(messages) -> List[str]:
    return [message["role"] for message in messages]


def _has(obj: dict, name: str) -> bool:
    """A field with a value (a dataset's columnar storage gives every row
    every column, None where a row has none)."""
    return obj.get(name) is not None


def _not_null(obj: dict, name: str) -> None:
    if obj[name] is None:
        raise DataError("expected a string or a list of messages, got null", field=name)


def _no_shape(kind: str, obj: dict, shapes: str) -> DataError:
    fields = ", ".join(f"{key}{'' if value is not None else ' (null)'}" for key, value in obj.items())
    return DataError(f"holds none of the shapes of {kind}: {shapes} (its fields: {fields or 'none'}; --columns "
                     f"NAME=COLUMN maps other column names)")


def _demonstration(obj: dict) -> Demonstration:
    if _has(obj, "messages"):
        messages = _conversation(obj["messages"], "messages")
        roles = _roles(messages)
        if ASSISTANT not in roles:
            raise DataError("has no assistant message: nothing to train on", field="messages")
        first, last = roles.index(ASSISTANT), len(roles) - 1 - roles[::-1].index(ASSISTANT)
        if first == 0:
            raise DataError("is the assistant's: a conversation starts with a message to answer",
                            field="messages[0].role")
        if last != len(roles) - 1:
            raise DataError(f"is {roles[-1]!r} after the last assistant message: a demonstration ends with the "
                            f"assistant's turn", field=f"messages[{len(roles) - 1}].role")
        return _build(Demonstration, {"prompt": messages[:first], "response": messages[first:]},
                      {"prompt": ("messages", 0), "response": ("messages", first)})
    if _has(obj, "prompt") or ("prompt" in obj and (_has(obj, "completion") or _has(obj, "response"))):
        _not_null(obj, "prompt")
        answer = "completion" if _has(obj, "completion") or "response" not in obj else "response"
        if answer not in obj:
            raise DataError("is missing (TRL's name 'completion' is accepted too)", field="response")
        return _build(Demonstration, {"prompt": obj["prompt"], "response": obj[answer]},
                      {"response": (answer, 0)})
    if _has(obj, "text"):
        return _build(Demonstration, {"prompt": None, "response": obj["text"]}, {"response": ("text", 0)})
    raise _no_shape("demonstrations", obj, "'messages'; 'prompt' with 'completion' (or 'response'); 'text'")


def implicit_prompt(chosen, rejected):
    """``(prompt, chosen, rejected, offset)``: the implicit prompt of two
    whole conversations (module doc) and what follows it in each;
    ``offset``: the index in the message lists where the responses start
    (0 for strings).

    Raises:
        DataError: the two share no such prompt (or differ in type).
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = os.path.commonprefix([chosen, rejected])
        end = shared.rfind(ASSISTANT_MARKER)
        if end < 0:
            raise DataError(f"shares no start ending with {ASSISTANT_MARKER!r} with 'chosen', and there is no "
                            f"'prompt': the prompt cannot be found (give a 'prompt' column)", field="rejected")
        end += len(ASSISTANT_MARKER)
        return chosen[:end], chosen[end:], rejected[end:], 0
    chosen, rejected = _conversation(chosen, "chosen"), _conversation(rejected, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for start in range(min(shared, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[start]["role"] == ASSISTANT and rejected[start]["role"] == ASSISTANT:
            return chosen[:start], chosen[start:], rejected[start:], start
    raise DataError("shares with 'chosen' no leading messages followed in both by an assistant message, and there "
                    "is no 'prompt': the prompt cannot be found (give a 'prompt' column)", field="rejected")


def _comparison(obj: dict) -> Comparison:
    for name in ("chosen", "rejected"):
        if name not in obj:
            raise DataError("is missing", field=name)
    margin = obj.get("margin")
    if _has(obj, "prompt"):
        return _build(Comparison, {"prompt": obj["prompt"], "chosen": obj["chosen"], "rejected": obj["rejected"],
                                   "margin": margin})
    prompt, chosen, rejected, offset = implicit_prompt(obj["chosen"], obj["rejected"])
    return _build(Comparison, {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin},
                  {"prompt": ("chosen", 0), "chosen": ("chosen", offset), "rejected": ("rejected", offset)})


def _prompt(obj: dict) -> Prompt:
    if _has(obj, "prompt") or not any(_has(obj, name) for name in ("messages", "chosen")):
        if "prompt" not in obj:
            raise _no_shape("prompts", obj, "'prompt'; 'messages'; 'chosen' with 'rejected'")
        return _build(Prompt, {"prompt": obj["prompt"]})
    if _has(obj, "messages"):
        messages = _conversation(obj["messages"], "messages")
        roles = _roles(messages)
        keep = len(roles)
        while keep and roles[keep - 1] == ASSISTANT:
            keep -= 1
        if not keep:
            raise DataError("holds only assistant messages: no prompt", field="messages")
        return _build(Prompt, {"prompt": messages[:keep]}, {"prompt": ("messages", 0)})
    if "rejected" not in obj:
        raise DataError("is missing (an implicit prompt is the start 'chosen' and 'rejected' share)", field="rejected")
    prompt, _, _, _ = implicit_prompt(obj["chosen"], obj["rejected"])
    return _build(Prompt, {"prompt": prompt}, {"prompt": ("chosen", 0)})


SHAPES = {"demonstrations": _demonstration, "comparisons": _comparison, "prompts": _prompt,
          "rankings": lambda obj: record_from_object(obj, Ranking)}


def record_builder(kind: str, columns: Mapping[str, str]) -> Callable[[dict], Record]:
    """``build(row) -> record`` for ``kind``: the row's columns renamed by
    ``columns`` (standard name -> column), its shape recognised; a
    :class:`DataError` names the row's own field."""
    if kind not in SHAPES:
        raise ValueError(f"kind must be one of {sorted(SHAPES)}, got {kind!r}")
    shape = SHAPES[kind]
    mapped = {name: column for name, column in columns.items() if name in READS[kind]}
    names = {name: (column, 0) for name, column in mapped.items()}
    sources = set(mapped.values())

    def build(row: dict) -> Record:
        renamed = {key: value for key, value in row.items() if key not in mapped and key not in sources}
        renamed.update({name: row[column] for name, column in mapped.items() if column in row})
        try:
            return shape(renamed)
        except DataError as exc:
            raise DataError(exc.problem, field=_rename(exc.field, names)) from None

    return build


# -- sources ----------------------------------------------------------------------------------

def _clean(value):
    """A dataset row's message (at any depth) without the None keys the
    columnar storage adds (a key another message has); top-level None
    values stay (read as absent where a shape allows)."""
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def _clean_row(row: dict) -> dict:
    return {key: _clean(value) for key, value in row.items()}


def _open_dataset(path: str, split: str):
    """The ``datasets.Dataset`` of a folder or a data file."""
    import datasets

    if os.path.isdir(path):
        try:
            dataset = datasets.load_from_disk(path)
        except FileNotFoundError as exc:
            raise DataError(f"is not a dataset folder (one written by datasets' save_to_disk): {exc}",
                            path=path) from None
        except Exception as exc:  # noqa: BLE001 (datasets raises many kinds; one line naming the folder instead)
            raise DataError(f"cannot load as a dataset folder ({type(exc).__name__}: {exc})".splitlines()[0],
                            path=path) from None
        if isinstance(dataset, datasets.DatasetDict):
            splits = sorted(dataset)
            if not split and len(splits) == 1:
                split = splits[0]
            if split not in dataset:
                chosen = f"has no split {split!r}" if split else "holds several splits"
                raise DataError(f"{chosen}: choose one of {', '.join(splits)} with --split", path=path)
            return dataset[split]
        if split:
            raise DataError(f"is a Dataset folder (one split): --split {split} applies to a DatasetDict folder "
                            f"or a data file; drop it", path=path)
        return dataset
    builder = FILE_BUILDERS[os.path.splitext(path)[1].lower()]
    if not os.path.isfile(path):
        raise DataError("cannot read (No such file or directory)", path=path)
    try:
        return datasets.load_dataset(builder, data_files=path, split=split or "train")
    except Exception as exc:  # noqa: BLE001 (datasets raises many kinds; one line naming the file instead)
        raise DataError(f"cannot load as {builder} ({type(exc).__name__}: {exc})".splitlines()[0],
                        path=path) from None


def load_records(path, kind: str, *, split: str = "", columns="",
                 check: Optional[Callable[[Record], None]] = None) -> List[Record]:
    """Read and validate the ``kind`` records of any accepted source (module doc).

    Args:
        path: a ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a
            ``save_to_disk`` folder.
        kind: ``demonstrations``, ``comparisons``, ``rankings`` or ``prompts``.
        split: a DatasetDict folder's split, or a data file's split
            expression (``datasets.load_dataset``'s; default ``train``).
        columns: ``"NAME=COLUMN,..."`` or a ``{name: column}`` mapping
            (:func:`parse_columns`).
        check: ``check(record)``, a further rule of the caller's raising
            :class:`DataError` (the source and line or row are added).

    Raises:
        DataError: naming the source, the line or row and the field of the
            first bad record, or the source when it cannot be read, holds
            no record or lacks a mapped column.
    """
    columns = parse_columns(columns) if isinstance(columns, str) else dict(columns)
    build = record_builder(kind, columns)
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.isdir(path) and (suffix == ".jsonl" and not split):
        return read_jsonl(path, kind, check, build=build)
    if not os.path.isdir(path) and suffix not in FILE_BUILDERS:
        raise DataError(f"unknown kind of source: expected a dataset folder (save_to_disk) or a file ending in "
                        f"{', '.join(FILE_BUILDERS)}", path=path)
    dataset = _open_dataset(path, split)
    missing = {name: column for name, column in columns.items()
               if name in READS[kind] and column not in dataset.column_names}
    if missing:
        name, column = next(iter(missing.items()))
        raise DataError(f"--columns {name}={column}: no column {column!r} (its columns: "
                        f"{', '.join(dataset.column_names)})", path=path)
    records = []
    for row, values in enumerate(dataset):
        try:
            records.append(build(_clean_row(values)))
            if check is not None:
                check(records[-1])
        except DataError as exc:
            raise DataError(exc.problem, path=path, row=row, field=exc.field) from None
    if not records:
        raise DataError(f"holds no {kind} (the dataset is empty)", path=path)
    return records
