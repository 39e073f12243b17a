"""Read each dataset the config names into record sets: a local file, a hub split or the embedded synthetic set.

Each file or hub split is read, checked (every record: ``checks.py``), cut to data.max_examples and formatted once,
as a ``RecordSet`` (``cache.py``). A source's held-out records are its eval_path or eval_split, else
data.eval_fraction of its rows.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, load_dataset

from ..errors import FusetuneError, one_line
from .cache import RecordSet, code_hash
from .checks import DatasetOrigin, checked, record_check
from .files import content_hash, load_local
from .formatters import FORMATTERS
from .rules import SYNTHETIC, is_mixture, value
from .synthetic import preference_pairs, synthetic_splits, unpaired

log = logging.getLogger(__name__)
SPEC_KEYS = ("path", "name", "subset", "split", "revision", "eval_path", "eval_split", "field")


@dataclass(frozen=True)
class SourceSpec:
    """One dataset the config names: the data group itself ("data"), or a source of a mixture ("data.sources.N")."""

    key: str
    formatter: str
    path: str | None = None
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    eval_path: str | None = None
    eval_split: str | None = None
    field: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class ReadOptions:
    """How every dataset of this build is read: the data group's options that apply to all of them."""

    chat_template: bool
    as_messages: bool
    empty_content: str
    max_examples: int | None


@dataclass
class LoadedSource:
    """A source, read: its record set, the rows that train, and where its held-out records are."""

    spec: SourceSpec
    records: RecordSet
    train_rows: np.ndarray | None = None  # None: every row
    eval_records: RecordSet | None = None  # an eval file or split
    eval_rows: np.ndarray | None = None  # else rows of ``records`` held out by data.eval_fraction

    def train_count(self) -> int:
        return len(self.records.dataset) if self.train_rows is None else len(self.train_rows)

    def rows_that_train(self) -> np.ndarray:
        return np.arange(len(self.records.dataset)) if self.train_rows is None else self.train_rows

    def held_out(self) -> tuple[RecordSet, np.ndarray | None] | None:
        if self.eval_records is not None:
            return self.eval_records, None
        return (self.records, self.eval_rows) if self.eval_rows is not None else None


def source_specs(cfg) -> list[SourceSpec]:
    """The data group as one source, or each of data.sources for a mixture."""
    if is_mixture(cfg):
        return [
            SourceSpec(
                f"data.sources.{n}", value(s.formatter), weight=s.weight, **{k: getattr(s, k) for k in SPEC_KEYS}
            )
            for n, s in enumerate(cfg.sources)
        ]
    return [SourceSpec("data", value(cfg.formatter), **{k: getattr(cfg, k) for k in SPEC_KEYS})]


def _read_hub(spec: SourceSpec, split: str) -> tuple[Dataset, DatasetOrigin, dict]:
    subset = f"subset {spec.subset}, " if spec.subset else ""
    revision = f"revision {spec.revision}, " if spec.revision else ""
    origin = DatasetOrigin(f"{spec.key}.name {spec.name} ({subset}{revision}split {split})")
    options = {"revision": spec.revision} if spec.revision else {}
    try:
        dataset = load_dataset(spec.name, spec.subset, split=split, **options)
    # not found (DatasetNotFoundError), offline (ConnectionError), an unknown split or subset (ValueError)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        raise FusetuneError(f"{origin.label}: cannot load: {one_line(error)}") from error
    if len(dataset) == 0:
        raise FusetuneError(f"{origin.label}: no records (0 records)")
    identity = {"kind": "hub", "name": spec.name, "subset": spec.subset, "split": split, "revision": spec.revision}
    return dataset, origin, {**identity, "fingerprint": getattr(dataset, "_fingerprint", None)}


def _read_local(path: str, key: str, check=None) -> tuple[Dataset, DatasetOrigin, dict]:
    """The file's records, keyed by its content: a SHA-256 of its bytes names every cache entry of it. ``check``:
    a record's problem, named with the file's unreadable lines when it cannot be read (files.load_local)."""
    file = Path(path).expanduser()
    if not file.is_file():
        return load_local(path, key), DatasetOrigin(f"{key} {path}", file), {}  # raises the one line that says why
    before = file.stat()
    hashed = content_hash(file)
    log.debug("data: %s hashed (%d bytes) in %.3f s", path, hashed["bytes"], hashed["seconds"])
    dataset = load_local(path, key, sha256=hashed["sha256"], check=check)
    after = file.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise FusetuneError(f"{key} {path}: the file changed while it was read; run again once it is written")
    identity = {"kind": "file", "path": str(file.resolve()), "sha256": hashed["sha256"], "size": hashed["bytes"]}
    return dataset, DatasetOrigin(f"{key} {path}", file, hashed), identity


def _format_records(dataset: Dataset, formatter_name: str, field: str | None, chat_template: bool, as_messages: bool):
    formatter = FORMATTERS[formatter_name]
    names = formatter.column_names(field)

    def format_batch(batch: dict) -> dict:
        size = len(next(iter(batch.values())))
        columns = [batch[name] if name in batch else [None] * size for name in names]
        rows = [formatter.format(values, chat_template) for values in zip(*columns, strict=True)]
        if as_messages:  # a one-turn conversation, mixed with others (alpaca with a chat template)
            rows = [{"messages": row["prompt"] + row["completion"]} for row in rows]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}

    return dataset.map(format_batch, batched=True, remove_columns=dataset.column_names)


def _record_set(read: tuple[Dataset, DatasetOrigin, dict], spec: SourceSpec, options: ReadOptions) -> RecordSet:
    """The read records, checked, cut to data.max_examples and formatted, with the identity that keys the cache."""
    dataset, origin, identity = read
    read_count = len(dataset)
    dataset, rows = checked(dataset, origin, spec.formatter, spec.field, options.empty_content)
    if options.max_examples is not None:
        dataset = dataset.select(range(min(options.max_examples, len(dataset))))
        rows = rows[: len(dataset)] if rows is not None else None
    as_messages = options.as_messages and spec.formatter == "alpaca"
    formatted = _format_records(dataset, spec.formatter, spec.field, options.chat_template, as_messages)
    identity = {
        **identity,
        "formatter": spec.formatter,
        "field": spec.field,
        "chat_template": options.chat_template,
        "as_messages": as_messages,
        "empty_content": options.empty_content,
        "max_examples": options.max_examples,
        "code": code_hash(),
    }
    return RecordSet(origin.label, formatted, identity, origin=origin, rows=rows, read_count=read_count)


def _hold_out(count: int, fraction: float, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of ``count`` records: datasets' train_test_split, as on the records themselves."""
    rows = Dataset.from_dict({"row": np.arange(count)})
    try:
        parts = rows.train_test_split(test_size=fraction, seed=seed)
    except ValueError as error:
        raise FusetuneError(f"{key}={fraction}: {one_line(error)}") from error
    return np.asarray(parts["train"]["row"]), np.asarray(parts["test"]["row"])


def _load_synthetic(spec: SourceSpec, cfg, seed: int, options: ReadOptions) -> LoadedSource:
    train, held_out = synthetic_splits(cfg.num_train, cfg.num_eval, seed)
    if spec.formatter in ("synthetic_preference", "synthetic_kto"):
        train, held_out = preference_pairs(train, seed), preference_pairs(held_out, seed + 1)
    if spec.formatter == "synthetic_kto":
        train, held_out = unpaired(train), unpaired(held_out)
    identity = {"kind": "synthetic", "num_train": cfg.num_train, "num_eval": cfg.num_eval, "seed": seed}
    origin = DatasetOrigin("data (synthetic)")
    read = (Dataset.from_list(train), origin, {**identity, "part": "train"})
    source = LoadedSource(spec, _record_set(read, spec, options))
    if held_out:
        read = (Dataset.from_list(held_out), origin, {**identity, "part": "eval"})
        source.eval_records = _record_set(read, spec, options)
    return source


def load_source(spec: SourceSpec, cfg, seed: int, options: ReadOptions) -> LoadedSource:
    """Read ``spec``'s records and its held-out ones (an eval file or split, else data.eval_fraction of its rows)."""
    check = record_check(spec.formatter, spec.field)  # a file that cannot be read is refused with its bad records
    if spec.formatter in SYNTHETIC:
        source = _load_synthetic(spec, cfg, seed, options)
    elif spec.path is not None:
        source = LoadedSource(spec, _record_set(_read_local(spec.path, f"{spec.key}.path", check), spec, options))
    else:
        source = LoadedSource(spec, _record_set(_read_hub(spec, spec.split), spec, options))
    if spec.eval_path:
        source.eval_records = _record_set(_read_local(spec.eval_path, f"{spec.key}.eval_path", check), spec, options)
    elif spec.eval_split:
        source.eval_records = _record_set(_read_hub(spec, spec.eval_split), spec, options)
    elif source.eval_records is None and cfg.eval_fraction > 0:
        key = "data.eval_fraction" if spec.key == "data" else f"data.eval_fraction (of {spec.key})"
        source.train_rows, source.eval_rows = _hold_out(len(source.records.dataset), cfg.eval_fraction, seed, key)
    return source
