"""A failed or refused attempt leaves nothing that blocks the next one.

One table: an attempt that fails before its first step, then the corrected command into the same run folder,
which trains. A refused config never makes the folder (run_folder.GuardRunFolder, as train.py runs it); a failure
found later (the data, the model) leaves a "failed" record that the rerun replaces, saying so. A default run folder
(no hydra.run.dir) of a user mistake is removed: the real train.py, once.
"""

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from hydra import compose, initialize_config_dir

from fusetune.app import run_lock
from fusetune.app.cli import run_or_exit
from fusetune.app.run_folder import GuardRunFolder

from ..conftest import CONF, ROOT
from .app_runs import error_line, exit_and_stderr

FAST = ("logger=none", "trainer.max_steps=2", "data.num_train=32", "data.num_eval=8", "data.num_generate=0",
        "save_model=false")  # fmt: skip
ALPACA = {"instruction": "Double it", "input": "3", "output": "6"}


@dataclass(frozen=True)
class Row:
    id: str
    overrides: tuple[str, ...]  # the failed attempt's ("{tmp}": the row's folder)
    message: str  # its one line starts with this
    files: dict[str, str] = field(default_factory=dict)
    guard: bool = False  # refused by train.py's guard, before the folder is made


ROWS = [
    Row(
        "a-refused-config",
        ("experiment=qlora_8b",),
        "data: formatter 'alpaca' needs exactly one of data.path or data.name",
        guard=True,
    ),
    Row("a-refused-enum-value", ("trainer.optim=adamw_8bitt",), "trainer.optim: 'adamw_8bitt' is not", guard=True),
    Row(
        "a-missing-data-file",
        ("data=alpaca", "data.path={tmp}/missing.jsonl"),
        "data.path: no such file: {tmp}/missing.jsonl",
    ),
    Row(
        "a-bad-record",
        ("data=alpaca", "data.path={tmp}/a.jsonl"),
        "data.path {tmp}/a.jsonl: 1 bad record: line 2: 'output' is missing or null",
        {"a.jsonl": json.dumps(ALPACA) + "\n" + json.dumps({"instruction": "x"}) + "\n"},
    ),
    Row(
        "a-model-that-is-not-there",
        ("model.name_or_path={tmp}/no-model",),
        "model.tokenizer: cannot load '{tmp}/no-model",
    ),
    Row("a-config-refused-in-a-library-call", ("trainer.max_steps=0",), "trainer.max_steps=0 trains nothing"),
]


@pytest.fixture(autouse=True)
def give_back_locks():
    yield
    run_lock.release_all()


def guard(run_dir, overrides):
    """train.py's guard, in-process: the config composed as the app composes it, then the claim."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    GuardRunFolder().on_run_start(config=cfg)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_the_corrected_rerun_into_the_same_folder_trains(row, tmp_path, compose_cfg, capsys, caplog):
    for name, text in row.files.items():
        (tmp_path / name).write_text(text)
    run_dir = tmp_path / "run"
    first = [*FAST, *(o.format(tmp=tmp_path) for o in row.overrides)]
    if row.guard:
        with pytest.raises(SystemExit) as exited:
            guard(run_dir, first)
        code, stderr = exited.value.code, capsys.readouterr().err
    else:
        code, stderr = exit_and_stderr(first, run_dir, False, compose_cfg, capsys)
    assert code == 2
    assert error_line(stderr).startswith(f"fusetune: error: {row.message.format(tmp=tmp_path)}")
    if row.guard:
        assert not run_dir.exists(), "refused before the folder is made"
    else:
        assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    run_lock.release_all()

    with caplog.at_level(logging.INFO, logger="fusetune.app.run_folder"):
        run_or_exit(compose_cfg(FAST, output_dir=run_dir))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and status["last_step"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 2
    replaced = [r.getMessage() for r in caplog.records if "failed before its first step" in r.getMessage()]
    assert len(replaced) == (0 if row.guard else 1), replaced


def test_a_mistake_in_a_default_run_folder_leaves_no_folder(tmp_path):
    """No hydra.run.dir: outputs/runs/<time> under the working directory; the one line says it all."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST, "data=alpaca", "data.path=missing.jsonl"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc.stderr) == "fusetune: error: data.path: no such file: missing.jsonl"
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
