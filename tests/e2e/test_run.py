"""End to end: the Hydra app and run(), on the embedded default, a few steps at a time."""

import json
import subprocess
import sys

import pytest
import torch

from fusetune.app.run import run
from fusetune.report import read_jsonl

from ..conftest import ROOT, needs_wandb

AUTO_BACKEND = "triton" if torch.cuda.is_available() else "reference"  # what kernels=auto picks here

SUMMARY_KEYS = {
    "model",
    "data",
    "kernels",
    "trainer",
    "global_step",
    "train_loss",
    "eval",
    "train_tokens_per_second",
    "peak_memory_gib",
    "runtime_s",
    "seed",
    "versions",
}
FAST = ["data.num_train=256", "data.num_eval=16", "data.num_generate=8", "trainer.logging_steps=1"]


def train_cli(*overrides, cwd=ROOT, timeout=300):
    return subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_smoke_run_writes_the_record(tmp_path):
    proc = train_cli("trainer.max_steps=5", "logger=none", *FAST, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["global_step"] == 5 and summary["kernels"] == AUTO_BACKEND and summary["trainer"] == "sft"
    assert summary["train_tokens_per_second"] > 0 and summary["peak_memory_gib"] > 0
    assert 0.0 <= summary["eval"]["exact_match"] <= 1.0 and summary["eval"]["exact_match_n"] == 8
    assert {"torch", "triton", "transformers", "trl", "peft", "fusetune"} <= set(summary["versions"])
    lines = [m for m in read_jsonl(tmp_path / "metrics.jsonl") if m["split"] == "train"]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    assert all(isinstance(m["loss"], float) for m in lines)
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "model" / name).is_file(), name
    assert "fusetune run:" in proc.stdout and "tok/s" in proc.stdout


def losses(metrics_file):
    return [m["loss"] for m in read_jsonl(metrics_file) if m["split"] == "train"]


def test_same_seed_gives_identical_losses(compose_cfg, tmp_path):
    runs = []
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        cfg = compose_cfg(
            ["trainer.max_steps=6", "logger=none", f"seed={seed}", "save_model=false", *FAST],
            output_dir=tmp_path / name,
        )
        run(cfg)
        runs.append(losses(tmp_path / name / "metrics.jsonl"))
    assert len(runs[0]) == 6
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_loss_falls_on_the_embedded_default(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer.max_steps=60", "logger=none", "save_model=false", *FAST], output_dir=tmp_path)
    run(cfg)
    curve = losses(tmp_path / "metrics.jsonl")
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5, curve


def test_lora_with_embedding_lr_saves_a_loadable_adapter(compose_cfg, tmp_path):
    from peft import PeftModel

    from fusetune.loading import load_model

    cfg = compose_cfg(
        ["model=tiny_llama_lora", "trainer=embedding_lr", "trainer.max_steps=3", "logger=none", *FAST],
        output_dir=tmp_path,
    )
    summary = run(cfg)
    assert summary["trainable_parameters"] < summary["parameters"]
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer.json").is_file()
    base = load_model("fusetune:tiny_llama", __import__("torch").float32, random_init=True)
    PeftModel.from_pretrained(base, adapter)


@needs_wandb
def test_wandb_offline_and_tensorboard_write_logs(compose_cfg, tmp_path):
    run(
        compose_cfg(
            ["trainer.max_steps=2", "logger=wandb", "logger.mode=offline", "save_model=false", *FAST],
            output_dir=tmp_path / "w",
        )
    )
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    run(
        compose_cfg(
            ["trainer.max_steps=2", "logger=tensorboard", "save_model=false", *FAST],
            output_dir=tmp_path / "t",
        )
    )
    assert list((tmp_path / "t" / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data=alpaca", "data.path=/nonexistent/alpaca.jsonl"], "data.path: no such file"),
        (["model.name_or_path=fusetune:nope"], "no shipped model 'fusetune:nope'"),
        (["model.load_in_4bit=true"], "needs model.lora"),
        (["trainer.cuda_graphs=true"], "cuda_graphs=True: not possible here"),  # no CUDA, or padded batches
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, overrides, message):
    proc = train_cli(*overrides, "logger=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fusetune: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_multirun_writes_an_ablation_report(tmp_path):
    proc = train_cli(
        "-m",
        "seed=1,2",
        "trainer.max_steps=2",
        "logger=none",
        "save_model=false",
        *FAST,
        f"hydra.sweep.dir={tmp_path}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "report.json").read_text())
    assert [r["overrides"].split()[0] for r in rows] == ["seed=1", "seed=2"]
    assert rows[0]["tok/s ratio"] == 1.0 and rows[1]["tok/s ratio"] > 0
    table = (tmp_path / "report.md").read_text()
    assert table.count("\n| ") >= 3 and "seed=2" in table


def test_tiny_assets_regenerate_identically(tmp_path):
    from fusetune.tiny import TINY_LLAMA, write_tiny_llama

    write_tiny_llama(tmp_path)
    for shipped in TINY_LLAMA.iterdir():
        assert (tmp_path / shipped.name).read_text() == shipped.read_text(), shipped.name


def test_triton_and_reference_backends_give_matching_losses(compose_cfg, tmp_path):
    """The done-when check of the kernels issue: the embedded default, fp32, a few steps, both backends."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not __import__("torch").cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    curves = {}
    for backend in ("reference", "triton"):
        cfg = compose_cfg(
            [
                f"kernels={backend}",
                "trainer.max_steps=5",
                "logger=none",
                "save_model=false",
                "model.dtype=float32",
                "trainer.per_device_train_batch_size=4",
                *FAST,
                "data.num_generate=0",  # greedy generation through interpreted kernels is slow and proves nothing here
            ],
            output_dir=tmp_path / backend,
        )
        assert run(cfg)["kernels"] == backend
        curves[backend] = losses(tmp_path / backend / "metrics.jsonl")
    assert len(curves["triton"]) == 5
    assert max(abs(a - b) for a, b in zip(curves["triton"], curves["reference"], strict=True)) <= 1e-4, curves


@pytest.mark.parametrize(
    ("losses", "shown"),
    [
        ({"train_loss": 2.5, "final_loss": 2.25, "final_loss_step": 4}, "2.5000  final_loss 2.2500 (step 4)"),
        ({"train_loss": None, "final_loss": None, "final_loss_step": None}, "not logged  final_loss not logged"),
    ],
)
def test_the_terminal_summary_shows_losses_that_were_never_logged(losses, shown):
    """A resumed run whose metrics hold no train line (logging_steps above its steps) has no loss to show."""
    import dataclasses

    from fusetune.app.summary import RunSummary

    given = {
        "model": "m", "data": "d", "kernels": "reference", "trainer": "sft", "seed": 1, "global_step": 4,
        "skipped_steps": 0, "eval": {}, "train_tokens_per_second": 1.0, "peak_memory_gib": 0.1, "runtime_s": 1.0,
        "output_dir": "/tmp/x", "preference": None, **losses,
    }  # fmt: skip
    summary = RunSummary(**{f.name: given.get(f.name) for f in dataclasses.fields(RunSummary)})
    assert f"steps 4  train_loss {shown}\n" in summary.lines()


def test_smart_checkpointing_on_the_cpu_is_plain_checkpointing_and_says_so(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(
        ["model=tiny_llama_lora", "model.gradient_checkpointing=smart", "model.memory_budget=0.5"]
        + ["trainer.max_steps=3", "logger=none", "save_model=false", *FAST],
        output_dir=tmp_path,
    )
    with caplog.at_level("INFO"):
        run(cfg)
    assert len(losses(tmp_path / "metrics.jsonl")) == 3
    assert (
        "use_gradient_checkpointing='smart': smart checkpointing needs a CUDA device to measure memory; "
        "plain non-reentrant checkpointing on 4 layers (CUDA is not available)"
    ) in [r.getMessage() for r in caplog.records]
