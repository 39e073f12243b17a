"""The seed pages' code, as users paste it: every example in examples/seeds/ runs on the CPU.

Each example runs in this process (runpy, as ``__main__``) from its own empty working folder holding
train.jsonl and eval.jsonl (the synthetic tasks rendered by the tiny model's chat template into a
``text`` column), with SEED_MODEL naming a tiny random Llama saved with its tokenizer. The checks read
what the example left: its ``trainer``, its output folders, and the warnings it raised.
"""

import json
import runpy
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from fusetune.patching import remove_kernels

from ..conftest import ROOT

SEEDS = ROOT / "examples" / "seeds"
EXAMPLES = sorted(p.name for p in SEEDS.glob("[0-9][0-9][0-9]_*.py"))
NEEDS_WANDB = {"002_monitoring.py"}
STEPS = 20  # SEED_MAX_STEPS: the seeds' 60 and 100 steps cut to keep CI short


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """A tiny 4-bit-loadable model folder, train/eval JSONL files, and a dataset folder."""
    from fusetune import FastModel
    from fusetune.data.synthetic import synthetic_splits

    root = tmp_path_factory.mktemp("seed_files")
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", random_init=True)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    remove_kernels()
    train, held_out = synthetic_splits(64, 16, seed=0)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(root / name, "w") as f:
            for row in rows:
                chat = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
                f.write(json.dumps({"text": tokenizer.apply_chat_template(chat, tokenize=False)}) + "\n")
    (root / "your_dataset").mkdir()
    shutil.copy(root / "train.jsonl", root / "your_dataset" / "train.jsonl")
    return root


def run_example(name: str, seed_files: Path, workdir: Path, monkeypatch) -> tuple[dict, list]:
    for file in ("train.jsonl", "eval.jsonl"):
        shutil.copy(seed_files / file, workdir / file)
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("SEED_MODEL", str(seed_files / "model"))
    monkeypatch.setenv("SEED_DATASET", str(seed_files / "your_dataset"))
    monkeypatch.setenv("SEED_MAX_STEPS", str(STEPS))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(workdir))
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scope = runpy.run_path(str(SEEDS / name), run_name="__main__")
        finally:
            remove_kernels()
    return scope, [str(w.message) for w in caught]


def train_losses(trainer) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]


def tensorboard_scalars(folder: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [e.value for e in accumulator.Scalars(tag)]
    return values


def test_every_seed_example_is_listed_in_the_readme():
    readme = (SEEDS / "README.md").read_text()
    assert len(EXAMPLES) >= 15
    assert all(name in readme for name in EXAMPLES), [n for n in EXAMPLES if n not in readme]


@pytest.mark.parametrize("name", EXAMPLES)
def test_seed_example_runs(name, seed_files, tmp_path, monkeypatch):
    if name in NEEDS_WANDB:  # a dev dependency, left out of the GPU hosts' wheelhouse for size
        pytest.importorskip("wandb", reason=f"{name} reports to W&B")
    scope, said = run_example(name, seed_files, tmp_path, monkeypatch)
    trainer = scope.get("trainer")
    if trainer is None:
        assert name == "003_import.py"
        return
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit, "every seed flow loads the base in 4 bits"
    assert not (trainer.args.bf16 or trainer.args.fp16) or torch.cuda.is_available()
    assert trainer.state.global_step > 0 and torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    losses = train_losses(trainer)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in losses)
    span = losses[-1][0] - losses[0][0] if losses else 0
    if span >= 10 and trainer.args.learning_rate * span >= 2e-3:  # steps enough for the loss to fall
        third = max(1, len(losses) // 3)
        first, last = (sum(loss for _, loss in part) / len(part) for part in (losses[:third], losses[-third:]))
        assert last < first, losses
    CHECKS.get(name, lambda *a: None)(scope, said, tmp_path)


def check_older_trainer_keywords(scope, said, workdir):
    args = scope["trainer"].args
    assert args.dataset_text_field == "text" and args.max_length == 2048
    for keyword in ("dataset_text_field", "max_seq_length"):
        assert any(f"({keyword}=...) is an older spelling" in s for s in said), said


def check_basic_sft(scope, said, workdir):
    check_older_trainer_keywords(scope, said, workdir)
    if not torch.cuda.is_available():
        assert sum("bf16=True, but there is no CUDA GPU: training in fp32 on the CPU" in s for s in said) == 1, said


def check_signature(scope, said, workdir):
    check_older_trainer_keywords(scope, said, workdir)
    assert scope["trainer"].args.dataset_num_proc == 2
    assert any("(packing=...) is an older spelling" in s for s in said), said
    assert scope["train_output"].global_step == STEPS


def check_embedding_group(scope, said, workdir):
    groups = scope["trainer"].optimizer.param_groups
    assert sorted({g["initial_lr"] for g in groups}) == [5e-5, 2e-4]  # LoRA, then embed_tokens and lm_head


def check_tensorboard_default_folder(scope, said, workdir):
    assert len(tensorboard_scalars(workdir / "outputs", "train/loss")) == STEPS  # logging_steps=1


def check_resume(scope, said, workdir):
    trainer = scope["trainer"]
    assert (workdir / "outputs" / f"checkpoint-{STEPS}").is_dir()
    assert trainer.state.global_step == 2 * STEPS
    steps = [step for step, _ in train_losses(trainer)]
    assert steps == list(range(1, 2 * STEPS + 1)), "each step logged once, the checkpoint's history kept"


def check_full_loop(scope, said, workdir):
    assert (workdir / "trained_model" / "adapter_config.json").is_file()
    assert (workdir / "trained_model" / "tokenizer_config.json").is_file()
    assert scope["trainer"].optimizer.optimizer.args.optim_bits == 8  # bitsandbytes' AdamW in 8 bits


def check_precision_idiom(scope, said, workdir):
    if not torch.cuda.is_available():
        assert sum("fp16=True, but there is no CUDA GPU" in s for s in said) == 1, said
    assert scope["trainer"].args.max_length == 2048
    assert any("(max_seq_length=...) is an older spelling: use max_length" in s for s in said)


def check_best_model_loaded(scope, said, workdir):
    from safetensors.torch import load_file

    trainer = scope["trainer"]
    assert any("(evaluation_strategy=...) is an older spelling: use eval_strategy" in s for s in said)
    evals = {row["step"]: row["eval_loss"] for row in trainer.state.log_history if "eval_loss" in row}
    assert sorted(evals) == [50, 100]
    best_step = min(evals, key=evals.get)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    saved = load_file(Path(trainer.state.best_model_checkpoint) / "adapter_model.safetensors")
    live = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    for name, tensor in saved.items():
        match = [p for n, p in live.items() if n.replace(".default", "").endswith(name.removeprefix("base_model."))]
        assert len(match) == 1 and torch.equal(match[0].detach().cpu(), tensor), name


def check_monitoring(scope, said, workdir):
    assert any("(logging_dir=...)" in s and "TENSORBOARD_LOGGING_DIR" in s for s in said), said
    assert len(tensorboard_scalars(workdir / "logs", "train/loss")) == STEPS // 5
    runs = list((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline W&B run for the first trainer"


CHECKS = {
    "000_basic_sft.py": check_basic_sft,
    "000_signature.py": check_signature,
    "000_embedding_lr.py": check_embedding_group,
    "003_embedding_lr.py": check_embedding_group,
    "001_monitoring.py": check_tensorboard_default_folder,
    "001_resume.py": check_resume,
    "001_full_loop.py": check_full_loop,
    "002_basic_config.py": check_precision_idiom,
    "002_evaluation.py": check_best_model_loaded,
    "002_monitoring.py": check_monitoring,
}
