"""The run record: metrics.jsonl while training, summary.json at the end."""

import importlib.metadata
import json
import resource
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

VERSIONED = (
    "torch",
    "triton",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "fusetune",
)
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")


def versions() -> dict[str, str | None]:
    found = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    """CUDA peak allocated memory on GPU; the process's max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsRecorder(TrainerCallback):
    """Appends one JSON line per logging step to ``metrics.jsonl`` (train lines carry ``loss``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.last_train: dict = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or any(k in logs for k in SUMMARY_KEYS):
            return
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        line = {"step": state.global_step, "split": split, **logs}
        if split == "train":
            self.last_train = line
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_summary(path: Path, summary: dict) -> None:
    Path(path).write_text(json.dumps(summary, indent=2, default=str) + "\n")


def format_summary(summary: dict) -> str:
    """A few lines for the terminal at the end of a run."""
    evals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary["eval"].items())
    return "\n".join(
        [
            f"fusetune run: {summary['model']} on {summary['data']} | kernels={summary['kernels']} "
            f"trainer={summary['trainer']} seed={summary['seed']}",
            f"  steps {summary['global_step']}  train_loss {summary['train_loss']:.4f}  "
            f"final_loss {summary['final_loss']}",
            f"  {summary['train_tokens_per_second']:.0f} tok/s  peak {summary['peak_memory_gib']:.2f} GiB  "
            f"runtime {summary['runtime_s']:.1f} s",
            f"  eval: {evals or 'none'}",
            f"  record: {summary['output_dir']}",
        ]
    )
