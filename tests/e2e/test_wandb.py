"""W&B through the Hydra app and run(), offline: the run's own .wandb file, read back with wandb's reader, holds the
resolved config, the run's name and group, every logging step's metrics, the summary and how the run ended."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusetune.app import run as run_module
from fusetune.app.distributed import rank
from fusetune.app.run import run
from fusetune.errors import FusetuneError, Interrupted
from fusetune.report import read_jsonl

from ..conftest import ROOT, needs_wandb

pytestmark = needs_wandb

FAST = ["data.num_train=256", "data.num_eval=16", "data.num_generate=4", "trainer.logging_steps=1", "save_model=false"]
OFFLINE = ["logger=wandb", "logger.mode=offline"]
API_KEY = "fusetune-test-key-0123456789abcdef0123456789"  # stands for a real key in the environment


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def wandb_records(offline_run: Path) -> list[dict]:
    """The records of an offline run's .wandb file, as wandb's own reader prints them (`wandb leet inspect --json`)."""
    # wandb's service process writes the file; under load it can land a moment after finish() returns
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 0 for p in offline_run.glob("*.wandb")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline_run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0 and "No such command" in proc.stderr:
        pytest.skip("this wandb has no `wandb leet inspect` to read a .wandb file")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


class Recorded:
    """One W&B run as its records left it: the run record, the config and summary after every update, the history."""

    def __init__(self, records: list[dict]):
        (self.run,) = [r["run"] for r in records if r["type"] == "run"]
        self.config = dict(self.run.get("config", {}).get("update", {}))
        self.summary, self.history, self.exit_code = {}, [], None
        for r in records:
            if r["type"] == "config":
                self.config.update(r["config"].get("update", {}))
            elif r["type"] == "summary":
                self.summary.update(r["summary"].get("update", {}))
            elif r["type"] == "history":
                self.history.append(r["history"]["item"])
            elif r["type"] == "exit":
                self.exit_code = r["exit"].get("exit_code", 0)


def recorded(run_dir: Path) -> Recorded:
    (offline_run,) = offline_runs(run_dir)
    return Recorded(wandb_records(offline_run))


def train_app(*overrides, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_offline_run_holds_the_config_the_name_and_every_logging_step(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_app(*OFFLINE, "trainer.max_steps=3", *FAST, f"hydra.run.dir={run_dir}", env={"WANDB_API_KEY": API_KEY})
    assert proc.returncode == 0, proc.stderr[-3000:]
    w = recorded(run_dir)

    assert w.run["display_name"] == "tiny_llama-synthetic-auto-sft"  # model-data-kernels-trainer choices
    assert w.run["project"] == "fusetune" and not w.run.get("run_group")
    # The resolved Hydra config, whole, beside what HF's callback adds (TrainingArguments, the model's config).
    assert w.config["model"]["name_or_path"] == "fusetune:tiny_llama" and w.config["model"]["lora"] is None
    assert "learning_rate" in w.config["trainer"] and w.config["trainer"]["logging_steps"] == 1
    assert w.config["data"]["num_train"] == 256 and w.config["logger"]["mode"] == "offline"
    assert w.config["kernels"] == {"backend": "auto", "fp8": False}, "the config's, not the TrainingArguments field's"
    assert w.config["export"] == {"merged": False, "gguf": None} and w.config["output_dir"] == str(run_dir)
    assert w.config["choices"]["model"] == "tiny_llama" and w.config["choices"]["logger"] == "wandb"
    assert w.config["per_device_train_batch_size"] == 64 and w.config["model/num_parameters"] > 0  # HF's own

    # Every logging step streamed by HF's callback, the same losses as metrics.jsonl.
    rows = [h for h in w.history if "train/loss" in h]
    assert [h["train/global_step"] for h in rows] == [1, 2, 3]
    logged = [m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if m["split"] == "train"]
    assert [h["train/loss"] for h in rows] == pytest.approx(logged, rel=1e-6)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert w.summary["global_step"] == 3 and w.summary["final_loss"] == pytest.approx(summary["final_loss"])
    assert w.summary["eval/exact_match_n"] == 4 and w.summary["kernels"] == "reference"
    assert w.summary["status"] == "finished" and w.exit_code == 0

    # The API key in the environment is in no file of the run folder (.hydra/, summary.json, logs, wandb/) nor output.
    for path in (p for p in run_dir.rglob("*") if p.is_file()):
        assert API_KEY.encode() not in path.read_bytes(), path
    assert API_KEY not in proc.stdout + proc.stderr


def test_multirun_groups_its_runs_by_the_sweep_and_numbers_them(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_app(
        "-m", "seed=1,2", "run_name=ablation", *OFFLINE, "trainer.max_steps=1", *FAST, f"hydra.sweep.dir={sweep}",
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted({p.parent.parent for p in sweep.rglob("offline-run-*")}, key=lambda p: p.name)
    assert len(jobs) == 2
    runs = [recorded(job) for job in jobs]
    assert [w.run["display_name"] for w in runs] == ["ablation-0", "ablation-1"]  # run_name, then the job number
    assert {w.run["run_group"] for w in runs} == {sweep.name}
    assert [w.config["seed"] for w in runs] == [1, 2]


@pytest.mark.parametrize(
    "error,code,status",
    [
        (FusetuneError("training stopped: a non-finite loss at step 1"), 2, "failed"),
        (RuntimeError("something broke"), 1, "failed"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (Interrupted("interrupted at step 3", 143), 143, "interrupted"),
    ],
    ids=["user-mistake", "exception", "ctrl-c", "signal"],
)
def test_a_run_that_does_not_finish_is_marked_failed_in_wandb(compose_cfg, tmp_path, monkeypatch, error, code, status):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(run_module, "_train_steps", fail)  # training, after the W&B run started
    with pytest.raises(type(error)):
        run(compose_cfg([*OFFLINE, *FAST], output_dir=tmp_path))
    w = recorded(tmp_path)
    assert w.exit_code == code and w.summary["status"] == status
    assert w.summary["error"] == (str(error) or type(error).__name__)
    assert "global_step" not in w.summary  # there is no summary.json to add


@pytest.mark.parametrize("where", ["build_splits", "from_pretrained", "FastSFTTrainer"])
def test_no_wandb_run_before_the_config_the_data_and_the_model_have_loaded(compose_cfg, tmp_path, monkeypatch, where):
    """A mistake found while the data, the model or the trainer load leaves no W&B run, not even a failed one, with
    W&B chosen and an API key set."""

    def fail(*args, **kwargs):
        raise FusetuneError(f"a mistake found in {where}")

    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if where == "from_pretrained":
        monkeypatch.setattr(run_module.FastModel, "from_pretrained", fail)
    else:
        monkeypatch.setattr(run_module, where, fail)
    with pytest.raises(FusetuneError, match=where):
        run(compose_cfg(["logger=wandb", *FAST], output_dir=tmp_path))
    assert not (tmp_path / "wandb").exists()


def test_a_resumed_run_continues_its_wandb_run(compose_cfg, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    class StopAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    callbacks = run_module.logger_callbacks
    monkeypatch.setattr(run_module, "logger_callbacks", lambda: [*callbacks(), StopAtStep3()])
    steps = ["trainer.max_steps=4", "trainer.save_strategy=steps", "trainer.save_steps=2"]
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg([*OFFLINE, *FAST, *steps], output_dir=tmp_path))
    monkeypatch.setattr(run_module, "logger_callbacks", callbacks)
    summary = run(compose_cfg([*OFFLINE, *FAST, *steps, "resume=auto"], output_dir=tmp_path))
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-2")

    first, second = (Recorded(wandb_records(path)) for path in offline_runs(tmp_path))
    assert first.run["run_id"] == second.run["run_id"]  # one W&B run, continued
    assert first.summary["status"] == "interrupted" and second.summary["status"] == "finished"
    # the interrupt comes before step 3 is logged; the second run repeats step 3 from checkpoint-2
    assert [h["train/global_step"] for h in first.history if "train/loss" in h] == [1, 2]
    assert [h["train/global_step"] for h in second.history if "train/loss" in h] == [3, 4]


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"WANDB_MODE": "disabled"}], ids=["rank-1", "disabled"])
def test_no_wandb_files_from_another_rank_or_when_disabled(compose_cfg, tmp_path, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    summary = run(compose_cfg(["logger=wandb", "trainer.max_steps=1", *FAST], output_dir=tmp_path))
    assert summary["global_step"] == 1
    assert not offline_runs(tmp_path) and not list(tmp_path.rglob("*.wandb"))


def test_rank_comes_from_torchrun_variables(monkeypatch):
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert rank() == 2
    monkeypatch.setenv("RANK", "5")  # the global rank wins: LOCAL_RANK is 0 on every node's first process
    assert rank() == 5


ENV = {"WANDB_PROJECT": "my-team", "WANDB_ENTITY": "lab", "WANDB_MODE": "disabled", "WANDB_TAGS": "smoke, cpu"}
EXPLICIT = ["logger.project=mine", "logger.entity=me", "logger.mode=offline", "logger.tags=[x]"]


@pytest.mark.parametrize(
    "env,overrides,expected",
    [
        ({}, [], ("fusetune", None, "offline", None)),
        ({"WANDB_API_KEY": API_KEY}, [], ("fusetune", None, "online", None)),  # W&B's own convention, once chosen
        ({"WANDB_API_KEY": API_KEY, "WANDB_MODE": "offline"}, [], ("fusetune", None, "offline", None)),
        (ENV, [], ("my-team", "lab", "disabled", ["smoke", "cpu"])),
        (ENV, EXPLICIT, ("mine", "me", "offline", ["x"])),
        (ENV, ["logger.project=mine"], ("mine", "lab", "disabled", ["smoke", "cpu"])),
        (ENV, ["logger.tags=[]"], ("my-team", "lab", "disabled", None)),  # explicitly none
    ],
    ids=["defaults", "api-key", "api-key-offline", "environment", "config-wins", "one-explicit", "no-tags"],
)
def test_wandb_environment_wins_over_defaults_never_over_the_config(
    compose_cfg, tmp_path, monkeypatch, env, overrides, expected
):
    from fusetune.app.loggers import wandb_settings

    for name in ("WANDB_API_KEY", *ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = wandb_settings(compose_cfg(["logger=wandb", *overrides]))
    assert (settings["project"], settings["entity"], settings["mode"], settings["tags"]) == expected


def test_wandb_project_and_tags_from_the_environment_reach_the_offline_run(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "my-team")
    monkeypatch.setenv("WANDB_TAGS", "smoke,cpu")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(compose_cfg(["logger=wandb", "trainer.max_steps=1", *FAST], output_dir=tmp_path))
    w = recorded(tmp_path)
    assert w.run["project"] == "my-team" and w.run["tags"] == ["smoke", "cpu"]
    assert w.config["logger"]["project"] is None  # the config left it to the environment


def test_the_default_logger_is_local_and_starts_no_wandb_run_with_an_api_key(compose_cfg, tmp_path, monkeypatch):
    """A smoke test on a machine logged into W&B: TensorBoard files in the run folder, nothing sent anywhere."""
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # were anything to try, it could not reach W&B
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("the default logger started a W&B run"))
    cfg = compose_cfg(["trainer.max_steps=1", *FAST], output_dir=tmp_path)
    assert cfg.logger.kind.value == "tensorboard"
    assert run(cfg)["global_step"] == 1
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert not (tmp_path / "wandb").exists()
