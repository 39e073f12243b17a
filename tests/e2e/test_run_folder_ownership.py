"""One owner per run folder: a lock held for the whole run, overwrite that deletes only what fusetune wrote, and
unwritable folders named as such.

The table runs the guard in-process (GuardRunFolder.on_run_start, which claims a single run's folder before Hydra
writes .hydra/ into it): each row checks the exit code, the one stderr line and the folder's every byte. The
guarantees about processes start real ones: two `train.py` into one new folder at once, a second run (with
overwrite=true) into the folder of a run that is training, and the app on an unwritable folder.
"""

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fusetune.app import run_lock
from fusetune.app.cli import run_or_exit
from fusetune.app.config import expand_resume_shorthand
from fusetune.app.run_folder import MANIFEST, GuardRunFolder

from ..conftest import CONF, ROOT

FAST = ("logger=none", "data.num_train=64", "data.num_eval=8", "data.num_generate=0",
        "trainer.per_device_train_batch_size=8", "trainer.max_steps=1")  # fmt: skip
HOST = socket.gethostname()
RECORD = ["status.json", "summary.json", "metrics.jsonl", "model", "checkpoint-N", ".hydra", "app.log"]
# a process that owns a folder as a run does: the lock taken, its file naming the owner
HOLDER = """
import fcntl, json, os, socket, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], "fusetune.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then"}).encode())
print("locked", flush=True)
time.sleep(300)
"""


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def train_py(run_dir, *overrides) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *FAST, f"hydra.run.dir={run_dir}", *overrides]


def snapshot(folder: Path) -> dict[str, object]:
    """Every path under ``folder``: a file's bytes, a link's target, None for a folder (links not followed)."""
    if not folder.exists():
        return {}
    seen: dict[str, object] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                seen[rel] = f"-> {os.readlink(path)}"
            else:
                seen[rel] = None if path.is_dir() else path.read_bytes()
    return seen


def write(folder: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text(content)


def manifest(*writes: str) -> str:
    return json.dumps({"writes": ["fusetune.lock", MANIFEST, *writes], "config": {}})


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def hold(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def make_immutable(path: Path) -> Callable[[], None]:
    """Make ``path`` unwritable even for root (chattr +i), or skip where this file system cannot."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode != 0:
        os.chmod(path, 0o555)
        probe = path / ".probe"
        try:
            probe.touch()
        except OSError:
            return lambda: os.chmod(path, 0o755)
        probe.unlink()
        os.chmod(path, 0o755)
        pytest.skip("neither chattr +i nor chmod makes a folder read-only here")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture(autouse=True)
def give_back_locks():
    yield
    run_lock.release_all()  # what an in-process claim took


def guard(run_dir, overrides=()):
    """train.py's guard, in-process: the config composed as the app composes it, then the claim."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=expand_resume_shorthand([*FAST, *overrides, f"hydra.run.dir={run_dir}"]),
            return_hydra_config=True,
        )
    GuardRunFolder().on_run_start(config=cfg)


@dataclass(frozen=True)
class Row:
    id: str
    files: dict[str, str]  # written into the run folder "run" first; "name/" is a folder
    overrides: tuple[str, ...] = ()
    message: str | None = None  # part of the one error line; None: the claim is accepted ("{run}", "{pid}")
    not_in_message: str | None = None
    kept: tuple[str, ...] = ()  # accepted: the names still in the folder besides the lock and the manifest
    live_owner: bool = False  # another process holds the folder's lock
    lock_owner: dict | None = None  # the lock file's content (a stale lock: nobody holds it)
    warning: str | None = None  # accepted: part of a note the claim logs
    extra: dict[str, str] = field(default_factory=dict)  # written beside the run folder


OWN_RECORD = {MANIFEST: manifest(*RECORD), "status.json": '{"status": "failed"}', "summary.json": "{}",
              "metrics.jsonl": "", "model/": "", "model/w.bin": "w", "checkpoint-3/": "", "checkpoint-3/x": "x",
              "checkpoint-4.nonfinite/": "", ".hydra/": "", ".hydra/config.yaml": "seed: 1\n", "app.log": "log",
              ".status.json.tmp": "half", ".summary.json.4242.tmp": "half"}  # fmt: skip
EARLY_ERROR = "data.path x.jsonl: no such file"
FAILED_EARLY = {MANIFEST: manifest("status.json", "metrics.jsonl", "checkpoint-N", ".hydra", "app.log"),
                "status.json": json.dumps({"status": "failed", "error": EARLY_ERROR, "last_step": 0}),
                "metrics.jsonl": "", ".hydra/": "", ".hydra/config.yaml": "seed: 1\n", "app.log": "log"}  # fmt: skip
USERS_OWN = {"model/": "", "model/model.safetensors": "mine", "checkpoint-final/": "", "checkpoint-final/w": "mine"}

ROWS = [
    Row(
        "live-owner-overwrite",
        OWN_RECORD,
        ("overwrite=true",),
        "run folder {run} is in use by pid {pid} on host",
        live_owner=True,
    ),
    Row("live-owner-new-run", {}, (), "run folder {run} is in use by pid {pid} on host " + HOST, live_owner=True),
    Row("live-owner-resume", OWN_RECORD, ("resume=auto",), "is in use by pid {pid}", live_owner=True),
    Row(
        "stale-lock-of-a-dead-pid",
        {},
        (),
        None,
        lock_owner={"pid": "dead", "host": HOST, "started": "then"},
        warning="took over the stale lock of pid {dead}",
    ),
    Row(
        "stale-lock-beside-a-record-resumed",
        {k: v for k, v in OWN_RECORD.items() if k != "summary.json"},
        ("resume=auto",),
        None,
        lock_owner={"pid": "dead", "host": HOST, "started": "then"},
        warning="took over the stale lock of pid {dead}",
        kept=tuple(k.rstrip("/").split("/")[0] for k in OWN_RECORD if k != "summary.json" and k != MANIFEST),
    ),
    Row(
        "lock-of-another-host",
        {},
        (),
        "its lock names pid 7 on host elsewhere, which this host cannot check",
        lock_owner={"pid": 7, "host": "elsewhere", "started": "then"},
    ),
    Row(
        "overwrite-replaces-its-own-record",
        OWN_RECORD,
        ("overwrite=true",),
        None,
        warning="overwrite=true: removed the previous run's record",
    ),
    Row(
        "overwrite-refuses-a-foreign-file",
        {**OWN_RECORD, "notes.txt": "mine"},
        ("overwrite=true",),
        "run folder {run} holds notes.txt, which no fusetune run recorded writing",
    ),
    Row(
        "overwrite-refuses-a-users-checkpoint-beside-a-record",
        {**OWN_RECORD, **USERS_OWN},
        ("overwrite=true",),
        "holds checkpoint-final, which no fusetune run recorded writing",
    ),  # model: listed
    Row(
        "overwrite-a-users-model-and-checkpoint",
        USERS_OWN,
        ("overwrite=true",),
        "run folder {run} holds checkpoint-final, model, which no fusetune run recorded writing",
        not_in_message="overwrite=true",
    ),
    Row(
        "a-users-model-and-checkpoint",
        USERS_OWN,
        (),
        "holds checkpoint-final, model, which no fusetune run",
        not_in_message="overwrite=true",
    ),
    Row(
        "resume-a-users-model-and-checkpoint",
        USERS_OWN,
        ("resume=auto",),
        "fusetune neither resumes nor deletes",
        not_in_message="overwrite=true",
    ),
    Row(
        "overwrite-an-adapter-symlink",
        {MANIFEST: manifest("status.json", "adapter"), "status.json": "{}"},
        ("overwrite=true",),
        "holds adapter (a symbolic link), which no fusetune run recorded writing",
        extra={"elsewhere/": "", "elsewhere/adapter_model.safetensors": "precious"},
    ),
    Row(
        "record-without-leave",
        {MANIFEST: manifest("status.json"), "status.json": "{}"},
        (),
        "run folder {run} holds another run's record (status.json): resume=auto continues that run, "
        "overwrite=true replaces it, or choose another hydra.run.dir",
    ),
    Row(
        "a-record-and-a-foreign-file",
        {MANIFEST: manifest("status.json"), "status.json": "{}", "n.txt": ""},
        (),
        "resume=auto continues that run, or choose another hydra.run.dir; it also holds n.txt",
        not_in_message="overwrite=true replaces",
    ),
    Row(
        "an-attempt-that-failed-before-its-first-step-is-replaced",
        FAILED_EARLY,
        (),
        None,
        warning=f"replaced the record of an attempt that failed before its first step: {EARLY_ERROR}",
    ),
    Row(
        "a-run-that-failed-after-its-first-step-is-kept",
        {**FAILED_EARLY, "status.json": json.dumps({"status": "failed", "error": "boom", "last_step": 3})},
        (),
        "holds another run's record (metrics.jsonl, status.json, .hydra, app.log): resume=auto continues",
    ),
    Row(
        "a-failed-run-with-a-checkpoint-is-kept",
        {**FAILED_EARLY, "checkpoint-2/": "", "checkpoint-2/x": "x"},
        (),
        "holds another run's record (checkpoint-2, metrics.jsonl, status.json",
    ),
    Row(
        "an-attempt-interrupted-before-its-first-step-is-kept",
        {**FAILED_EARLY, "status.json": json.dumps({"status": "interrupted", "last_step": 0})},
        (),
        "holds another run's record (metrics.jsonl, status.json",
    ),
    Row(
        "a-failed-attempt-beside-a-foreign-file-is-kept",
        {**FAILED_EARLY, "notes.txt": "mine"},
        (),
        "resume=auto continues that run, or choose another hydra.run.dir; it also holds notes.txt",
    ),
    Row("new-run-beside-an-unrelated-file", {"notes.txt": "mine"}, (), None, kept=("notes.txt",)),
    Row(
        "manifest-unreadable",
        {MANIFEST: "{not json", "status.json": "{}"},
        ("overwrite=true",),
        f"{MANIFEST} cannot be read",
    ),
    Row(
        "under-a-regular-file",
        {},
        (),
        "run folder {run}/sub cannot be written: a part of its path is a file",
        extra={"run": "a file"},
    ),
]


def _run_dir(row: Row, tmp_path: Path) -> Path:
    return tmp_path / "run" / "sub" if row.id == "under-a-regular-file" else tmp_path / "run"


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_the_claim_of_a_run_folder(row, tmp_path, capsys, caplog):
    run_dir = _run_dir(row, tmp_path)
    write(tmp_path, row.extra)
    if "run" not in row.extra:
        run_dir.mkdir(parents=True)
        write(run_dir, row.files)
    if row.id == "overwrite-an-adapter-symlink":
        (run_dir / "adapter").symlink_to(tmp_path / "elsewhere")
    dead = dead_pid()
    if row.lock_owner is not None:
        owner = {**row.lock_owner, "pid": dead if row.lock_owner["pid"] == "dead" else row.lock_owner["pid"]}
        (run_dir / "fusetune.lock").write_text(json.dumps(owner))
    holder = hold(run_dir) if row.live_owner else None
    before, outside = snapshot(run_dir), snapshot(tmp_path / "elsewhere")
    try:
        if row.message is None:
            guard(run_dir, row.overrides)
        else:
            with pytest.raises(SystemExit) as exited:
                guard(run_dir, row.overrides)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert snapshot(tmp_path / "elsewhere") == outside  # never through a link
    if row.message is not None:
        lines = capsys.readouterr().err.splitlines()
        assert exited.value.code == 2 and len(lines) == 1, lines
        run = run_dir.parent if row.id == "under-a-regular-file" else run_dir
        fill = {"run": run, "pid": getattr(holder, "pid", "")}
        assert lines[0].startswith("fusetune: error: ") and row.message.format(**fill) in lines[0], lines[0]
        assert row.not_in_message is None or row.not_in_message not in lines[0]
        assert snapshot(run_dir) == before  # refused: not a byte changed
        return
    left = sorted(p.name for p in run_dir.iterdir())
    assert left == sorted({"fusetune.lock", MANIFEST, *row.kept}), left
    lock = json.loads((run_dir / "fusetune.lock").read_text())
    assert lock["pid"] == os.getpid() and lock["host"] == HOST
    assert "app.log" in json.loads((run_dir / MANIFEST).read_text())["writes"]
    if row.warning:
        from fusetune.app.run_folder import _claims

        notes = [line for _, line in _claims[run_dir.absolute()].notes]
        assert any(row.warning.format(dead=dead) in line for line in notes), notes


@pytest.mark.parametrize("where", ["folder", "parent"])
def test_a_read_only_folder_is_named_as_such(where, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    run_dir = parent / "run"
    if where == "folder":
        run_dir.mkdir()
    undo = make_immutable(run_dir if where == "folder" else parent)
    try:
        with pytest.raises(SystemExit) as exited:
            guard(run_dir)
    finally:
        undo()
    lines = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"fusetune: error: run folder {run_dir} cannot be written: "), lines[0]
    assert sorted(os.listdir(parent)) == (["run"] if where == "folder" else [])
    assert where == "parent" or os.listdir(run_dir) == []


def test_a_refused_library_run_writes_no_status(tmp_path, compose_cfg, capsys):
    """run_or_exit (a multirun job, the library through the app's boundary) claims in run(): a folder it may not
    have is left as it was, status.json included."""
    write(tmp_path, USERS_OWN)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exited:
        run_or_exit(compose_cfg([*FAST, "overwrite=true"], output_dir=tmp_path))
    assert exited.value.code == 2 and "which no fusetune run recorded writing" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    holder = hold(tmp_path)
    try:
        with pytest.raises(SystemExit):
            run_or_exit(compose_cfg(FAST, output_dir=tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert f"is in use by pid {holder.pid}" in capsys.readouterr().err
    assert snapshot(tmp_path) == {**before, "fusetune.lock": (tmp_path / "fusetune.lock").read_bytes()}


def test_two_runs_started_at_once_into_one_new_folder(tmp_path):
    """Exactly one wins; the other exits 2 with one line naming the winner's lock or record, and leaves nothing of
    its own. (25 steps: the winner is usually still training when the slower of the two starts up.)"""
    for attempt in range(3):
        run_dir = tmp_path / f"new{attempt}"
        procs = [
            subprocess.Popen(
                train_py(run_dir, f"seed={seed}", "save_model=false", "trainer.max_steps=25"),
                cwd=ROOT,
                env=env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for seed in (1, 2)
        ]
        errs = [proc.communicate(timeout=400)[1] for proc in procs]
        codes = [proc.returncode for proc in procs]
        assert sorted(codes) == [0, 2], (codes, [e[-2000:] for e in errs])
        winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
        lines = errs[loser].strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in errs[loser], errs[loser]
        # the loser names the winner's live lock, or (on a loaded host, where the winner finished first) its record
        in_use = f"fusetune: error: run folder {run_dir} is in use by pid {procs[winner].pid}"
        recorded = f"fusetune: error: run folder {run_dir} holds another run's record ("
        assert lines[0].startswith((in_use, recorded)), lines[0]
        seed = winner + 1  # the winner's config everywhere: .hydra/, the manifest, the summary
        assert f"seed: {seed}\n" in (run_dir / ".hydra" / "config.yaml").read_text()
        assert json.loads((run_dir / MANIFEST).read_text())["config"]["seed"] == seed
        assert json.loads((run_dir / "summary.json").read_text())["seed"] == seed
        assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
        assert (run_dir / "fusetune.lock").read_text() == ""  # given back at the end


def test_a_live_run_refuses_a_second_run_with_overwrite(tmp_path):
    """A run still training keeps its folder: overwrite=true is refused, naming it, and nothing changes."""
    run_dir = tmp_path / "live"
    first = subprocess.Popen(train_py(run_dir, "trainer.max_steps=2000", "trainer.logging_steps=1"), cwd=ROOT,
                             env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        start = time.monotonic()
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() - start < 300, "the first run did not start training"
            time.sleep(0.1)
        config = (run_dir / ".hydra" / "config.yaml").read_bytes()
        second = subprocess.run(train_py(run_dir, "overwrite=true", "seed=9"), cwd=ROOT, env=env(),
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert first.poll() is None  # still training
        status = json.loads((run_dir / "status.json").read_text())
    finally:
        first.kill()
        first.wait()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert lines[0].startswith(f"fusetune: error: run folder {run_dir} is in use by pid {first.pid} on host {HOST}")
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config and status["status"] == "running"


def test_the_app_names_an_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("")
    done = subprocess.run(train_py(tmp_path / "file" / "run"), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"fusetune: error: run folder {tmp_path / 'file' / 'run'} cannot be written: "
        "a part of its path is a file, not a folder"
    ]


def test_a_sweep_folder_that_cannot_be_written_is_named(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.sweep.dir={tmp_path / 'file' / 'sweep'}"], return_hydra_config=True)
    with pytest.raises(SystemExit) as exited:
        GuardRunFolder().on_multirun_start(config=cfg)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fusetune: error: sweep folder {tmp_path / 'file' / 'sweep'} cannot be written: "
        "a part of its path is a file, not a folder"
    ]
