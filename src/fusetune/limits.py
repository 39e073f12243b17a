"""The allowed ranges of numeric settings: one table, read by the app's config check and by the library.

A value out of range is one line naming the key and the range, before anything loads: never a ZeroDivisionError
or an IndexError deep in training. None (null) always passes: it means "the default" wherever a key allows it.
"""

import math
from dataclasses import dataclass, replace

from .errors import FusetuneError


@dataclass(frozen=True)
class Range:
    """A finite number from ``low`` to ``high``; ``above``/``below``: the bound itself is refused."""

    low: float | None = None
    high: float | None = None
    above: bool = False
    below: bool = False
    note: str = ""  # what a special value means
    when: tuple[str, str] | None = None  # checked only where this sibling key holds this value

    def allows(self, value) -> bool:
        if value is None:
            return True
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.above and value == self.low)):
            return False
        return self.high is None or value < self.high or (value == self.high and not self.below)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.above else '>='} {_number(self.low)}"
        return f"in {'(' if self.above else '['}{_number(self.low)}, {_number(self.high)}{')' if self.below else ']'}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


SEED = Range(0, 2**32 - 1)  # numpy's seeds
STEPS = Range(0, above=True, note="below 1: a fraction of the run")

# FastSFTConfig's fields (the app's trainer keys)
TRAINER = {
    "learning_rate": Range(0),
    "embedding_learning_rate": Range(0),
    "per_device_train_batch_size": Range(1),
    "per_device_eval_batch_size": Range(1),
    "gradient_accumulation_steps": Range(1),
    "num_train_epochs": Range(0),
    "max_steps": Range(-1, note="-1: train by num_train_epochs"),
    "warmup_steps": Range(0, note="below 1: a fraction of the run"),
    "weight_decay": Range(0),
    "max_grad_norm": Range(0, note="0: no clipping"),
    "adam_beta1": Range(0, 1, below=True),
    "adam_beta2": Range(0, 1, below=True),
    "adam_epsilon": Range(0, above=True),
    "label_smoothing_factor": Range(0, 1, below=True),
    "dataloader_num_workers": Range(0),
    "max_skipped_fraction": Range(0, 1),
    "max_skipped_in_a_row": Range(1),
    "logging_steps": replace(STEPS, when=("logging_strategy", "steps")),
    "eval_steps": replace(STEPS, when=("eval_strategy", "steps")),
    "save_steps": replace(STEPS, when=("save_strategy", "steps")),
    "seed": SEED,
    "data_seed": SEED,
}
# FastModel.from_pretrained's arguments and the app's model keys. A sequence needs two tokens: a next-token target
# and one before it to predict it from.
MODEL = {"max_seq_length": Range(2, note="a next-token target needs a token before it")}
# FastModel.get_peft_model's arguments
LORA = {"r": Range(1), "lora_alpha": Range(0, above=True), "lora_dropout": Range(0, 1, below=True)}


def _get(values, name: str):
    return values.get(name) if isinstance(values, dict) else getattr(values, name, None)


def _plain(value):
    return getattr(value, "value", value)  # an Enum's value: the strategies are str Enums in TrainingArguments


def problems(values, table: dict[str, Range], prefix: str = "") -> list[str]:
    """One line for each value of ``values`` (a mapping or an object) out of its range in ``table``."""
    found = []
    for name, allowed in table.items():
        value = _get(values, name)
        if allowed.when is not None and str(_plain(_get(values, allowed.when[0]))) != allowed.when[1]:
            continue
        if not allowed.allows(value):
            note = f" ({allowed.note})" if allowed.note else ""
            found.append(f"{prefix}{name} must be {allowed}{note}, got {value}")
    return found


def refuse(values, table: dict[str, Range], prefix: str = "") -> None:
    """Raise FusetuneError, one line, where a value is out of range."""
    found = problems(values, table, prefix)
    if found:
        raise FusetuneError("; ".join(found))
