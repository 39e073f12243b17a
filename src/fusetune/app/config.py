"""Typed schemas for every config group, registered in Hydra's ConfigStore.

YAML files hold values; these dataclasses hold types. A misspelled key or a
wrong type fails when Hydra composes the config, before anything loads.
Rules that span groups live in ``validate``.
"""

import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..errors import FusetuneError
from ..modules import PROJECTIONS


class Backend(str, Enum):
    auto = "auto"
    triton = "triton"
    reference = "reference"


class Formatter(str, Enum):
    synthetic = "synthetic"
    chat = "chat"
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    text = "text"
    completion = "completion"


class EmptyContent(str, Enum):
    warn = "warn"  # keep records with an empty answer, prompt, text or user/assistant turn, and log how many
    error = "error"  # refuse them: the run ends with the first few listed
    drop = "drop"  # remove them, and log how many


class LoggerKind(str, Enum):
    wandb = "wandb"
    tensorboard = "tensorboard"
    none = "none"


class DType(str, Enum):
    auto = "auto"  # bf16 where supported, else fp16 on GPU; fp32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    modules_to_save: list[str] | None = None


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # hub id or local folder; "fusetune:NAME" is a folder shipped in the package
    config: str | None = None  # architecture config used by random_init; defaults to name_or_path
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: DType = DType.auto
    max_seq_length: int = 2048
    load_in_4bit: bool = False
    lora: LoraConfig | None = None  # null: full fine-tuning
    random_init: bool = False  # build the architecture from its config alone, without weights
    attn_implementation: str | None = None
    # true (non-reentrant) | false | offload: each layer's saved input waits in pinned CPU memory (Unsloth's "unsloth")
    gradient_checkpointing: str = "false"
    # Recommendations for this model, used where the trainer leaves them null.
    learning_rate: float = 2e-4
    batch_size: int = 8


@dataclass
class DataConfig:
    formatter: Formatter = Formatter.synthetic
    path: str | None = None  # local .jsonl/.json/.parquet/.csv
    name: str | None = None  # hub dataset id
    subset: str | None = None
    split: str = "train"
    eval_path: str | None = None
    eval_split: str | None = None
    eval_fraction: float = 0.0  # held out from train when there is no eval split or file
    field: str | None = None  # the column for text/chat/sharegpt; the formatter's default when null
    use_chat_template: bool | None = None  # null: when the tokenizer has one
    max_examples: int | None = None
    empty_content: EmptyContent = EmptyContent.warn  # records with an empty answer, prompt, text or user/assistant turn
    num_generate: int = 0  # held-out prompts answered greedily for exact-match accuracy
    num_train: int = 4000  # synthetic only
    num_eval: int = 200  # synthetic only


@dataclass
class KernelsConfig:
    backend: Backend = Backend.auto


@dataclass
class TrainerConfig:
    name: str = "sft"
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int | None = None  # null: model.batch_size
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None  # null: model.learning_rate
    embedding_learning_rate: float | None = None
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.0  # a count, or a fraction of the run when below 1
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    max_grad_norm: float = 1.0
    packing: bool = False
    padding_free: bool = False
    cuda_graphs: bool | None = None  # padding-free steps as CUDA graph replays; null: on where safe
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = False
    logging_steps: int = 10
    eval_strategy: str = "no"
    eval_steps: int | None = None
    save_strategy: str = "no"
    save_steps: int = 500
    dataloader_num_workers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # any other SFTConfig field, passed through


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.none
    project: str = "fusetune"
    mode: str | None = None  # wandb: online | offline | disabled; null: online when an API key is configured
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    kernels: KernelsConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 42
    cpu_threads: int | None = 1  # torch threads when training on CPU; null: torch's default
    run_name: str | None = None
    output_dir: str = MISSING
    save_model: bool = True


CHECKPOINTING = {"true": True, "false": False, "offload": "offload", "unsloth": "offload"}


def checkpointing_mode(value: str) -> bool | str:
    """model.gradient_checkpointing as FastModel.get_peft_model takes it: True, False or "offload"."""
    return CHECKPOINTING[str(value).lower()]


def register_configs() -> None:
    """Attach the schemas to the YAML groups: each YAML lists its schema first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, node in [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("kernels", KernelsConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


def validate(cfg) -> None:
    """Rules that span config groups. Raises FusetuneError with one line per mistake."""
    problems = []
    if cfg.model.load_in_4bit and cfg.model.lora is None:
        problems.append("model.load_in_4bit needs model.lora: 4-bit weights cannot be trained directly (QLoRA)")
    if cfg.model.load_in_4bit and cfg.model.random_init:
        problems.append("model.load_in_4bit cannot quantize a random_init model: there are no weights to load")
    if str(cfg.model.gradient_checkpointing).lower() not in CHECKPOINTING:
        problems.append(
            f"model.gradient_checkpointing: expected true, false or offload, got '{cfg.model.gradient_checkpointing}'"
        )
    if cfg.model.max_seq_length <= 0:
        problems.append(f"model.max_seq_length must be positive, got {cfg.model.max_seq_length}")
    if cfg.trainer.packing and cfg.trainer.padding_free:
        problems.append("trainer.packing and trainer.padding_free: choose one (packing is already padding-free)")
    if cfg.trainer.max_steps <= 0 and cfg.trainer.num_train_epochs <= 0:
        problems.append("trainer: set max_steps or num_train_epochs above zero")
    if cfg.data.formatter != Formatter.synthetic and (cfg.data.path is None) == (cfg.data.name is None):
        problems.append(f"data: formatter '{cfg.data.formatter.value}' needs exactly one of data.path or data.name")
    if (
        cfg.trainer.eval_strategy != "no"
        and cfg.data.formatter != Formatter.synthetic
        and not (cfg.data.eval_path or cfg.data.eval_split or cfg.data.eval_fraction > 0)
    ):
        problems.append(
            "trainer.eval_strategy needs eval data: set data.eval_path, data.eval_split or data.eval_fraction"
        )
    if cfg.trainer.embedding_learning_rate is not None and cfg.model.lora is not None:
        saved = cfg.model.lora.modules_to_save or []
        if not any(name in saved for name in ("embed_tokens", "lm_head")):
            warnings.warn(
                "trainer.embedding_learning_rate is set but model.lora.modules_to_save holds neither embed_tokens "
                "nor lm_head: no embedding weights are trained, so it has no effect",
                stacklevel=2,
            )
    if problems:
        raise FusetuneError("; ".join(problems))
