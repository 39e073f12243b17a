"""Load a dataset (local file, hub, or the embedded synthetic set) and format it for TRL."""

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, load_dataset

from ..errors import FusetuneError
from .formatters import FORMATTERS
from .synthetic import synthetic_splits

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Splits:
    train: Dataset
    eval: Dataset | None
    # (prompt text, expected answer) pairs for greedy exact-match evaluation
    generation: list[tuple[str, str]]


def load_local(path: str) -> Dataset:
    file = Path(path).expanduser()
    builder = LOCAL_BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise FusetuneError(f"data.path: {path} must end in one of {sorted(LOCAL_BUILDERS)}")
    if not file.is_file():
        raise FusetuneError(f"data.path: no such file: {file}")
    return load_dataset(builder, data_files=str(file), split="train")


def _raw_splits(cfg, seed: int) -> tuple[Dataset, Dataset | None]:
    if cfg.formatter == "synthetic":
        train, held_out = synthetic_splits(cfg.num_train, cfg.num_eval, seed)
        return Dataset.from_list(train), Dataset.from_list(held_out) if held_out else None
    if (cfg.path is None) == (cfg.name is None):
        raise FusetuneError(
            f"data: give exactly one of data.path (a local file) or data.name (a hub dataset), "
            f"got path={cfg.path!r} name={cfg.name!r}"
        )
    if cfg.path is not None:
        train = load_local(cfg.path)
        held_out = load_local(cfg.eval_path) if cfg.eval_path else None
    else:
        train = load_dataset(cfg.name, cfg.subset, split=cfg.split)
        held_out = load_dataset(cfg.name, cfg.subset, split=cfg.eval_split) if cfg.eval_split else None
    if held_out is None and cfg.eval_fraction > 0:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train, held_out = parts["train"], parts["test"]
    return train, held_out


def _format(dataset: Dataset, cfg, chat_template: bool) -> Dataset:
    if cfg.max_examples is not None:
        dataset = dataset.select(range(min(cfg.max_examples, len(dataset))))
    formatter = FORMATTERS[cfg.formatter]
    # Validate on the first record, so a wrong column fails before the whole map runs.
    if len(dataset) == 0:
        raise FusetuneError(f"data: the {cfg.formatter} dataset is empty")
    formatter(dataset[0], cfg.field, chat_template)
    return dataset.map(lambda r: formatter(r, cfg.field, chat_template), remove_columns=dataset.column_names)


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
    """Load and format ``cfg`` (a DataConfig) into TRL-ready train/eval datasets."""
    chat_template = tokenizer.chat_template is not None if cfg.use_chat_template is None else cfg.use_chat_template
    if chat_template and tokenizer.chat_template is None:
        raise FusetuneError("data.use_chat_template: the tokenizer has no chat template")
    if cfg.formatter in ("chat", "sharegpt") and tokenizer.chat_template is None:
        raise FusetuneError(f"data: formatter '{cfg.formatter}' needs a tokenizer with a chat template")
    train, held_out = _raw_splits(cfg, seed)
    train = _format(train, cfg, chat_template)
    held_out = _format(held_out, cfg, chat_template) if held_out is not None else None
    pairs = []
    if held_out is not None:
        for record in held_out:
            pair = generation_pair(record, tokenizer)
            if pair is not None:
                pairs.append(pair)
            if len(pairs) == cfg.num_generate:
                break
    return Splits(train=train, eval=held_out, generation=pairs)
