"""TRL from fusetune's side, in one file, so that a TRL upgrade touches only this one.

- ``point_trl_at(trainer_cls, config_cls)`` makes ``from trl import SFTTrainer, SFTConfig`` give
  fusetune's classes (``import fusetune`` calls it); ``restore_trl()`` undoes it; ``original(name)``
  is TRL's own class.
- Accessors for TRL's private trainer state that fusetune reads or writes: the per-mode metric
  lists behind TRL's logged ``entropy`` / ``mean_token_accuracy`` / ``num_tokens``, the running
  count of trained tokens, and the tensor-parallel size TRL divides that count by.
- ``PrepareDatasetHook``: a mixin that routes TRL's private ``_prepare_dataset`` to a public-named
  ``prepare_dataset``, which a subclass overrides.
- ``ResumeTokenCount``: TRL starts its count of trained tokens at 0 on a resumed run; this callback
  continues it from the checkpoint's last logged ``num_tokens``.
- ``head_adapter_allowed(lift)``: TRL's SFTTrainer refuses a PEFT adapter on lm_head (its own fused head
  reads ``lm_head.weight`` alone); with ``lift`` its check is off while the trainer is built.
"""

import contextlib
import importlib

from transformers import TrainerCallback

from .. import ledger

# TRL's public names that fusetune points at its subclasses.
TRL_CLASSES = [
    ("trl", "SFTTrainer"),
    ("trl.trainer", "SFTTrainer"),
    ("trl.trainer.sft_trainer", "SFTTrainer"),
    ("trl", "SFTConfig"),
    ("trl.trainer", "SFTConfig"),
    ("trl.trainer.sft_config", "SFTConfig"),
]
TRL = "trl"  # the ledger's tag for these


def point_trl_at(trainer_cls: type, config_cls: type) -> None:
    """``trl.SFTTrainer`` / ``trl.SFTConfig`` (and their submodule spellings) become the given classes."""
    ours = {"SFTTrainer": trainer_cls, "SFTConfig": config_cls}
    for module_name, name in TRL_CLASSES:
        module = importlib.import_module(module_name)
        ledger.replace(module, name, ours[name], TRL)


def restore_trl() -> None:
    """TRL's own classes back under every name ``point_trl_at`` changed."""
    ledger.restore_all(TRL)


def original(name: str) -> type:
    """TRL's own ``SFTTrainer`` or ``SFTConfig``, whatever the public name points at now."""
    module = importlib.import_module("trl.trainer.sft_trainer" if name == "SFTTrainer" else "trl.trainer.sft_config")
    return ledger.original(module, name)


def metric_lists(trainer, mode: str) -> dict[str, list]:
    """The lists TRL averages into its logged metrics for ``mode`` ("train" or "eval")."""
    return trainer._metrics[mode]


def trained_tokens(trainer) -> int | None:
    """TRL's running count of trained (non-padding) tokens, as logged in ``num_tokens``; where TRL keeps none (its
    experimental ORPO and CPO trainers), the Trainer's count of input tokens if it counts them, else None."""
    count = getattr(trainer, "_total_train_tokens", None)
    if count is None and trainer.args.include_num_input_tokens_seen not in (False, "no"):
        count = trainer.state.num_input_tokens_seen
    return count


def add_trained_tokens(trainer, count: int) -> int:
    trainer._total_train_tokens += count
    return trainer._total_train_tokens


def tensor_parallel_size(trainer) -> int:
    """The tensor-parallel group size TRL divides its token counts by (ranks of a group see one batch)."""
    return trainer._tp_size


class PrepareDatasetHook:
    """Put first among a TRL SFTTrainer subclass's bases: TRL's ``_prepare_dataset`` (tokenizing,
    packing, truncating one dataset) calls ``prepare_dataset``, whose default is TRL's own."""

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        return self.prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)


class ResumeTokenCount(TrainerCallback):
    """On a resumed run, TRL's token count continues from the checkpoint instead of restarting at 0."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 or trained_tokens(self.trainer) != 0:
            return
        logged = [row["num_tokens"] for row in state.log_history if "num_tokens" in row and "loss" in row]
        if logged:
            add_trained_tokens(self.trainer, int(logged[-1]))


def prepare_as_trl(trainer, dataset, processing_class, args, packing, formatting_func, dataset_name):
    """TRL's own dataset preparation (tokens and labels), whatever the trainer's class overrides."""
    return original("SFTTrainer")._prepare_dataset(
        trainer, dataset, processing_class, args, packing, formatting_func, dataset_name
    )


def label_options(trainer) -> dict:
    """What, on the trainer, decides TRL's labels: its training chat template and completion-only loss."""
    return {
        "chat_template": getattr(trainer, "chat_template", None),
        "completion_only_loss": getattr(trainer, "completion_only_loss", None),
    }


class _NoTunerLayer:
    """Matches nothing: TRL's ``isinstance(head, BaseTunerLayer)`` check for an adapter on lm_head, lifted."""


@contextlib.contextmanager
def head_adapter_allowed(lift: bool):
    """While the block runs, TRL's SFTTrainer accepts a PEFT adapter on lm_head, if ``lift``. TRL refuses one
    because its own fused head would ignore it; fusetune's fused loss trains it (``forwards.head_adapter``), so
    the caller lifts the check only where the model's forward is fusetune's."""
    module = importlib.import_module("trl.trainer.sft_trainer")
    if not lift or not hasattr(module, "BaseTunerLayer"):
        yield
        return
    real = module.BaseTunerLayer
    module.BaseTunerLayer = _NoTunerLayer
    try:
        yield
    finally:
        module.BaseTunerLayer = real
