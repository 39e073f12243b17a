"""The tokenized cache: a second run with the same key reads what the first tokenized, and gets exactly the tokens,
labels and packed rows an uncached run gets from TRL; a change in any part of the key tokenizes again."""

import hashlib
import json
import logging
import os
import shutil

import pytest

from fusetune.data import DatasetCacheHook, build_splits
from fusetune.data.cache import KEY_FILE, default_cache_dir
from fusetune.loading import load_tokenizer
from fusetune.training.trainer import FastSFTConfig, FastSFTTrainer

from .test_formatters import data_cfg

# FastSFTTrainer takes dataset_cache= once the mixin is among its bases; until then the tests add it themselves.
Trainer = (
    FastSFTTrainer
    if issubclass(FastSFTTrainer, DatasetCacheHook)
    else type("CachingTrainer", (DatasetCacheHook, FastSFTTrainer), {})
)
TURNS = [{"role": "user", "content": "question {}"}, {"role": "assistant", "content": "answer {}"}]


def conversations(path, count: int, start: int = 0) -> str:
    rows = [{"messages": [{**t, "content": t["content"].format(i)} for t in TURNS]} for i in range(start, count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def alpaca(path, count: int) -> str:
    rows = [{"instruction": f"Double {i}", "input": "" if i % 2 else "now", "output": str(2 * i)} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def prepared(cfg, model, tokenizer, tmp_path, *, cached=True, seed=0, assistant_only_loss=False, **args):
    """What the trainer trains and evaluates on, as plain dicts, and the cache's record."""
    splits = build_splits(cfg, tokenizer, seed, assistant_only_loss=assistant_only_loss)
    config = FastSFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        report_to=[],
        use_cpu=True,
        seed=seed,
        assistant_only_loss=assistant_only_loss,
        **args,
    )
    trainer = Trainer(
        model=model,
        args=config,
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=tokenizer,
        dataset_cache=splits.cache if cached else None,
    )
    held_out = trainer.eval_dataset.to_dict() if trainer.eval_dataset is not None else None
    return (trainer.train_dataset.to_dict(), held_out), splits.cache.summary()


CASES = {
    "chat-assistant-only": ({"formatter": "chat"}, {"assistant_only_loss": True}),
    "alpaca-turns-packed": ({"formatter": "alpaca"}, {"packing": True, "max_length": 48}),
    # too_long=truncate is TRL's own truncation (the default, drop, removes the records that TRL would cut)
    "alpaca-text-truncated": (
        {"formatter": "alpaca", "use_chat_template": False, "too_long": "truncate"},
        {"max_length": 150},  # drops the records with an input (no answer token fits), truncates some others
    ),
    "alpaca-text-padded": ({"formatter": "alpaca", "use_chat_template": False}, {"padding_free": False}),
    "mixture-weighted": (
        {
            "formatter": "mixture",
            "sources": [
                {"path": "c.jsonl", "formatter": "chat", "weight": 3},
                {"path": "a.jsonl", "formatter": "alpaca"},
            ],
            "mixture_size": 40,
        },
        {"assistant_only_loss": True},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_second_run_reads_the_cache_and_trains_on_exactly_what_trl_makes(case, tiny_model, tiny_tokenizer, tmp_path):
    data, args = CASES[case]
    chat, instructions = conversations(tmp_path / "c.jsonl", 12), alpaca(tmp_path / "a.jsonl", 14)
    data = dict(data, cache_dir=str(tmp_path / "cache"), eval_fraction=0.25)
    if "sources" in data:
        data["sources"] = [{**s, "path": str(tmp_path / s["path"])} for s in data["sources"]]
    else:
        data["path"] = chat if data["formatter"] == "chat" else instructions
    cfg = data_cfg(**data)
    uncached, _ = prepared(cfg, tiny_model, tiny_tokenizer, tmp_path, cached=False, **args)
    first, record = prepared(cfg, tiny_model, tiny_tokenizer, tmp_path, **args)
    assert record["enabled"] and not record["used"] and record["hits"] == 0
    assert record["misses"] == len(cfg.sources or [cfg]) and all(entry["saved"] for entry in record["entries"])
    second, again = prepared(cfg, tiny_model, tiny_tokenizer, tmp_path, **args)
    assert again["used"] and again["misses"] == 0 and again["hits"] == record["misses"]
    assert [e["key"] for e in again["entries"]] == [e["key"] for e in record["entries"]]
    assert first == uncached and second == uncached  # input_ids, labels (the loss mask), seq_lengths, the text
    assert "labels" in uncached[0] and uncached[1] is not None


def test_what_does_not_change_the_tokens_reuses_them(tiny_model, tiny_tokenizer, tmp_path):
    """A sweep over seeds, mixture weights, hold-out, max length or packing tokenizes each source once."""
    sources = [
        {"path": conversations(tmp_path / "c.jsonl", 12), "formatter": "chat", "weight": 1},
        {"path": alpaca(tmp_path / "a.jsonl", 10), "formatter": "alpaca", "weight": 1},
    ]
    base = {"formatter": "mixture", "sources": sources, "cache_dir": str(tmp_path / "cache")}
    _, record = prepared(data_cfg(**base), tiny_model, tiny_tokenizer, tmp_path, assistant_only_loss=True)
    assert record["misses"] == 2
    for data, args in [
        ({}, {"seed": 7}),
        ({"sources": [{**sources[0], "weight": 0.2}, {**sources[1], "weight": 0.8}]}, {}),
        ({"mixture_size": 100, "eval_fraction": 0.2}, {}),
        ({}, {"max_length": 30}),
        ({}, {"packing": True, "max_length": 64}),
    ]:
        _, record = prepared(
            data_cfg(**{**base, **data}), tiny_model, tiny_tokenizer, tmp_path, **args, assistant_only_loss=True
        )
        assert record["hits"] == 2 and record["misses"] == 0, (data, args)


def test_a_change_in_any_part_of_the_key_tokenizes_again(tiny_model, tmp_path):
    tokenizer = load_tokenizer("fusetune:tiny_llama")
    path = alpaca(tmp_path / "a.jsonl", 6)
    base = {"formatter": "alpaca", "path": path, "cache_dir": str(tmp_path / "cache")}

    def key(tok=tokenizer, **changes):
        data = {
            k: v
            for k, v in changes.items()
            if k in base or k in ("use_chat_template", "max_examples", "empty_content", "chat_template")
        }
        args = {k: v for k, v in changes.items() if k not in data}
        _, record = prepared(data_cfg(**{**base, **data}), tiny_model, tok, tmp_path, **args)
        [entry] = record["entries"]
        return entry["key"], entry["hit"]

    first, hit = key()
    assert not hit and key() == (first, True)
    changed = {
        "formatting": key(use_chat_template=False),
        "max_examples": key(max_examples=3),
        "empty_content": key(empty_content="drop"),
        "chat template": key(chat_template="phi3", tok=load_tokenizer("fusetune:tiny_llama")),
        "completion_only_loss": key(completion_only_loss=False),
    }
    other = load_tokenizer("fusetune:tiny_llama")
    other.add_tokens(["<extra>"])
    changed["tokenizer vocabulary"] = key(tok=other)
    os.utime(path, ns=(1, 1))  # the same bytes, another modification time: the same records
    assert key() == (first, True)
    alpaca(tmp_path / "a.jsonl", 7)
    changed["file content"] = key()
    for part, (found, hit) in changed.items():
        assert not hit and found != first, part
    assert len({found for found, _ in changed.values()}) == len(changed)
    # chat records: the loss options of conversations, and the column they are read from
    chat = tmp_path / "c.jsonl"
    rows = [{"messages": [{**t, "content": t["content"].format(i)} for t in TURNS]} for i in range(4)]
    chat.write_text("".join(json.dumps({**row, "turns": row["messages"]}) + "\n" for row in rows))
    base = {"formatter": "chat", "path": str(chat), "cache_dir": str(tmp_path / "cache")}
    plain = prepared(data_cfg(**base), tiny_model, tokenizer, tmp_path)[1]["entries"][0]["key"]
    assistant = prepared(data_cfg(**base), tiny_model, tokenizer, tmp_path, assistant_only_loss=True)[1]
    field = prepared(data_cfg(**base, field="turns"), tiny_model, tokenizer, tmp_path)[1]
    assert not assistant["used"] and not field["used"]
    assert len({plain, assistant["entries"][0]["key"], field["entries"][0]["key"]}) == 3


def test_the_key_is_kept_next_to_the_records_and_a_damaged_entry_is_rebuilt(
    tiny_model, tiny_tokenizer, tmp_path, caplog
):
    path = alpaca(tmp_path / "a.jsonl", 6)
    cfg = data_cfg(formatter="alpaca", path=path, cache_dir=str(tmp_path / "cache"))
    (expected, _), record = prepared(cfg, tiny_model, tiny_tokenizer, tmp_path)
    folder = tmp_path / "cache" / record["entries"][0]["key"]
    key = json.loads((folder / KEY_FILE).read_text())
    assert key["records"]["path"] == str((tmp_path / "a.jsonl").resolve())
    assert key["records"]["size"] == os.path.getsize(path) and key["records"]["formatter"] == "alpaca"
    assert key["records"]["sha256"] == hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
    assert key["trainer"]["tokenizer"]["name"] == tiny_tokenizer.name_or_path
    assert {"trl", "transformers", "datasets"} <= set(key["trainer"]["versions"])
    for arrow in folder.glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    caplog.set_level(logging.WARNING, logger="fusetune.data.cache")
    (found, _), record = prepared(cfg, tiny_model, tiny_tokenizer, tmp_path)
    assert found == expected and not record["used"] and "is unreadable" in caplog.text
    (found, _), record = prepared(cfg, tiny_model, tiny_tokenizer, tmp_path)
    assert found == expected and record["used"]


def test_off_or_not_a_split_of_the_build_means_trls_own_preparation(tiny_model, tiny_tokenizer, tmp_path):
    path = alpaca(tmp_path / "a.jsonl", 6)
    cfg = data_cfg(formatter="alpaca", path=path, cache_dir=str(tmp_path / "cache"), cache=False)
    _, record = prepared(cfg, tiny_model, tiny_tokenizer, tmp_path)
    [hashed] = record.pop("files")
    assert hashed["source"] == f"data.path {path}" and hashed["bytes"] == os.path.getsize(path)
    assert record == {
        "enabled": False,
        "dir": str(tmp_path / "cache"),
        "used": False,
        "skipped": None,
        "hits": 0,
        "misses": 0,
        "entries": [],
    }
    assert not (tmp_path / "cache").exists()
    splits = build_splits(data_cfg(formatter="alpaca", path=path, cache_dir=str(tmp_path / "cache")), tiny_tokenizer, 0)
    config = FastSFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True)
    Trainer(
        model=tiny_model,
        args=config,
        train_dataset=splits.train.select(range(3)),
        processing_class=tiny_tokenizer,
        dataset_cache=splits.cache,
    )
    assert splits.cache.summary()["entries"] == [] and not (tmp_path / "cache").exists()


def test_the_default_folder_follows_fusetune_cache_dir_then_xdg_cache_home(monkeypatch, tmp_path):
    from fusetune.self_check import cache_path

    monkeypatch.setenv("FUSETUNE_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine" / "datasets"
    assert cache_path().parent == default_cache_dir().parent  # one root for the verdicts and the datasets
    monkeypatch.delenv("FUSETUNE_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "fusetune" / "datasets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(default_cache_dir()).endswith(os.path.join(".cache", "fusetune", "datasets"))
    shutil.rmtree(tmp_path, ignore_errors=True)
