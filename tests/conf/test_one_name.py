"""Every setting has one key and travels down once (issue 26): the sequence length is ``model.max_seq_length``, the
learning rate ``trainer.learning_rate`` and the batch size ``trainer.per_device_train_batch_size``, whatever the
library and TRL call them below the app."""

import ast
import dataclasses
import re
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from fusetune.app.config import TrainConfig

from ..conftest import ROOT

APP = ROOT / "src" / "fusetune" / "app"
# a key that names a sequence length (max_length, seq_len, model_max_length, context_length, cutoff_len, block_size)
LENGTH = re.compile(r"(^|_)(len|length|seq|sequence|block_size)$|seq_len|context_len")
# lengths of a part of the sequence (the preference trainers' prompt and answer), which are other settings
PARTS = re.compile(r"^trainer\.max_(prompt|completion)_length$")
RATE = re.compile(r"(^|_)(lr|learning_rate)$")
BATCH = re.compile(r"(^|_)(bs|batch|batch_size)$")
# the batches of evaluation and of DPO's reference pass, which are other settings, and TRL's switch that searches for
# a batch size that fits
OTHER_BATCHES = re.compile(r"^trainer\.((per_device_eval|precompute_ref)_batch_size|auto_find_batch_size)$")


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every key of a schema, nested ones included (``X | None`` and ``list[X]`` of a schema too)."""
    keys = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        nested = [t for t in (hints[f.name], *get_args(hints[f.name])) if dataclasses.is_dataclass(t)]
        keys += schema_keys(nested[0], f"{prefix}{f.name}.") if nested else [f"{prefix}{f.name}"]
    return keys


def test_the_schema_walk_sees_nested_and_listed_schemas():
    keys = schema_keys(TrainConfig)
    assert {"model.lora.r", "data.sources.weight", "trainer.adam_beta1", "resume.allow_changes"} <= set(keys)
    names = ("max_length", "x.model_max_length", "seq_len", "block_size", "max_completion_length", "x_context")
    assert [n for n in names if LENGTH.search(n.rpartition(".")[2])] == list(names[:-1])  # a context is no length


def test_the_sequence_length_has_one_key():
    """One key the user types: a second (trainer.max_length, data.max_seq_length, ...) fails here."""
    found = [k for k in schema_keys(TrainConfig) if LENGTH.search(k.rpartition(".")[2]) and not PARTS.match(k)]
    assert found == ["model.max_seq_length"]


def test_the_learning_rate_has_one_key():
    """trainer.learning_rate, and the embeddings' own rate beside it (trainer=embedding_lr)."""
    found = [k for k in schema_keys(TrainConfig) if RATE.search(k.rpartition(".")[2])]
    assert sorted(found) == ["trainer.embedding_learning_rate", "trainer.learning_rate"]


def test_the_batch_size_has_one_key():
    """trainer.per_device_train_batch_size: a second (model.batch_size, data.batch_size, ...) fails here."""
    names = ("model.batch_size", "x.train_bs", "x.micro_batch", "x.batch_eval_metrics", "x.eval_do_concat_batches")
    assert [n for n in names if BATCH.search(n.rpartition(".")[2])] == list(names[:3])  # a batch's metrics are no size
    found = [k for k in schema_keys(TrainConfig) if BATCH.search(k.rpartition(".")[2]) and not OTHER_BATCHES.match(k)]
    assert found == ["trainer.per_device_train_batch_size"]


def test_the_app_reads_the_sequence_length_once():
    """app.run's load phase reads model.max_seq_length and hands it on (Loaded.max_seq_length); nothing else in the
    app reads it from the config."""
    reads = [
        f"{path.name}:{node.lineno}"
        for path in sorted(APP.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute) and node.attr == "max_seq_length" and isinstance(node.ctx, ast.Load)
        if not (isinstance(node.value, ast.Name) and node.value.id == "loaded")  # the phase's hand-on
    ]
    assert len(reads) == 1 and reads[0].startswith("run.py:"), reads
    source = (APP / "run.py").read_text()
    assert "max_length=max_seq_length" in source and "max_length=cfg" not in source


@pytest.mark.parametrize("key", ["learning_rate", "batch_size", "per_device_train_batch_size"])
def test_every_model_preset_leaves_the_learning_rate_and_batch_size_to_the_trainer_group(key):
    """A preset sets trainer.learning_rate or trainer.per_device_train_batch_size (a `# @package _global_` file) or
    nothing: never model.learning_rate or model.batch_size (nor the trainer's name under model)."""
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        text = path.read_text()
        flat = not text.startswith("# @package _global_")
        assert not (flat and re.search(rf"^{key}:", text, re.M)), path.name
        assert not (not flat and re.search(rf"^model:\n(  .*\n)*  {key}:", text, re.M)), path.name
    assert Path(ROOT / "conf" / "model" / "tiny_llama.yaml").read_text().startswith("# @package _global_")


@pytest.mark.parametrize(
    "overrides,batch",
    [
        (["model=llama3_8b", "trainer=dpo"], 4),  # a global preset's, which the trainer option leaves alone
        (["model=llama3_8b_qlora"], 4),  # a twin in the model package keeps its global base's
        (["experiment=qlora_8b"], 2),  # an experiment's wins over its model's
        (["model=llama3_1b"], 8),  # the schema's
        ([], 64),  # tiny_llama's
    ],
)
def test_the_batch_size_reaches_the_trainer_key(compose_cfg, overrides, batch):
    cfg = compose_cfg(overrides)
    assert cfg.trainer.per_device_train_batch_size == batch and "batch_size" not in cfg.model
