"""Local data files: load one, say precisely why one cannot be loaded, and number its records as a user would.

A JSON Lines file numbers its records by line (blank lines are skipped by the loader, not by the count);
other files number them from 1 in file order. The slow work here (reading a file line by line with
``json.loads``) runs only on the failure path and when a bad record needs its line number.
"""

import csv
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, Features, Value, load_dataset

from ..errors import FusetuneError, one_line
from ..noise import muted
from ..training.checkpoints import file_hash
from .formatters import kind

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
BLANK = b" \t\r\n"
MAX_SHOWN = 5  # bad records (or lines) shown in one message; the rest are counted


def listing(items: list[tuple[str, str]], count: int) -> str:
    """'line 3: problem; line 9: problem; (2 more)': the first MAX_SHOWN of count (where, problem) pairs."""
    shown = "; ".join(f"{where}: {problem}" for where, problem in items[:MAX_SHOWN])
    return shown + (f"; ({count - MAX_SHOWN} more)" if count > MAX_SHOWN else "")


class Tally:
    """Problems grouped by kind (a problem's text with its numbers left out), in the order first found: the
    first MAX_SHOWN of each kind, and how many of each there are. One message then names every kind."""

    def __init__(self):
        self.shown: dict[str, list[tuple]] = {}
        self.counts: dict[str, int] = {}

    def add(self, at, problem: str) -> None:
        kind_of = re.sub(r"\d+", "#", problem)
        seen = self.counts.get(kind_of, 0)
        self.counts[kind_of] = seen + 1
        if seen < MAX_SHOWN:
            self.shown.setdefault(kind_of, []).append((at, problem))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def text(self, where=None) -> str:
        """Each kind's listing, joined; ``where`` turns the positions of one kind into the words shown."""
        parts = []
        for kind_of, found in self.shown.items():
            places = [at for at, _ in found]
            shown = where(places) if where is not None else places
            parts.append(listing(list(zip(shown, [p for _, p in found], strict=True)), self.counts[kind_of]))
        return "; ".join(parts)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _start(file: Path) -> bytes:
    """The file's first bytes after any blank space (and a UTF-8 byte order mark): b"" for a blank file."""
    with file.open("rb") as f:
        head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf").lstrip(BLANK)
        while not head:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            head = chunk.lstrip(BLANK)
    return head[:16]


def is_json_lines(file: Path) -> bool:
    """A .json or .jsonl file that holds one record per line (not a JSON array)."""
    return LOCAL_BUILDERS.get(file.suffix.lower()) == "json" and not _start(file).startswith(b"[")


def line_numbers(file: Path) -> list[int]:
    """The 1-based line of each non-blank line of a file: the JSON Lines loader skips blank lines."""
    with file.open("rb") as f:
        return [number for number, line in enumerate(f, 1) if line.strip(BLANK)]


def content_hash(file: Path) -> dict:
    """The file's SHA-256 (read in chunks, as a checkpoint's files are), with its size and the seconds hashing took.
    The caller checks that the file did not change meanwhile."""
    started = time.perf_counter()
    size = file.stat().st_size
    return {"sha256": file_hash(file), "bytes": size, "seconds": round(time.perf_counter() - started, 4)}


def load_local(
    path: str, key: str = "data.path", sha256: str | None = None, check: Callable[[dict], str | None] | None = None
) -> Dataset:
    """Load a local .jsonl/.json/.parquet/.csv file; ``key`` is the config field that named it. A JSON Lines file
    that cannot be read is refused with every kind of bad line in it, and ``check`` (a record's problem, or None)
    adds the records that parse but would be refused later.

    ``sha256`` (the file's content hash) names the datasets library's cache entry, which otherwise keys on the
    path and modification time alone: a file edited in place with its mtime kept never reads back stale rows."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise FusetuneError(f"{key}: {path} is a directory; give one {'/'.join(LOCAL_BUILDERS)} file")
    builder = LOCAL_BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise FusetuneError(f"{key}: {path} must end in one of {sorted(LOCAL_BUILDERS)}")
    if not file.is_file():
        raise FusetuneError(f"{key}: no such file: {file}")
    if not _start(file):
        raise FusetuneError(f"{key} {path}: the file is empty (0 records)")
    options = {"name": f"fusetune-{sha256[:32]}"} if sha256 else {}
    if builder == "csv":
        # CSV has no types: every cell is text, as written ("007" stays "007", "3" does not become 3.0,
        # "NA" stays "NA"), and an empty cell is an empty string.
        options["features"] = Features(dict.fromkeys(_csv_header(file, key, path), Value("string")))
        options["keep_default_na"] = False
    try:
        with muted("datasets"):  # it logs a failure before raising it; ours is one line
            dataset = load_dataset(builder, data_files=str(file), split="train", **options)
            dataset.data.table.validate(full=True)  # the JSON reader leaves invalid UTF-8 to fail later, when read
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:
        raise FusetuneError(f"{key} {path}: {_why_unreadable(file, builder, error, check)}") from error
    if len(dataset) == 0:
        raise FusetuneError(f"{key} {path}: no records (0 records)")
    return dataset


def _csv_header(file: Path, key: str, path: str) -> list[str]:
    try:
        with file.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error) as error:
        raise FusetuneError(f"{key} {path}: cannot be read as CSV: {one_line(error)}") from error
    if len(set(header)) != len(header) or not all(header):
        raise FusetuneError(f"{key} {path}: the CSV header needs distinct, non-empty column names, got {header}")
    return header


def _root(error: BaseException) -> BaseException:
    """The first cause that is not one of datasets' wrappers."""
    seen = error
    while type(seen).__module__.startswith("datasets") and (seen.__cause__ or seen.__context__):
        seen = seen.__cause__ or seen.__context__
    return seen


def _why_unreadable(file: Path, builder: str, error: Exception, check=None) -> str:
    root = _root(error)
    if isinstance(root, ValueError) and "corresponds to no data" in str(root):
        return "no records (0 records)"
    if builder == "json":
        found = _json_lines_problems(file, check) if is_json_lines(file) else _json_problem(file)
        if found:
            return found
        return f"cannot be read as JSON: {one_line(root)}"
    return f"cannot be read as {'CSV' if builder == 'csv' else 'Parquet'}: {one_line(root)}"


def _json_lines_problems(file: Path, check=None) -> str | None:
    """'cannot be read as JSON Lines: 2 bad lines: line 3: ...', or None when every line is a JSON object; with
    ``check``, the lines whose record it refuses too."""
    bad = Tally()
    unreadable = False
    with file.open("rb") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip(BLANK)  # so that a column counts within the line
            if not line:
                continue
            try:
                record = json.loads(line.decode("utf-8").removeprefix("\ufeff"))
            except UnicodeDecodeError:
                problem = "not UTF-8 text"
            except json.JSONDecodeError as error:
                problem = f"not valid JSON ({error.msg} at column {error.colno})"
            else:
                problem = None if isinstance(record, dict) else f"not a JSON object (got {kind(record)})"
                if problem is None:
                    if check is not None and (problem := check(record)) is not None:
                        bad.add(f"line {number}", problem)
                    continue
            unreadable = True
            bad.add(f"line {number}", problem)
    if not unreadable:
        return None
    return f"cannot be read as JSON Lines: {plural(bad.total, 'bad line')}: {bad.text()}"


def _json_problem(file: Path) -> str | None:
    """Where a JSON file (an array of records) is broken, or None when it is a list of objects."""
    try:
        records = json.loads(file.read_bytes().decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as error:
        return f"cannot be read as JSON: not UTF-8 text ({one_line(error)})"
    except json.JSONDecodeError as error:
        return f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
    if not isinstance(records, list):
        return f"cannot be read as JSON: holds {kind(records)}, not a list of records"
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            return f"cannot be read as JSON: record {number} is not an object (got {kind(record)})"
    return None
