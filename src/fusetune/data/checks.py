"""Check every record before training: bad records end the run, empty ones follow data.empty_content.

One plain pass over the formatter's columns, in batches of Python lists (no per-record dicts):
about 0.3 s for 100k Alpaca records and 0.8 s for 100k five-turn conversations on one CPU core.
"""

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from pathlib import Path

import numpy as np
from datasets import Dataset

from ..errors import FusetuneError
from .files import BLANK, MAX_SHOWN, Tally, is_json_lines, line_numbers, listing, plural
from .formatters import FORMATTERS, Empty, Formatter

log = logging.getLogger(__name__)
BATCH = 10_000
EMPTY_CONTENT = ("warn", "error", "drop")


@dataclass(frozen=True)
class DatasetOrigin:
    """Where a dataset came from, in the words of the config."""

    label: str  # "data.path train.jsonl", "data.eval_path eval.jsonl", "data.name org/set (split train)"
    file: Path | None = None  # the local file, for line numbers
    hashed: dict | None = None  # a local file's content hash: sha256, bytes, seconds

    def where(self, indices: list[int], total: int) -> list[str]:
        """How a user finds each record (by 0-based index of ``total``): 'line 7' in a JSON Lines file, else
        'record 7' (also where records span lines, as pretty-printed objects do)."""
        if self.file is not None and is_json_lines(self.file):
            lines = line_numbers(self.file)
            if len(lines) == total:
                return [f"line {lines[i]}" for i in indices]
        return [f"record {i + 1}" for i in indices]


@dataclass
class Findings:
    bad: Tally = field(default_factory=Tally)  # (index, problem) by kind: the first MAX_SHOWN of each
    empty: list[tuple[int, str]] = field(default_factory=list)  # (index, problem): all, for drop

    @property
    def bad_count(self) -> int:
        return self.bad.total


def scan(rows: Iterable[tuple], names: tuple[str, ...], formatter: Formatter) -> Findings:
    """Check each row (a record's values of ``names``)."""
    findings = Findings()
    check = formatter.check
    for index, values in enumerate(rows):
        problem = check(values, names)
        if problem is None:
            continue
        if isinstance(problem, Empty):
            findings.empty.append((index, problem))
        else:
            findings.bad.add(index, problem)
    return findings


def record_check(formatter_name: str, field: str | None):
    """A record's problem (not its empty content), as ``scan`` finds it: for records read outside a dataset."""
    formatter = FORMATTERS[formatter_name]
    names = formatter.column_names(field)

    def check(record: dict) -> str | None:
        problem = formatter.check(tuple(record.get(name) for name in names), names)
        return None if problem is None or isinstance(problem, Empty) else problem

    return check


def _rows(dataset: Dataset, names: tuple[str, ...]) -> Iterator[tuple]:
    present = [name for name in names if name in dataset.column_names]
    for batch in dataset.select_columns(present).iter(batch_size=BATCH):
        size = len(batch[present[0]])
        yield from zip(*(batch[name] if name in batch else repeat(None, size) for name in names), strict=True)


def _raw_rows(file: Path, names: tuple[str, ...]) -> Iterator[tuple]:
    """The same rows read from a JSON file by ``json.loads``, as written (for exact messages on the failure path)."""
    if is_json_lines(file):
        with file.open("rb") as f:
            records = (json.loads(line) for line in f if line.strip(BLANK))
            yield from (tuple(record.get(name) for name in names) for record in records)
    else:
        for record in json.loads(file.read_bytes()):
            yield tuple(record.get(name) for name in names)


def _missing_columns(dataset: Dataset, formatter_name: str, names: tuple[str, ...], origin: DatasetOrigin) -> None:
    formatter = FORMATTERS[formatter_name]
    columns = dataset.column_names
    for name in names:
        if name in columns or name in formatter.optional:
            continue
        hint = ""
        if formatter_name == "chat" and "conversations" in columns:
            hint = " (ShareGPT 'conversations' of from/value: use data=sharegpt)"
        elif formatter_name == "sharegpt" and "messages" in columns:
            hint = " ('messages' of role/content: use data=chat)"
        elif formatter.takes_field:
            hint = " (data.field names the column to read)"
        raise FusetuneError(
            f"{origin.label}: formatter '{formatter_name}' needs a '{name}' column; "
            f"the data has {sorted(columns)}{hint}"
        )


def find_problems(dataset: Dataset, origin: DatasetOrigin, formatter_name: str, field: str | None) -> Findings:
    formatter = FORMATTERS[formatter_name]
    names = formatter.column_names(field)
    _missing_columns(dataset, formatter_name, names, origin)
    findings = scan(_rows(dataset, names), names, formatter)
    # datasets (5.x) stores a column of mixed types as JSON text and decodes it back, so a string that reads
    # as JSON ("1", "null") comes back as a number or null: name the bad records as the file writes them.
    if findings.bad_count and origin.file is not None and origin.file.suffix.lower() in (".json", ".jsonl"):
        if "Json(" in repr({name: dataset.features[name] for name in names if name in dataset.features}):
            try:
                raw = scan(_raw_rows(origin.file, names), names, formatter)
            except (ValueError, AttributeError, TypeError):  # JSON that only the lenient loader reads
                raw = findings
            findings = raw if raw.bad_count else findings
    return findings


def _listed(problems: list[tuple[int, str]], count: int, origin: DatasetOrigin, total: int) -> str:
    shown = problems[:MAX_SHOWN]
    return listing(list(zip(origin.where([i for i, _ in shown], total), [p for _, p in shown], strict=True)), count)


def checked(
    dataset: Dataset, origin: DatasetOrigin, formatter_name: str, field: str | None, empty_content
) -> tuple[Dataset, np.ndarray | None]:
    """The dataset once every record is checked, and the index of each kept record among those read (None: all).
    Raises on bad records, and warns on, refuses or drops empty ones."""
    empty_content = getattr(empty_content, "value", empty_content)
    if empty_content not in EMPTY_CONTENT:
        raise FusetuneError(f"data.empty_content must be one of {', '.join(EMPTY_CONTENT)}, got {empty_content!r}")
    findings = find_problems(dataset, origin, formatter_name, field)
    count = len(findings.empty)
    shown = _listed(findings.empty, count, origin, len(dataset)) if count else ""
    refused = []  # every kind of problem, in one message
    if findings.bad_count:
        where = partial(origin.where, total=len(dataset))
        refused.append(f"{plural(findings.bad_count, 'bad record')}: {findings.bad.text(where)}")
    if count and empty_content == "error":
        refused.append(
            f"{plural(count, 'record')} with empty content "
            f"(data.empty_content=error; warn keeps them, drop removes them): {shown}"
        )
    if refused:
        raise FusetuneError(f"{origin.label}: " + "; ".join(refused))
    if not count:
        return dataset, None
    if empty_content == "warn":
        log.warning(
            "%s: %s with empty content, kept (data.empty_content=warn; error refuses them, drop removes them): %s",
            origin.label,
            plural(count, "record"),
            shown,
        )
        return dataset, None
    if count == len(dataset):
        raise FusetuneError(
            f"{origin.label}: all {count} records have empty content, none is left to train on: {shown}"
        )
    keep = np.ones(len(dataset), dtype=bool)
    keep[[index for index, _ in findings.empty]] = False
    log.warning(
        "%s: dropped %d of %d records with empty content (data.empty_content=drop): %s",
        origin.label,
        count,
        len(dataset),
        shown,
    )
    kept = np.flatnonzero(keep)
    return dataset.select(kept), kept
