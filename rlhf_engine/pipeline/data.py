"""The pipeline's data: JSONL record formats, their validation, tokenisation
and the over-long-sample policy.

One JSON object per line; blank lines are skipped; keys other than the ones
below are ignored (ids, metadata). Text fields must be non-empty after
stripping whitespace, but are kept exactly as written.

================  =========================================================
kind              fields of each line
================  =========================================================
demonstrations    ``prompt``, ``response`` (strings): for SFT
comparisons       ``prompt``, ``chosen``, ``rejected`` (strings; ``chosen``
                  and ``rejected`` differ after stripping), optional
                  ``margin`` (a finite number: how much better ``chosen``
                  is): for the reward model
rankings          ``prompt``, ``responses`` (a list of K >= 2 distinct
                  strings, best first): for the reward model
prompts           ``prompt`` (string): for PPO and evaluation
================  =========================================================

Examples::

    {"prompt": "reverse: abc", "response": "cba"}
    {"prompt": "reverse: abc", "chosen": "cba", "rejected": "cab", "margin": 1.0}
    {"prompt": "sort: cab", "responses": ["abc", "acb", "cab"]}
    {"prompt": "upper: bad"}

Bad data raises :class:`DataError`, whose message names the file, the
1-based line and the field, never an exception from deep inside a stage.
"""
import dataclasses
import json
import math
import os
import tempfile
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

from rlhf_engine.models.prompts import PLAIN_SEPARATOR, encode_prompt  # noqa: F401 (the prompt format)

LENGTH_POLICIES = ("truncate", "drop")


class DataError(ValueError):
    """Invalid data: ``problem`` at ``path``, 1-based ``line``, ``field``.

    ``path`` and ``line`` are None for a record built in code, ``line`` for a
    whole-file problem (unreadable, empty), ``field`` for a problem with the
    whole line (invalid JSON, not an object). A list element's field reads
    ``responses[2]``.
    """

    def __init__(self, problem: str, path: Optional[str] = None, line: Optional[int] = None,
                 field: Optional[str] = None):
        self.problem, self.path, self.line, self.field = problem, path, line, field
        where = [part for part in (path, None if line is None else f"line {line}",
                                   None if field is None else f"field '{field}'") if part]
        super().__init__(": ".join([", ".join(where), problem]) if where else problem)


class LengthPolicyError(DataError):
    """``--length_policy drop`` dropped every one of ``count`` examples: all
    are longer than ``max_length`` tokens. ``option_prefix``: the prefix of
    the options' flags in the message (``ptx_`` for ``--ptx_max_length``);
    :meth:`with_prefix` names other flags."""

    def __init__(self, count: int, max_length: int, option_prefix: str = ""):
        self.count, self.max_length, self.option_prefix = count, max_length, option_prefix
        p = option_prefix
        super().__init__(f"--{p}length_policy drop drops every example: all {count} examples are longer than "
                         f"max_length={max_length} tokens of prompt + response (--{p}max_length {max_length}); "
                         f"raise --{p}max_length or use --{p}length_policy truncate")

    def with_prefix(self, option_prefix: str) -> "LengthPolicyError":
        return LengthPolicyError(self.count, self.max_length, option_prefix)

    def __reduce__(self):
        return type(self), (self.count, self.max_length, self.option_prefix)


_JSON_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "a number", float: "a number",
                    list: "a list", dict: "an object", type(None): "null"}


def _type_name(value) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _check_text(value, field: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {_type_name(value)}", field=field)
    if not value.strip():
        raise DataError("is empty", field=field)


@dataclasses.dataclass(frozen=True)
class Demonstration:
    """A prompt and the response to imitate (SFT)."""

    prompt: str
    response: str

    def __post_init__(self):
        _check_text(self.prompt, "prompt")
        _check_text(self.response, "response")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A prompt and two responses, ``chosen`` preferred over ``rejected``.

    ``margin`` (optional, finite): how strongly ``chosen`` is preferred, for
    the Bradley-Terry loss with a margin.
    """

    prompt: str
    chosen: str
    rejected: str
    margin: Optional[float] = None

    def __post_init__(self):
        _check_text(self.prompt, "prompt")
        _check_text(self.chosen, "chosen")
        _check_text(self.rejected, "rejected")
        if self.chosen.strip() == self.rejected.strip():
            raise DataError("is identical to 'chosen'", field="rejected")
        if self.margin is not None:
            if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)):
                raise DataError(f"expected a number, got {_type_name(self.margin)}", field="margin")
            if not math.isfinite(self.margin):
                raise DataError(f"must be finite, got {self.margin}", field="margin")


@dataclasses.dataclass(frozen=True)
class Ranking:
    """A prompt and K >= 2 distinct responses, best first."""

    prompt: str
    responses: List[str]

    def __post_init__(self):
        _check_text(self.prompt, "prompt")
        if not isinstance(self.responses, list):
            raise DataError(f"expected a list of strings, got {_type_name(self.responses)}",
                            field="responses")
        if len(self.responses) < 2:
            raise DataError(f"needs at least 2 responses, got {len(self.responses)}", field="responses")
        seen = {}
        for i, response in enumerate(self.responses):
            _check_text(response, f"responses[{i}]")
            first = seen.setdefault(response.strip(), i)
            if first != i:
                raise DataError(f"duplicates responses[{first}]", field=f"responses[{i}]")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt alone (PPO rollouts, evaluation)."""

    prompt: str

    def __post_init__(self):
        _check_text(self.prompt, "prompt")


Record = Union[Demonstration, Comparison, Ranking, Prompt]
KINDS = {"demonstrations": Demonstration, "comparisons": Comparison, "rankings": Ranking,
         "prompts": Prompt}


def _check_kind(kind: str) -> type:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind]


def _parse_line(text: str, cls: type) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_type_name(obj)}")
    values = {}
    for field in dataclasses.fields(cls):
        optional = field.default is not dataclasses.MISSING
        if field.name not in obj and not optional:
            raise DataError("is missing", field=field.name)
        if field.name in obj and not (optional and obj[field.name] is None):
            values[field.name] = obj[field.name]
    return cls(**values)


def read_jsonl(path, kind: str, check: Optional[Callable[[Record], None]] = None) -> List[Record]:
    """Read and validate a JSONL file of ``kind`` records (see the module doc).

    ``check(record)``: a further rule of the caller's, raising
    :class:`DataError` (its ``field``; the file and line are added).

    Raises :class:`DataError` naming the file, line and field of the first
    bad record, or the file when it cannot be read or holds no record.
    """
    cls = _check_kind(kind)
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror})", path=path) from None
    records = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            if text.strip():
                records.append(_parse_line(text, cls))
                if check is not None:
                    check(records[-1])
        except UnicodeDecodeError as exc:
            raise DataError(f"not valid UTF-8 (byte {exc.start})", path=path, line=number) from None
        except DataError as exc:
            raise DataError(exc.problem, path=path, line=number, field=exc.field) from None
    if not records:
        raise DataError(f"holds no {kind} (the file is empty)", path=path)
    return records


def _to_json(record: Record) -> dict:
    return {key: value for key, value in dataclasses.asdict(record).items() if value is not None}


def write_jsonl(path, records: Sequence[Record]) -> None:
    """Write ``records`` (all of one record type) to ``path`` as JSONL.

    Atomic: the lines go to a temporary file in the same folder that then
    replaces ``path``, so a reader never sees half a file. Creates the folder.
    """
    if not records:
        raise ValueError("records is empty: read_jsonl would reject the file")
    kinds = {type(record) for record in records}
    if len(kinds) != 1 or not kinds <= set(KINDS.values()):
        raise ValueError(f"records must all be one of {[c.__name__ for c in KINDS.values()]}, "
                         f"got {sorted(c.__name__ for c in kinds)}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(_to_json(record), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def expand_ranking(ranking: Ranking) -> List[Comparison]:
    """The K(K-1)/2 comparisons of a ranking, ``chosen`` the better ranked.

    Order: (0, 1), (0, 2), ..., (0, K-1), (1, 2), ..., (K-2, K-1).
    """
    if not isinstance(ranking, Ranking):
        raise ValueError(f"ranking must be a Ranking, got {type(ranking).__name__}")
    responses = ranking.responses
    return [Comparison(ranking.prompt, responses[i], responses[j])
            for i in range(len(responses)) for j in range(i + 1, len(responses))]


# -- tokenisation -------------------------------------------------------------

def _encode_response(tokenizer, response: str) -> List[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id: responses must end with EOS")
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def encode_pair(tokenizer, prompt: str, response: str) -> Tuple[List[int], List[int]]:
    """``(prompt_ids, response_ids)``: :func:`encode_prompt`, and the
    response's tokens followed by EOS."""
    return encode_prompt(tokenizer, prompt), _encode_response(tokenizer, response)


class Encoded(NamedTuple):
    """A record's token ids: the prompt once, then each response (EOS-ended).

    ``responses``: ``[response]`` for a Demonstration, ``[chosen, rejected]``
    for a Comparison, the K responses best first for a Ranking, ``[]`` for a
    Prompt.
    """

    record: Record
    prompt_ids: List[int]
    responses: List[List[int]]


def _response_texts(record: Record) -> List[str]:
    if isinstance(record, Demonstration):
        return [record.response]
    if isinstance(record, Comparison):
        return [record.chosen, record.rejected]
    if isinstance(record, Ranking):
        return list(record.responses)
    if isinstance(record, Prompt):
        return []
    raise ValueError(f"record must be one of {[c.__name__ for c in KINDS.values()]}, "
                     f"got {type(record).__name__}")


def encode_record(tokenizer, record: Record) -> Encoded:
    """Tokenise any record (see :class:`Encoded` for the responses' order)."""
    texts = _response_texts(record)
    return Encoded(record, encode_prompt(tokenizer, record.prompt),
                   [_encode_response(tokenizer, text) for text in texts])


# -- over-long samples ----------------------------------------------------------

def _check_length_args(max_length: int, policy: str) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"policy must be one of {LENGTH_POLICIES}, got {policy!r}")


def fit_group(prompt_ids: Sequence[int], responses: Sequence[Sequence[int]], max_length: int,
              policy: str) -> Optional[Tuple[List[int], List[List[int]]]]:
    """Make ``prompt + response`` fit ``max_length`` tokens for every response.

    ``policy="drop"``: None when the prompt plus the longest response is over.
    ``policy="truncate"``: a response keeps its first
    ``min(len, max(max_length - len(prompt), max_length // 2))`` tokens (so
    it is never empty, though a cut response loses its EOS), and the prompt,
    shared by all responses, keeps its last tokens up to the room the longest
    kept response leaves (at least one). A prompt alone (no responses) keeps
    its last ``max_length`` tokens.
    """
    _check_length_args(max_length, policy)
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: the first response token needs a context")
    if any(len(response) == 0 for response in responses):
        raise ValueError("responses holds an empty response")
    longest = max((len(response) for response in responses), default=0)
    if len(prompt_ids) + longest <= max_length:
        return list(prompt_ids), [list(response) for response in responses]
    if policy == "drop":
        return None
    room = max(max_length - len(prompt_ids), max_length // 2)
    kept = [list(response[:room]) for response in responses]
    prompt_keep = min(len(prompt_ids), max_length - max((len(r) for r in kept), default=0))
    return list(prompt_ids[len(prompt_ids) - prompt_keep:]), kept


def fit_length(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int,
               policy: str) -> Optional[Tuple[List[int], List[int]]]:
    """:func:`fit_group` for one response: ``(prompt_ids, response_ids)`` or
    None when ``policy="drop"`` drops it."""
    fitted = fit_group(prompt_ids, [response_ids], max_length, policy)
    return None if fitted is None else (fitted[0], fitted[1][0])


@dataclasses.dataclass(frozen=True)
class LengthReport:
    """What the length policy did to a dataset: ``kept`` examples (the
    ``truncated`` ones among them) and ``dropped`` ones."""

    kept: int
    truncated: int
    dropped: int

    @property
    def total(self) -> int:
        return self.kept + self.dropped

    def __str__(self) -> str:
        return f"dropped {self.dropped} of {self.total}, truncated {self.truncated}"


def fit_examples(examples: Sequence[Encoded], max_length: int, policy: str, *,
                 option_prefix: str = "") -> Tuple[List[Encoded], LengthReport]:
    """Apply :func:`fit_group` to every example: the kept (possibly
    truncated) examples in order, and the counts.

    Raises:
        LengthPolicyError: ``policy="drop"`` dropped every one of the
            (one or more) examples (its message names the flags
            ``--{option_prefix}max_length`` and ``--{option_prefix}length_policy``).
    """
    _check_length_args(max_length, policy)
    kept, truncated = [], 0
    for example in examples:
        fitted = fit_group(example.prompt_ids, example.responses, max_length, policy)
        if fitted is None:
            continue
        prompt_ids, responses = fitted
        if len(prompt_ids) != len(example.prompt_ids) or any(
                len(new) != len(old) for new, old in zip(responses, example.responses)):
            truncated += 1
        kept.append(Encoded(example.record, prompt_ids, responses))
    if examples and not kept:
        raise LengthPolicyError(len(examples), max_length, option_prefix)
    return kept, LengthReport(kept=len(kept), truncated=truncated, dropped=len(examples) - len(kept))
