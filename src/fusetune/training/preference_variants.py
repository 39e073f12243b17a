"""ORPO, SimPO (TRL's CPO) and KTO on fusetune's kernels: TRL's own trainers and losses, the model patched.

Each ``Fast*Trainer`` is TRL's trainer with the kernels backend (``kernels``: auto | triton | reference)
applied to the model as FastSFTTrainer applies it, and each ``Fast*Config`` settles the precision from the
hardware (TRL's configs say bf16 everywhere; fp32 on a host without CUDA, with one warning). The losses are
TRL's: these trainers ask the model for logits, which fusetune's patched forward leaves to the model's own
head, so norms, RoPE, the GLU and the LoRA projections run fused and the loss is TRL's to the last digit.
fusetune's fused preference loss (no ``[tokens, vocab]`` logits) covers DPO (``FastDPOTrainer``) only.

- ORPO: odds-ratio preference on chosen/rejected pairs, no reference model (``trl.experimental.orpo``).
- SimPO: TRL's CPO with ``loss_type="simpo"`` and ``cpo_alpha=0`` (length-normalised rewards, a margin
  ``simpo_gamma``, no reference model; ``trl.experimental.cpo``). ``FastCPOConfig`` keeps CPO's other losses.
- KTO: unpaired completions labelled desirable or not (``prompt``/``completion``/``label``), against a
  reference: the model with its LoRA adapters disabled, or a frozen ``ref_model``. Its tokenized answers can come
  from fusetune's tokenized cache (``dataset_cache=``, as FastDPOTrainer's); ORPO's and CPO's cannot (they
  tokenize inside TRL's constructors: ``fusetune.data.cache``).

ORPO and CPO live in TRL's experimental module, which warns on import; fusetune imports them knowingly.
"""

import warnings
from dataclasses import dataclass, field

from trl import KTOConfig, KTOTrainer

from ..compat.trl import PreparePairsHook, add_trained_tokens, start_token_count, trained_tokens
from ..data.cache import PairsCacheHook
from .guards import GuardedTrainer
from .preference_trainer import build_with_kernels, field_like
from .trainer import FastSFTConfig, SettledPrecision, as_fast_config

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer


@dataclass
class FastORPOConfig(SettledPrecision, ORPOConfig):
    kernels: str = field_like(FastSFTConfig, "kernels")


@dataclass
class FastCPOConfig(SettledPrecision, CPOConfig):
    kernels: str = field_like(FastSFTConfig, "kernels")


@dataclass
class FastSimPOConfig(FastCPOConfig):
    """CPO's config with SimPO's settings as defaults: loss_type="simpo", cpo_alpha=0 (no NLL term)."""

    loss_type: str = field(default="simpo", metadata=CPOConfig.__dataclass_fields__["loss_type"].metadata)
    cpo_alpha: float = field(default=0.0, metadata=CPOConfig.__dataclass_fields__["cpo_alpha"].metadata)


@dataclass
class FastKTOConfig(SettledPrecision, KTOConfig):
    kernels: str = field_like(FastSFTConfig, "kernels")


class CountsPairTokens:
    """TRL's ORPO and CPO trainers keep no count of trained tokens, where its SFT, DPO and KTO trainers log one as
    ``num_tokens``: this one counts each training batch's non-padding tokens, chosen and rejected rows with their
    prompts (what the model reads, as DPO counts them), and logs the running sum as ``num_tokens``."""

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        if train_eval == "train":
            tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
            add_trained_tokens(self, int(self.accelerator.gather_for_metrics(tokens.reshape(1)).sum()))
        return super().get_batch_loss_metrics(model, batch, train_eval)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["num_tokens"] = float(trained_tokens(self))
        return super().log(logs, start_time)


class FastORPOTrainer(CountsPairTokens, GuardedTrainer, ORPOTrainer):
    """TRL's ORPOTrainer on fusetune's kernels."""

    def __init__(self, model=None, args=None, *rest, **kwargs):
        args = as_fast_config(args, FastORPOConfig)
        start_token_count(self)
        build_with_kernels(
            self, model, args, lambda: super(FastORPOTrainer, self).__init__(model, args, *rest, **kwargs)
        )


class FastCPOTrainer(CountsPairTokens, GuardedTrainer, CPOTrainer):
    """TRL's CPOTrainer on fusetune's kernels (SimPO: ``args=FastSimPOConfig(...)``, or FastSimPOTrainer)."""

    default_config = FastCPOConfig

    def __init__(self, model=None, args=None, *rest, **kwargs):
        args = as_fast_config(args, self.default_config)
        start_token_count(self)
        build_with_kernels(
            self, model, args, lambda: super(FastCPOTrainer, self).__init__(model, args, *rest, **kwargs)
        )


class FastSimPOTrainer(FastCPOTrainer):
    """FastCPOTrainer whose default config is SimPO's (``FastSimPOConfig``)."""

    default_config = FastSimPOConfig


class FastKTOTrainer(PairsCacheHook, PreparePairsHook, GuardedTrainer, KTOTrainer):
    """TRL's KTOTrainer on fusetune's kernels; ``dataset_cache=`` (``Splits.cache``) takes its tokenized answers
    from fusetune's cache (``data.cache``)."""

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        args = as_fast_config(args, FastKTOConfig)
        build = lambda: super(FastKTOTrainer, self).__init__(model, ref_model, args, *rest, **kwargs)  # noqa: E731
        build_with_kernels(self, model, args, build)
