"""Older spellings that users still write, in one table.

Two kinds: trainer keyword arguments that TRL moved into ``SFTConfig`` (``SFTTrainer(...,
dataset_text_field="text", max_seq_length=2048)``), and ``TrainingArguments`` / ``SFTConfig`` fields
that transformers or TRL renamed or removed (``evaluation_strategy``, ``logging_dir``, ...). Each
use warns once with a FutureWarning that names the new spelling. A value given under both spellings
that disagrees is an error; a removed field whose old value would change nothing is dropped with
the warning, and one whose value cannot be honoured is an error.
"""

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

from ..errors import FusetuneError

DROP = object()  # a converter's answer for "this value asks for nothing": leave the new field alone


@dataclasses.dataclass(frozen=True)
class Rename:
    old: str
    new: str | None  # the field it became (None: removed); for trainer keywords, a config field
    note: str = ""  # what to write instead, when ``new`` alone does not say it
    convert: Callable[[Any], Any] | None = None  # old value -> new value (or DROP); raises when impossible


def _warmup_fraction(value):
    if not 0 <= value < 1:
        raise FusetuneError(f"warmup_ratio must be in [0, 1), got {value}")
    return value


def _sampling(value):
    return "group_by_length" if value else DROP


def _safetensors(value):
    if not value:
        raise FusetuneError("save_safetensors=False: transformers 5 saves only safetensors; remove the argument")
    return DROP


# SFTConfig / TrainingArguments fields, by their older names.
CONFIG_RENAMES = {
    r.old: r
    for r in (
        Rename("evaluation_strategy", "eval_strategy"),
        Rename("max_seq_length", "max_length"),
        Rename("no_cuda", "use_cpu"),
        Rename("per_gpu_train_batch_size", "per_device_train_batch_size"),
        Rename("per_gpu_eval_batch_size", "per_device_eval_batch_size"),
        Rename("push_to_hub_token", "hub_token"),
        Rename("warmup_ratio", "warmup_steps", "a value below 1 is a fraction of the run", _warmup_fraction),
        Rename("group_by_length", "train_sampling_strategy", 'set to "group_by_length"', _sampling),
        Rename("save_safetensors", None, "checkpoints are always safetensors", _safetensors),
        Rename("overwrite_output_dir", None, "the Trainer never deletes output_dir", lambda v: DROP),
        Rename("include_tokens_per_second", None, "fusetune's run record reports tokens/s", lambda v: DROP),
        # Kept as a FastSFTConfig field, which the trainer hands to the TensorBoard callback.
        Rename(
            "logging_dir", "logging_dir", "transformers 5 takes the TensorBoard folder from TENSORBOARD_LOGGING_DIR"
        ),
    )
}

# SFTTrainer keyword arguments that moved into SFTConfig (TRL 0.9-0.20), by their trainer names.
TRAINER_KEYWORDS = {
    r.old: r
    for r in (
        Rename("dataset_text_field", "dataset_text_field"),
        Rename("max_seq_length", "max_length"),
        Rename("packing", "packing"),
        Rename("dataset_num_proc", "dataset_num_proc"),
        Rename("dataset_kwargs", "dataset_kwargs"),
        Rename("eval_packing", "eval_packing"),
        Rename("model_init_kwargs", "model_init_kwargs"),
        Rename("neftune_noise_alpha", "neftune_noise_alpha"),
        Rename("dataset_batch_size", None, "TRL tokenizes in batches of its own", lambda v: DROP),
        Rename("num_of_sequences", None, "packing fills rows of max_length", lambda v: DROP),
        Rename("chars_per_token", None, "packing fills rows of max_length", lambda v: DROP),
        Rename("infinite", None, "use max_steps", lambda v: DROP),
    )
}


def _message(where: str, rename: Rename, trainer: bool) -> str:
    said = f"{where}({rename.old}=...)"
    if rename.new is None:
        return f"{said} was removed; it is ignored" + (f" ({rename.note})" if rename.note else "")
    if trainer:
        return f"{said} is an older spelling: set SFTConfig({rename.new}=...)"
    if rename.new == rename.old:
        return f"{said}: {rename.note}; fusetune still honours it"
    return f"{said} is an older spelling: use {rename.new}" + (f" ({rename.note})" if rename.note else "")


def _apply(rename: Rename, value, where: str, trainer: bool) -> tuple[str | None, Any]:
    """The (new field, value) an old spelling stands for, or (None, DROP); warns."""
    warnings.warn(_message(where, rename, trainer), FutureWarning, stacklevel=4)
    value = rename.convert(value) if rename.convert else value
    return (rename.new, value) if value is not DROP and rename.new is not None else (None, DROP)


def translate_config_kwargs(kwargs: dict, where: str) -> dict:
    """Config keyword arguments with older spellings replaced by today's (each one warned about)."""
    out = {k: v for k, v in kwargs.items() if k not in CONFIG_RENAMES or CONFIG_RENAMES[k].new == k}
    for old, value in kwargs.items():
        rename = CONFIG_RENAMES.get(old)
        if rename is None:
            continue
        new, value = _apply(rename, value, where, trainer=False)
        if new is None or new == old:
            continue
        if new in out and out[new] != value:
            raise FusetuneError(f"{where}: {old}={value!r} and {new}={out[new]!r} disagree; give only {new}")
        out[new] = value
    return out


def accepts_older_names(cls):
    """Class decorator for a config dataclass: its constructor also takes the older spellings."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **translate_config_kwargs(kwargs, cls.__name__))

    cls.__init__ = __init__
    return cls


def pop_trainer_keywords(kwargs: dict, where: str) -> dict:
    """Remove the config values given as older trainer keywords from ``kwargs``; return them by field."""
    moved = {}
    for old in [k for k in kwargs if k in TRAINER_KEYWORDS]:
        new, value = _apply(TRAINER_KEYWORDS[old], kwargs.pop(old), where, trainer=True)
        if new is not None:
            moved[new] = value
    return moved


def merge_into_config(args, values: dict, where: str) -> None:
    """Set ``values`` on the config ``args``; a field already set to something else is an error."""
    defaults = {f.name: f for f in dataclasses.fields(args)}
    for name, value in values.items():
        field = defaults[name]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        current = getattr(args, name)
        if current != default and current != value:
            raise FusetuneError(
                f"{where}: {name}={value!r} given to the trainer disagrees with args.{name}={current!r}; give it once"
            )
        setattr(args, name, value)
