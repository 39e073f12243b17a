"""Typed schemas for every config group, registered in Hydra's ConfigStore.

YAML files hold values; these dataclasses hold types. A misspelled key or a
wrong type fails when Hydra composes the config, before anything loads.
Rules that span groups live in ``validate``.

The trainer schema is not written out: ``TrainerConfig`` is generated from
``FastSFTConfig``, every field OmegaConf can type with its default, so the two
cannot drift apart; then the fields of ``FastDPOConfig`` that FastSFTConfig lacks
(beta, label_smoothing, ...), with DPO's defaults. ``trainer.name`` picks the
config class (``TRAINER_CLASSES``: dpo, orpo, simpo, else FastSFTConfig), which gets only the
keys it has; a key set away from its default that the class lacks is refused.
The app's own trainer keys are ``AppTrainerKeys``, the defaults it sets apart
from FastSFTConfig's are ``OWN_TRAINER_DEFAULTS`` (values in
conf/trainer/sft.yaml), and ``trainer.extra`` passes the untyped fields.
"""

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from difflib import get_close_matches
from enum import Enum
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from .. import limits
from ..compat.renames import CONFIG_RENAMES
from ..data.rules import (
    LABELLED,
    PAIRS,
    SINGLE,
    data_problems,
    has_eval_data,
    is_mixture,
    record_formatters,
    record_kind,
)
from ..errors import FusetuneError
from ..fast_model import CHECKPOINTING, OFFLOADED, check_memory_budget
from ..modules import PROJECTIONS
from ..training.preference_trainer import FastDPOConfig
from ..training.preference_variants import FastKTOConfig, FastORPOConfig, FastSimPOConfig
from ..training.trainer import FastSFTConfig
from . import distributed, job_names
from .choices import choice_problems


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
    preference = "preference"  # prompt/chosen/rejected pairs, for trainer=dpo
    synthetic_preference = "synthetic_preference"  # the embedded set as pairs: right answer chosen, a wrong one not
    kto = "kto"  # prompt/completion/label: one answer, labelled desirable (true) or not, for trainer=kto
    synthetic_kto = "synthetic_kto"  # the embedded set's pairs as labelled answers: right ones true, wrong ones false
    mixture = "mixture"  # the records come from data.sources, sampled by weight


class EmptyContent(str, Enum):
    warn = "warn"  # keep records with an empty answer, prompt, text or user/assistant turn, and log how many
    error = "error"  # refuse them: the run ends with the first few listed
    drop = "drop"  # remove them, and log how many


class TooLong(str, Enum):
    drop = "drop"  # remove records longer than model.max_seq_length, and log how many and which
    truncate = "truncate"  # keep their first max_seq_length tokens (dropped if none of those is trained)
    error = "error"  # refuse them: the run ends naming the first


class Distributed(str, Enum):
    none = "none"  # one process
    ddp = "ddp"  # torchrun / accelerate launch: DistributedDataParallel through the HF Trainer
    fsdp = "fsdp"  # the same launchers: FSDP2 over each decoder layer (CUDA)


class LoggerKind(str, Enum):
    wandb = "wandb"
    tensorboard = "tensorboard"
    mlflow = "mlflow"
    none = "none"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"  # into <run>/wandb/; `wandb sync` uploads it later
    disabled = "disabled"


class GGUFType(str, Enum):
    f16 = "f16"  # every matrix in f16
    q8_0 = "q8_0"  # matrices in blocks of 32 int8 values with an f16 scale (about half of f16's size)


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
    trust_remote_code: bool = False  # run the model repository's own Python code (only for a repository you trust)
    # true (non-reentrant) | false | offload: each layer's saved input waits in pinned CPU memory (Unsloth's "unsloth")
    # | smart: as many layers as memory_budget allows keep their activations (no recompute), the rest offloaded
    gradient_checkpointing: str = "false"
    memory_budget: float | None = None  # smart checkpointing: GiB (> 1) or a fraction of the GPU; null: what is free
    # (A model's learning rate and batch size are trainer.learning_rate and trainer.per_device_train_batch_size: a
    # preset that needs its own sets those keys, as conf/model/tiny_llama.yaml does.)


@dataclass
class SourceConfig:
    """One source of a mixture (data=mixture): a dataset read as a single one is, and its weight."""

    path: str | None = None  # local .jsonl/.json/.parquet/.csv
    name: str | None = None  # hub dataset id (give exactly one of path and name)
    subset: str | None = None
    split: str = "train"
    revision: str | None = None  # hub branch, tag or commit
    formatter: Formatter | None = None  # chat, sharegpt, alpaca, text, completion; preference or kto (one kind)
    field: str | None = None  # the column for text/chat/sharegpt; the formatter's default when null
    weight: float = 1.0  # relative: divided by the sum of the weights; 0 leaves the source out of training
    eval_path: str | None = None  # held-out records of this source (else data.eval_fraction of it)
    eval_split: str | None = None


@dataclass
class DataConfig:
    formatter: Formatter = Formatter.synthetic
    path: str | None = None  # local .jsonl/.json/.parquet/.csv
    name: str | None = None  # hub dataset id
    subset: str | None = None
    split: str = "train"
    revision: str | None = None  # hub branch, tag or commit
    eval_path: str | None = None
    eval_split: str | None = None
    eval_fraction: float = 0.0  # held out from train (from each mixture source) when there is no eval split or file
    field: str | None = None  # the column for text/chat/sharegpt; the formatter's default when null
    use_chat_template: bool | None = None  # null: when the tokenizer has one
    # a template shipped in fusetune (chatml, llama3, mistral, gemma, phi3) or the path of a Jinja file; it replaces
    # the tokenizer's own for training and is saved with the tokenizer; null: the tokenizer's own
    chat_template: str | None = None
    max_examples: int | None = None  # only the first N records of each file or split (before any hold-out)
    empty_content: EmptyContent = EmptyContent.warn  # records with an empty answer, prompt, text or user/assistant turn
    too_long: TooLong = TooLong.drop  # records longer than model.max_seq_length tokens: drop, truncate or error
    num_generate: int = 0  # held-out prompts answered greedily for exact-match accuracy
    num_train: int = 4000  # synthetic only
    num_eval: int = 200  # synthetic only
    # data=mixture only (`field` above shadows dataclasses.field in this class body)
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    mixture_size: int | None = None  # training examples drawn from the sources; null: as many as they hold together
    cache: bool = True  # keep each source's tokenized records, keyed by data, tokenizer and loss options, for reuse
    cache_dir: str | None = None  # null: datasets/ under FUSETUNE_CACHE_DIR, else ~/.cache/fusetune


@dataclass
class KernelsConfig:
    backend: Backend = Backend.auto
    # the frozen base projections under LoRA as scaled FP8 GEMMs (GPUs with FP8 tensor cores, bf16; fusetune.fp8_base)
    fp8: bool = False


# FastSFTConfig fields that the app fills in from elsewhere (run.sft_config), and from where: no trainer key holds them.
SET_BY_THE_APP = {
    "output_dir": "output_dir (hydra.run.dir)",
    "run_name": "run_name",
    "seed": "seed",
    "data_seed": "seed",
    "max_length": "model.max_seq_length",
    "kernels": "kernels.backend",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "use_cpu": "the host (CPU where there is no CUDA)",
    "report_to": "logger",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "model.gradient_checkpointing",
}


@dataclass
class AppTrainerKeys:
    """Trainer keys that are the app's own, or that it types apart from FastSFTConfig."""

    name: str = "sft"  # the trainer option, recorded in summary.json
    # the one home of the learning rate: a model preset that needs another sets trainer.learning_rate (PRESET_KEYS)
    learning_rate: float = 2e-4
    # the one home of the batch size (TRL's name and default): a model preset that needs another sets it (PRESET_KEYS)
    per_device_train_batch_size: int = 8
    logging_steps: float | None = None  # null: logging_steps_for(max_steps), at least ten points in a short run
    extra: dict[str, Any] = field(default_factory=dict)  # the trainer class's fields that no trainer key holds


# The app's trainer defaults that differ from FastSFTConfig's on purpose. conf/trainer/sft.yaml (which every
# trainer option builds on) sets each one and says why; every other trainer default is FastSFTConfig's.
# tests/conf/test_trainer_schema.py holds the two to that.
OWN_TRAINER_DEFAULTS = (
    "num_train_epochs",
    "lr_scheduler_type",
    "warmup_steps",
    "logging_steps",
    "padding_free",
    "save_strategy",
    "optim",
)

# Trainer keys that a model preset may set: its file is `# @package _global_` and sets trainer.KEY beside model.*
# (conf/model/tiny_llama.yaml). The trainer options leave them alone, as the trainer group is composed after the
# model's and would replace the preset's value; their app default is AppTrainerKeys'.
PRESET_KEYS = ("learning_rate", "per_device_train_batch_size")

# Keys that moved, by their old place: an override or a preset that sets one is refused naming where it lives now.
# Keys that moved, to their new place (a record saved before the move is read with them there: resume_check).
MOVED_KEYS = {"model.learning_rate": "trainer.learning_rate", "model.batch_size": "trainer.per_device_train_batch_size"}


def moved_key_line(key: str) -> str | None:
    """The one line for a key that moved (MOVED_KEYS), or None."""
    if key not in MOVED_KEYS:
        return None
    return f"{key} moved to {MOVED_KEYS[key]} (a model preset sets it there too, as conf/model/tiny_llama.yaml does)"


PRIMITIVES = (int, float, bool, str)


def _holds_plainly(tp) -> bool:
    """OmegaConf types it as it is: a primitive, an Enum, or a list or str-keyed dict of primitives."""
    if tp in PRIMITIVES or (isinstance(tp, type) and issubclass(tp, Enum)):
        return True
    origin, args = get_origin(tp), get_args(tp)
    if origin is list:
        return len(args) == 1 and args[0] in PRIMITIVES
    if origin is dict:
        return len(args) == 2 and args[0] is str and (args[1] in PRIMITIVES or args[1] is Any)
    return False


def schema_type(tp):
    """A FastSFTConfig field's type as an OmegaConf structured config holds it, or None where it cannot.

    ``X | None`` stays optional; ``SomeStrEnum | str`` (TRL's scheduler, optimizer and strategy names) is a str.
    Other unions (``dict | str``, ``str | list[str]``, ...) have no OmegaConf type: ``trainer.extra`` passes them.
    """
    if get_origin(tp) not in (Union, UnionType):
        return tp if _holds_plainly(tp) else None
    args = get_args(tp)
    kinds = [a for a in args if a is not NoneType]
    if len(kinds) == 2 and str in kinds:
        other = kinds[0] if kinds[1] is str else kinds[1]
        if isinstance(other, type) and issubclass(other, Enum) and issubclass(other, str):
            kinds = [str]
    if len(kinds) != 1 or not _holds_plainly(kinds[0]):
        return None
    return kinds[0] | None if len(kinds) < len(args) else kinds[0]


def default_value(f: dataclasses.Field):
    """A dataclass field's default value (an Enum member as its value)."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return value.value if isinstance(value, Enum) else value


def _default(f: dataclasses.Field) -> dataclasses.Field:
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory)
    return field(default=default_value(f))


# trainer.name -> the config class it trains with (run picks the trainer by it); every other name is FastSFTConfig's.
TRAINER_CLASSES = {"dpo": FastDPOConfig, "orpo": FastORPOConfig, "simpo": FastSimPOConfig, "kto": FastKTOConfig}
# The records each preference trainer takes (a data.rules record kind); every other trainer takes single answers.
TRAINER_DATA = {"dpo": PAIRS, "orpo": PAIRS, "simpo": PAIRS, "kto": LABELLED}
# The data options that give each preference kind: a user's records, and the embedded set.
KIND_DATA = {
    PAIRS: ("data=preference (prompt/chosen/rejected records)", "synthetic_preference"),
    LABELLED: ("data=kto (prompt/completion/label records)", "synthetic_kto"),
}


def trainer_class(name: str) -> type:
    """The config class of the trainer option ``name`` (trainer.name)."""
    return TRAINER_CLASSES.get(name, FastSFTConfig)


def _trainer_schema() -> type:
    """TrainerConfig: every FastSFTConfig field OmegaConf can type, with its default; the typed fields of the other
    trainer classes that FastSFTConfig lacks, with their defaults; and the app's own keys."""
    own = {f.name: (f.type, _default(f)) for f in dataclasses.fields(AppTrainerKeys)}
    spec = [("name", *own.pop("name"))]
    for config_class in (FastSFTConfig, *TRAINER_CLASSES.values()):
        hints = get_type_hints(config_class)
        for f in dataclasses.fields(config_class):
            if any(f.name == named for named, *_ in spec):
                continue
            if f.name in own:
                spec.append((f.name, *own.pop(f.name)))
            elif f.init and f.name not in SET_BY_THE_APP and (tp := schema_type(hints[f.name])) is not None:
                spec.append((f.name, tp, _default(f)))
    spec += [(name, *typed) for name, typed in own.items()]  # extra
    schema = dataclasses.make_dataclass("TrainerConfig", spec)
    schema.__module__ = __name__
    schema.__doc__ = (
        "The trainer group: FastSFTConfig's fields and defaults, then the other trainer classes' own (generated), "
        "and the app's own keys."
    )
    return schema


TrainerConfig = _trainer_schema()
SFT_DEFAULTS = {f.name: default_value(f) for f in dataclasses.fields(FastSFTConfig)}
SFT_FIELDS = frozenset(SFT_DEFAULTS)
SCHEMA_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainerConfig))
# Each trainer class's fields and defaults.
CLASS_DEFAULTS = {
    cls: {f.name: default_value(f) for f in dataclasses.fields(cls)}
    for cls in (FastSFTConfig, *TRAINER_CLASSES.values())
}
# The schema's defaults of the fields that are trainer keys: FastSFTConfig's, else the class's that has the field.
TRAINER_DEFAULTS = {
    name: defaults[name] for defaults in reversed(CLASS_DEFAULTS.values()) for name in defaults if name in SCHEMA_FIELDS
}
# Fields of some trainer class that are trainer keys (the rest go through trainer.extra, or come from SET_BY_THE_APP).
TRAINER_FIELDS = frozenset(TRAINER_DEFAULTS)
# FastSFTConfig fields that are trainer keys (the SFT trainer options' own; the DPO keys are TRAINER_FIELDS' rest).
SFT_TRAINER_FIELDS = SFT_FIELDS & TRAINER_FIELDS


def class_keys(trainer) -> dict:
    """The trainer keys (a TrainerConfig, or its dict) that the trainer option's class has and that differ from the
    schema's defaults: only what differs, so a default given again changes nothing."""
    fields = CLASS_DEFAULTS[trainer_class(trainer["name"])]
    return {k: v for k, v in trainer.items() if k in TRAINER_FIELDS and k in fields and v != TRAINER_DEFAULTS[k]}


def other_class_problems(trainer) -> list[str]:
    """A trainer key set away from its default that the trainer option's class lacks (trainer.beta with
    trainer=sft, trainer.packing with trainer=dpo): one line each."""
    cls = trainer_class(trainer.name)
    fields = CLASS_DEFAULTS[cls]
    problems = []
    for key in sorted(TRAINER_FIELDS - set(fields)):
        if trainer[key] != TRAINER_DEFAULTS[key]:
            owners = [name for name, other in TRAINER_CLASSES.items() if key in CLASS_DEFAULTS[other]]
            where = f"trainer={' or '.join(owners)}" if owners else "the SFT trainers (FastSFTConfig)"
            problems.append(f"trainer.{key} applies to {where}, not to trainer={trainer.name} ({cls.__name__})")
    return problems


def dpo_loss_types() -> list[str]:
    """The DPO loss types the installed TRL names in DPOConfig's help."""
    return re.findall(r"`'(\w+)'`", FastDPOConfig.__dataclass_fields__["loss_type"].metadata.get("help", ""))


def loss_type_problems(trainer) -> list[str]:
    """trainer=dpo's loss_type: one name of TRL's, or several joined by commas (weighted by loss_weights)."""
    if trainer_class(trainer.name) is not FastDPOConfig:
        return []
    names = dpo_loss_types()
    if not names:  # a TRL whose help names none: TRL itself checks
        return []
    bad = [name for name in str(trainer.loss_type).split(",") if name.strip() not in names]
    return [
        f"trainer.loss_type: '{name}' is not a DPO loss type of the installed TRL"
        + (f" (did you mean {near[0]}?)" if (near := get_close_matches(name, names, n=1)) else "")
        + f"; one of {', '.join(names)}"
        for name in bad
    ]


@dataclass
class LoggerConfig:
    """The logger group (app.loggers). The W&B keys matter only for kind=wandb, the MLflow keys for kind=mlflow;
    ``group`` for both."""

    kind: LoggerKind = LoggerKind.none
    # null (project, entity, mode, tags): W&B's environment wins, then fusetune's default (app.loggers)
    project: str | None = None  # null: WANDB_PROJECT, else "fusetune"
    entity: str | None = None  # null: WANDB_ENTITY, else the account's default
    # null: WANDB_MODE if set, else online when an API key is configured (WANDB_API_KEY or ~/.netrc), else offline
    mode: WandbMode | None = None
    group: str | None = None  # null: the sweep folder's name in a multirun, no group in a single run
    tags: list[str] | None = None  # null: WANDB_TAGS (comma-separated), else none
    # MLflow's store; null: MLFLOW_TRACKING_URI, else outputs/mlflow/mlflow.db (sqlite) in the working folder
    tracking_uri: str | None = None
    experiment: str | None = None  # null: MLFLOW_EXPERIMENT_NAME, else "fusetune"


@dataclass
class ExportConfig:
    """What the run writes besides its model or adapter."""

    # <run>/merged/: 16-bit weights that plain transformers loads (FastModel.save_merged): the LoRA adapters merged
    # into the base, or a full fine-tune's whole model (a 16-bit copy of model/, also without save_model)
    merged: bool = False
    # <run>/gguf/model-<type>.gguf: one GGUF file that llama.cpp runs (fusetune.gguf_export: llama, mistral, qwen2),
    # the adapters merged in, the tokenizer and its chat template included; null: none
    gguf: GGUFType | None = None


@dataclass
class ResumeConfig:
    """How a run continues the one in its folder (app.run_folder, app.resume_check)."""

    # null: a new run (its folder must hold no other run's record); auto: continue the run in this folder from its
    # newest complete checkpoint; or the path of a checkpoint-N folder. `resume=X` on the command line is short for it
    checkpoint: str | None = None
    # keys (or prefixes: data) that change the math and may differ from the checkpoint's config
    allow_changes: list[str] = field(default_factory=list)


_RESUME_SHORTHAND = re.compile(r"^(\+{0,2})resume=(?!\{)")  # resume={checkpoint: ..} is the node itself


def expand_resume_shorthand(overrides: list[str]) -> list[str]:
    """``resume=X`` (also ``+resume=``, ``++resume=``) as ``resume.checkpoint=X``: the command line's short form."""
    return [_RESUME_SHORTHAND.sub(r"\1resume.checkpoint=", override) for override in overrides]


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
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    overwrite: bool = False  # replace another run's record in the run folder
    distributed: Distributed = Distributed.none  # how several processes (torchrun, accelerate launch) train
    allow_single_process: bool = False  # distributed=ddp|fsdp launched as one process: warn instead of refusing
    objective: str = "eval_loss"  # what a sweeper optimizes: a summary.json key or a key of its eval block
    export: ExportConfig = field(default_factory=ExportConfig)


def logging_steps_for(max_steps: int) -> int:
    """The logging interval when trainer.logging_steps is null: ten points or more in a run of max_steps (every
    10 steps in long runs, and in runs by epochs, whose length is not known here)."""
    return min(10, max(1, max_steps // 10)) if max_steps > 0 else 10


# model.gradient_checkpointing's words for FastModel's modes (fast_model.CHECKPOINTING); "unsloth" is "offload"
CHECKPOINTING_WORDS = {str(mode).lower(): "offload" if mode in OFFLOADED else mode for mode in CHECKPOINTING}


def checkpointing_mode(value: str) -> bool | str:
    """model.gradient_checkpointing as FastModel.get_peft_model takes it: True, False, "offload" or "smart"."""
    return CHECKPOINTING_WORDS[str(value).lower()]


def register_configs() -> None:
    """Store the schemas: train.yaml lists ``train_schema`` first, which types every group beneath it; and the
    resolver that names a run folder every rank of a distributed launch agrees on."""
    if not OmegaConf.has_resolver("fusetune.run_id"):
        OmegaConf.register_new_resolver("fusetune.run_id", distributed.run_id)
    job_names.register_resolvers()
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


def extra_key_problem(key: str, config_class: type = FastSFTConfig) -> str | None:
    """Why ``trainer.extra.<key>`` is refused, or None: extra holds the trainer class's fields that no trainer key
    holds (or their older spellings, which FastSFTConfig translates), so the app's own reading of the trainer keys
    holds."""
    if key in TRAINER_FIELDS:
        return f"set trainer.{key} instead"
    if key in SET_BY_THE_APP:
        return f"fusetune sets {key} from {SET_BY_THE_APP[key]}"
    if config_class is not FastSFTConfig:  # the older spellings are FastSFTConfig's translations
        return None if key in CLASS_DEFAULTS[config_class] else f"not a field of {config_class.__name__}"
    rename = CONFIG_RENAMES.get(key)
    if rename is not None and rename.new in TRAINER_FIELDS:
        return f"an older spelling of {rename.new}: set trainer.{rename.new}"
    if rename is not None and rename.new in SET_BY_THE_APP:
        return f"an older spelling of {rename.new}, which fusetune sets from {SET_BY_THE_APP[rename.new]}"
    if rename is None and key not in SFT_FIELDS:
        return "not a field of FastSFTConfig (TRL's SFTConfig)"
    return None


# Keys that hold credentials (not special tokens such as pad_token or eos_token).
SECRET = re.compile(r"((^|_)(hub|hf|auth|access|api)_token|api_?key|password|secret)$", re.IGNORECASE)
# Environment variables that hold credentials (HF_TOKEN, WANDB_API_KEY, DB_PASSWORD, ...), set by hydra.job.env_set.
SECRET_VARIABLE = re.compile(r"((^|_)(token|api_?key)$|password|secret)", re.IGNORECASE)


def _looks_secret(path: str) -> bool:
    parent, _, key = path.rpartition(".")
    if parent.endswith("env_set"):
        return bool(SECRET_VARIABLE.search(key))
    return bool(SECRET.search(key))


def _children(cfg):
    if isinstance(cfg, ListConfig | list):
        return enumerate(cfg)
    return cfg.items_ex(resolve=False) if hasattr(cfg, "items_ex") else cfg.items()


def secrets_in(cfg, prefix: str = "") -> list[str]:
    """The keys of ``cfg`` that hold a secret (a token, an API key, a password) with a value set, hydra.* included:
    a secret-looking variable of ``hydra.job.env_set``, and an override of such a key (hydra.overrides lists it)."""
    found = []
    for key, value in _children(cfg):
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig | ListConfig) and value._is_none():
            continue
        if path in ("hydra.overrides.task", "hydra.overrides.hydra"):
            found += [key for key, given in map(_override, value) if given and _looks_secret(key)]
        elif isinstance(value, DictConfig | ListConfig | dict | list):
            found += secrets_in(value, f"{path}.")
        elif _looks_secret(path) and value not in (None, "", "???"):
            found.append(path)
    return list(dict.fromkeys(found))


def _override(override) -> tuple[str, bool]:
    """``+hydra.job.env_set.HF_TOKEN=x`` -> (``hydra.job.env_set.HF_TOKEN``, whether it gives a value)."""
    key, _, value = str(override).partition("=")
    return key.lstrip("~+").strip(), value.strip() not in ("", "null", "???")


def refuse_secrets(cfg) -> None:
    """Hydra writes the whole config (hydra.* and the overrides too) into .hydra/: a secret given there would be
    kept on disk."""
    found = secrets_in(cfg)
    if found:
        raise FusetuneError(
            f"{', '.join(found)}: secrets are not read from the config, which is written to .hydra/; "
            "set them in the environment (HF_TOKEN, WANDB_API_KEY) instead"
        )


def unknown_keys(cfg, prefix: str = "") -> list[str]:
    """Keys that a ``+key=value`` override added to a typed node whose schema has no such key: one line each, with
    the nearest key. ``trainer.extra`` (untyped) and ``hydra`` take any key."""
    found = []
    schema = cfg._metadata.object_type if isinstance(cfg, DictConfig) else None
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key, value in _children(cfg):
        path = f"{prefix}{key}"
        if path == "hydra":
            continue
        if known is not None and key not in known and (moved := moved_key_line(path)):
            found.append(moved)
        elif known is not None and key not in known:
            near = "".join(f" (did you mean {near}?)" for near in get_close_matches(str(key), sorted(known), n=1))
            extra = (
                "; trainer.extra holds FastSFTConfig fields that no trainer key holds" if prefix == "trainer." else ""
            )
            found.append(f"{path}: not a key of {schema.__name__}{near}{extra}")
        elif isinstance(value, DictConfig | ListConfig) and not value._is_none():
            found += unknown_keys(value, f"{path}.")
    return found


# The app's own keys; the trainer and model keys are the library's (fusetune.limits), under the app's names.
LORA_LIMITS = {"r": limits.LORA["r"], "alpha": limits.LORA["lora_alpha"], "dropout": limits.LORA["lora_dropout"]}
RUN_LIMITS = {"seed": limits.SEED, "cpu_threads": limits.Range(1, note="null: torch's default")}
DATA_LIMITS = {"num_train": limits.Range(1), "num_eval": limits.Range(0), "num_generate": limits.Range(0)}


def range_problems(cfg) -> list[str]:
    """The numeric keys out of their range (fusetune.limits), one line each."""
    problems = limits.problems(cfg.trainer, limits.TRAINER, "trainer.")
    problems += limits.problems(cfg.model, limits.MODEL, "model.")
    if cfg.model.lora is not None:
        problems += limits.problems(cfg.model.lora, LORA_LIMITS, "model.lora.")
    problems += limits.problems(cfg, RUN_LIMITS)
    return problems + limits.problems(cfg.data, DATA_LIMITS, "data.")


def check_composed(cfg) -> None:
    """What the composed config alone shows, checked before Hydra writes it (run_folder.GuardRunFolder) and again
    by ``validate``: a secret, a key added with ``+`` that its group does not have, a number out of range, a name
    the installed libraries do not accept (app.choices); every problem found, in one line."""
    refuse_secrets(cfg)
    problems = unknown_keys(cfg) + range_problems(cfg) + choice_problems(cfg)
    if problems:
        raise FusetuneError("; ".join(problems))


def fp8_problems(cfg) -> list[str]:
    """What kernels.fp8=true cannot run with, known from the config alone (the device is checked at load)."""
    problems = []
    if cfg.model.lora is None:
        problems.append("kernels.fp8 needs model.lora: it runs the frozen base weights under LoRA adapters in FP8")
    if cfg.model.dtype not in (DType.auto, DType.bfloat16):
        problems.append(f"kernels.fp8 computes in bfloat16: model.dtype is {cfg.model.dtype.value}")
    if cfg.distributed != Distributed.none:
        problems.append(f"kernels.fp8 trains in one process: distributed={cfg.distributed.value} is not supported")
    return problems


def trainer_data_problems(cfg) -> list[str]:
    """trainer=dpo, orpo and simpo train on chosen/rejected pairs, trainer=kto on labelled answers, and the SFT
    trainers on neither."""
    name, wants = cfg.trainer.name, TRAINER_DATA.get(cfg.trainer.name, SINGLE)
    given = record_formatters(cfg.data)  # each source of a mixture
    if len({record_kind(formatter) for _, formatter in given}) > 1:
        return []  # data_problems names the source of another kind
    for data, formatter in given:
        gives = record_kind(formatter)
        if formatter is None or formatter == "mixture" or gives == wants:  # no formatter: data_problems says so
            continue
        if wants != SINGLE:
            use, embedded = KIND_DATA[wants]
            return [
                f"trainer={name} trains on {wants}, but {data} gives {gives}: use {use} or data={embedded} "
                "(the embedded set)"
            ]
        trainers = " or ".join(n for n, kind in TRAINER_DATA.items() if kind == gives)
        return [f"{data} gives {gives}, which trainer={name} does not train on: use trainer={trainers}"]
    return []


def validate(cfg) -> None:
    """Rules that span config groups, after ``check_composed``. Raises FusetuneError, one line for every mistake."""
    check_composed(cfg)
    problems = []
    if cfg.model.load_in_4bit and cfg.model.lora is None:
        problems.append("model.load_in_4bit needs model.lora: 4-bit weights cannot be trained directly (QLoRA)")
    if cfg.model.load_in_4bit and cfg.model.random_init:
        problems.append("model.load_in_4bit cannot quantize a random_init model: there are no weights to load")
    if str(cfg.model.gradient_checkpointing).lower() not in CHECKPOINTING_WORDS:
        problems.append(
            "model.gradient_checkpointing: expected true, false, offload or smart, "
            f"got '{cfg.model.gradient_checkpointing}'"
        )
    elif cfg.model.memory_budget is not None:
        try:
            check_memory_budget(
                cfg.model.memory_budget, checkpointing_mode(cfg.model.gradient_checkpointing), "model.memory_budget"
            )
        except FusetuneError as error:
            problems.append(str(error))
    for key, wanted in (("export.merged", cfg.export.merged), ("export.gguf", cfg.export.gguf is not None)):
        if wanted and cfg.model.lora is None and cfg.distributed == Distributed.fsdp:
            problems.append(
                f"{key} with distributed=fsdp and no LoRA: rank 0 holds only its shard of the model; "
                "use the run's model/ (saved whole), or convert it afterwards"
            )
    if (alone := distributed.single_process(cfg.distributed.value)) is not None:
        if not cfg.allow_single_process:
            problems.append(alone)
        else:
            warnings.warn(alone.partition("; allow_single_process")[0] + ": training in one process", stacklevel=2)
    if cfg.kernels.fp8:
        problems += fp8_problems(cfg)
    if cfg.trainer.packing and cfg.trainer.padding_free:
        problems.append("trainer.packing and trainer.padding_free: choose one (packing is already padding-free)")
    if cfg.trainer.max_steps == 0:
        problems.append("trainer.max_steps=0 trains nothing: give a positive number, or -1 to train by epochs")
    elif cfg.trainer.max_steps < 0 and cfg.trainer.num_train_epochs <= 0:
        problems.append("trainer: set max_steps or num_train_epochs above zero")
    config_class = trainer_class(cfg.trainer.name)
    problems += [
        f"trainer.extra.{key}: {why}" for key in cfg.trainer.extra if (why := extra_key_problem(key, config_class))
    ]
    problems += other_class_problems(cfg.trainer) + loss_type_problems(cfg.trainer)
    problems += trainer_data_problems(cfg)
    problems += data_problems(cfg.data)
    if cfg.trainer.eval_strategy != "no" and not has_eval_data(cfg.data):
        where = "data.eval_path, data.eval_split or data.eval_fraction"
        if is_mixture(cfg.data):
            where = "data.eval_fraction, or a source's eval_path or eval_split"
        problems.append(f"trainer.eval_strategy needs eval data: set {where}")
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
