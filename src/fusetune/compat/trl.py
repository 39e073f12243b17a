"""TRL from fusetune's side, in one file, so that a TRL upgrade touches only this one.

- ``point_trl_at(trainer_cls, config_cls)`` makes ``from trl import SFTTrainer, SFTConfig`` give
  fusetune's classes (``import fusetune`` calls it); ``restore_trl()`` undoes it; ``original(name)``
  is TRL's own class.
- Accessors for TRL's private trainer state that fusetune reads or writes: the per-mode metric
  lists behind TRL's logged ``entropy`` / ``mean_token_accuracy`` / ``num_tokens``, the running
  count of trained tokens, and the tensor-parallel size TRL divides that count by.
- ``PrepareDatasetHook``: a mixin that routes TRL's private ``_prepare_dataset`` to a public-named
  ``prepare_dataset``, which a subclass overrides.
- ``PreparePairsHook``: the same for TRL's DPO and KTO trainers, whose ``_prepare_dataset`` takes no packing or
  formatting function; ``tokenize_pairs_as_trl`` and ``finish_pairs_as_trl`` split their preparation in two (the
  per-record tokenizing that the tokenized cache keeps, and what depends on the split's rows and max length).
- ``ResumeTokenCount``: TRL starts its count of trained tokens at 0 on a resumed run; this callback
  continues it from the checkpoint's last logged ``num_tokens``.
- ``head_adapter_allowed(lift)``: TRL's SFTTrainer refuses a PEFT adapter on lm_head (its own fused head
  reads ``lm_head.weight`` alone); with ``lift`` its check is off while the trainer is built.
"""

import contextlib
import importlib
import logging

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
log = logging.getLogger(__name__)


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
    """TRL's running count of trained (non-padding) tokens, as logged in ``num_tokens``; where TRL keeps none and
    fusetune started none (``start_token_count``), the Trainer's count of input tokens if it counts them, else None."""
    count = getattr(trainer, "_total_train_tokens", None)
    if count is None and trainer.args.include_num_input_tokens_seen not in (False, "no"):
        count = trainer.state.num_input_tokens_seen
    return count


def start_token_count(trainer) -> None:
    """A count of trained tokens, kept as TRL keeps its own, on a trainer of TRL's that keeps none."""
    trainer._total_train_tokens = 0


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


class PreparePairsHook:
    """Put first among a TRL DPOTrainer or KTOTrainer subclass's bases: TRL's ``_prepare_dataset`` (extracting the
    prompt, adding EOS, tokenizing, dropping the rows whose prompt fills max_length, KTO's mismatched KL pairs) calls
    ``prepare_pairs``, whose default is TRL's own."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return self.prepare_pairs(dataset, processing_class, args, dataset_name)

    def prepare_pairs(self, dataset, processing_class, args, dataset_name):
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


def _pairs_trainer_class(trainer) -> type:
    """The TRL trainer whose preparation ``trainer`` runs: DPOTrainer or KTOTrainer."""
    from trl import DPOTrainer, KTOTrainer

    for trl_class in (KTOTrainer, DPOTrainer):
        if isinstance(trainer, trl_class):
            return trl_class
    raise TypeError(f"{type(trainer).__name__} is neither a DPOTrainer nor a KTOTrainer")


def pairs_preparation(trainer) -> str:
    """The name of the TRL preparation ``trainer`` runs (a part of the tokenized cache's key)."""
    return _pairs_trainer_class(trainer).__name__


def tokenize_pairs_as_trl(trainer, dataset, processing_class, args, dataset_name):
    """TRL's own DPO or KTO preparation of ``dataset``, one row per record: the prompt extracted, EOS added and
    every record tokenized (``prompt_ids`` and ``chosen_ids``/``rejected_ids``, or ``completion_ids``), none dropped
    for its length and no KL pairs yet (``finish_pairs_as_trl`` does those on the split's rows)."""
    trl_class = _pairs_trainer_class(trainer)
    kept = args.max_length, getattr(trainer, "calculate_KL", None)
    args.max_length = None
    if kept[1] is not None:
        trainer.calculate_KL = False
    try:  # not named "train": KTO's check of the split's desirable/undesirable balance waits for the split
        return trl_class._prepare_dataset(trainer, dataset, processing_class, args, f"{dataset_name} records")
    finally:
        args.max_length = kept[0]
        if kept[1] is not None:
            trainer.calculate_KL = kept[1]


def finish_pairs_as_trl(trainer, tokenized, args, dataset_name):
    """What TRL's DPO or KTO preparation does after tokenizing, on a split's tokenized rows: the rows whose prompt
    alone fills max_length are dropped (DPO: with truncation_mode=keep_start; KTO: always), and KTO's KL term gets
    its mismatched pairs (``KL_completion_ids``: within each run of per_device_train_batch_size rows, each prompt
    with the completion of the row before it, the first with the last's). tests/data/test_preference_cache.py
    holds the result equal to TRL's own preparation of the formatted split."""
    is_kto = pairs_preparation(trainer) == "KTOTrainer"
    if args.max_length is not None and (is_kto or args.truncation_mode == "keep_start"):
        limit = args.max_length
        tokenized = tokenized.filter(
            lambda prompt: len(prompt) < limit, input_columns="prompt_ids", num_proc=args.dataset_num_proc
        )
    if is_kto and trainer.calculate_KL:

        def rotated(completions):
            return {"KL_completion_ids": completions[-1:] + completions[:-1]}

        tokenized = tokenized.map(
            rotated,
            input_columns="completion_ids",
            batched=True,
            batch_size=args.per_device_train_batch_size,
            num_proc=args.dataset_num_proc,
        )
    if is_kto and dataset_name == "train":
        _check_kto_balance(trainer, tokenized["label"])
    return tokenized


def _check_kto_balance(trainer, labels: list[bool]) -> None:
    """The KTO paper (Ethayarajh et al. 2024, eq. 8) advises weights with desirable_weight x desirable answers
    between 1 and 4/3 times undesirable_weight x undesirable ones; one warning where the split's are not."""
    desirable = sum(labels)
    undesirable = len(labels) - desirable
    if not desirable or not undesirable or desirable == undesirable:
        return
    good, bad = trainer.desirable_weight, trainer.undesirable_weight
    ratio = good * desirable / (bad * undesirable)
    if not 1 <= ratio <= 4 / 3:
        fits = bad * undesirable / desirable
        log.warning(
            "KTO: %d desirable and %d undesirable answers weigh %.2f : 1; the KTO paper advises 1 to 4/3: set "
            "desirable_weight in [%.2f, %.2f] (or undesirable_weight to match)",
            desirable,
            undesirable,
            ratio,
            fits,
            fits * 4 / 3,
        )


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
