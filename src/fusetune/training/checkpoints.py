"""Checkpoints that are known to be whole and unchanged, and the newest one to resume from.

The HF Trainer writes ``checkpoint-N/`` file by file (weights, optimizer, scheduler, RNG states,
``trainer_state.json`` last). A process killed in the middle leaves a folder that looks like a
checkpoint. After the Trainer has written all of it, ``MarkComplete`` checks that the trainable
weights are finite, fsyncs every file and folder of it, and writes ``fusetune_checkpoint.json`` (the
step, each file's size and SHA-256, and the seconds hashing took) by an atomic rename, fsynced too.

``problem(folder)`` says why a checkpoint cannot be resumed (no marker, a file missing, of another size,
or whose content differs from its hash), naming the file; ``verify=False`` compares sizes only, for
messages that need no reading of the weights. ``newest_complete(folder)`` tries the checkpoints newest
first and takes the first whole one, with one warning for each it passes over. A marker written
before hashes were recorded is accepted with a warning (its sizes checked only): it is unverified.

A checkpoint whose weights are not finite gets no marker: it is renamed ``checkpoint-N.nonfinite`` and
training stops, so the last good checkpoint stays the newest. ``saving(path)`` turns a full disk during
a save into one line; the half-written checkpoint then gets no marker, and is removed.
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..errors import FusetuneError
from ..record_files import fsync_folder, write_json_atomically

log = logging.getLogger(__name__)
MARKER = "fusetune_checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
CHUNK = 4 * 2**20
# what torch.save's zip writer and safetensors say when a write fails for want of space
_DISK_FULL_WORDS = ("no space left on device", "unexpected pos", "file write failed", "storagefull")


def _files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def file_hash(path: Path, sync: bool = False) -> str:
    """SHA-256 of the file, read in chunks of ``CHUNK`` bytes; ``sync``: fsync it too."""
    digest, buffer = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def mark(folder: Path, step: int) -> dict:
    """Fsync every file and folder of the checkpoint, then write its marker (sizes, hashes) durably."""
    folder = Path(folder)
    started = time.perf_counter()
    sizes = _files(folder)
    hashes = {name: file_hash(folder / name, sync=True) for name in sizes}
    for sub in {(folder / name).parent for name in sizes} | {folder}:
        fsync_folder(sub)
    seconds = time.perf_counter() - started
    marker = {"step": step, "files": sizes, "sha256": hashes, "hash_seconds": round(seconds, 3)}
    write_json_atomically(folder / MARKER, marker, durable=True)
    fsync_folder(folder.parent)  # the checkpoint's own name
    log.info("%s: %.1f MiB hashed and synced in %.2f s", folder.name, sum(sizes.values()) / 2**20, seconds)
    return marker


def problem(folder: Path, verify: bool = True) -> str | None:
    """Why ``folder`` is not a whole checkpoint (naming the file), or None. ``verify``: compare the hashes
    too (reads every file); else sizes only. A marker without hashes passes on its sizes, with a warning
    when ``verify`` asked for more."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text())
        listed = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MARKER}"
    present = _files(folder)
    for name, size in listed.items():
        if name not in present:
            return f"{name} is missing"
        if present[name] != size:
            return f"{name} has {present[name]} bytes, the marker says {size}"
    hashes = marker.get("sha256")
    if not verify:
        return None
    if hashes is None:
        log.warning("%s: its marker holds no hashes; resumed unverified (sizes checked)", folder)
        return None
    started = time.perf_counter()
    for name, expected in hashes.items():
        if file_hash(folder / name) != expected:
            return f"{name} has changed since it was saved (its SHA-256 differs from the marker's)"
    log.info("%s: verified in %.2f s", folder.name, time.perf_counter() - started)
    return None


def is_complete(folder: Path, verify: bool = True) -> bool:
    return problem(folder, verify) is None


def step_of(folder: Path) -> int | None:
    match = _NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def newest_complete(folder: Path, verify: bool = True, warn: bool = True) -> Path | None:
    """The whole ``checkpoint-N`` in ``folder`` with the largest N, or None. Tried newest first; one warning
    (``warn``) for each marked checkpoint passed over, naming it and its file."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of, reverse=True)
    for checkpoint in found:
        why = problem(checkpoint, verify)
        if why is None:
            return checkpoint
        if warn and (checkpoint / MARKER).exists():  # an unmarked one was never finished: nothing to say
            log.warning("%s skipped: %s; trying the next older checkpoint", checkpoint, why)
    return None


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or one it wraps) is a write that failed for want of space."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(error).lower() for words in _DISK_FULL_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_mib(path: Path) -> float:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 2**20


@contextmanager
def saving(path, remove_partial: bool = False):
    """Around a save to ``path``: a full disk becomes one line (FusetuneError) naming the path and the space
    left; ``remove_partial``: the half-written folder is removed then, which frees the space it took."""
    try:
        yield
    except FusetuneError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        free = free_mib(path)
        if remove_partial:
            shutil.rmtree(path, ignore_errors=True)
        detail = " ".join(str(error).split())[:200]
        raise FusetuneError(f"disk full while saving {path} (free: {free:.1f} MiB): {detail}") from None


def trainable_weights_finite(model) -> bool:
    """One device-side reduction over the trainable weights, one host read."""
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters() if p.requires_grad]
    return bool(torch.stack(flags).all()) if flags else True


class MarkComplete(TrainerCallback):
    """After each save: the marker for a whole, finite checkpoint; a non-finite one is set aside and stops."""

    def __init__(self):
        self.bad_step: int | None = None

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # every rank checks (the weights are the same on each), so every rank stops together
        if model is not None and not trainable_weights_finite(model):
            self.bad_step = state.global_step
            control.should_training_stop = True
            if state.is_world_process_zero and folder.is_dir():
                folder.rename(folder.with_name(folder.name + ".nonfinite"))
                log.error("checkpoint-%d holds non-finite weights: set aside, training stops", state.global_step)
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its part (its RNG state) before the hashes
        if state.is_world_process_zero and folder.is_dir():
            mark(folder, state.global_step)
