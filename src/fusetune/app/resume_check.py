"""What a resumed run may change: its config against the one its checkpoints were trained with.

A key that changes what training computes (the model, the data, the seed, the learning rate and its schedule,
the batch shape, LoRA, the precision, the kernels, the number of processes) is refused with a one-line diff,
unless ``resume.allow_changes`` names it or a prefix of it (``data`` accepts every data key). Keys that change only
what is logged, evaluated or saved, and a longer run (``trainer.max_steps`` or ``num_train_epochs`` raised), are
allowed and listed in one line. A key that is not named here changes the math.
"""

import copy
import json
from typing import Any

from omegaconf import OmegaConf

from ..errors import FusetuneError

NOT_THE_RUN = ("hydra", "output_dir", "resume", "overwrite")  # how a run starts, not what it trains
WORLD_SIZE = "world_size"  # not a config key: the number of processes, recorded beside the config
# keys, and prefixes of keys ("logger" covers logger.kind), that leave the math as it is
NOT_MATH = (
    "logger",
    "run_name",
    "export",
    "save_model",
    "objective",
    "cpu_threads",
    "allow_single_process",
    "data.cache",
    "data.cache_dir",
    "data.num_generate",
    *(
        f"trainer.{key}"
        for key in (
            "per_device_eval_batch_size",
            "prediction_loss_only",
            "include_for_metrics",
            "batch_eval_metrics",
            "load_best_model_at_end",
            "metric_for_best_model",
            "greater_is_better",
            "disable_tqdm",
            "project",
            "skip_memory_metrics",
            "ddp_timeout",
            "torch_empty_cache_steps",
            "bf16_full_eval",
            "fp16_full_eval",
            "do_train",
            "do_eval",
            "do_predict",
            "restore_callback_states_from_checkpoint",
            "enable_jit_checkpoint",
            "dataset_num_proc",
            "push_to_hub",
            "dataloader_num_workers",
            "dataloader_pin_memory",
            "dataloader_persistent_workers",
            "dataloader_prefetch_factor",
            "dataloader_multiprocessing_context",
        )
    ),
)
NOT_MATH_TRAINER_PREFIXES = ("trainer.logging_", "trainer.log_", "trainer.eval_", "trainer.save_", "trainer.hub_")
EXTENDABLE = ("trainer.max_steps", "trainer.num_train_epochs")  # raised: the run goes on longer


def run_config(cfg, world_size: int) -> dict:
    """The config a run trains with, as saved beside its checkpoints (interpolations as written)."""
    config = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    return {**{k: v for k, v in config.items() if k not in NOT_THE_RUN}, WORLD_SIZE: world_size}


def changes(old, new, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key that differs; nested dicts by their dotted keys."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in list(old) + [k for k in new if k not in old]:
            found += changes(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}.")
        return found
    return [] if old == new else [(prefix.rstrip("."), old, new)]


_ABSENT = "(absent)"


def _covered(key: str, names) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in names)


def changes_math(key: str, old, new) -> bool:
    if _covered(key, NOT_MATH) or key.startswith(NOT_MATH_TRAINER_PREFIXES):
        return False
    if key in EXTENDABLE and isinstance(old, int | float) and isinstance(new, int | float):
        return not (0 < old < new)
    return True


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # logging_steps=10 is a float key
    if isinstance(value, dict | list):
        text = json.dumps(value, separators=(",", ":"))
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value)


def _line(found: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key} changed {_show(old)} -> {_show(new)}" for key, old, new in found)


def _never_read(key: str, old, new, trainer_name) -> bool:
    """A trainer key that the saved config lacks (the schema grew it since: trainer=dpo's keys, for an SFT run) and
    that the run's trainer class does not have, at its default: it reaches no trainer, so nothing changed."""
    from .config import CLASS_DEFAULTS, TRAINER_DEFAULTS, trainer_class

    name = key.removeprefix("trainer.")
    if old != _ABSENT or not key.startswith("trainer.") or name not in TRAINER_DEFAULTS:
        return False
    return name not in CLASS_DEFAULTS[trainer_class(trainer_name)] and new == TRAINER_DEFAULTS[name]


def as_moved(saved: dict) -> dict:
    """A config saved before keys moved (config.MOVED_KEYS), read as if saved after: the old key's value goes to the
    new key where that was null, as the run then trained with it (a null trainer key fell back to the model's)."""
    from .config import MOVED_KEYS

    saved = copy.deepcopy(saved)
    for old, new in MOVED_KEYS.items():
        (old_group, old_key), (new_group, new_key) = old.split("."), new.split(".")
        group, target = saved.get(old_group), saved.get(new_group)
        if isinstance(group, dict) and old_key in group and isinstance(target, dict):
            value = group.pop(old_key)
            if target.get(new_key) is None:
                target[new_key] = value
    return saved


def check(saved: dict, new: dict, allow_changes, checkpoint) -> str | None:
    """Refuse a resume whose config changes the math (one line, the diff); returns the line that lists the allowed
    changes, or None when nothing changed."""
    trainer_name = (new.get("trainer") or {}).get("name")
    found = [c for c in changes(as_moved(saved), new) if not _never_read(*c, trainer_name)]
    allowed = list(allow_changes or [])
    refused = [c for c in found if changes_math(*c) and not _covered(c[0], allowed)]
    if refused:
        keys = ",".join(key for key, _, _ in refused)
        raise FusetuneError(
            f"resume: {_line(refused)} (since {checkpoint} was saved); "
            f"resume.allow_changes=[{keys}] accepts {'it' if len(refused) == 1 else 'them'}"
        )
    return f"resume: continuing {checkpoint} with {_line(found)}" if found else None
