"""Plain mistakes end the run with exit code 2 and one line naming the key, before anything loads.

One table. A row runs in-process through ``cli.run_or_exit`` (the app's boundary; the loaders are replaced by a
function that fails the test, so "before anything loads" is checked). A row with ``cli=True`` runs the real
``train.py``: those are refused by run_folder.GuardRunFolder before Hydra writes .hydra/, so the run folder must
not even exist afterwards. Rows with ``files`` need something on disk (a tokenizer, a weights file) and load it.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fusetune import loading
from fusetune.app import run as run_module
from fusetune.fast_model import FastModel

from .app_runs import error_line, exit_and_stderr

BASE = ("logger=none", "trainer.max_steps=1", "data.num_train=64", "data.num_eval=8", "data.num_generate=0")
LORA = "model=tiny_llama_lora"
TINY = Path(loading.resolve("fusetune:tiny_llama"))


@dataclass(frozen=True)
class Row:
    id: str
    overrides: tuple[str, ...]
    message: str  # the whole line after "fusetune: error: " starts with this ("{tmp}": the row's folder)
    cli: bool = False
    loads: str | None = None  # a folder to build first: "small-vocab" or "pickled"


ROWS = [
    Row("negative-learning-rate", ("trainer.learning_rate=-1e-4",), "trainer.learning_rate must be >= 0, got -0.0001"),
    Row("nan-learning-rate", ("trainer.learning_rate=nan",), "trainer.learning_rate must be >= 0, got nan", cli=True),
    Row(
        "batch-size-zero",
        ("trainer.per_device_train_batch_size=0",),
        "trainer.per_device_train_batch_size must be >= 1, got 0",
    ),
    Row(
        "model-batch-size-moved",
        ("+model.batch_size=8",),
        "model.batch_size moved to trainer.per_device_train_batch_size (a model preset sets it there too",
    ),
    Row(
        "eval-batch-size-zero",
        ("trainer.per_device_eval_batch_size=0",),
        "trainer.per_device_eval_batch_size must be >= 1",
    ),
    Row(
        "gradient-accumulation-zero",
        ("trainer.gradient_accumulation_steps=0",),
        "trainer.gradient_accumulation_steps must be >= 1, got 0",
        cli=True,
    ),
    Row(
        "max-seq-length-one",
        ("model.max_seq_length=1",),
        "model.max_seq_length must be >= 2 (a next-token target needs a token before it), got 1",
    ),
    Row("max-seq-length-negative", ("model.max_seq_length=-5",), "model.max_seq_length must be >= 2"),
    Row("lora-r-zero", (LORA, "model.lora.r=0"), "model.lora.r must be >= 1, got 0"),
    Row("lora-alpha-zero", (LORA, "model.lora.alpha=0"), "model.lora.alpha must be > 0, got 0"),
    Row(
        "lora-dropout-above-one",
        (LORA, "model.lora.dropout=1.5"),
        "model.lora.dropout must be in [0, 1), got 1.5",
        cli=True,
    ),
    Row("lora-dropout-one", (LORA, "model.lora.dropout=1"), "model.lora.dropout must be in [0, 1), got 1.0"),
    Row("lora-dropout-negative", (LORA, "model.lora.dropout=-0.1"), "model.lora.dropout must be in [0, 1), got -0.1"),
    Row("cpu-threads-negative", ("cpu_threads=-2",), "cpu_threads must be >= 1 (null: torch's default), got -2"),
    Row("max-steps-below-minus-one", ("trainer.max_steps=-5",), "trainer.max_steps must be >= -1 (-1: train by"),
    Row(
        "epochs-negative",
        ("trainer.max_steps=-1", "trainer.num_train_epochs=-1"),
        "trainer.num_train_epochs must be >= 0",
    ),
    Row("warmup-negative", ("trainer.warmup_steps=-0.1",), "trainer.warmup_steps must be >= 0 (below 1: a fraction"),
    Row("weight-decay-negative", ("trainer.weight_decay=-0.01",), "trainer.weight_decay must be >= 0, got -0.01"),
    Row("grad-norm-negative", ("trainer.max_grad_norm=-1",), "trainer.max_grad_norm must be >= 0 (0: no clipping)"),
    Row("adam-beta2-one", ("trainer.adam_beta2=1",), "trainer.adam_beta2 must be in [0, 1), got 1.0"),
    Row("logging-steps-zero", ("trainer.logging_steps=0",), "trainer.logging_steps must be > 0"),
    Row(
        "eval-steps-zero",
        ("trainer.eval_strategy=steps", "trainer.eval_steps=0"),
        "trainer.eval_steps must be > 0 (below 1: a fraction of the run), got 0",
    ),
    Row(
        "save-steps-negative",
        ("trainer.save_strategy=steps", "trainer.save_steps=-10"),
        "trainer.save_steps must be > 0",
    ),
    Row("seed-negative", ("seed=-1",), "seed must be in [0, 4294967295], got -1"),
    Row("synthetic-num-train-zero", ("data.num_train=0",), "data.num_train must be >= 1, got 0"),
    Row(
        "two-mistakes-one-line",
        ("trainer.learning_rate=-1", "trainer.gradient_accumulation_steps=0"),
        "trainer.learning_rate must be >= 0, got -1.0; trainer.gradient_accumulation_steps must be >= 1, got 0",
    ),
    Row(
        "typo-under-plus",
        ("+trainer.lerning_rate=1e-3",),
        "trainer.lerning_rate: not a key of TrainerConfig (did you mean learning_rate?)",
        cli=True,
    ),
    Row(
        "typo-under-plus-model",
        ("+model.max_seq_len=64",),
        "model.max_seq_len: not a key of ModelConfig (did you mean max_seq_length?)",
    ),
    Row(
        "typo-under-plus-max-step",
        ("+trainer.max_step=3",),
        "trainer.max_step: not a key of TrainerConfig (did you mean max_steps?)",
    ),
    Row(
        "typo-under-plus-lora",
        (LORA, "+model.lora.alpah=8"),
        "model.lora.alpah: not a key of LoraConfig (did you mean alpha?)",
    ),
    Row("unknown-top-level-key", ("+sed=3",), "sed: not a key of TrainConfig (did you mean seed?)"),
    Row(
        "optimizer-typo",
        ("trainer.optim=adamw_8bitt",),
        "trainer.optim: 'adamw_8bitt' is not a name the installed transformers accepts (did you mean adamw_8bit?)",
    ),
    Row(
        "scheduler-typo",
        ("trainer.lr_scheduler_type=cosin",),
        "trainer.lr_scheduler_type: 'cosin' is not a name the installed transformers accepts (did you mean cosine?)",
    ),
    Row(
        "logging-strategy-typo",
        ("trainer.logging_strategy=epochs",),
        "trainer.logging_strategy: 'epochs' is not a name the installed transformers accepts (did you mean epoch?)",
    ),
    Row(
        "save-strategy-unknown",
        ("trainer.save_strategy=always",),
        "trainer.save_strategy: 'always' is not one of no, steps, epoch, best",
    ),
    Row(
        "attention-typo",
        ("model.attn_implementation=sdpaa",),
        "model.attn_implementation: 'sdpaa' is not a name the installed transformers accepts (did you mean sdpa?)",
    ),
    Row(
        "attention-unknown",
        ("model.attn_implementation=fast",),
        "model.attn_implementation: 'fast' is not one of eager, ",
    ),
    Row(
        "every-mistake-at-once",
        (
            "+trainer.max_step=2",
            "trainer.optim=adamw_8bitt",
            "trainer.lr_scheduler_type=cosin",
            "trainer.eval_strategy=stpes",
            "trainer.learning_rate=-1",
        ),
        "trainer.max_step: not a key of TrainerConfig (did you mean max_steps?); trainer.extra holds FastSFTConfig "
        "fields that no trainer key holds; trainer.learning_rate must be >= 0, got -1.0; trainer.optim: "
        "'adamw_8bitt' is not a name the installed transformers accepts (did you mean adamw_8bit?); "
        "trainer.lr_scheduler_type: 'cosin' is not a name the installed transformers accepts (did you mean cosine?); "
        "trainer.eval_strategy: 'stpes' is not a name the installed transformers accepts (did you mean steps?)",
    ),  # fmt: skip
    Row(
        "ddp-in-one-process",
        ("distributed=ddp",),
        "distributed=ddp, but only 1 process was launched: start it with torchrun --nproc_per_node=N train.py ..., "
        "or accelerate launch --num_processes N train.py ... (--multi_cpu on a host without CUDA); "
        "allow_single_process=true trains in one process anyway",
    ),
    Row("fsdp-in-one-process", ("distributed=fsdp",), "distributed=fsdp, but only 1 process was launched"),
    Row("unknown-key-under-export", ("+export.onnx=true",), "export.onnx: not a key of ExportConfig"),
    Row(
        "tokenizer-larger-than-embeddings",
        ("model.name_or_path={tmp}/small-vocab",),
        "tokenizer {tmp}/small-vocab has 103 ids but model {tmp}/small-vocab embeds 64 (vocab_size): use the model's "
        "own tokenizer, or resize the embeddings",
        loads="small-vocab",
    ),
    Row(
        "pickled-code-in-weights",
        ("model.name_or_path={tmp}/pickled", "model.random_init=false"),
        "model {tmp}/pickled: the weights file {tmp}/pickled/pytorch_model.bin holds pickled code besides tensors, "
        "which is not run (torch weights_only)",
        loads="pickled",
    ),
    Row(
        "merged-full-model-under-fsdp",
        ("export.merged=true", "distributed=fsdp"),
        "export.merged with distributed=fsdp and no LoRA: rank 0 holds only its shard",
    ),
]


class RunsCode:
    """A pickled object that would leave a marker file if it were ever unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def build(kind: str, tmp: Path) -> Path:
    folder = tmp / kind
    shutil.copytree(TINY, folder)
    if kind == "small-vocab":  # the tokenizer has 103 ids
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 64}))
    else:
        torch.save(
            {"model.embed_tokens.weight": torch.zeros(128, 192), "x": RunsCode(tmp / "MARKER")},
            folder / "pytorch_model.bin",
        )
    return folder


def nothing_loads(monkeypatch) -> None:
    def fails(*args, **kwargs):
        raise AssertionError("a mistake in the config must be refused before anything loads")

    monkeypatch.setattr(run_module, "build_splits", fails)
    monkeypatch.setattr(FastModel, "from_pretrained", fails)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_mistake_exits_2_with_one_line(row, tmp_path, compose_cfg, capsys, monkeypatch):
    if row.loads:
        build(row.loads, tmp_path)
    overrides = [override.format(tmp=tmp_path) for override in (*BASE, *row.overrides)]
    run_dir = tmp_path / "run"
    if not row.cli and row.loads is None:
        nothing_loads(monkeypatch)
    code, stderr = exit_and_stderr(overrides, run_dir, row.cli, compose_cfg, capsys)
    assert code == 2, stderr[-3000:]
    assert error_line(stderr).startswith(f"fusetune: error: {row.message.format(tmp=tmp_path)}")
    assert not (row.cli and run_dir.exists()), "refused before Hydra writes anything"
    assert not (tmp_path / "MARKER").exists()


def test_ddp_in_one_process_when_allowed_warns(compose_cfg, monkeypatch):
    from fusetune.app.config import validate

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match=r"^distributed=ddp, but only 1 process was launched: .*: training in one"):
        validate(compose_cfg(["distributed=ddp", "allow_single_process=true"]))
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched as two: nothing to say
    validate(compose_cfg(["distributed=ddp"]))


LIBRARY = [
    ("FastSFTConfig", {"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1, got 0"),
    ("FastSFTConfig", {"learning_rate": float("nan")}, "learning_rate must be >= 0, got nan"),
    ("FastSFTConfig", {"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1, got 0"),
    ("FastSFTConfig", {"warmup_steps": -1}, "warmup_steps must be >= 0 (below 1: a fraction of the run), got -1"),
    ("FastSFTConfig", {"eval_strategy": "steps", "eval_steps": -1}, "eval_steps must be > 0"),
    ("from_pretrained", {"max_seq_length": 1}, "max_seq_length must be >= 2"),
    ("get_peft_model", {"r": 0}, "r must be >= 1, got 0"),
    ("get_peft_model", {"lora_alpha": -16}, "lora_alpha must be > 0, got -16"),
    ("get_peft_model", {"lora_dropout": 1.0}, "lora_dropout must be in [0, 1), got 1.0"),
]


@pytest.mark.parametrize("call,arguments,line", LIBRARY, ids=[f"{c}-{next(iter(a))}" for c, a, _ in LIBRARY])
def test_the_library_says_the_same(call, arguments, line, tmp_path):
    """Without the app, the same table gives the same line (a FusetuneError), before anything loads or trains."""
    from fusetune.errors import FusetuneError
    from fusetune.training.trainer import FastSFTConfig

    calls = {
        "FastSFTConfig": lambda: FastSFTConfig(output_dir=str(tmp_path), report_to=[], **arguments),
        "from_pretrained": lambda: FastModel.from_pretrained("fusetune:tiny_llama", random_init=True, **arguments),
        "get_peft_model": lambda: FastModel.get_peft_model(torch.nn.Linear(2, 2), **arguments),
    }
    with pytest.raises(FusetuneError) as refused:
        calls[call]()
    assert str(refused.value) == line or str(refused.value).startswith(line)
