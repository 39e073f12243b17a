"""Checkpoints are verified, not measured: hashes in the marker, fsynced, checked before resuming; a full disk
during a save is one line, and the half-written checkpoint is never resumed."""

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fusetune.app.cli import run_or_exit
from fusetune.app.run import run
from fusetune.training import checkpoints
from fusetune.training.checkpoints import MARKER, newest_complete, problem

FAST = ["logger=none", "data.num_train=128", "data.num_eval=0", "data.num_generate=0", "trainer.logging_steps=1"]
SAVES = ["trainer.max_steps=4", "trainer.save_strategy=steps", "trainer.save_steps=2", "seed=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run folders (full fine-tune: model.safetensors; LoRA: adapter_model.safetensors) with checkpoint-2 and -4."""
    from hydra import compose, initialize_config_dir

    from ..conftest import CONF

    folders = {}
    for kind, extra in [("full", []), ("lora", ["model=tiny_llama_lora"])]:
        out = tmp_path_factory.mktemp(kind)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[*FAST, *SAVES, *extra])
        cfg.output_dir = str(out)
        run(cfg)
        folders[kind] = (out, extra)
    return folders


def killed_copy(trained, kind, tmp_path) -> Path:
    """A copy of the run folder as a run killed after checkpoint-4 leaves it."""
    source, _ = trained[kind]
    out = tmp_path / kind
    shutil.copytree(source, out)
    for name in ("summary.json", "model", "adapter"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (out / "status.json").write_text(json.dumps({"status": "running", "last_step": 4}))
    return out


def flip_middle(path: Path, count: int = 4096) -> None:
    """Invert ``count`` bytes in the middle of the file: the size stays, the content does not."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


CORRUPTED = [
    ("full", "model.safetensors"),
    ("lora", "adapter_model.safetensors"),
    ("full", "optimizer.pt"),
    ("lora", "optimizer.pt"),
    ("full", "trainer_state.json"),
    ("full", "rng_state.pth"),
    ("lora", "scheduler.pt"),
]


@pytest.mark.parametrize(("kind", "name"), CORRUPTED)
def test_a_same_size_corrupted_file_is_skipped_for_the_previous_checkpoint(trained, tmp_path, caplog, kind, name):
    out = killed_copy(trained, kind, tmp_path)
    newest = out / "checkpoint-4"
    size = (newest / name).stat().st_size
    flip_middle(newest / name)
    assert (newest / name).stat().st_size == size
    assert problem(newest, verify=False) is None  # sizes alone would take it
    with caplog.at_level(logging.WARNING, logger="fusetune.training.checkpoints"):
        assert newest_complete(out) == out / "checkpoint-2"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{newest} skipped: {name} has changed since it was saved (its SHA-256 differs from the marker's); "
        "trying the next older checkpoint"
    ]


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("flip model.safetensors", "model.safetensors has changed since it was saved"),
        ("truncate optimizer.pt", "optimizer.pt has 100 bytes, the marker says"),
        ("delete rng_state.pth", "rng_state.pth is missing"),
        ("garble marker", f"no readable {MARKER}"),
    ],
)
def test_resume_auto_through_the_app_takes_the_older_checkpoint(trained, tmp_path, compose_cfg, damage, why):
    out = killed_copy(trained, "full", tmp_path)
    action, name = damage.split()
    path = out / "checkpoint-4" / (MARKER if name == "marker" else name)
    if action == "flip":
        flip_middle(path)
    elif action == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif action == "delete":
        path.unlink()
    else:
        path.write_text("{not json")
    assert why in problem(out / "checkpoint-4")
    cfg = _cfg(compose_cfg, trained, "full", out, "resume=auto")
    summary = run(cfg)
    assert summary["resumed_from"] == str(out / "checkpoint-2") and summary["global_step"] == 4
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


def _cfg(compose_cfg, trained, kind, out, *overrides):
    return compose_cfg([*FAST, *SAVES, *trained[kind][1], *overrides], output_dir=out)


@pytest.mark.parametrize(("kind", "name"), [("full", "model.safetensors"), ("lora", "optimizer.pt")])
def test_resume_path_to_a_corrupted_checkpoint_is_one_line(trained, tmp_path, compose_cfg, capsys, kind, name):
    out = killed_copy(trained, kind, tmp_path)
    flip_middle(out / "checkpoint-4" / name)
    with pytest.raises(SystemExit) as ended:
        run_or_exit(_cfg(compose_cfg, trained, kind, out, f"resume={out / 'checkpoint-4'}"))
    assert ended.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"fusetune: error: resume: {out / 'checkpoint-4'} cannot be resumed: {name} has changed since it was saved "
        "(its SHA-256 differs from the marker's)"
    )
    assert "Traceback" not in "\n".join(err)


def test_the_marker_holds_each_files_hash_and_the_hashing_time(trained):
    folder = trained["full"][0] / "checkpoint-4"
    marker = json.loads((folder / MARKER).read_text())
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    assert sorted(marker["sha256"]) == sorted(marker["files"]) == files
    for name, digest in marker["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert marker["step"] == 4 and isinstance(marker["hash_seconds"], float) and marker["hash_seconds"] >= 0


@pytest.mark.parametrize("how", ["resume=auto", "resume=PATH"])
def test_a_marker_without_hashes_is_resumed_unverified_with_a_warning(trained, tmp_path, caplog, how):
    out = killed_copy(trained, "full", tmp_path)
    path = out / "checkpoint-4" / MARKER
    marker = json.loads(path.read_text())
    path.write_text(json.dumps({"step": marker["step"], "files": marker["files"]}))  # as older versions wrote it
    with caplog.at_level(logging.WARNING, logger="fusetune.training.checkpoints"):
        if how == "resume=auto":
            assert newest_complete(out) == out / "checkpoint-4"
        else:  # what run_folder.claim asks of a resume=PATH
            assert problem(out / "checkpoint-4") is None
    assert problem(out / "checkpoint-4", verify=False) is None
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{out / 'checkpoint-4'}: its marker holds no hashes; resumed unverified (sizes checked)"
    ]


def test_every_file_and_folder_is_fsynced_before_the_marker(trained, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(trained["lora"][0] / "checkpoint-2", out / "checkpoint-2")
    folder = out / "checkpoint-2"
    (folder / MARKER).unlink()
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    checkpoints.mark(folder, 2)
    files = [str(p) for p in folder.rglob("*") if p.is_file() and p.name != MARKER]
    marker_tmp = synced.index(str(folder / f".{MARKER}.{os.getpid()}.tmp"))
    assert set(files) <= set(synced[:marker_tmp])  # every file before the marker
    assert str(folder) in synced[:marker_tmp]  # the folder's entries before the marker
    assert synced[marker_tmp + 1 :] == [str(folder), str(out)]  # the marker's rename, the checkpoint's name
    assert newest_complete(out) == folder


# ---- a full disk during a save ----------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1.5 MiB tmpfs (root only): the tiny model's checkpoint does not fit."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def zip_writer_fails(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1088 vs 978")


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    ("case", "saved", "detail"),
    [
        ("tmpfs", "checkpoint-2", "No space left on device"),
        ("torch.save", "checkpoint-2", "unexpected pos 1088 vs 978"),
        ("final model", "model", "No space left on device"),
    ],
)
def test_a_full_disk_during_a_save_is_one_line(trained, tmp_path, capsys, monkeypatch, request, case, saved, detail):
    out = tmp_path / "run"
    overrides = list(SAVES)
    if case == "tmpfs":
        out = request.getfixturevalue("small_tmpfs") / "run"
    elif case == "torch.save":
        monkeypatch.setattr(torch, "save", zip_writer_fails)
    else:
        overrides = ["trainer.max_steps=2"]
        monkeypatch.setattr("transformers.modeling_utils.safe_save_file", no_space)
    from hydra import compose, initialize_config_dir

    from ..conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, *overrides])
    cfg.output_dir = str(out)
    with pytest.raises(SystemExit) as ended:
        run_or_exit(cfg)
    assert ended.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"fusetune: error: disk full while saving {out / saved} (free: ") and detail in line
    assert " MiB): " in line
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    assert not (out / saved / MARKER).exists() and newest_complete(out) is None
    assert not (out / "summary.json").exists()
