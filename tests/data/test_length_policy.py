"""data.too_long: records longer than max_seq_length are dropped, truncated or refused, always counted per split
(summary.json's data_length) and named in one warning line; a split left empty is one error line, never a
traceback, a "non-finite loss" or a silently missing eval_loss."""

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from fusetune.app.cli import run_or_exit
from fusetune.data import build_splits
from fusetune.errors import FusetuneError

from ..conftest import ROOT
from .conftest import trainer_on
from .test_formatters import data_cfg

LIMIT = 64
LONG = "word " * 90  # well over LIMIT tokens with the tiny tokenizer


def completions(count: int, long_every: int = 3, long_part: str = "prompt") -> list[dict]:
    """Every ``long_every``-th record (lines 3, 6, 9 ...) has a long prompt (or completion)."""
    rows = []
    for i in range(count):
        long = long_every and i % long_every == long_every - 1
        prompt = LONG if long and long_part == "prompt" else f"question {i}"
        answer = LONG if long and long_part == "completion" else f"answer {i}"
        rows.append({"prompt": prompt, "completion": answer})
    return rows


def texts(count: int, long_every: int) -> list[dict]:
    return [{"text": LONG if i % long_every == long_every - 1 else f"short text {i}"} for i in range(count)]


def chats(count: int, long_every: int) -> list[dict]:
    user = lambda i: LONG if i % long_every == long_every - 1 else f"hi {i}"  # noqa: E731
    return [
        {"messages": [{"role": "user", "content": user(i)}, {"role": "assistant", "content": f"yo {i}"}]}
        for i in range(count)
    ]


def alpacas(count: int, long_every: int) -> list[dict]:
    return [
        {"instruction": LONG if i % long_every == long_every - 1 else f"do {i}", "input": "", "output": str(i)}
        for i in range(count)
    ]


def counts(records: int, longer: int, dropped: int, truncated: int = 0) -> dict:
    return {"records": records, "longer": longer, "dropped": dropped, "truncated": truncated}


@dataclass(frozen=True)
class Case:
    id: str
    files: dict[str, list[dict]]  # written as JSON Lines into the case's folder
    data: dict  # data config; "{tmp}" in a path is the case's folder
    lengths: dict | None = None  # expected cache.lengths (None: an error is expected)
    warning: str = ""  # part of the one warning line ("{tmp}" as above)
    error: str = ""  # part of the one error line
    args: dict = field(default_factory=dict)  # FastSFTConfig options
    kept: int | None = None  # records the train split keeps (packed: the documents in its rows)


A = "{tmp}/a.jsonl"
CASES = [
    Case(
        "completion-prompt-fills-the-limit",
        {"a.jsonl": completions(48)},
        {"formatter": "completion", "path": A},
        {"train": counts(48, 16, 16)},
        "data: 16 of 48 train records are longer than max_seq_length=64 and were dropped (data.path {tmp}/a.jsonl: "
        "lines 3, 6, 9, 12, 15 and 11 more); data.too_long=truncate keeps their first 64 tokens",
        kept=32,
    ),
    Case(
        "packing",
        {"a.jsonl": completions(48)},
        {"formatter": "completion", "path": A},
        {"train": counts(48, 16, 16)},
        "16 of 48 train records are longer than max_seq_length=64 and were dropped",
        args={"packing": True},
        kept=32,
    ),
    Case(
        "padding-free",
        {"a.jsonl": completions(48)},
        {"formatter": "completion", "path": A},
        {"train": counts(48, 16, 16)},
        "16 of 48 train records are longer",
        args={"padding_free": True},
        kept=32,
    ),
    Case(
        "padded",
        {"a.jsonl": completions(12, long_every=4)},
        {"formatter": "completion", "path": A},
        {"train": counts(12, 3, 3)},
        "(data.path {tmp}/a.jsonl: lines 4, 8, 12)",
        args={"padding_free": False},
        kept=9,
    ),
    Case(
        "truncate-keeps-what-trains",
        {"a.jsonl": completions(12, long_every=4, long_part="completion")},
        {"formatter": "completion", "path": A, "too_long": "truncate"},
        {"train": counts(12, 3, 0, 3)},
        "3 of 12 train records are longer than max_seq_length=64 and were truncated to their first 64 tokens",
        kept=12,
    ),
    Case(
        "truncate-drops-what-would-train-on-nothing",
        {"a.jsonl": completions(12, long_every=4)},
        {"formatter": "completion", "path": A, "too_long": "truncate"},
        {"train": counts(12, 3, 3)},
        "3 of 12 train records are longer than max_seq_length=64 and were dropped (data.path {tmp}/a.jsonl: "
        "lines 4, 8, 12): none of their first 64 tokens is trained",
        kept=9,
    ),
    Case(
        "truncate-packed-text",
        {"a.jsonl": texts(10, long_every=5)},
        {"formatter": "text", "path": A, "too_long": "truncate"},
        {"train": counts(10, 2, 0, 2)},
        "2 of 10 train records are longer than max_seq_length=64 and were truncated",
        args={"packing": True},
        kept=10,
    ),
    Case(
        "text",
        {"a.jsonl": texts(10, long_every=5)},
        {"formatter": "text", "path": A},
        {"train": counts(10, 2, 2)},
        "lines 5, 10",
        kept=8,
    ),
    Case(
        "chat-assistant-only",
        {"a.jsonl": chats(9, long_every=3)},
        {"formatter": "chat", "path": A},
        {"train": counts(9, 3, 3)},
        "3 of 9 train records are longer",
        args={"assistant_only_loss": True},
        kept=6,
    ),
    Case(
        "alpaca-with-an-eval-file",
        {"a.jsonl": alpacas(16, long_every=2), "e.jsonl": alpacas(4, long_every=2)},
        {"formatter": "alpaca", "path": A, "eval_path": "{tmp}/e.jsonl"},
        {"train": counts(16, 8, 8), "eval": counts(4, 2, 2)},
        "8 of 16 train records are longer than max_seq_length=64 and were dropped (data.path {tmp}/a.jsonl: "
        "lines 2, 4, 6, 8, 10 and 3 more)",
        kept=8,
    ),
    Case(
        "mixture-counts-per-source",
        {"a.jsonl": completions(8, long_every=2), "b.jsonl": completions(8, long_every=0)},
        {
            "formatter": "mixture",
            "sources": [{"path": A, "formatter": "completion"}, {"path": "{tmp}/b.jsonl", "formatter": "completion"}],
        },
        None,
        "train records are longer than max_seq_length=64 and were dropped (data.sources.0.path",
    ),
    Case(
        "error-names-the-first",
        {"a.jsonl": completions(48)},
        {"formatter": "completion", "path": A, "too_long": "error"},
        error="data.too_long=error: train record data.path {tmp}/a.jsonl: line 3 is longer than max_seq_length=64 "
        "tokens (16 of 48 train records are); data.too_long=drop drops them, truncate keeps their first 64 tokens",
    ),
    Case(
        "every-record-too-long",
        {"a.jsonl": completions(6, long_every=1)},
        {"formatter": "completion", "path": A},
        error="data: all 6 train records are longer than max_seq_length=64 and were dropped (data.too_long=drop), "
        "so nothing is left to train on: raise model.max_seq_length, or shorten the records",
    ),
    Case(
        "every-record-too-long-packed",
        {"a.jsonl": completions(6, long_every=1)},
        {"formatter": "completion", "path": A, "too_long": "truncate"},
        error="data: all 6 train records have no trained token in their first 64 tokens (data.too_long=truncate), "
        "so nothing is left to train on",
        args={"packing": True},
    ),
    Case(
        "eval-split-emptied",
        {"a.jsonl": completions(8, long_every=0), "e.jsonl": completions(3, long_every=1)},
        {"formatter": "completion", "path": A, "eval_path": "{tmp}/e.jsonl"},
        error="data: all 3 eval records are longer than max_seq_length=64 and were dropped (data.too_long=drop), "
        "so nothing is left in the eval split",
    ),
]


def _write(tmp_path, files: dict[str, list[dict]]) -> None:
    for name, rows in files.items():
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def _fill(value, tmp_path):
    if isinstance(value, str):
        return value.format(tmp=tmp_path)
    if isinstance(value, list):
        return [_fill(v, tmp_path) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, tmp_path) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_too_long_records_are_counted_and_named(case, tiny_model, tiny_tokenizer, tmp_path, caplog):
    _write(tmp_path, case.files)
    cfg = data_cfg(**_fill(case.data, tmp_path), cache=False)
    splits = build_splits(cfg, tiny_tokenizer, 0, assistant_only_loss=case.args.get("assistant_only_loss", False))
    caplog.set_level(logging.WARNING, logger="fusetune.data.lengths")

    def prepare():
        return trainer_on(splits, tiny_model, tiny_tokenizer, tmp_path, max_length=LIMIT, **case.args)

    if case.error:
        with pytest.raises(FusetuneError) as raised:
            prepare()
        assert case.error.format(tmp=tmp_path) in str(raised.value)
        assert "\n" not in str(raised.value)
        return
    trainer = prepare()
    lines = [r.getMessage() for r in caplog.records if r.name == "fusetune.data.lengths"]
    assert case.warning.format(tmp=tmp_path) in lines[0], lines
    assert len(lines) == len(splits.cache.lengths), lines  # one line per split
    if case.lengths is not None:
        assert splits.cache.lengths == case.lengths
    train = trainer.train_dataset
    if "seq_lengths" in train.column_names:  # packed rows: count the documents in them
        assert sum(len(row) for row in train["seq_lengths"]) == case.kept
    elif case.kept is not None:
        assert len(train) == case.kept
    assert all(len(row) <= LIMIT for row in train["input_ids"])
    assert all(any(label != -100 for label in row) for row in train["labels"])


def test_a_mixture_counts_each_source(tiny_model, tiny_tokenizer, tmp_path):
    """Per source: only the source with long records loses any, and the draws add up."""
    _write(tmp_path, {"a.jsonl": completions(8, long_every=2), "b.jsonl": completions(8, long_every=0)})
    sources = [{"path": str(tmp_path / n), "formatter": "completion"} for n in ("a.jsonl", "b.jsonl")]
    splits = build_splits(
        data_cfg(formatter="mixture", sources=sources, mixture_size=40, cache=False), tiny_tokenizer, 0
    )
    trainer = trainer_on(splits, tiny_model, tiny_tokenizer, tmp_path, max_length=LIMIT)
    train = splits.cache.lengths["train"]
    a, b = (train["sources"][f"data.sources.{n}.path {s['path']}"] for n, s in enumerate(sources))
    assert a["records"] + b["records"] == train["records"] == 40
    assert b["longer"] == b["dropped"] == 0 and a["dropped"] == a["longer"] == train["dropped"] > 0
    assert len(trainer.train_dataset) == 40 - train["dropped"]


def run_files(tmp_path) -> list[str]:
    _write(tmp_path, {"a.jsonl": completions(48), "e.jsonl": completions(6, long_every=2)})
    return [
        "logger=none",
        "trainer.max_steps=2",
        "data=completion",
        f"data.path={tmp_path / 'a.jsonl'}",
        f"data.eval_path={tmp_path / 'e.jsonl'}",
        "data.num_generate=0",
        f"model.max_seq_length={LIMIT}",
        "trainer.eval_strategy=steps",
        "trainer.eval_steps=2",
    ]


def test_the_summary_counts_each_split(tmp_path, compose_cfg):
    from fusetune.app.run import run

    summary = run(compose_cfg(run_files(tmp_path), output_dir=tmp_path / "run"))
    assert summary["data_length"] == {"train": counts(48, 16, 16), "eval": counts(6, 3, 3)}
    assert "eval_loss" in summary["eval"]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["data_length"] == summary["data_length"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.too_long=error"], "data.too_long=error: train record data.path {tmp}/a.jsonl: line 3 is longer"),
        (["model.max_seq_length=8", "trainer=packing"], "data: all 48 train records are longer than max_seq_length"),
    ],
    ids=["error", "packing-all-too-long"],
)
def test_the_app_exits_2_with_one_line(overrides, message, tmp_path, compose_cfg, capsys):
    with pytest.raises(SystemExit) as exited:
        run_or_exit(compose_cfg([*run_files(tmp_path), *overrides], output_dir=tmp_path / "run"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fusetune: error:")]
    assert exited.value.code == 2 and len(lines) == 1, err[-2000:]
    assert message.format(tmp=tmp_path) in lines[0]
    assert "non-finite" not in err and "Traceback" not in err


def test_train_py_every_record_too_long_is_one_line(tmp_path):
    """The real command line: exit 2, one line, and the run recorded as failed with that line."""
    overrides = [*run_files(tmp_path), "model.max_seq_length=8", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith("fusetune: error: data: all 48 train records are longer")
    assert "Traceback" not in proc.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "all 48 train records" in status["error"]
