"""data=mixture of preference sources, end to end in the app: pairs from two files drawn by weight train with
trainer=dpo (a second run reads the tokenized cache), labelled answers from two files with trainer=kto; a source
of another kind is refused in one line that names it."""

import json
import random

from fusetune.app.run import run
from fusetune.data.synthetic import synthetic_splits
from fusetune.report import read_jsonl

from .app_runs import error_line, exit_and_stderr
from .test_dpo_app import write_pairs

STEPS = ["trainer.max_steps=2", "trainer.logging_steps=1", "trainer.per_device_train_batch_size=8", "save_model=false"]


def sources(*files: tuple, formatter: str) -> str:
    """data.sources as the command line gives it: (path, weight) of each file."""
    return "data.sources=[" + ", ".join(f"{{path: {p}, formatter: {formatter}, weight: {w}}}" for p, w in files) + "]"


def write_answers(path, count: int, seed: int):
    rows, _ = synthetic_splits(count, 0, seed)
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({**r, "label": rng.random() < 0.5}) + "\n" for r in rows))
    return path


def test_a_weighted_mixture_of_pairs_trains_with_dpo_and_a_second_run_reads_the_cache(compose_cfg, tmp_path):
    seed = random.randrange(1000)
    a, b = write_pairs(tmp_path / "a.jsonl", 30, seed), write_pairs(tmp_path / "b.jsonl", 20, seed + 1)
    weights = random.choice([(3, 1), (1, 3)])
    overrides = [
        "trainer=dpo", "data=mixture", "logger=none", sources((a, weights[0]), (b, weights[1]), formatter="preference"),
        "data.mixture_size=64", f"data.cache_dir={tmp_path / 'cache'}", f"seed={seed}", *STEPS,
    ]  # fmt: skip
    first = run(compose_cfg(overrides, output_dir=tmp_path / "first"))
    assert first["trainer"] == "dpo" and first["global_step"] == 2 and first["data"] == "mixture"
    drawn = [s["drawn"] for s in first["data_sources"]]
    assert sum(drawn) == 64 and [s["probability"] for s in first["data_sources"]] == [w / 4 for w in weights]
    assert abs(drawn[0] / 64 - weights[0] / 4) < 0.2 and (drawn[0] > drawn[1]) == (weights[0] > weights[1])
    train = [m for m in read_jsonl(tmp_path / "first" / "metrics.jsonl") if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2] and all(isinstance(m["rewards/margins"], float) for m in train)
    assert first["data_cache"]["misses"] == 2 and not first["data_cache"]["used"]
    second = run(compose_cfg(overrides, output_dir=tmp_path / "second"))
    assert second["data_cache"]["hits"] == 2 and second["data_cache"]["misses"] == 0
    assert [s["drawn"] for s in second["data_sources"]] == drawn
    assert second["train_tokens"] == first["train_tokens"]  # the same rows, read back


def test_labelled_answers_from_two_files_train_with_kto_and_other_kinds_are_refused(compose_cfg, tmp_path, capsys):
    seed = random.randrange(1000)
    a, b = write_answers(tmp_path / "a.jsonl", 16, seed), write_answers(tmp_path / "b.jsonl", 16, seed + 1)
    mixture = sources((a, 1), (b, 1), formatter="kto")
    overrides = ["trainer=kto", "data=mixture", "logger=none", mixture, f"data.cache_dir={tmp_path / 'cache'}", *STEPS]
    summary = run(compose_cfg(overrides, output_dir=tmp_path / "run"))
    assert summary["trainer"] == "kto" and summary["global_step"] == 2
    assert sum(s["drawn"] for s in summary["data_sources"]) == 32 and summary["data_cache"]["misses"] == 2
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8, seed)
    mixed = f"data.sources=[{{path: {a}, formatter: kto}}, {{path: {pairs}, formatter: preference}}]"
    code, stderr = exit_and_stderr([*overrides[:3], mixed], tmp_path / "mixed", False, compose_cfg, capsys)
    assert code == 2 and error_line(stderr).startswith(
        "fusetune: error: data.sources.1 (preference) gives chosen/rejected pairs, but data.sources.0 (kto) gives "
        "labelled answers: a mixture's sources must all give one kind"
    )
    code, stderr = exit_and_stderr(["trainer=dpo", *overrides[1:4]], tmp_path / "dpo", False, compose_cfg, capsys)
    assert code == 2 and error_line(stderr).startswith(
        "fusetune: error: trainer=dpo trains on chosen/rejected pairs, but data.sources.0 (kto) gives labelled answers"
    )
