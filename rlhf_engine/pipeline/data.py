"""The pipeline's data: record formats, their validation, tokenisation
and the over-long-sample policy (other sources than JSONL, and the shapes
of TRL's datasets: :mod:`rlhf_engine.pipeline.sources`).

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

Conversations: the prompt of a demonstration, a comparison or a prompt
record may instead be a conversation, a list of ``{"role", "content"}``
messages (non-empty strings; other keys are kept for the chat template)
whose last message is not the assistant's; the responses are then
conversations too, each starting and ending with an assistant message
(several assistant turns: a multi-turn demonstration, SFT training on the
assistant turns only). A demonstration whose prompt is None is plain text
(language modelling on all of ``response``). Rankings take strings only.

Bad data raises :class:`DataError`, whose message names the file, the
1-based line (or the 0-based row of a dataset without lines) and the field,
never an exception from deep inside a stage.
"""
import dataclasses
import json
import math
import os
import tempfile
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from rlhf_engine.models.prompts import (ASSISTANT, PLAIN_SEPARATOR, encode_conversation,  # noqa: F401
                                        encode_prompt)

LENGTH_POLICIES = ("truncate", "drop")


class DataError(ValueError):
    """Invalid data: ``problem`` at ``path``, 1-based ``line`` (or 0-based
    ``row`` of a dataset without lines), ``field``.

    ``path`` and ``line`` are None for a record built in code, ``line`` for a
    whole-file problem (unreadable, empty), ``field`` for a problem with the
    whole line (invalid JSON, not an object). A list element's field reads
    ``responses[2]``, a message's ``messages[1].content``.
    """

    def __init__(self, problem: str, path: Optional[str] = None, line: Optional[int] = None,
                 field: Optional[str] = None, row: Optional[int] = None):
        self.problem, self.path, self.line, self.field, self.row = problem, path, line, field, row
        where = [part for part in (path, None if line is None else f"line {line}",
                                   None if row is None else f"row {row}",
                                   None if field is None else f"field '{field}'") if part]
        super().__init__(": ".join([", ".join(where), problem]) if where else problem)

    def __reduce__(self):
        return type(self), (self.problem, self.path, self.line, self.field, self.row)


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


Message = Dict[str, str]
Conversation = List[Message]
Text = Union[str, Conversation]


def check_conversation(value, field: str) -> None:
    """A non-empty list of messages: objects with non-empty string ``role`` and ``content``."""
    if not value:
        raise DataError("is an empty conversation", field=field)
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"expected a message (an object with 'role' and 'content'), got "
                            f"{_type_name(message)}", field=f"{field}[{i}]")
        for key in ("role", "content"):
            if key not in message:
                raise DataError("is missing", field=f"{field}[{i}].{key}")
            _check_text(message[key], f"{field}[{i}].{key}")


def _check_prompt(value, field: str = "prompt") -> bool:
    """Check a prompt: a string or a conversation not ending with the
    assistant's message. True when it is a conversation."""
    if isinstance(value, list):
        check_conversation(value, field)
        if value[-1]["role"] == ASSISTANT:
            raise DataError("ends with an assistant message: a prompt's last message is the one answered",
                            field=f"{field}[{len(value) - 1}].role")
        return True
    _check_text(value, field)
    return False


def _check_response(value, conversational: bool, field: str) -> None:
    """A response: a string after a string prompt, else a conversation that
    starts and ends with an assistant message."""
    if not conversational:
        if isinstance(value, list):
            raise DataError("expected a string, got a list (the prompt is a string, so the responses are too)",
                            field=field)
        _check_text(value, field)
        return
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages (the prompt is a conversation), got {_type_name(value)}",
                        field=field)
    check_conversation(value, field)
    for end in {0, len(value) - 1}:
        if value[end]["role"] != ASSISTANT:
            raise DataError(f"must be the assistant's (a response {'starts' if end == 0 else 'ends'} with an "
                            f"assistant message), got {value[end]['role']!r}", field=f"{field}[{end}].role")


def _same(a: Text, b: Text) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


@dataclasses.dataclass(frozen=True)
class Demonstration:
    """A prompt and the response to imitate (SFT): strings, conversations
    (the response's assistant turns are trained on), or ``prompt`` None and
    a text ``response`` (language modelling on all of it)."""

    prompt: Optional[Text]
    response: Text

    def __post_init__(self):
        if self.prompt is None:
            _check_response(self.response, False, "response")
        else:
            _check_response(self.response, _check_prompt(self.prompt), "response")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A prompt and two responses, ``chosen`` preferred over ``rejected``.

    ``margin`` (optional, finite): how strongly ``chosen`` is preferred, for
    the Bradley-Terry loss with a margin.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    margin: Optional[float] = None

    def __post_init__(self):
        conversational = _check_prompt(self.prompt)
        _check_response(self.chosen, conversational, "chosen")
        _check_response(self.rejected, conversational, "rejected")
        if _same(self.chosen, self.rejected):
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
    """A prompt alone (PPO rollouts, evaluation): a string or a conversation."""

    prompt: Text

    def __post_init__(self):
        _check_prompt(self.prompt)


Record = Union[Demonstration, Comparison, Ranking, Prompt]
KINDS = {"demonstrations": Demonstration, "comparisons": Comparison, "rankings": Ranking,
         "prompts": Prompt}


def _check_kind(kind: str) -> type:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind]


def _parse_line(text: str, build: Callable[[dict], Record]) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_type_name(obj)}")
    return build(obj)


def record_from_object(obj: dict, cls: type) -> Record:
    """The ``cls`` record of a JSON object with the record's own field names."""
    values = {}
    for field in dataclasses.fields(cls):
        optional = field.default is not dataclasses.MISSING
        if field.name not in obj and not optional:
            raise DataError("is missing", field=field.name)
        if field.name in obj and not (optional and obj[field.name] is None):
            values[field.name] = obj[field.name]
    return cls(**values)


def read_jsonl(path, kind: str, check: Optional[Callable[[Record], None]] = None, *,
               build: Optional[Callable[[dict], Record]] = None) -> List[Record]:
    """Read and validate a JSONL file of ``kind`` records (see the module doc).

    ``check(record)``: a further rule of the caller's, raising
    :class:`DataError` (its ``field``; the file and line are added).
    ``build(obj)``: the record of a line's JSON object (default: the
    object's fields are the record's, :func:`record_from_object`), raising
    :class:`DataError`.

    Raises :class:`DataError` naming the file, line and field of the first
    bad record, or the file when it cannot be read or holds no record.
    """
    cls = _check_kind(kind)
    build = build or (lambda obj: record_from_object(obj, cls))
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
                records.append(_parse_line(text, build))
                if check is not None:
                    check(records[-1])
        except UnicodeDecodeError as exc:
            raise DataError(f"not valid UTF-8 (byte {exc.start})", path=path, line=number) from None
        except DataError as exc:
            raise DataError(exc.problem, path=path, line=number, field=exc.field) from None
    if not records:
        raise DataError(f"holds no {kind} (the file is empty)", path=path)
    return records


def record_texts(record: Record) -> List[str]:
    """Every string of a record (prompt, responses, message contents): what
    a new tokenizer learns from."""
    texts = []

    def add(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                add(item["content"] if isinstance(item, dict) else item)

    for field in dataclasses.fields(record):
        if field.name != "margin":
            add(getattr(record, field.name))
    return texts


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


def encode_pair(tokenizer, prompt: Text, response: str) -> Tuple[List[int], List[int]]:
    """``(prompt_ids, response_ids)``: :func:`encode_prompt`, and the
    response's tokens followed by EOS; after a conversation, the response
    is its next assistant message (:func:`encode_conversation`)."""
    if isinstance(prompt, list):
        prompt_ids, response_ids, _ = _encode_turns(tokenizer, prompt, [{"role": ASSISTANT, "content": response}])
        return prompt_ids, response_ids
    return encode_prompt(tokenizer, prompt), _encode_response(tokenizer, response)


def _encode_turns(tokenizer, prompt: Conversation, response: Conversation):
    try:
        return encode_conversation(tokenizer, list(prompt) + list(response), len(prompt))
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _encode_text(tokenizer, text: str) -> Tuple[List[int], List[int]]:
    """A plain text (no prompt): ``([bos], text + eos)``, or without a BOS
    its first token as the context of the rest."""
    ids = _encode_response(tokenizer, text)
    if tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id], ids
    return ids[:1], ids[1:]


class Encoded(NamedTuple):
    """A record's token ids: the prompt once, then each response (EOS-ended).

    ``responses``: ``[response]`` for a Demonstration, ``[chosen, rejected]``
    for a Comparison, the K responses best first for a Ranking, ``[]`` for a
    Prompt. ``masks``: None when every response token is a target, else one
    list of bools per response (True: a target, the assistant's tokens of a
    multi-turn conversation).
    """

    record: Record
    prompt_ids: List[int]
    responses: List[List[int]]
    masks: Optional[List[List[bool]]] = None


def _response_texts(record: Record) -> List[Text]:
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
    """Tokenise any record (see :class:`Encoded` for the responses' order):
    string records as :func:`encode_pair`, conversations by
    :func:`encode_conversation` (the masks mark their assistant turns),
    plain text as ``<bos>`` + text + ``<eos>`` with every token after
    ``<bos>`` a target."""
    texts = _response_texts(record)
    if record.prompt is None:
        prompt_ids, response = _encode_text(tokenizer, texts[0])
        return Encoded(record, prompt_ids, [response])
    if not isinstance(record.prompt, list):
        return Encoded(record, encode_prompt(tokenizer, record.prompt),
                       [_encode_response(tokenizer, text) for text in texts])
    if not texts:
        return Encoded(record, encode_prompt(tokenizer, record.prompt), [])
    turns = [_encode_turns(tokenizer, record.prompt, text) for text in texts]
    masks = [mask for _, _, mask in turns]
    return Encoded(record, turns[0][0], [ids for _, ids, _ in turns],
                   None if all(all(mask) for mask in masks) else masks)


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
        masks = None if example.masks is None else [
            list(mask[:len(response)]) for mask, response in zip(example.masks, responses)]
        kept.append(Encoded(example.record, prompt_ids, responses, masks))
    if examples and not kept:
        raise LengthPolicyError(len(examples), max_length, option_prefix)
    return kept, LengthReport(kept=len(kept), truncated=truncated, dropped=len(examples) - len(kept))
