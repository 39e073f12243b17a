"""Preference data in mixtures and the tokenized cache: pairs (trainer=dpo) and labelled answers (trainer=kto) from
several files drawn by weight; a second run reads what the first tokenized and gets exactly the rows TRL's own
preparation makes; sources of another kind, or a bad record, are refused in one line that names the source."""

import json
import random

import pytest
import torch

from fusetune.data import build_splits
from fusetune.errors import FusetuneError
from fusetune.loading import load_model, load_tokenizer
from fusetune.training.preference_trainer import FastDPOConfig, FastDPOTrainer
from fusetune.training.preference_variants import FastKTOConfig, FastKTOTrainer

from .test_formatters import data_cfg

TRAINERS = {"dpo": (FastDPOTrainer, FastDPOConfig), "kto": (FastKTOTrainer, FastKTOConfig)}


@pytest.fixture(scope="module")
def reference():
    """A second tiny Llama: TRL's DPO and KTO trainers refuse the policy itself as their reference."""
    torch.manual_seed(1)
    return load_model("fusetune:tiny_llama", torch.float32, random_init=True)


def write_records(path, kind: str, count: int, rng: random.Random, bad: dict | None = None) -> str:
    """``count`` random pairs (kind "preference") or labelled answers ("kto"), prompts starting with the file's
    name; ``bad``: {line number: record} written in place of those lines."""
    lines = []
    for n in range(1, count + 1):
        prompt = f"{path.stem} {rng.randint(0, 99)}="  # under 20 tokens; every third one over 30
        if n % 3 == 0:
            prompt = f"{path.stem} {rng.randint(0, 99)} plus {rng.randint(0, 99)} and then {rng.randint(0, 99)}="
        words = [" ".join(rng.choice("abcdefgh") * rng.randint(1, 3) for _ in range(rng.randint(1, 6))) for _ in "xy"]
        if kind == "preference":
            record = {"prompt": prompt, "chosen": words[0], "rejected": words[1] + " no"}
        else:
            record = {"prompt": prompt, "completion": words[0], "label": rng.random() < 0.5}
        lines.append(json.dumps((bad or {}).get(n, record)))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def built(cfg, trainer: str, models, tokenizer, tmp_path, *, cached=True, **args):
    """The DPO or KTO trainer over ``cfg``'s splits, and the splits."""
    splits = build_splits(cfg, tokenizer, 0)
    trainer_class, config_class = TRAINERS[trainer]
    config = config_class(
        output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, per_device_train_batch_size=4, **args
    )
    trainer = trainer_class(
        models[0],
        ref_model=models[1],
        args=config,
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=tokenizer,
        dataset_cache=splits.cache if cached else None,
    )
    return trainer, splits


def prepared(cfg, trainer: str, models, tokenizer, tmp_path, *, cached=True, **args):
    """What the DPO or KTO trainer trains and evaluates on, as plain dicts, and the cache's record."""
    made, splits = built(cfg, trainer, models, tokenizer, tmp_path, cached=cached, **args)
    return (made.train_dataset.to_dict(), made.eval_dataset.to_dict()), splits.cache.summary()


def record_lengths(cfg, trainer: str, models, tokenizer, tmp_path, **args) -> dict:
    """data.too_long's counts per split, as summary.json's data_length holds them."""
    return built(cfg, trainer, models, tokenizer, tmp_path, **args)[1].cache.lengths


@pytest.mark.parametrize("trainer", ["dpo", "kto"])
def test_data_too_long_drops_truncates_or_refuses_pairs(trainer, tiny_model, reference, tmp_path, caplog):
    """A pair is as long as its prompt and its longer answer: ``drop`` (the default) trains on none longer than
    max_length, ``truncate`` keeps them for TRL's collator to cut (dropping, counted, those whose prompt fills it,
    which TRL would drop unsaid; none with DPO's keep_end), ``error`` is one line naming the first."""
    tokenizer = load_tokenizer("fusetune:tiny_llama")
    kind = "preference" if trainer == "dpo" else "kto"
    path = write_records(tmp_path / "p.jsonl", kind, 27, random.Random())
    long = {"prompt": "p 1=", "chosen": "abc " * 12, "rejected": "no"}  # a short prompt, an answer over the limit
    long = long if trainer == "dpo" else {"prompt": "p 1=", "completion": long["chosen"], "label": True}
    with open(path, "a") as lines:
        lines.write(3 * (json.dumps(long) + "\n"))
    models, limit = (tiny_model, reference), 20

    def cfg(too_long):
        cache = str(tmp_path / "cache")
        return data_cfg(formatter=kind, path=path, eval_fraction=0.0, cache_dir=cache, too_long=too_long)

    with caplog.at_level("WARNING", logger="fusetune.data.lengths"):
        made, splits = built(cfg("drop"), trainer, models, tokenizer, tmp_path, max_length=limit)
    rows = made.train_dataset.to_dict()
    answers = ["chosen_ids", "rejected_ids"] if trainer == "dpo" else ["completion_ids"]
    longest = [len(p) + max(len(rows[a][n]) for a in answers) for n, p in enumerate(rows["prompt_ids"])]
    drop = splits.cache.lengths["train"]
    assert max(longest) <= limit and drop["longer"] == drop["dropped"] == 30 - len(longest) > 0
    assert f"were dropped (data.path {path}: line" in caplog.text
    made, splits = built(cfg("truncate"), trainer, models, tokenizer, tmp_path, max_length=limit)
    cut, rows = splits.cache.lengths["train"], made.train_dataset.to_dict()
    filling = 30 - len(rows["prompt_ids"])  # every third prompt fills 20 tokens: dropped, as TRL drops them
    assert cut["longer"] == drop["longer"] and cut["dropped"] == filling > 0
    assert cut["truncated"] == cut["longer"] - filling >= 3 and max(map(len, rows["prompt_ids"])) < limit
    if trainer == "dpo":
        kept = record_lengths(cfg("truncate"), trainer, models, tokenizer, tmp_path, max_length=limit,
                              truncation_mode="keep_end")["train"]  # fmt: skip
        assert kept["dropped"] == 0 and kept["truncated"] == drop["longer"]
    with pytest.raises(FusetuneError, match=rf"^data.too_long=error: train record data.path {path}: line \d+ is "):
        built(cfg("error"), trainer, models, tokenizer, tmp_path, max_length=limit)


@pytest.mark.parametrize("trainer", ["dpo", "kto"])
def test_a_preference_mixture_reads_the_cache_on_a_second_run_and_matches_trl(trainer, tiny_model, reference, tmp_path):
    """Two sources, weighted 3:1: each tokenized once, read back by later runs (another max length too), and the
    rows each run trains on are TRL's own preparation of the same split (EOS, ids, long prompts dropped, KTO's KL
    pairs)."""
    tokenizer = load_tokenizer("fusetune:tiny_llama")
    rng = random.Random()
    kind = "preference" if trainer == "dpo" else "kto"
    sources = [
        {"path": write_records(tmp_path / "a.jsonl", kind, 20, rng), "formatter": kind, "weight": 3},
        {"path": write_records(tmp_path / "b.jsonl", kind, 12, rng), "formatter": kind, "weight": 1},
    ]
    cfg = data_cfg(
        formatter="mixture",
        sources=sources,
        mixture_size=24,
        eval_fraction=0.25,
        cache_dir=str(tmp_path / "cache"),
        too_long="truncate",  # TRL's own cut: pairs over max_length kept for its collator to cut
    )
    uncached, _ = prepared(cfg, trainer, (tiny_model, reference), tokenizer, tmp_path, cached=False, max_length=20)
    first, record = prepared(cfg, trainer, (tiny_model, reference), tokenizer, tmp_path, max_length=20)
    assert record["enabled"] and not record["used"] and record["misses"] == 2 and record["skipped"] is None
    assert [e["source"] for e in record["entries"]] == [f"data.sources.{n}.path {s['path']}" for n, s in
                                                         enumerate(sources)]  # fmt: skip
    second, again = prepared(cfg, trainer, (tiny_model, reference), tokenizer, tmp_path, max_length=20)
    assert again["used"] and again["hits"] == 2 and again["misses"] == 0
    assert first == uncached and second == uncached
    ids = ("chosen_ids", "rejected_ids") if trainer == "dpo" else ("completion_ids", "KL_completion_ids")
    assert {"prompt_ids", *ids} <= set(uncached[0]) and uncached[1]["prompt_ids"]
    assert len(uncached[0]["prompt"]) < 24  # prompts that fill max_length=20 were dropped, as TRL drops them
    lengths = record_lengths(cfg, trainer, (tiny_model, reference), tokenizer, tmp_path, max_length=20)["train"]
    assert lengths["records"] - lengths["dropped"] == len(first[0]["prompt"]) and lengths["dropped"]  # and counted
    longer, _ = prepared(cfg, trainer, (tiny_model, reference), tokenizer, tmp_path, cached=False, max_length=64)
    reused, third = prepared(cfg, trainer, (tiny_model, reference), tokenizer, tmp_path, max_length=64)
    assert third["hits"] == 2 and reused == longer and len(longer[0]["prompt"]) == 24
    tokenizer.add_tokens(["<another>"])  # another tokenizer: tokenized again
    _, changed = prepared(cfg, trainer, (tiny_model, reference), tokenizer, tmp_path, max_length=64)
    assert changed["misses"] == 2 and {e["key"] for e in changed["entries"]}.isdisjoint(
        e["key"] for e in record["entries"]
    )


def test_mixed_kinds_and_a_bad_pair_in_the_second_source_are_one_line(tiny_tokenizer, tmp_path):
    rng = random.Random()
    pairs = write_records(tmp_path / "pairs.jsonl", "preference", 6, rng)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    mixed = data_cfg(formatter="mixture", sources=[{"path": str(chat), "formatter": "chat"},
                                                   {"path": pairs, "formatter": "preference"}])  # fmt: skip
    with pytest.raises(FusetuneError) as refused:
        build_splits(mixed, tiny_tokenizer, 0)
    assert str(refused.value) == (
        "data.sources.1 (preference) gives chosen/rejected pairs, but data.sources.0 (chat) gives single answers: a "
        "mixture's sources must all give one kind (chosen/rejected pairs: preference; labelled answers: kto; single "
        "answers: the SFT formatters)"
    )
    line = rng.randint(2, 5)
    bad = write_records(tmp_path / "bad.jsonl", "preference", 6, rng, bad={line: {"prompt": "p", "chosen": "c"}})
    cfg = data_cfg(formatter="mixture", sources=[{"path": pairs, "formatter": "preference"},
                                                 {"path": bad, "formatter": "preference", "weight": 2}])  # fmt: skip
    with pytest.raises(FusetuneError) as refused:
        build_splits(cfg, tiny_tokenizer, 0)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"data.sources.1.path {bad}: 1 bad record")
    assert f"line {line}: 'rejected' is missing or null" in message
