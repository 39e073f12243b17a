"""Load a dataset (local file, hub, or the embedded synthetic set), check every record, and format it for TRL."""

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, load_dataset

from ..errors import FusetuneError
from .checks import Source, checked
from .files import LOCAL_BUILDERS, load_local, one_line
from .formatters import FORMATTERS
from .synthetic import synthetic_splits

__all__ = ["LOCAL_BUILDERS", "Splits", "build_splits", "generation_pair", "load_local"]


@dataclass
class Splits:
    train: Dataset
    eval: Dataset | None
    # (prompt text, expected answer) pairs for greedy exact-match evaluation
    generation: list[tuple[str, str]]


def _hub(cfg, split: str) -> tuple[Dataset, Source]:
    subset = f"subset {cfg.subset}, " if cfg.subset else ""
    source = Source(f"data.name {cfg.name} ({subset}split {split})")
    try:
        dataset = load_dataset(cfg.name, cfg.subset, split=split)
    # not found (DatasetNotFoundError), offline (ConnectionError), an unknown split or subset (ValueError)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        raise FusetuneError(f"{source.label}: cannot load: {one_line(error)}") from error
    if len(dataset) == 0:
        raise FusetuneError(f"{source.label}: no records (0 records)")
    return dataset, source


def _local(path: str, key: str) -> tuple[Dataset, Source]:
    return load_local(path, key), Source(f"{key} {path}", Path(path).expanduser())


def _raw_splits(cfg, seed: int) -> tuple[tuple[Dataset, Source], tuple[Dataset, Source] | None]:
    if cfg.formatter == "synthetic":
        train, held_out = synthetic_splits(cfg.num_train, cfg.num_eval, seed)
        source = Source("data (synthetic)")
        return (Dataset.from_list(train), source), ((Dataset.from_list(held_out), source) if held_out else None)
    if (cfg.path is None) == (cfg.name is None):
        raise FusetuneError(
            f"data: give exactly one of data.path (a local file) or data.name (a hub dataset), "
            f"got path={cfg.path!r} name={cfg.name!r}"
        )
    if cfg.path is not None:
        train = _local(cfg.path, "data.path")
        held_out = _local(cfg.eval_path, "data.eval_path") if cfg.eval_path else None
    else:
        train = _hub(cfg, cfg.split)
        held_out = _hub(cfg, cfg.eval_split) if cfg.eval_split else None
    return train, held_out


def _format(dataset: Dataset, cfg, name: str, chat_template: bool) -> Dataset:
    if cfg.max_examples is not None:
        dataset = dataset.select(range(min(cfg.max_examples, len(dataset))))
    formatter = FORMATTERS[name]
    names = formatter.column_names(cfg.field)

    def format_batch(batch: dict) -> dict:
        size = len(next(iter(batch.values())))
        columns = [batch[name] if name in batch else [None] * size for name in names]
        rows = [formatter.format(values, chat_template) for values in zip(*columns, strict=True)]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}

    return dataset.map(format_batch, batched=True, remove_columns=dataset.column_names)


def generation_pair(record: dict, tokenizer) -> tuple[str, str] | None:
    """The prompt text the model sees and the answer it should produce, or None for plain text."""
    if "messages" in record:
        *context, last = record["messages"]
        if last["role"] != "assistant" or not context:
            return None
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        return prompt, last["content"]
    if "prompt" in record:
        prompt, answer = record["prompt"], record["completion"]
        if isinstance(prompt, list):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            answer = answer[-1]["content"]
        return prompt, answer
    return None


def build_splits(cfg, tokenizer, seed: int) -> Splits:
    """Load ``cfg`` (a DataConfig), check every record, and format it into TRL-ready train/eval datasets."""
    name = getattr(cfg.formatter, "value", cfg.formatter)
    chat_template = tokenizer.chat_template is not None if cfg.use_chat_template is None else cfg.use_chat_template
    if chat_template and tokenizer.chat_template is None:
        raise FusetuneError("data.use_chat_template: the tokenizer has no chat template")
    if name in ("chat", "sharegpt") and tokenizer.chat_template is None:
        raise FusetuneError(f"data: formatter '{name}' needs a tokenizer with a chat template")
    if cfg.field and not FORMATTERS[name].takes_field:
        raise FusetuneError(
            f"data.field: formatter '{name}' reads the columns {list(FORMATTERS[name].columns)}; "
            f"data.field={cfg.field!r} names the column only for chat, sharegpt and text"
        )
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise FusetuneError(f"data.max_examples must be at least 1, got {cfg.max_examples}")
    train, held_out = _raw_splits(cfg, seed)
    train = checked(*train, formatter_name=name, field=cfg.field, empty_content=cfg.empty_content)
    if held_out is not None:
        held_out = checked(*held_out, formatter_name=name, field=cfg.field, empty_content=cfg.empty_content)
    elif cfg.eval_fraction > 0:
        try:
            parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        except ValueError as error:
            raise FusetuneError(f"data.eval_fraction={cfg.eval_fraction}: {one_line(error)}") from error
        train, held_out = parts["train"], parts["test"]
    train = _format(train, cfg, name, chat_template)
    held_out = _format(held_out, cfg, name, chat_template) if held_out is not None else None
    pairs = []
    if held_out is not None:
        for record in held_out:
            pair = generation_pair(record, tokenizer)
            if pair is not None:
                pairs.append(pair)
            if len(pairs) == cfg.num_generate:
                break
    return Splits(train=train, eval=held_out, generation=pairs)
