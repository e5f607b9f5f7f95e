"""Data sources (rlhf_engine.pipeline.sources): every shape of TRL's dataset
formats and the project's own, in every container (JSONL, parquet, a
save_to_disk folder, CSV for the standard shapes), column mapping, splits,
and errors naming the source, the line or row and the field."""
import json

import pytest

from rlhf_engine.pipeline.data import Comparison, DataError, Demonstration, Prompt, Ranking
from rlhf_engine.pipeline.sources import implicit_prompt, load_records, parse_columns

datasets = pytest.importorskip("datasets")


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "be brief"}
TWO_TURNS = [SYSTEM, _user("hi"), _assistant("hello"), _user("and?"), _assistant("bye")]
HH_CHOSEN = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant: Yes, 4."
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant: Yes, 5."
HH_PROMPT = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant:"

# (kind, rows, expected records, standard: also as CSV)
SHAPES = {
    "sft-prompt-completion": ("demonstrations", [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}],
                              [Demonstration("p1", "c1"), Demonstration("p2", "c2")], True),
    "sft-prompt-response": ("demonstrations", [{"prompt": "p1", "response": "r1"}],
                            [Demonstration("p1", "r1")], True),
    "sft-text": ("demonstrations", [{"text": "some text"}], [Demonstration(None, "some text")], True),
    "sft-messages": ("demonstrations", [{"messages": TWO_TURNS}],
                     [Demonstration(TWO_TURNS[:2], TWO_TURNS[2:])], False),
    "sft-conversational-prompt-completion": (
        "demonstrations", [{"prompt": [_user("q")], "completion": [_assistant("a")]}],
        [Demonstration([_user("q")], [_assistant("a")])], False),
    "rm-explicit": ("comparisons", [{"prompt": "p", "chosen": "good", "rejected": "bad"}],
                    [Comparison("p", "good", "bad")], True),
    "rm-margin": ("comparisons", [{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 2.0}],
                  [Comparison("p", "good", "bad", 2.0)], True),
    "rm-conversational": ("comparisons", [{"prompt": [_user("q")], "chosen": [_assistant("good")],
                                           "rejected": [_assistant("bad")]}],
                          [Comparison([_user("q")], [_assistant("good")], [_assistant("bad")])], False),
    "rm-implicit-strings": ("comparisons", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}],
                            [Comparison(HH_PROMPT, " Yes, 4.", " Yes, 5.")], True),
    "rm-implicit-messages": ("comparisons", [{"chosen": TWO_TURNS, "rejected": TWO_TURNS[:4] + [_assistant("no")]}],
                             [Comparison(TWO_TURNS[:4], [_assistant("bye")], [_assistant("no")])], False),
    "rankings": ("rankings", [{"prompt": "p", "responses": ["a", "b", "c"]}], [Ranking("p", ["a", "b", "c"])], False),
    "prompts": ("prompts", [{"prompt": "p"}], [Prompt("p")], True),
    "prompts-conversational": ("prompts", [{"prompt": [SYSTEM, _user("q")]}], [Prompt([SYSTEM, _user("q")])], False),
    "prompts-from-messages": ("prompts", [{"messages": TWO_TURNS}], [Prompt(TWO_TURNS[:4])], False),
    "prompts-implicit": ("prompts", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], [Prompt(HH_PROMPT)], True),
}


def _write(tmp_path, container, rows, name="data"):
    """``rows`` as a source of ``container``; its path."""
    if container == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path
    keys = list(dict.fromkeys(key for row in rows for key in row))  # from_list takes the first row's keys only
    dataset = datasets.Dataset.from_list([{key: row.get(key) for key in keys} for row in rows])
    if container == "parquet":
        path = tmp_path / f"{name}.parquet"
        dataset.to_parquet(str(path))
    elif container == "csv":
        path = tmp_path / f"{name}.csv"
        dataset.to_csv(str(path), index=False)
    elif container == "folder":
        path = tmp_path / name
        dataset.save_to_disk(str(path))
    elif container == "dict-folder":
        path = tmp_path / name
        datasets.DatasetDict({"train": dataset}).save_to_disk(str(path))
    return path


CASES = [pytest.param(shape, container, id=f"{shape}-{container}")
         for shape, (_, _, _, standard) in SHAPES.items()
         for container in ("jsonl", "parquet", "folder", "dict-folder") + (("csv",) if standard else ())]


@pytest.mark.parametrize("shape,container", CASES)
def test_every_shape_in_every_container(tmp_path, shape, container):
    kind, rows, expected, _ = SHAPES[shape]
    assert load_records(_write(tmp_path, container, rows), kind) == expected


def test_shapes_mixed_in_one_dataset(tmp_path):
    """Columnar storage gives every row every column (None where it has none)."""
    rows = [{"messages": TWO_TURNS}, {"prompt": "p", "completion": "c"}, {"text": "t"}]
    expected = [Demonstration(TWO_TURNS[:2], TWO_TURNS[2:]), Demonstration("p", "c"), Demonstration(None, "t")]
    for container in ("jsonl", "parquet"):
        assert load_records(_write(tmp_path, container, rows), "demonstrations") == expected


def test_column_mapping(tmp_path):
    rows = [{"question": "q", "answer": "a", "prompt": "ignored"}]
    for container in ("jsonl", "parquet", "folder"):
        path = _write(tmp_path, container, rows, name=f"m-{container}")
        assert load_records(path, "demonstrations", columns="prompt=question,completion=answer") == \
            [Demonstration("q", "a")]
        assert load_records(path, "demonstrations", columns={"prompt": "question", "response": "answer"}) == \
            [Demonstration("q", "a")]
    prefs = _write(tmp_path, "parquet", [{"q": "p", "better": "x", "worse": "y"}], name="prefs")
    assert load_records(prefs, "comparisons", columns="prompt=q,chosen=better,rejected=worse") == \
        [Comparison("p", "x", "y")]
    # a name a kind does not read is ignored for it
    assert load_records(prefs, "prompts", columns="prompt=q,completion=nothing") == [Prompt("p")]


def test_unknown_column_names_the_columns_present(tmp_path):
    path = _write(tmp_path, "parquet", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        load_records(path, "demonstrations", columns="prompt=query,completion=answer")
    assert str(info.value) == f"{path}: --columns prompt=query: no column 'query' (its columns: question, answer)"
    # JSONL has no schema: the line without the column names it
    path = _write(tmp_path, "jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"line 1: holds none of the shapes of demonstrations.*question, answer"):
        load_records(path, "demonstrations", columns="prompt=query")


@pytest.mark.parametrize("text,problem", [("prompt", "is not NAME=COLUMN"), ("prompt=", "is not NAME=COLUMN"),
                                          ("question=q", "unknown name 'question'"),
                                          ("prompt=a,prompt=b", "'prompt' is mapped twice")])
def test_parse_columns_refuses(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_columns(text)


def test_parse_columns():
    assert parse_columns("") == {}
    assert parse_columns(" prompt = q , chosen=c ,") == {"prompt": "q", "chosen": "c"}


# -- errors: the source, the line or row, the field --------------------------------------------

ROW_ERRORS = [
    ("comparisons", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"}],
     "", "rejected", "is identical to 'chosen'"),
    ("comparisons", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "", "rejected": "b"}],
     "", "chosen", "is empty"),
    ("comparisons", [{"prompt": "p", "better": "a", "rejected": "b"}, {"prompt": "p", "better": " ", "rejected": "b"}],
     "chosen=better", "better", "is empty"),
    ("demonstrations", [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[:3] + [_user("more?")]}], "",
     "messages[3].role", "after the last assistant message"),
    ("demonstrations", [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[:2] + [_assistant(" ")]}], "",
     "messages[2].content", "is empty"),
    ("demonstrations", [{"messages": TWO_TURNS}, {"messages": [_user("q"), _user("r")]}], "",
     "messages", "no assistant message"),
    ("comparisons", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"chosen": "A: x", "rejected": "A: y"}], "",
     "rejected", "the prompt cannot be found"),
]


@pytest.mark.parametrize("kind,rows,columns,field,problem", ROW_ERRORS)
@pytest.mark.parametrize("container", ["jsonl", "parquet", "folder"])
def test_errors_name_the_row_and_field(tmp_path, kind, rows, columns, field, problem, container):
    path = _write(tmp_path, container, rows)
    with pytest.raises(DataError) as info:
        load_records(path, kind, columns=columns)
    error = info.value
    where = "line 2" if container == "jsonl" else "row 1"  # lines count from 1, rows from 0 (dataset[1])
    assert (error.path, error.field) == (str(path), field)
    assert (error.line, error.row) == ((2, None) if container == "jsonl" else (None, 1))
    assert str(error).startswith(f"{path}, {where}, field '{field}': ") and problem in str(error)


def test_no_shape_lists_the_fields(tmp_path):
    path = _write(tmp_path, "parquet", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        load_records(path, "demonstrations")
    assert str(info.value).startswith(f"{path}, row 0: holds none of the shapes of demonstrations: 'messages'; "
                                      f"'prompt' with 'completion' (or 'response'); 'text' (its fields: question, "
                                      f"answer; --columns")


def test_jsonl_keeps_the_line_numbers_and_todays_rules(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n\n{"prompt": "p", "response": ["r"]}\n')
    with pytest.raises(DataError) as info:
        load_records(path, "demonstrations")
    assert (info.value.line, info.value.field) == (3, "response")
    assert "expected a string, got a list" in str(info.value)


def test_splits(tmp_path):
    rows = [{"prompt": f"p{i}"} for i in range(4)]
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(folder))
    assert load_records(folder, "prompts", split="test") == [Prompt("p0")]
    with pytest.raises(DataError, match="holds several splits: choose one of test, train with --split"):
        load_records(folder, "prompts")
    with pytest.raises(DataError, match="has no split 'valid': choose one of test, train"):
        load_records(folder, "prompts", split="valid")
    single = _write(tmp_path, "folder", rows, name="single")
    with pytest.raises(DataError, match="is a Dataset folder .* --split test applies to a DatasetDict"):
        load_records(single, "prompts", split="test")
    for container in ("parquet", "jsonl"):  # a split expression of datasets; JSONL through datasets then
        path = _write(tmp_path, container, rows, name=f"s-{container}")
        assert load_records(path, "prompts", split="train[1:3]") == [Prompt("p1"), Prompt("p2")]
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p"}\n{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"row 1, field 'prompt': is empty"):
        load_records(path, "prompts", split="train")


def test_unreadable_sources(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_records(tmp_path / "absent.parquet", "prompts")
    with pytest.raises(DataError, match="cannot read"):
        load_records(tmp_path / "absent.jsonl", "prompts")
    with pytest.raises(DataError, match=r"unknown kind of source: expected a dataset folder \(save_to_disk\) or a "
                                        r"file ending in \.parquet, \.csv, \.json, \.jsonl"):
        load_records(tmp_path / "data.txt", "prompts")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is not a dataset folder"):
        load_records(tmp_path / "empty", "prompts")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: cannot load as parquet"):
        load_records(tmp_path / "broken.parquet", "prompts")


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": []}, features=datasets.Features({"prompt": datasets.Value("string")})) \
        .to_parquet(str(path))
    with pytest.raises(DataError, match=r"empty.parquet: cannot load as parquet \(ValueError: .* no data"):
        load_records(path, "prompts")  # datasets itself refuses an empty split, named by the file


# -- the implicit prompt --------------------------------------------------------------------------

def test_implicit_prompt_of_strings_ends_at_the_last_assistant_marker():
    # the shared start runs into the responses (" Yes, "): the prompt still ends at "Assistant:"
    assert implicit_prompt(HH_CHOSEN, HH_REJECTED) == (HH_PROMPT, " Yes, 4.", " Yes, 5.", 0)


def test_implicit_prompt_of_messages():
    other = TWO_TURNS[:4] + [_assistant("no")]
    assert implicit_prompt(TWO_TURNS, other) == (TWO_TURNS[:4], TWO_TURNS[4:], other[4:], 4)
    # they differ at a user turn: the prompt ends before the last assistant turn they both follow
    diverging = TWO_TURNS[:3] + [_user("why?"), _assistant("because")]
    assert implicit_prompt(TWO_TURNS, diverging) == (TWO_TURNS[:2], TWO_TURNS[2:], diverging[2:], 2)
    with pytest.raises(DataError, match="the prompt cannot be found"):
        implicit_prompt([_assistant("a")], [_assistant("b")])
