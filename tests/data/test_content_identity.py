"""A data file is known by its content: an edit that keeps the file's size and modification time is still read
and tokenized anew, through the datasets library's cache and fusetune's own, with the cache on and off."""

import json
import os
import time

import pytest

from fusetune.data import build_splits
from fusetune.data.files import content_hash

from .conftest import trainer_on
from .test_formatters import data_cfg


def write_keeping_stat(path, text: str) -> None:
    """Replace the file's text with text of the same size, then put its modification time back."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def rows(kind: str, word: str) -> str:
    records = {
        "completion": [{"prompt": f"say {i}", "completion": f"{word} {i}"} for i in range(6)],
        "text": [{"text": f"the {word} sat {i}"} for i in range(6)],
        "chat": [
            {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"{word} {i}"}]}
            for i in range(6)
        ],
    }[kind]
    return "".join(json.dumps(r) + "\n" for r in records)


def csv_rows(word: str) -> str:
    return "prompt,completion\n" + "".join(f"say {i},{word} {i}\n" for i in range(6))


def tokenized_text(cfg, model, tokenizer, tmp_path) -> tuple[str, dict]:
    """What the trainer would train on, decoded, and the cache's record."""
    splits = build_splits(cfg, tokenizer, 0)
    trainer = trainer_on(splits, model, tokenizer, tmp_path)
    text = " ".join(tokenizer.decode(ids) for ids in trainer.train_dataset["input_ids"])
    return text, splits.cache.summary()


CASES = [  # (formatter, file name, writer, cache on)
    ("completion", "d.jsonl", lambda w: rows("completion", w), True),
    ("completion", "d.jsonl", lambda w: rows("completion", w), False),
    ("text", "d.json", lambda w: json.dumps([json.loads(line) for line in rows("text", w).splitlines()]), True),
    ("chat", "d.jsonl", lambda w: rows("chat", w), False),
    ("completion", "d.csv", csv_rows, True),
]


@pytest.mark.parametrize(
    "formatter, name, write, cached", CASES, ids=[f"{c[0]}-{c[1]}-cache-{'on' if c[3] else 'off'}" for c in CASES]
)
def test_an_edit_that_keeps_size_and_mtime_is_read_anew(
    formatter, name, write, cached, tiny_model, tiny_tokenizer, tmp_path
):
    path = tmp_path / name
    path.write_text(write("cat"))
    cfg = data_cfg(formatter=formatter, path=str(path), cache=cached, cache_dir=str(tmp_path / "cache"))
    first, record = tokenized_text(cfg, tiny_model, tiny_tokenizer, tmp_path)
    assert "cat" in first and "dog" not in first
    write_keeping_stat(path, write("dog"))
    second, again = tokenized_text(cfg, tiny_model, tiny_tokenizer, tmp_path)
    assert "dog" in second and "cat" not in second
    assert again["hits"] == 0
    assert again["files"][0]["sha256"] != record["files"][0]["sha256"]
    write_keeping_stat(path, write("cat"))  # back to the first text: the first entry is the right one again
    third, back = tokenized_text(cfg, tiny_model, tiny_tokenizer, tmp_path)
    assert third == first and back["hits"] == (1 if cached else 0)


def test_an_eval_file_is_known_by_content_too(tiny_tokenizer, tmp_path):
    train, held = tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    train.write_text(rows("completion", "cat"))
    held.write_text(rows("completion", "cow"))
    cfg = data_cfg(formatter="completion", path=str(train), eval_path=str(held), cache=False)
    assert "cow 0" in build_splits(cfg, tiny_tokenizer, 0).eval[0]["completion"]
    write_keeping_stat(held, rows("completion", "pig"))
    assert "pig 0" in build_splits(cfg, tiny_tokenizer, 0).eval[0]["completion"]


def test_a_large_file_is_hashed_in_chunks_and_the_time_recorded(tiny_tokenizer, tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"prompt": "p" * 900, "completion": "c" * 100}) + "\n"
    with path.open("w") as f:
        for _ in range(8 * 1024):  # about 8 MB: eight chunks
            f.write(line)
    started = time.perf_counter()
    hashed = content_hash(path)
    assert hashed["bytes"] == path.stat().st_size > 4 * 2**20
    assert 0 < hashed["seconds"] <= time.perf_counter() - started
    cfg = data_cfg(formatter="completion", path=str(path), max_examples=4, cache=False)
    splits = build_splits(cfg, tiny_tokenizer, 0)
    [recorded] = splits.cache.summary()["files"]
    assert recorded["sha256"] == hashed["sha256"] and recorded["bytes"] == hashed["bytes"]
    assert recorded["seconds"] > 0
