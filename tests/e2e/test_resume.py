"""The app's run folder through real processes: refused reuse, overwrite, resume after SIGKILL, signals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ..conftest import ROOT

STEPS = ["trainer.max_steps=18", "trainer.logging_steps=1", "trainer.save_strategy=steps", "trainer.save_steps=6"]
SMALL = ["logger=none", "data.num_train=512", "data.num_eval=8", "trainer.per_device_train_batch_size=16", "seed=5"]


def command(run_dir, *overrides):
    return [sys.executable, str(ROOT / "train.py"), *SMALL, f"hydra.run.dir={run_dir}", *overrides]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def app(run_dir, *overrides, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, *overrides), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def losses(run_dir) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m["step"] for m in lines if m["split"] == "train"]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {m["step"]: m["loss"] for m in lines if m["split"] == "train"}


def wait_for(path, proc, timeout=180):
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() - start < timeout, f"no {path} after {timeout} s"
        time.sleep(0.02)


def status(run_dir) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    done = app(run_dir, *STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_losses(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    with subprocess.Popen(command(run_dir, *STEPS), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as proc:  # fmt: skip
        wait_for(run_dir / "checkpoint-6" / "fusetune_checkpoint.json", proc)
        proc.send_signal(signal.SIGKILL)
    assert status(run_dir)["status"] == "running" and not (run_dir / "summary.json").exists()
    done = app(run_dir, *STEPS, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    whole, resumed = losses(uninterrupted), losses(run_dir)
    assert sorted(resumed) == sorted(whole) == list(range(1, 19))
    for step, loss in whole.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    summary = json.loads((run_dir / "summary.json").read_text())
    first = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-6") or summary["resumed_from"].endswith("checkpoint-12")
    assert summary["train_tokens"] == first["train_tokens"]  # the count continued from the checkpoint
    assert summary["train_loss"] == pytest.approx(first["train_loss"], rel=1e-4)
    assert status(run_dir)["status"] == "finished"


def test_a_used_folder_is_refused_and_left_as_it_was(uninterrupted):
    config = (uninterrupted / ".hydra" / "config.yaml").read_text()
    summary = (uninterrupted / "summary.json").read_text()
    done = app(uninterrupted, "trainer.max_steps=2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert last_line(done.stderr).startswith(f"fusetune: error: run folder {uninterrupted} holds another run's record")
    assert "resume=auto continues that run, overwrite=true replaces it" in last_line(done.stderr)
    assert (uninterrupted / ".hydra" / "config.yaml").read_text() == config
    assert (uninterrupted / "summary.json").read_text() == summary
    done = app(uninterrupted, *STEPS, "resume=auto")
    assert done.returncode == 2 and "has finished; there is nothing to continue" in last_line(done.stderr)


def test_overwrite_replaces_the_record(tmp_path):
    run_dir = tmp_path / "again"
    assert app(run_dir, "trainer.max_steps=3").returncode == 0
    (run_dir / "checkpoint-99").mkdir()  # a leftover of the old run
    done = app(run_dir, "trainer.max_steps=2", "overwrite=true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 2
    assert sorted(losses(run_dir)) == [] or max(losses(run_dir)) <= 2
    assert not (run_dir / "checkpoint-99").exists() and status(run_dir)["status"] == "finished"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_says_where(tmp_path, sig, code):
    run_dir = tmp_path / "signalled"
    overrides = ["trainer.max_steps=400", "trainer.logging_steps=1"]
    with subprocess.Popen(command(run_dir, *overrides), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:  # fmt: skip
        wait_for(run_dir / "metrics.jsonl", proc)
        while not (run_dir / "metrics.jsonl").read_text().strip():
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    record = status(run_dir)
    step = record["last_step"]
    assert record["status"] == "interrupted" and 0 < step < 400
    assert last_line(stderr) == (
        f"fusetune: interrupted at step {step}: checkpoint saved in {run_dir / f'checkpoint-{step}'}; "
        "resume=auto continues"
    )
    assert (run_dir / f"checkpoint-{step}" / "fusetune_checkpoint.json").is_file()
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model").exists()
