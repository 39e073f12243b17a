"""SIGINT and SIGTERM in every phase of a run, sent to real `train.py` processes.

Each case starts a process, waits until its output or its files show the phase (data preparation, model loading,
training, an evaluation between steps, the final save, the final evaluation, generation), sends a real signal,
and checks: the process ends within seconds, exit code 128 + the signal, status.json "interrupted" naming the
signal and the phase, no summary.json, one stderr line that says where it stopped and whether a checkpoint is
there to resume from, and a complete checkpoint where the signal came between training steps. A second signal
ends the process at once. The cases run side by side (each process mostly imports and waits), about a minute.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fusetune.data.cache import KEY_FILE
from fusetune.training.checkpoints import is_complete

from ..conftest import ROOT

STOPS_WITHIN = 15.0  # seconds from the signal to the exit, with every case running at once on 2 cores
BASE = ["logger=none", "seed=5", "data.num_train=2000", "data.num_eval=8", "data.num_generate=0",
        "trainer.logging_steps=1"]  # fmt: skip
TINY = ROOT / "src" / "fusetune" / "assets" / "tiny_llama" / "config.json"


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1"}  # fmt: skip


class Watched:
    """A process whose stdout and stderr are read as they come (progress bars end their lines with \\r)."""

    started: list["Watched"] = []

    def __init__(self, command: list[str], run_dir: Path | None = None):
        self.run_dir = run_dir
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        Watched.started.append(self)
        self.text = {"stdout": "", "stderr": ""}
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.text]
        for reader in self.readers:
            reader.start()
        self.signalled_at = 0.0

    def _read(self, name: str) -> None:
        stream = getattr(self.proc, name)
        while chunk := os.read(stream.fileno(), 65536):
            self.text[name] += chunk.decode(errors="replace")

    def wait_for(self, ready, what: str, timeout: float = 300) -> None:
        start = time.monotonic()
        while not ready(self):
            assert self.proc.poll() is None, f"the process ended before {what}: {self.text['stderr'][-3000:]}"
            assert time.monotonic() - start < timeout, f"no {what} after {timeout} s: {self.text['stderr'][-2000:]}"
            time.sleep(0.02)

    def send(self, sig: int) -> None:
        self.signalled_at = self.signalled_at or time.monotonic()
        self.proc.send_signal(sig)

    def finish(self) -> float:
        """Seconds from the first signal to the exit."""
        try:
            self.proc.wait(timeout=180)
        finally:
            self.proc.kill()
        ended = time.monotonic()
        for reader in self.readers:
            reader.join(timeout=10)
        return ended - self.signalled_at

    @property
    def last_line(self) -> str:
        """stderr's last line, after any progress bar left on it."""
        line = re.split(r"[\r\n]", self.text["stderr"].strip())[-1]
        return line[line.find("fusetune: ") :] if "fusetune: " in line else line


def seen(pattern: str, stream: str = "stderr"):
    return lambda w: re.search(pattern, w.text[stream]) is not None


def logged_step(step: int):
    def ready(w: Watched) -> bool:
        path = w.run_dir / "metrics.jsonl"
        return path.is_file() and f'"step": {step}, "split": "train"' in path.read_text()

    return ready


@dataclass
class Case:
    sig: int
    overrides: list[str]
    ready: object  # Watched -> bool: the phase has begun
    phase: str  # status.json's phase
    where: str  # the stderr line: "fusetune: interrupted {where}: ..." (a regex)
    checkpoint_at: int | None = None  # a complete checkpoint of this step (-1: of the step it stopped at)
    needs: list[str] = field(default_factory=list)  # "jsonl": a large data file; "medium": a larger model


CASES = {
    # a large file read, checked and formatted: the datasets library's loader, our checks and formatter
    "loading-a-large-data-file": Case(
        signal.SIGTERM,
        ["data=completion", "data.path={jsonl}", "trainer.max_steps=2"],
        seen(r"Generating train split|Map"),
        "data preparation",
        "during data preparation",
        needs=["jsonl"],
    ),
    # the issue's `timeout 200` on a large mixture, here while TRL tokenizes it
    "tokenizing-a-mixture": Case(
        signal.SIGTERM,
        [
            "data=mixture",
            "data.sources=[{path: '{jsonl}', formatter: completion, weight: 1}]",
            "data.mixture_size=150000",
            "trainer.max_steps=2",
        ],  # fmt: skip
        seen(r"Tokenizing train dataset"),
        "data preparation",
        "during data preparation",
        needs=["jsonl"],
    ),
    "model-loading": Case(
        signal.SIGINT,
        ["model.config={medium}", "trainer.max_steps=2"],
        seen(r"kernels=auto chose", "stdout"),
        "model loading",
        "during model loading",
        needs=["medium"],
    ),
    "training": Case(
        signal.SIGTERM, ["trainer.max_steps=400"], logged_step(1), "training", r"at step \d+", checkpoint_at=-1
    ),
    "evaluation-between-steps": Case(
        signal.SIGINT,
        ["trainer.max_steps=400", "data.num_eval=6000", "trainer.eval_strategy=steps", "trainer.eval_steps=2"],
        logged_step(2),
        "evaluation",
        "during evaluation at step 2",
        checkpoint_at=2,
    ),
    "the-final-save": Case(
        signal.SIGINT,
        ["model.config={medium}", "trainer.max_steps=1", "trainer.per_device_train_batch_size=2"],
        seen(r"Writing model shards"),
        "the final save",
        "during the final save",
        needs=["medium"],
    ),
    "the-final-evaluation": Case(
        signal.SIGTERM,
        ["trainer.max_steps=2", "data.num_eval=6000", "trainer.eval_strategy=steps", "trainer.eval_steps=1000"],
        # the second evaluation's progress bar (6000 records, batches of 8): the Trainer evaluates at the last step too
        lambda w: w.text["stderr"].count(" 0/750 [") >= 2,
        "the final evaluation",
        "during the final evaluation",
    ),
    "generation": Case(
        signal.SIGINT,
        ["trainer.max_steps=2", "data.num_eval=3000", "data.num_generate=3000"],
        seen(r"exact match: generating", "stdout"),
        "generation",
        "during generation",
    ),
}


def medium_config(tmp: Path) -> Path:
    """The tiny Llama made ~50M parameters: random initialization, a step and a save take a second or more."""
    config = json.loads(TINY.read_text())
    config.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=24)
    (tmp / "medium").mkdir()
    (tmp / "medium" / "config.json").write_text(json.dumps(config))
    return tmp / "medium"


def large_jsonl(tmp: Path, records: int = 150_000) -> Path:
    path = tmp / "large.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"add {n} {n + 7}=", "completion": str(2 * n + 7)}) + "\n"
                            for n in range(records)))  # fmt: skip
    return path


def train(tmp: Path, overrides: list[str], needs: list[str]) -> Watched:
    given = {"{jsonl}": large_jsonl(tmp) if "jsonl" in needs else None}
    given["{medium}"] = medium_config(tmp) if "medium" in needs else None
    for name, value in given.items():
        overrides = [o.replace(name, str(value)) for o in overrides]
    command = [sys.executable, str(ROOT / "train.py"), *BASE, f"data.cache_dir={tmp / 'cache'}", *overrides,
               f"hydra.run.dir={tmp / 'run'}"]  # fmt: skip
    return Watched(command, tmp / "run")


def signalled(tmp: Path, case: Case) -> tuple[Watched, float]:
    watched = train(tmp, case.overrides, case.needs)
    watched.wait_for(case.ready, case.phase)
    watched.send(case.sig)
    return watched, watched.finish()


def signalled_twice(tmp: Path) -> tuple[Watched, float]:
    """A first SIGTERM between steps waits for the step; a second one ends the process at once."""
    watched = train(
        tmp, ["model.config={medium}", "trainer.max_steps=400", "trainer.per_device_train_batch_size=8"], ["medium"]
    )
    watched.wait_for(seen(r"/400 \["), "training")
    watched.send(signal.SIGTERM)
    time.sleep(0.2)
    watched.send(signal.SIGTERM)
    return watched, watched.finish()


OWN_CASE = {"test_a_second_signal_ends_the_process_at_once": "twice"}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """The selected cases, three at a time: {name: (the watched process, seconds from the signal to the exit)}."""
    tests = [item for item in request.session.items if item.module is request.module]
    selected = {item.callspec.params["name"] if hasattr(item, "callspec") else OWN_CASE[item.name] for item in tests}
    folders = {name: tmp_path_factory.mktemp(name) for name in selected}
    jobs = {name: (signalled, folders[name], case) for name, case in CASES.items() if name in selected}
    if "twice" in selected:
        jobs["twice"] = (signalled_twice, folders["twice"])
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {name: pool.submit(*job) for name, job in jobs.items()}
            return {name: future.result() for name, future in futures.items()}, folders
    finally:
        for watched in Watched.started:
            watched.proc.kill()


def status_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_a_signal_stops_the_run_within_seconds_and_says_where(outcomes, name):
    case = CASES[name]
    (watched, took), folder = outcomes[0][name], outcomes[1][name]
    run_dir, stderr = watched.run_dir, watched.text["stderr"]
    assert watched.proc.returncode == 128 + case.sig, stderr[-3000:]
    assert took < STOPS_WITHIN, f"{took:.1f} s from the signal to the exit"
    status = status_of(run_dir)
    assert status["status"] == "interrupted" and status["phase"] == case.phase, status
    assert status["signal"] == case.sig.name and status["error"].startswith(case.sig.name)
    assert not (run_dir / "summary.json").exists() and "Traceback" not in stderr
    assert (run_dir / "fusetune.lock").read_text() == ""  # given back, not left stale for the resume to take over
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    if case.checkpoint_at is None:
        assert not checkpoints and status["checkpoint"] is None
        assert re.fullmatch(rf"fusetune: interrupted {case.where}: there is no checkpoint to resume from",
                            watched.last_line), watched.last_line  # fmt: skip
    else:
        step = status["last_step"] if case.checkpoint_at == -1 else case.checkpoint_at
        assert [c.name for c in checkpoints] == [f"checkpoint-{step}"] and is_complete(checkpoints[0])
        assert status["checkpoint"] == str(checkpoints[0])
        assert re.fullmatch(rf"fusetune: interrupted {case.where}: checkpoint saved in {checkpoints[0]}; "
                            "resume=auto continues", watched.last_line), watched.last_line  # fmt: skip
    cache = folder / "cache"  # a unit cut short leaves nothing a later run would take, nor any leftover
    assert not cache.exists() or all((unit / KEY_FILE).is_file() for unit in cache.iterdir()), list(cache.iterdir())
    if case.phase == "the final save":  # the save completed before the run stopped
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run_dir / "model").iterdir()}


def test_a_second_signal_ends_the_process_at_once(outcomes):
    (watched, took), folder = outcomes[0]["twice"], outcomes[1]["twice"]
    assert watched.proc.returncode == -signal.SIGTERM, watched.text["stderr"][-3000:]  # killed by it, no clean-up
    assert took < 5, f"{took:.1f} s"
    status = status_of(folder / "run")
    assert status["status"] == "interrupted" and status["error"] == "SIGTERM twice during training: stopped at once"
    assert not (folder / "run" / "summary.json").exists()
