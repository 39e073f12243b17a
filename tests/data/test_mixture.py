"""data=mixture: sources drawn by weight with a seed, each checked as a single dataset is, evaluated on together."""

import json
import logging
from collections import Counter

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from fusetune.app.config import validate
from fusetune.data import build_splits
from fusetune.data.rules import data_problems
from fusetune.errors import FusetuneError

from .test_formatters import data_cfg


def completions(path, prefix: str, count: int):
    path.write_text("".join(json.dumps({"prompt": f"{prefix}{i}=", "completion": f"{i}"}) + "\n" for i in range(count)))
    return str(path)


def mixture(*sources, **values):
    return data_cfg(formatter="mixture", sources=list(sources), **values)


def drawn_from(splits) -> Counter:
    return Counter(prompt[0] for prompt in splits.train["prompt"])


@pytest.fixture
def files(tmp_path):
    return completions(tmp_path / "a.jsonl", "a", 30), completions(tmp_path / "b.jsonl", "b", 100)


def test_draws_follow_the_weights_with_a_seed(files, tiny_tokenizer):
    a, b = files
    cfg = mixture(
        {"path": a, "formatter": "completion", "weight": 4},
        {"path": b, "formatter": "completion", "weight": 1},
        mixture_size=2000,
    )
    splits = build_splits(cfg, tiny_tokenizer, seed=0)
    counts = drawn_from(splits)
    assert len(splits.train) == 2000 and counts["a"] + counts["b"] == 2000
    assert abs(counts["a"] / 2000 - 0.8) < 0.03  # binomial sd is 0.009
    assert [s["drawn"] for s in splits.sources] == [counts["a"], counts["b"]]
    assert [s["probability"] for s in splits.sources] == [0.8, 0.2]
    assert [s["weight"] for s in splits.sources] == [4.0, 1.0]
    assert [(s["source"], s["path"], s["formatter"], s["records"]) for s in splits.sources] == [
        ("data.sources.0", a, "completion", 30),
        ("data.sources.1", b, "completion", 100),
    ]
    assert splits.mixture == {"size": 2000, "seed": 0}
    # the same seed draws the same examples; weights are relative (0.8 : 0.2 is 4 : 1); another seed draws others
    again = build_splits(cfg, tiny_tokenizer, seed=0)
    assert again.train[:] == splits.train[:]
    scaled = mixture(
        {"path": a, "formatter": "completion", "weight": 0.8},
        {"path": b, "formatter": "completion", "weight": 0.2},
        mixture_size=2000,
    )
    assert build_splits(scaled, tiny_tokenizer, seed=0).train[:] == splits.train[:]
    assert build_splits(cfg, tiny_tokenizer, seed=1).train[:] != splits.train[:]


def test_the_default_size_is_what_the_sources_hold_and_a_small_source_is_reshuffled_per_pass(files, tiny_tokenizer):
    a, b = files
    cfg = mixture({"path": a, "formatter": "completion"}, {"path": b, "formatter": "completion"})  # weights 1 : 1
    splits = build_splits(cfg, tiny_tokenizer, seed=0)
    assert len(splits.train) == 130
    drawn_a = [p for p in splits.train["prompt"] if p.startswith("a")]
    assert len(drawn_a) > 30  # a is oversampled: about 65 draws from 30 records
    # passes: every record once in each full pass, so counts differ by at most one
    per_record = Counter(drawn_a)
    assert len(per_record) == 30 and max(per_record.values()) - min(per_record.values()) <= 1
    assert drawn_a[:30] != sorted(drawn_a[:30], key=lambda p: int(p[1:-1]))  # not in file order
    # b is undersampled: no record twice
    drawn_b = [p for p in splits.train["prompt"] if p.startswith("b")]
    assert len(set(drawn_b)) == len(drawn_b) < 100


def test_a_zero_weight_source_is_checked_and_evaluated_on_but_never_drawn(files, tiny_tokenizer, tmp_path):
    a, b = files
    cfg = mixture(
        {"path": a, "formatter": "completion", "weight": 0},
        {"path": b, "formatter": "completion", "weight": 1},
        eval_fraction=0.1,
    )
    splits = build_splits(cfg, tiny_tokenizer, seed=0)
    assert set(drawn_from(splits)) == {"b"} and len(splits.train) == 90
    assert Counter(p[0] for p in splits.eval["prompt"]) == {"a": 3, "b": 10}
    assert [s["drawn"] for s in splits.sources] == [0, 90]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": "x"}\n')
    cfg.sources[0].path = str(bad)
    with pytest.raises(FusetuneError, match=rf"^data.sources.0.path {bad}: 1 bad record: line 2: 'completion' is"):
        build_splits(cfg, tiny_tokenizer, seed=0)


def test_eval_holds_out_from_each_source_and_generation_prompts_take_turns(files, tiny_tokenizer, tmp_path):
    a, b = files
    held = completions(tmp_path / "b_eval.jsonl", "e", 4)
    cfg = mixture(
        {"path": a, "formatter": "completion", "weight": 1},
        {"path": b, "formatter": "completion", "weight": 1, "eval_path": held},
        eval_fraction=0.2,
        num_generate=6,
    )
    splits = build_splits(cfg, tiny_tokenizer, seed=0)
    assert [(s["train_records"], s["eval_records"]) for s in splits.sources] == [(24, 6), (100, 4)]
    assert len(splits.train) == 124
    train_a, eval_a = (
        {p for p in splits.train["prompt"] if p[0] == "a"},
        [p for p in splits.eval["prompt"] if p[0] == "a"],
    )
    assert len(eval_a) == 6 and not train_a & set(eval_a)  # held-out records are never drawn
    assert sorted(p[0] for p in splits.eval["prompt"]) == ["a"] * 6 + ["e"] * 4
    assert [p[0][0] for p in splits.generation] == ["a", "e", "a", "e", "a", "e"]


def test_each_source_is_checked_as_a_single_dataset_is(tiny_tokenizer, tmp_path):
    good = completions(tmp_path / "good.jsonl", "g", 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": "p", "completion": None}) + "\n" for _ in range(7)))
    cfg = mixture({"path": good, "formatter": "completion"}, {"path": str(bad), "formatter": "completion"})
    with pytest.raises(FusetuneError) as caught:
        build_splits(cfg, tiny_tokenizer, seed=0)
    listed = "; ".join(f"line {n}: 'completion' is missing or null" for n in range(1, 6))
    assert str(caught.value) == f"data.sources.1.path {bad}: 7 bad records: {listed}; (2 more)"
    cfg = mixture(
        {"path": good, "formatter": "completion"}, {"path": str(tmp_path / "nope.jsonl"), "formatter": "completion"}
    )
    with pytest.raises(FusetuneError, match=r"^data.sources.1.path: no such file: .*nope.jsonl$"):
        build_splits(cfg, tiny_tokenizer, seed=0)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    cfg = mixture({"path": good, "formatter": "completion"}, {"path": str(empty), "formatter": "completion"})
    with pytest.raises(FusetuneError, match=r"^data.sources.1.path .*e.jsonl: the file is empty \(0 records\)$"):
        build_splits(cfg, tiny_tokenizer, seed=0)


def test_conversations_mix_with_alpaca_which_becomes_a_conversation(tiny_tokenizer, tmp_path, caplog):
    chat = tmp_path / "c.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat.write_text(json.dumps({"messages": turns}) + "\n")
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Double it", "input": "3", "output": "6"}) + "\n")
    cfg = mixture({"path": str(chat), "formatter": "chat"}, {"path": str(alpaca), "formatter": "alpaca"})
    caplog.set_level(logging.WARNING, logger="fusetune.data.pipeline")
    splits = build_splits(cfg, tiny_tokenizer, seed=0)
    assert splits.train.column_names == ["messages"]
    assert {"role": "user", "content": "Double it\n\n3"} in [m for ms in splits.train["messages"] for m in ms]
    assert "with trainer.assistant_only_loss=false every token trains" in caplog.text
    caplog.clear()
    build_splits(cfg, tiny_tokenizer, seed=0, assistant_only_loss=True)
    assert "every token trains" not in caplog.text


def test_sources_of_different_forms_are_refused(files, tiny_tokenizer, tmp_path):
    a, _ = files
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "words"}) + "\n")
    cfg = mixture({"path": a, "formatter": "completion"}, {"path": str(text), "formatter": "text"})
    with pytest.raises(FusetuneError) as caught:
        build_splits(cfg, tiny_tokenizer, seed=0)
    assert str(caught.value) == (
        "data.sources: a mixture needs one record form: conversations (chat, sharegpt, and alpaca with a chat "
        "template), prompt/completion text (completion, and alpaca without one) or text (text); here "
        "data.sources.0 (completion) gives prompt/completion text, data.sources.1 (text) gives text"
    )


def source(**values):
    return {"path": "a.jsonl", "formatter": "chat", **values}


PROBLEMS = [
    ({"sources": []}, "data.sources is empty: data=mixture needs at least one source, e.g. data.sources='[{path: "),
    ({"sources": [source(name="org/set")]}, "data.sources.0: give exactly one of path (a local file) or name"),
    ({"sources": [{"name": "org/set"}]}, "data.sources.0.formatter is missing: give one of chat, sharegpt, alpaca"),
    ({"sources": [source(formatter="synthetic")]}, "data.sources.0.formatter: 'synthetic' is not a source formatter"),
    ({"sources": [source(weight=-1)]}, "data.sources.0.weight must be a finite number >= 0 (weights are relative)"),
    ({"sources": [source(weight=float("nan"))]}, "data.sources.0.weight must be a finite number >= 0"),
    ({"sources": [source(weight=0), source(weight=0.0)]}, "data.sources: every weight is 0, so there is nothing"),
    ({"sources": [source()], "mixture_size": 0}, "data.mixture_size must be at least 1"),
    ({"sources": [source()], "path": "x.jsonl"}, "data.path: data=mixture reads its records from data.sources"),
    ({"sources": [source(formatter="alpaca", field="q")]}, "data.sources.0.field: formatter 'alpaca' reads the"),
    ({"sources": [source(eval_split="test")]}, "data.sources.0.eval_split names a split of a hub dataset"),
]


@pytest.mark.parametrize(
    "values,message", PROBLEMS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(PROBLEMS)]
)
def test_config_mistakes_are_found_before_anything_loads(values, message, tiny_tokenizer):
    cfg = data_cfg(formatter="mixture", **values)
    assert any(p.startswith(message) for p in data_problems(cfg)), data_problems(cfg)
    with pytest.raises(FusetuneError, match="^" + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build_splits(cfg, tiny_tokenizer, seed=0)


def test_sources_belong_to_data_mixture_only():
    problems = data_problems(data_cfg(formatter="chat", path="a.jsonl", sources=[source()], mixture_size=3))
    assert problems == [
        "data.sources is read only by data=mixture (data.formatter=mixture); formatter 'chat' reads data.path or "
        "data.name",
        "data.mixture_size applies only to data=mixture",
    ]


SOURCES = "data.sources=[{path: a.jsonl, formatter: chat, weight: 1}, {name: org/set, formatter: alpaca}]"


def test_a_source_weight_is_overridden_and_swept_from_the_command_line(compose_cfg):
    cfg = compose_cfg(["data=mixture", SOURCES, "data.sources.0.weight=0.2", "trainer.eval_strategy=no"])
    assert cfg.data.sources[0].weight == 0.2 and isinstance(cfg.data.sources[0].weight, float)
    assert cfg.data.sources[1].weight == 1.0 and cfg.data.sources[1].formatter.value == "alpaca"
    validate(cfg)
    # what `-m data.sources.0.weight=0.2,0.5,0.8` runs: one job per value, each composed with it
    [sweep] = OverridesParser.create().parse_overrides(["data.sources.0.weight=0.2,0.5,0.8"])
    jobs = [f"{sweep.key_or_group}={v}" for v in sweep.sweep_string_iterator()]
    assert [compose_cfg(["data=mixture", SOURCES, job]).data.sources[0].weight for job in jobs] == [0.2, 0.5, 0.8]
    with pytest.raises(
        (ConfigCompositionException, ValidationError)
    ):  # typed: a weight is a number, a formatter one of the formatters
        compose_cfg(["data=mixture", SOURCES, "data.sources.0.weight=heavy"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg(["data=mixture", "data.sources=[{path: a.jsonl, formatter: xml}]"])


def test_eval_strategy_needs_held_out_records_of_a_mixture(compose_cfg):
    with pytest.raises(FusetuneError, match="set data.eval_fraction, or a source's eval_path or eval_split"):
        validate(compose_cfg(["data=mixture", SOURCES, "trainer.eval_strategy=steps"]))
    validate(compose_cfg(["data=mixture", SOURCES, "trainer.eval_strategy=steps", "data.eval_fraction=0.1"]))
