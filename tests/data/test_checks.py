"""Every record is checked: a bad one ends the run saying where and what; an empty one follows data.empty_content."""

import json
import logging
import time

import pytest
from datasets import Dataset

from fusetune.data import build_splits, load_local
from fusetune.data.checks import DatasetOrigin, find_problems
from fusetune.data.formatters import FORMATTERS, Empty
from fusetune.errors import FusetuneError

from .test_formatters import data_cfg, write

TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
SHARE = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
GOOD = {"instruction": "Double it", "input": "3", "output": "6"}

# (formatter, record, expected): None for a good record, Empty(...) for an empty one, else part of the problem
CASES = [
    ("chat", {"messages": TURNS}, None),
    ("chat", {"messages": [{"role": "system", "content": ""}, *TURNS]}, None),  # an empty system prompt is allowed
    ("chat", {"messages": [*TURNS, {"role": "user", "content": "and?"}]}, None),  # ending on a user turn is allowed
    ("chat", {"messages": [{"role": "user", "content": "hi", "name": None}, TURNS[1]]}, None),  # other keys: ignored
    ("chat", {}, "'messages' is missing or null"),
    ("chat", {"messages": "hi"}, "'messages' must be a list, got a string"),
    ("chat", {"messages": []}, "'messages' is empty"),
    ("chat", {"messages": ["hi"]}, "message 1 must be an object with 'role' and 'content', got a string"),
    ("chat", {"messages": SHARE}, "message 1 has 'from'/'value' keys, not 'role'/'content': use data=sharegpt"),
    ("chat", {"messages": [{"content": "hi"}, TURNS[1]]}, "message 1 has no 'role'"),
    ("chat", {"messages": [TURNS[0], {"role": "bot", "content": "x"}]}, "message 2 has role 'bot', not one of system"),
    ("chat", {"messages": [{"role": "human", "content": "x"}, TURNS[1]]}, "message 1 has role 'human', not one of"),
    ("chat", {"messages": [*TURNS, {"role": "tool", "content": "42"}]}, "message 3: tool turns are not supported"),
    (
        "chat",
        {"messages": [TURNS[0], {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]},
        "message 2: tool calls are not supported",
    ),
    ("chat", {"messages": [{"role": "user", "content": None}, TURNS[1]]}, "message 1 (user) has no 'content'"),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, TURNS[1]]},
        "message 1 (user) 'content' must be a string, got a list",
    ),
    ("chat", {"messages": [TURNS[0]]}, "no assistant message (nothing to train on)"),
    ("chat", {"messages": [{"role": "system", "content": "s"}, TURNS[0]]}, "no assistant message"),
    ("chat", {"messages": [{"role": "user", "content": " \n"}, TURNS[1]]}, Empty("message 1 (user) is empty")),
    ("chat", {"messages": [TURNS[0], {"role": "assistant", "content": ""}]}, Empty("message 2 (assistant) is empty")),
    ("chat", {"messages": [{"role": "user", "content": ""}, {"role": "bot", "content": "x"}]}, "has role 'bot'"),
    ("sharegpt", {"conversations": [{"from": "system", "value": "be brief"}, *SHARE]}, None),
    ("sharegpt", {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}, None),
    ("sharegpt", {"conversations": TURNS}, "message 1 has 'role'/'content' keys, not 'from'/'value': use data=chat"),
    ("sharegpt", {"conversations": [{"from": "robot", "value": "x"}]}, "message 1 has from 'robot', not one of system"),
    ("sharegpt", {"conversations": [SHARE[0]]}, "no assistant message"),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": 3}, SHARE[1]]},
        "'value' must be a string, got a number",
    ),
    ("sharegpt", {"conversations": [SHARE[0], {"from": "gpt", "value": ""}]}, Empty("message 2 (gpt) is empty")),
    ("sharegpt", {"conversations": []}, "'conversations' is empty"),
    ("sharegpt", {"conversations": None}, "'conversations' is missing or null"),
    ("alpaca", GOOD, None),
    ("alpaca", {"instruction": "i", "output": "o"}, None),  # no input column
    ("alpaca", {"instruction": "i", "input": None, "output": "o"}, None),
    ("alpaca", {"instruction": "i", "input": "", "output": "o"}, None),
    ("alpaca", {"instruction": "i"}, "'output' is missing or null"),
    ("alpaca", {"instruction": "i", "output": None}, "'output' is missing or null"),
    ("alpaca", {"output": "o"}, "'instruction' is missing or null"),
    ("alpaca", {"instruction": "i", "output": 6}, "'output' must be a string, got a number"),
    ("alpaca", {"instruction": ["i"], "output": "o"}, "'instruction' must be a string, got a list"),
    ("alpaca", {"instruction": "i", "input": {"a": 1}, "output": "o"}, "'input' must be a string, got an object"),
    ("alpaca", {"instruction": "i", "output": ""}, Empty("empty 'output'")),
    ("alpaca", {"instruction": "  ", "output": "o"}, Empty("empty 'instruction'")),
    ("text", {"text": "words"}, None),
    ("text", {"text": None}, "'text' is missing or null"),
    ("text", {"text": 1.5}, "'text' must be a string, got a number"),
    ("text", {"text": ""}, Empty("empty 'text'")),
    ("completion", {"prompt": "p", "completion": "c"}, None),
    ("completion", {"prompt": "p"}, "'completion' is missing or null"),
    ("completion", {"prompt": [TURNS[0]], "completion": "c"}, "'prompt' must be a string, got a list"),
    ("completion", {"prompt": "p", "completion": True}, "'completion' must be a string, got true/false"),
    ("completion", {"prompt": "p", "completion": "\n"}, Empty("empty 'completion'")),
    ("completion", {"prompt": "", "completion": "c"}, Empty("empty 'prompt'")),
]


def check(formatter: str, record: dict, field: str | None = None):
    spec = FORMATTERS[formatter]
    names = spec.column_names(field)
    return spec.check(tuple(record.get(name) for name in names), names)


@pytest.mark.parametrize("formatter,record,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_formatter_checks_each_record(formatter, record, expected):
    found = check(formatter, record)
    if expected is None:
        assert found is None
    elif isinstance(expected, Empty):
        assert isinstance(found, Empty) and found == expected
    else:
        assert found is not None and not isinstance(found, Empty) and expected in found, found


def test_data_field_names_the_column_in_messages():
    assert check("text", {"body": ""}, field="body") == Empty("empty 'body'")
    assert check("chat", {"turns": []}, field="turns") == "'turns' is empty"


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def build(tokenizer, formatter, path, **values):
    return build_splits(data_cfg(formatter=formatter, path=str(path), **values), tokenizer, seed=0)


def test_every_kind_of_bad_record_is_shown_first_five_then_the_count(tiny_tokenizer, tmp_path):
    rows = [GOOD, {"instruction": "a"}, {"output": "b"}, GOOD, {"instruction": "c", "output": 1}]
    rows += [{"instruction": "d", "output": None}] * 5 + [GOOD, {"instruction": None, "output": "e"}]
    path = tmp_path / "alpaca.jsonl"
    path.write_text(jsonl(rows))
    with pytest.raises(FusetuneError) as caught:
        build(tiny_tokenizer, "alpaca", path)
    assert str(caught.value) == (
        f"data.path {path}: 9 bad records: line 2: 'output' is missing or null; "
        "line 6: 'output' is missing or null; line 7: 'output' is missing or null; "
        "line 8: 'output' is missing or null; line 9: 'output' is missing or null; (1 more); "
        "line 3: 'instruction' is missing or null; line 12: 'instruction' is missing or null; "
        "line 5: 'output' must be a string, got a number"
    )


def test_record_numbers_are_the_lines_of_a_jsonl_file_blank_lines_included(tiny_tokenizer, tmp_path):
    lines = [json.dumps(GOOD), "", json.dumps(GOOD), "   \t", json.dumps({"instruction": "x"}), "", ""]
    lines += [json.dumps(GOOD), json.dumps({"output": "y"})]
    path = tmp_path / "gaps.jsonl"
    path.write_text("\r\n".join(lines) + "\n")
    assert len(load_local(str(path))) == 5  # the loader skips blank lines, so record 3 is line 5
    with pytest.raises(FusetuneError, match=r"2 bad records: line 5: 'output' is missing or null; line 9: 'instruc"):
        build(tiny_tokenizer, "alpaca", path)


def test_json_arrays_and_csv_files_count_records(tiny_tokenizer, tmp_path):
    path = write(tmp_path / "a.json", [GOOD, GOOD, {"instruction": "x", "output": 7}])
    with pytest.raises(
        FusetuneError, match=r"a.json: 1 bad record: record 3: 'output' must be a string, got a number$"
    ):
        build(tiny_tokenizer, "alpaca", path)
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nDouble it,3,6\nSay nothing,,\n")
    with pytest.raises(FusetuneError, match=r"a.csv: 1 record with empty content .*: record 2: empty 'output'$"):
        build(tiny_tokenizer, "alpaca", path, empty_content="error")


def test_a_json_file_of_lines_counts_lines(tiny_tokenizer, tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(jsonl([{"text": "a"}]) + "\n" + jsonl([{"text": None}]))
    with pytest.raises(FusetuneError, match=r"1 bad record: line 3: 'text' is missing or null"):
        build(tiny_tokenizer, "text", path)


def test_records_that_span_lines_are_counted_as_records(tiny_tokenizer, tmp_path):
    path = tmp_path / "pretty.jsonl"
    path.write_text('{"text": "a",\n "source": "x"}\n{"text": null}\n')
    with pytest.raises(FusetuneError, match=r"1 bad record: record 2: 'text' is missing or null$"):
        build(tiny_tokenizer, "text", path)


def test_csv_cells_are_text_as_written(tiny_tokenizer, tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nPad it,7,007\nSay it,,NA\nAdd,1,3\n")
    splits = build(tiny_tokenizer, "alpaca", path, use_chat_template=False)
    assert splits.train["completion"] == ["007", "NA", "3"]
    assert "### Input:\n7\n\n" in splits.train[0]["prompt"] and "### Input" not in splits.train[1]["prompt"]


EMPTY_ROWS = [GOOD, {"instruction": "a", "output": ""}, GOOD | {"output": "12"}, {"instruction": "b", "output": " "}]


@pytest.mark.parametrize("choice", ["warn", "error", "drop"])
def test_empty_content_is_warned_refused_or_dropped(choice, tiny_tokenizer, tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    path.write_text(jsonl(EMPTY_ROWS))
    listed = "line 2: empty 'output'; line 4: empty 'output'"
    caplog.set_level(logging.WARNING, logger="fusetune.data")
    if choice == "error":
        with pytest.raises(FusetuneError) as caught:
            build(tiny_tokenizer, "alpaca", path, empty_content="error")
        assert str(caught.value) == (
            f"data.path {path}: 2 records with empty content "
            f"(data.empty_content=error; warn keeps them, drop removes them): {listed}"
        )
        return
    splits = build(tiny_tokenizer, "alpaca", path, empty_content=choice)
    answers = [turns[0]["content"] for turns in splits.train["completion"]]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if choice == "warn":
        assert answers == ["6", "", "12", " "]
        assert warning == (
            f"data.path {path}: 2 records with empty content, kept "
            f"(data.empty_content=warn; error refuses them, drop removes them): {listed}"
        )
    else:
        assert answers == ["6", "12"]
        assert (
            warning
            == f"data.path {path}: dropped 2 of 4 records with empty content (data.empty_content=drop): {listed}"
        )


def test_dropping_every_record_is_an_error(tiny_tokenizer, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(jsonl([{"text": ""}, {"text": "\n"}]))
    with pytest.raises(FusetuneError, match="all 2 records have empty content, none is left to train on: line 1"):
        build(tiny_tokenizer, "text", path, empty_content="drop")


def test_bad_records_win_over_empty_ones(tiny_tokenizer, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(jsonl([{"text": ""}, {"text": 3}]))
    with pytest.raises(FusetuneError, match=r": 1 bad record: line 2: 'text' must be a string, got a number$"):
        build(tiny_tokenizer, "text", path, empty_content="drop")


def test_the_eval_file_is_checked_and_named(tiny_tokenizer, tmp_path):
    train = write(tmp_path / "train.jsonl", [{"text": "a"}])
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(jsonl([{"text": "b"}, {"body": "c"}]))
    with pytest.raises(FusetuneError, match=rf"^data.eval_path {held_out}: 1 bad record: line 2: 'text' is missing"):
        build(tiny_tokenizer, "text", train, eval_path=str(held_out))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(FusetuneError, match="^data.eval_path .*empty.jsonl: the file is empty"):
        build(tiny_tokenizer, "text", train, eval_path=str(tmp_path / "empty.jsonl"))


def test_a_missing_column_names_the_columns_there_are(tiny_tokenizer, tmp_path):
    path = write(tmp_path / "s.jsonl", [{"conversations": SHARE}])
    with pytest.raises(FusetuneError) as caught:
        build(tiny_tokenizer, "chat", path)
    assert str(caught.value) == (
        f"data.path {path}: formatter 'chat' needs a 'messages' column; the data has ['conversations'] "
        "(ShareGPT 'conversations' of from/value: use data=sharegpt)"
    )


def test_mixed_types_in_a_column_name_the_records_as_written(tiny_tokenizer, tmp_path):
    """datasets decodes a mixed-type column from JSON text, so "1" would read as 1; the message must not say so."""
    path = tmp_path / "m.jsonl"
    path.write_text(jsonl([{"instruction": "a", "output": "1"}, {"instruction": "b", "output": 2}, GOOD]))
    with pytest.raises(FusetuneError, match=r": 1 bad record: line 2: 'output' must be a string, got a number$"):
        build(tiny_tokenizer, "alpaca", path)


LOAD_ERRORS = [
    ("empty.jsonl", "", "the file is empty (0 records)"),
    ("blank.jsonl", "\n  \n", "the file is empty (0 records)"),
    ("empty.json", "[]", "no records (0 records)"),
    ("header.csv", "text\n", "no records (0 records)"),
    (
        "broken.jsonl",
        '{"text": "a"}\n\n{"text": "b",\n{"text": "c"}\n',
        "cannot be read as JSON Lines: 1 bad line: line 3: not valid JSON "
        "(Expecting property name enclosed in double quotes at column 14)",
    ),
    ("list.jsonl", '{"text": "a"}\n["b"]\n', "cannot be read as JSON Lines: 1 bad line: line 2: not a JSON object"),
    ("broken.json", '[{"text": "a"},\n {"text": "b"},,\n]', "not valid JSON: Expecting value at line 2 column 16"),
    (
        "latin1.jsonl",
        b'{"text": "a"}\n{"text": "caf\xe9"}\n',
        "cannot be read as JSON Lines: 1 bad line: line 2: not UTF-8",
    ),
    ("ragged.csv", "text,b\n1,2\n3,4,5\n", "cannot be read as CSV: Error tokenizing data. C error: Expected 2 fields"),
    ("garbage.parquet", "not parquet", "cannot be read as Parquet: "),
]


@pytest.mark.parametrize("name,content,message", LOAD_ERRORS, ids=[row[0] for row in LOAD_ERRORS])
def test_files_that_cannot_be_loaded_say_why_in_one_line(name, content, message, tiny_tokenizer, tmp_path):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FusetuneError) as caught:
        build(tiny_tokenizer, "text", path)
    assert str(caught.value).startswith(f"data.path {path}: {message}") and "\n" not in str(caught.value)


def test_a_directory_is_not_a_data_file(tiny_tokenizer, tmp_path):
    (tmp_path / "train.jsonl").mkdir()
    with pytest.raises(FusetuneError, match="^data.path: .*train.jsonl is a directory; give one .jsonl/.json/"):
        build(tiny_tokenizer, "text", tmp_path / "train.jsonl")


def test_config_choices_the_data_cannot_honour(tiny_tokenizer, tmp_path):
    path = write(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(FusetuneError, match="data.field: formatter 'alpaca' reads the columns"):
        build(tiny_tokenizer, "alpaca", path, field="messages")
    with pytest.raises(FusetuneError, match="data.max_examples must be at least 1, got 0"):
        build(tiny_tokenizer, "alpaca", path, max_examples=0)
    with pytest.raises(FusetuneError, match="data.eval_fraction=0.5: "):
        build(tiny_tokenizer, "alpaca", path, eval_fraction=0.5)


def test_a_hub_dataset_is_named_with_its_split(tiny_tokenizer, monkeypatch):
    from datasets.exceptions import DatasetNotFoundError

    import fusetune.data.sources

    def not_found(name, subset=None, split=None):
        raise DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(fusetune.data.sources, "load_dataset", not_found)
    cfg = data_cfg(formatter="text", name="org/set", subset="en", split="test")
    with pytest.raises(
        FusetuneError, match=r"^data.name org/set \(subset en, split test\): cannot load: Dataset 'org/"
    ):
        build_splits(cfg, tiny_tokenizer, seed=0)
    monkeypatch.setattr(
        fusetune.data.sources, "load_dataset", lambda *a, **k: Dataset.from_list([{"text": "a"}, {"text": None}])
    )
    with pytest.raises(FusetuneError, match=r"^data.name org/set \(split train\): 1 bad record: record 2: 'text' is"):
        build_splits(data_cfg(formatter="text", name="org/set"), tiny_tokenizer, seed=0)


def test_checking_100k_records_takes_well_under_a_few_seconds():
    n = 100_000
    dataset = Dataset.from_dict(
        {
            "instruction": [f"Do task {i}" for i in range(n)],
            "input": ["" if i % 2 else f"context {i}" for i in range(n)],
            "output": [f"answer {i}" for i in range(n)],
        }
    )
    started = time.perf_counter()
    findings = find_problems(dataset, DatasetOrigin("data.path big.jsonl"), "alpaca", None)
    assert findings.bad_count == 0 and not findings.empty
    assert time.perf_counter() - started < 5.0  # about 0.3 s on one busy CPU core
