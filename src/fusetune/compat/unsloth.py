"""Unsloth's names for fusetune's classes: code written for Unsloth moves here by its import lines alone.

    from fusetune.compat.unsloth import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments

- ``FastLanguageModel`` is ``fusetune.FastModel``: ``from_pretrained(model_name, max_seq_length, dtype,
  load_in_4bit, ...)``, ``get_peft_model(model, r, lora_alpha, target_modules, use_gradient_checkpointing=
  "unsloth", random_state, ...)``, ``for_inference`` / ``for_training``.
- ``UnslothTrainer`` is ``fusetune.FastSFTTrainer`` (TRL's SFTTrainer with fusetune's kernels).
- ``UnslothTrainingArguments`` is ``fusetune.FastSFTConfig`` (TRL's SFTConfig with ``embedding_learning_rate``).
- ``is_bfloat16_supported()``, as notebooks use it for ``bf16=`` / ``fp16=``.

The helpers of Unsloth's notebooks, each a name for fusetune's own code:

- ``get_chat_template(tokenizer, chat_template="llama-3.1", mapping=None, map_eos_token=True)`` is
  ``fusetune.data.template_names.get_chat_template``: Unsloth's template names backed by fusetune's shipped
  templates or TRL's copies of the models' own (``data.chat_template`` in the app);
- ``standardize_sharegpt(dataset)`` is ``fusetune.data.formatters.standardize_sharegpt``: ShareGPT turns to
  role/content messages, checked as ``data=sharegpt`` checks them;
- ``train_on_responses_only(trainer, instruction_part, response_part)`` is
  ``fusetune.data.responses.train_on_responses_only``: the trainer's labels kept on response tokens only
  (``trainer.assistant_only_loss`` in the app does it from the template's own marks).

Importing this module imports fusetune, which points ``trl.SFTTrainer`` / ``trl.SFTConfig`` at
fusetune's classes, as importing Unsloth first does for Unsloth's.
"""

import torch

from ..data.formatters import standardize_sharegpt
from ..data.responses import train_on_responses_only
from ..data.template_names import get_chat_template
from ..fast_model import FastModel
from ..training.trainer import FastSFTConfig, FastSFTTrainer

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
    "get_chat_template",
    "is_bfloat16_supported",
    "standardize_sharegpt",
    "train_on_responses_only",
]
