"""JSONL records, their errors (file, line, field), tokenisation, the length
policy and ranking expansion."""
import json
import os

import pytest

from rlhf_engine.pipeline import data
from rlhf_engine.pipeline.data import (Comparison, DataError, Demonstration, Encoded, LengthReport, Prompt,
                                       Ranking)


def _byte_tokenizer(bos=True, eos=True):
    """A byte-level BPE tokenizer without merges: one token per UTF-8 byte,
    plus <pad>, <bos>, <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<pad>", "<bos>", "<eos>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>" if bos else None,
                                   eos_token="<eos>" if eos else None)


@pytest.fixture(scope="module")
def tokenizer():
    return _byte_tokenizer()


def _write(tmp_path, content, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# -- errors --------------------------------------------------------------------

GOOD_DEMO = '{"prompt": "p", "response": "r"}'

# (kind, file content, line, field, words of the problem)
ERRORS = [
    ("demonstrations", GOOD_DEMO + '\n{"prompt": "p", "response": \n', 2, None, "invalid JSON"),
    ("demonstrations", '[1, 2]\n', 1, None, "expected a JSON object, got a list"),
    ("demonstrations", GOOD_DEMO + '\n"text"\n', 2, None, "expected a JSON object, got a string"),
    ("demonstrations", GOOD_DEMO + '\n\n{"prompt": "p"}\n', 3, "response", "is missing"),
    ("demonstrations", '{"response": "r"}', 1, "prompt", "is missing"),
    ("demonstrations", '{"prompt": 3, "response": "r"}', 1, "prompt", "expected a string, got a number"),
    ("demonstrations", '{"prompt": "p", "response": null}', 1, "response", "expected a string, got null"),
    ("demonstrations", '{"prompt": "p", "response": ["r"]}', 1, "response", "expected a string, got a list"),
    ("demonstrations", '{"prompt": " \\t", "response": "r"}', 1, "prompt", "is empty"),
    ("demonstrations", GOOD_DEMO + '\n{"prompt": "p", "response": "\\n "}', 2, "response", "is empty"),
    ("comparisons", '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                    '{"prompt": "p", "chosen": "a", "rejected": " a\\n"}', 2, "rejected", "identical to 'chosen'"),
    ("comparisons", '{"prompt": "p", "chosen": "", "rejected": "b"}', 1, "chosen", "is empty"),
    ("comparisons", '{"prompt": "p", "chosen": "a"}', 1, "rejected", "is missing"),
    ("comparisons", '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', 1, "margin", "finite"),
    ("comparisons", '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -Infinity}', 1, "margin", "finite"),
    ("comparisons", '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "1"}', 1, "margin",
     "expected a number, got a string"),
    ("comparisons", '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": true}', 1, "margin",
     "expected a number, got a boolean"),
    ("rankings", '{"prompt": "p", "responses": ["a", "b", " a"]}', 1, "responses[2]", "duplicates responses[0]"),
    ("rankings", '{"prompt": "p", "responses": ["a"]}', 1, "responses", "at least 2 responses, got 1"),
    ("rankings", '{"prompt": "p", "responses": []}', 1, "responses", "at least 2 responses, got 0"),
    ("rankings", '{"prompt": "p", "responses": "ab"}', 1, "responses", "expected a list of strings, got a string"),
    ("rankings", '{"prompt": "p", "responses": ["a", 1]}', 1, "responses[1]", "expected a string, got a number"),
    ("rankings", '{"prompt": "p", "responses": ["a", " "]}', 1, "responses[1]", "is empty"),
    ("rankings", '{"prompt": "p", "responses": null}', 1, "responses", "got null"),
    ("prompts", '{"prompt": "p"}\n{"text": "p"}', 2, "prompt", "is missing"),
    ("prompts", '{"prompt": "p"}\n{"prompt": ""}', 2, "prompt", "is empty"),
]


@pytest.mark.parametrize("kind,content,line,field,problem", ERRORS)
def test_errors_name_file_line_and_field(tmp_path, kind, content, line, field, problem):
    path = _write(tmp_path, content)
    with pytest.raises(DataError) as info:
        data.read_jsonl(path, kind)
    error = info.value
    message = str(error)
    assert isinstance(error, ValueError)
    assert (error.path, error.line, error.field) == (str(path), line, field)
    assert str(path) in message and f"line {line}" in message and problem in message
    if field is None:
        assert "field" not in message
    else:
        assert f"field '{field}'" in message
    assert error.__cause__ is None and error.__suppress_context__


def test_invalid_utf8_names_the_line(tmp_path):
    path = _write(tmp_path, GOOD_DEMO.encode() + b'\n{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8") as info:
        data.read_jsonl(path, "demonstrations")
    assert str(path) in str(info.value) and info.value.line == 2


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_file_names_the_file(tmp_path, content):
    path = _write(tmp_path, content)
    with pytest.raises(DataError) as info:
        data.read_jsonl(path, "prompts")
    assert str(info.value) == f"{path}: holds no prompts (the file is empty)"
    assert (info.value.line, info.value.field) == (None, None)


def test_missing_file_is_a_data_error(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match="cannot read") as info:
        data.read_jsonl(path, "prompts")
    assert str(path) in str(info.value)


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        data.read_jsonl("x.jsonl", "pairs")


def test_records_built_in_code_validate_too():
    with pytest.raises(DataError, match="^field 'rejected': is identical to 'chosen'$"):
        Comparison("p", "a", "a")
    with pytest.raises(DataError, match=r"^field 'responses\[1\]': duplicates responses\[0\]$"):
        Ranking("p", ["a", "a"])
    with pytest.raises(DataError, match="^field 'response': is empty$"):
        Demonstration("p", "")


# -- reading and writing ---------------------------------------------------------

def test_read_every_kind(tmp_path):
    lines = {
        "demonstrations": ['{"prompt": "p1", "response": " r1 ", "id": 7}', '', GOOD_DEMO],
        "comparisons": ['{"prompt": "p", "chosen": "a", "rejected": "b"}',
                        '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}',
                        '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -0.5}',
                        '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": null}'],
        "rankings": ['{"prompt": "p", "responses": ["a", "b", "c"]}'],
        "prompts": ['{"prompt": "é ü"}'],
    }
    expected = {
        "demonstrations": [Demonstration("p1", " r1 "), Demonstration("p", "r")],
        "comparisons": [Comparison("p", "a", "b"), Comparison("p", "a", "b", 2), Comparison("p", "a", "b", -0.5),
                        Comparison("p", "a", "b")],
        "rankings": [Ranking("p", ["a", "b", "c"])],
        "prompts": [Prompt("é ü")],
    }
    for kind, kind_lines in lines.items():
        path = _write(tmp_path, "\n".join(kind_lines) + "\n", name=f"{kind}.jsonl")
        assert data.read_jsonl(path, kind) == expected[kind]


def test_read_skips_a_byte_order_mark_and_crlf(tmp_path):
    path = _write(tmp_path, b"\xef\xbb\xbf" + GOOD_DEMO.encode() + b"\r\n" + GOOD_DEMO.encode() + b"\r\n")
    assert data.read_jsonl(path, "demonstrations") == [Demonstration("p", "r")] * 2


def test_write_then_read_round_trips(tmp_path):
    records = [Comparison("p", "a", "b"), Comparison("q\n", "ü", "b", margin=1.5)]
    path = tmp_path / "sub" / "c.jsonl"
    data.write_jsonl(path, records)
    assert data.read_jsonl(path, "comparisons") == records
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert json.loads(lines[1])["margin"] == 1.5 and "ü" in lines[1]
    assert os.listdir(path.parent) == ["c.jsonl"]


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD_DEMO + "\n")
    calls = []

    def failing_dumps(obj, **kwargs):
        calls.append(obj)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return json.JSONEncoder(**kwargs).encode(obj)

    monkeypatch.setattr(data.json, "dumps", failing_dumps)
    with pytest.raises(RuntimeError, match="disk full"):
        data.write_jsonl(path, [Demonstration("a", "b"), Demonstration("c", "d")])
    assert path.read_text() == GOOD_DEMO + "\n"
    assert os.listdir(tmp_path) == ["d.jsonl"]


def test_write_rejects_empty_and_mixed(tmp_path):
    with pytest.raises(ValueError, match="records is empty"):
        data.write_jsonl(tmp_path / "x.jsonl", [])
    with pytest.raises(ValueError, match="records must all be one of"):
        data.write_jsonl(tmp_path / "x.jsonl", [Prompt("a"), Demonstration("a", "b")])
    assert not (tmp_path / "x.jsonl").exists()


# -- ranking expansion ------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 5])
def test_expand_ranking_gives_every_ordered_pair(k):
    responses = [f"r{i}" for i in range(k)]
    pairs = data.expand_ranking(Ranking("p", responses))
    assert len(pairs) == k * (k - 1) // 2
    assert [(c.chosen, c.rejected) for c in pairs] == [
        (responses[i], responses[j]) for i in range(k) for j in range(k) if i < j]
    assert all(c.prompt == "p" and c.margin is None for c in pairs)


def test_expand_ranking_order_for_three():
    assert data.expand_ranking(Ranking("p", ["best", "mid", "worst"])) == [
        Comparison("p", "best", "mid"), Comparison("p", "best", "worst"), Comparison("p", "mid", "worst")]


# -- tokenisation ----------------------------------------------------------------

def _text(tokenizer, ids):
    return "".join(tokenizer.convert_ids_to_tokens(ids)).replace("Ċ", "\n").replace("Ġ", " ")


def test_plain_prompt_format(tokenizer):
    ids = data.encode_prompt(tokenizer, "reverse: abc")
    assert ids[0] == tokenizer.bos_token_id
    assert _text(tokenizer, ids) == "<bos>reverse: abc\nAnswer:\n"
    assert len(ids) == 1 + len("reverse: abc") + len(data.PLAIN_SEPARATOR)


def test_plain_prompt_without_bos():
    tokenizer = _byte_tokenizer(bos=False)
    assert _text(tokenizer, data.encode_prompt(tokenizer, "hi")) == "hi\nAnswer:\n"


def test_chat_template_prompt_format():
    tokenizer = _byte_tokenizer()
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    ids = data.encode_prompt(tokenizer, "sort: cab")
    assert _text(tokenizer, ids) == "<bos>[user]sort: cab[assistant]"
    assert ids.count(tokenizer.bos_token_id) == 1


def test_encode_pair_appends_eos(tokenizer):
    prompt_ids, response_ids = data.encode_pair(tokenizer, "reverse: abc", "cba")
    assert prompt_ids == data.encode_prompt(tokenizer, "reverse: abc")
    assert response_ids[-1] == tokenizer.eos_token_id
    assert _text(tokenizer, response_ids) == "cba<eos>"
    with pytest.raises(ValueError, match="eos_token_id"):
        data.encode_pair(_byte_tokenizer(eos=False), "p", "r")


def test_encode_record_orders_responses(tokenizer):
    def texts(record):
        return [_text(tokenizer, ids) for ids in data.encode_record(tokenizer, record).responses]

    assert texts(Demonstration("p", "r")) == ["r<eos>"]
    assert texts(Comparison("p", "good", "bad")) == ["good<eos>", "bad<eos>"]
    assert texts(Ranking("p", ["1st", "2nd", "3rd"])) == ["1st<eos>", "2nd<eos>", "3rd<eos>"]
    assert texts(Prompt("p")) == []
    encoded = data.encode_record(tokenizer, Prompt("p"))
    assert encoded.record == Prompt("p") and encoded.prompt_ids == data.encode_prompt(tokenizer, "p")


# -- over-long samples -----------------------------------------------------------

def _ids(n, start=0):
    return list(range(start, start + n))


@pytest.mark.parametrize("prompt_len,response_len,max_length,kept_prompt,kept_response", [
    (3, 4, 7, 3, 4),     # fits exactly: unchanged
    (3, 10, 8, 3, 5),    # long response: cut at its end
    (10, 3, 8, 5, 3),    # long prompt: keeps its last tokens
    (10, 10, 8, 4, 4),   # both long: half each
    (10, 10, 9, 5, 4),
    (5, 5, 2, 1, 1),     # the smallest budget keeps a token of each
])
def test_fit_length_truncate(prompt_len, response_len, max_length, kept_prompt, kept_response):
    prompt, response = _ids(prompt_len), _ids(response_len, 100)
    fitted_prompt, fitted_response = data.fit_length(prompt, response, max_length, "truncate")
    assert fitted_prompt == prompt[prompt_len - kept_prompt:]
    assert fitted_response == response[:kept_response]


def test_fit_length_truncate_invariants():
    for max_length in range(2, 14):
        for prompt_len in range(1, 14):
            for response_len in range(1, 14):
                prompt, response = _ids(prompt_len), _ids(response_len, 100)
                p, r = data.fit_length(prompt, response, max_length, "truncate")
                assert 1 <= len(p) and 1 <= len(r) and len(p) + len(r) <= max_length
                assert p == prompt[len(prompt) - len(p):] and r == response[:len(r)]
                if prompt_len + response_len <= max_length:
                    assert (p, r) == (prompt, response)
                else:
                    assert len(p) + len(r) == max_length


def test_fit_length_drop():
    assert data.fit_length(_ids(3), _ids(4), 7, "drop") == (_ids(3), _ids(4))
    assert data.fit_length(_ids(3), _ids(5), 7, "drop") is None


def test_fit_group_shares_the_prompt_cut():
    prompt, short, long = _ids(6), _ids(3, 100), _ids(9, 200)
    fitted_prompt, (fitted_short, fitted_long) = data.fit_group(prompt, [short, long], 10, "truncate")
    assert fitted_long == long[:5] and fitted_short == short and fitted_prompt == prompt[1:]
    assert data.fit_group(prompt, [short, long], 10, "drop") is None
    assert data.fit_group(_ids(12), [], 8, "truncate") == (_ids(12)[4:], [])
    assert data.fit_group(_ids(12), [], 8, "drop") is None


def test_fit_examples_counts():
    record = Prompt("p")
    examples = [Encoded(record, _ids(2), [_ids(3)]),       # fits
                Encoded(record, _ids(2), [_ids(9)]),       # response too long
                Encoded(record, _ids(9), [_ids(1)]),       # prompt too long
                Encoded(record, _ids(2), [_ids(2), _ids(8)])]  # one response of two too long
    kept, report = data.fit_examples(examples, 6, "truncate")
    assert report == LengthReport(kept=4, truncated=3, dropped=0)
    assert [len(e.prompt_ids) + max(map(len, e.responses)) for e in kept] == [5, 6, 6, 6]
    kept, report = data.fit_examples(examples, 6, "drop")
    assert report == LengthReport(kept=1, truncated=0, dropped=3)
    assert kept == examples[:1] and str(report) == "dropped 3 of 4, truncated 0"
    assert report.total == 4


@pytest.mark.parametrize("max_length,policy,match", [
    (1, "truncate", "max_length must be an int >= 2"),
    (8.0, "truncate", "max_length must be an int >= 2"),
    (8, "cut", "policy must be one of"),
])
def test_length_arguments_are_checked(max_length, policy, match):
    with pytest.raises(ValueError, match=match):
        data.fit_length(_ids(2), _ids(2), max_length, policy)
    with pytest.raises(ValueError, match=match):
        data.fit_examples([], max_length, policy)


def test_empty_ids_are_rejected():
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        data.fit_length([], _ids(2), 8, "truncate")
    with pytest.raises(ValueError, match="empty response"):
        data.fit_length(_ids(2), [], 8, "truncate")
