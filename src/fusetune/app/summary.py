"""summary.json: what a finished run trained, on what, how well and how fast, and where its outputs are.

``RunSummary`` is built once, at the end of ``run()``, written last (atomically: a summary.json on disk is a
whole one) and printed in a few lines. Readers of old run folders (the report, the sweeper) read the JSON as
it is, so a field added here never breaks them.
"""

import dataclasses
from pathlib import Path

from ..record_files import write_json_atomically


@dataclasses.dataclass
class RunSummary:
    model: str
    data: str | None  # the formatter for built-in data and mixtures, else the path or hub name
    data_sources: list | None
    mixture: list | None
    chat_template: str | None
    data_cache: dict | None
    data_length: dict | None  # per split: records, those over max_seq_length, and what data.too_long did to them
    distributed: dict
    kernels: str
    fp8_base: bool
    cuda_graphs: dict | None
    trainer: str
    global_step: int
    train_loss: float | None
    resumed_from: str | None
    final_loss: float | None
    final_loss_step: int | None
    preference: dict | None  # trainer=dpo: the last logged reward metrics
    skipped_steps: int
    eval: dict
    samples: list
    train_tokens: int | None  # None: the trainer counts none (ORPO and SimPO, TRL's experimental trainers)
    train_tokens_per_second: float | None
    train_runtime_s: float | None
    peak_memory_gib: float
    runtime_s: float
    seed: int
    device: str
    dtype: str
    parameters: int
    trainable_parameters: int
    saved_to: str | None
    merged_to: str | None
    gguf_to: str | None
    output_dir: str
    versions: dict

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        write_json_atomically(Path(path), self.as_dict())

    def lines(self) -> str:
        """A few lines for the terminal at the end of a run."""
        evals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.eval.items())
        loss_line = f"  steps {self.global_step}  train_loss {_loss(self.train_loss)}"
        loss_line += f"  final_loss {_loss(self.final_loss)}"
        if self.final_loss_step is not None:
            loss_line += f" (step {self.final_loss_step})"
        if self.skipped_steps:
            loss_line += f"  skipped_steps {self.skipped_steps}"
        preference = ["  " + "  ".join(f"{k} {v:.4g}" for k, v in self.preference.items())] if self.preference else []
        return "\n".join(
            [
                f"fusetune run: {self.model} on {self.data} | kernels={self.kernels} trainer={self.trainer} "
                f"seed={self.seed}",
                loss_line,
                f"  {_speed(self.train_tokens_per_second)}  peak {self.peak_memory_gib:.2f} GiB  "
                f"runtime {self.runtime_s:.1f} s",
                *preference,
                f"  eval: {evals or 'none'}",
                f"  record: {self.output_dir}",
            ]
        )


def _speed(value: float | None) -> str:
    return "tokens not counted" if value is None else f"{value:.0f} tok/s"


def _loss(value: float | None) -> str:
    return "not logged" if value is None else f"{value:.4f}"
