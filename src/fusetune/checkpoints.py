"""Checkpoints that are known to be whole, and the newest one to resume from.

The HF Trainer writes ``checkpoint-N/`` file by file (weights, optimizer, scheduler, RNG states,
``trainer_state.json`` last). A process killed in the middle leaves a folder that looks like a
checkpoint. After the Trainer has written all of it, ``MarkComplete`` checks that the trainable
weights are finite and writes ``fusetune_checkpoint.json`` (the step, and each file's size) by an
atomic rename. ``newest_complete(folder)`` takes only checkpoints whose marker is there and whose
files still have the sizes it lists. A checkpoint whose weights are not finite gets no marker: it
is renamed ``checkpoint-N.nonfinite`` and training stops, so the last good checkpoint stays the newest.
"""

import json
import logging
import os
import re
from pathlib import Path

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)
MARKER = "fusetune_checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def write_json_atomically(path: Path, payload: dict) -> None:
    """Write ``payload`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def is_complete(folder: Path) -> bool:
    marker = Path(folder) / MARKER
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    present = _files(Path(folder))
    return all(present.get(name) == size for name, size in listed.items())


def step_of(folder: Path) -> int | None:
    match = _NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def newest_complete(folder: Path) -> Path | None:
    """The complete ``checkpoint-N`` in ``folder`` with the largest N, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return max(found, key=step_of, default=None)


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
        if state.is_world_process_zero and folder.is_dir():
            write_json_atomically(folder / MARKER, {"step": state.global_step, "files": _files(folder)})
