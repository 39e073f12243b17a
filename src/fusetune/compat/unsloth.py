"""Unsloth's names for fusetune's classes: code written for Unsloth moves here by its import lines alone.

    from fusetune.compat.unsloth import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments

- ``FastLanguageModel`` is ``fusetune.FastModel``: ``from_pretrained(model_name, max_seq_length, dtype,
  load_in_4bit, ...)``, ``get_peft_model(model, r, lora_alpha, target_modules, use_gradient_checkpointing=
  "unsloth", random_state, ...)``, ``for_inference`` / ``for_training``.
- ``UnslothTrainer`` is ``fusetune.FastSFTTrainer`` (TRL's SFTTrainer with fusetune's kernels).
- ``UnslothTrainingArguments`` is ``fusetune.FastSFTConfig`` (TRL's SFTConfig with ``embedding_learning_rate``).
- ``is_bfloat16_supported()``, as notebooks use it for ``bf16=`` / ``fp16=``.

Importing this module imports fusetune, which points ``trl.SFTTrainer`` / ``trl.SFTConfig`` at
fusetune's classes, as importing Unsloth first does for Unsloth's.
"""

import torch

from ..fast_model import FastModel
from ..trainer import FastSFTConfig, FastSFTTrainer

FastLanguageModel = FastModel
UnslothTrainer = FastSFTTrainer
UnslothTrainingArguments = FastSFTConfig


def is_bfloat16_supported() -> bool:
    """True where the CUDA GPU computes in bf16 (False without a GPU)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


__all__ = [
    "FastLanguageModel",
    "FastModel",
    "UnslothTrainer",
    "UnslothTrainingArguments",
    "is_bfloat16_supported",
]
