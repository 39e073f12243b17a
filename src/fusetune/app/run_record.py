"""The run record: status.json from the start, metrics.jsonl while training (summary.json: app.summary)."""

import json
import math
import resource
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..record_files import (
    read_jsonl,
    write_status,  # noqa: F401 (run.py writes status.json through this module)
)
from ..versions import run_versions as versions  # noqa: F401 (run.py: record.versions())

SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    """CUDA peak allocated memory on GPU; the process's max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsRecorder(TrainerCallback):
    """Appends one JSON line per logging step to ``metrics.jsonl`` (train lines carry ``loss``).

    A new run starts the file empty. A resumed run keeps the lines up to its checkpoint's step and drops
    the later ones (those steps run again), so every step stays in the file once; a last line cut short by the
    crash that stopped it is dropped too. A window of skipped
    steps (nan_policy=skip) has a loss of null. ``final_loss`` is the last finite logged loss and its step.
    """

    def __init__(self, path: Path, resume_step: int | None = None, write: bool = True):
        self.path = Path(path)
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [m for m in read_jsonl(self.path) if m.get("step", 0) <= resume_step]
        if write:  # rank 0 of a distributed run; the others only read
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self.last_train: dict = next((m for m in reversed(kept) if m.get("split") == "train"), {})
        self.final_loss: tuple[int, float] | None = last_finite_loss(kept)
        self.skipped_before = self.last_train.get("skipped_steps", 0)  # counted before a resume

    def on_step_end(self, args, state, control, **kwargs):
        """The last step is always logged, so a run records its final loss whatever logging_steps is."""
        if state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or any(k in logs for k in SUMMARY_KEYS):
            return
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        line = {"step": state.global_step, "split": split, **logs}
        if split == "train":
            self.last_train = line
            self.final_loss = last_finite_loss([line]) or self.final_loss
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def last_finite_loss(lines: list[dict]) -> tuple[int, float] | None:
    """(step, loss) of the last train line with a finite loss, or None."""
    for line in reversed(lines):
        loss = line.get("loss") if line.get("split") == "train" else None
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            return line["step"], loss
    return None


# The reward metrics a preference trainer (trainer=dpo) logs; the summary keeps the last logged value of each.
PREFERENCE_METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")


def preference_metrics(line: dict) -> dict | None:
    """The reward metrics of a train line of metrics.jsonl, or None where it has none (an SFT run)."""
    found = {key: line[key] for key in PREFERENCE_METRICS if key in line}
    return found or None


def whole_run_loss(lines: list[dict]) -> float | None:
    """The mean train loss over every step of the run, from metrics.jsonl: each logged loss is the mean over
    the steps since the previous train line, so it counts for that many steps; a null loss (skipped steps)
    counts for none."""
    total = count = 0.0
    previous = 0
    for line in lines:
        if line.get("split") != "train" or "loss" not in line:
            continue
        steps, previous = line["step"] - previous, line["step"]
        if line["loss"] is not None:
            total, count = total + line["loss"] * steps, count + steps
    return total / count if count else None
