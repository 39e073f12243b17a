"""The files of a run's record and how they are read and written: one home for their names, the JSONL reader,
the atomic write and status.json.

- ``metrics.jsonl``: one JSON line per logging step, appended while training; ``read_jsonl`` skips a line it
  cannot parse, so the last line of a run killed mid-append is no obstacle to a resume or a report;
- ``status.json``: how the run stands (``write_status``); ``summary.json``: written last, by a finished run only;
- every JSON record goes through a temporary file and a rename, so a reader never sees half a file.

Only the standard library: the report, the app and the checkpoints all read and write through here.
"""

import json
import os
import socket
from datetime import datetime
from pathlib import Path

from .errors import one_line

SUMMARY, STATUS, METRICS = "summary.json", "status.json", "metrics.jsonl"
STATUSES = ("running", "finished", "failed", "interrupted")  # status.json's values


def read_jsonl(path: Path, problems: list[str] | None = None) -> list[dict]:
    """The JSON objects of a JSONL file ([] without one). A line cut short by a crash, or any line that is not a
    JSON object, is skipped, and named in ``problems`` when given."""
    lines = []
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return lines
    bad = []
    rows = text.splitlines()
    for number, line in enumerate(rows, 1):
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if isinstance(value, dict):
            lines.append(value)
        elif line.strip():
            bad.append(number)
    if bad and problems is not None:
        last = " (the last, cut short?)" if bad[-1] == len(rows) else ""
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        problems.append(f"{Path(path).name}: line {shown} of {len(rows)} skipped, not a JSON object{last}")
    return lines


def last_step(job_dir: Path) -> int | None:
    """The step of the last line of metrics.jsonl, or None when there is none."""
    return last_step_of(read_jsonl(Path(job_dir) / METRICS))


def last_step_of(lines: list[dict]) -> int | None:
    """The step of the last of ``lines`` (metrics.jsonl's) that has one, or None."""
    steps = [m["step"] for m in lines if isinstance(m.get("step"), int) and not isinstance(m["step"], bool)]
    return steps[-1] if steps else None


def fsync_folder(folder: Path) -> None:
    """Make the entries of ``folder`` (new names, renames) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str, durable: bool = False) -> Path:
    """Write ``text`` to a temporary file beside ``path`` (``.NAME.PID.tmp``: a concurrent writer has its own),
    then rename it over ``path``.

    ``durable``: the file is fsynced before the rename and its folder after it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_folder(path.parent)
    return path


def write_json_atomically(path: Path, payload, durable: bool = False) -> Path:
    """``payload`` as indented JSON, written by ``write_atomically``."""
    return write_atomically(path, json.dumps(payload, indent=2, default=str) + "\n", durable)


def write_status(out: Path, status: str, error: str | None = None, step: int | None = None, **extra) -> Path:
    """status.json: {"status": running | finished | failed | interrupted, "error": one line, "last_step", "updated"};
    last_step is read from metrics.jsonl unless given. "running" also names its process ("pid", "host"), so a
    reader can tell a run that died from one that runs (fusetune.report)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "status": status,
        "error": one_line(error) if error else None,
        "last_step": step if step is not None else last_step(out),
        "updated": datetime.now().astimezone().isoformat(timespec="seconds"),
        **({"pid": os.getpid(), "host": socket.gethostname()} if status == "running" else {}),
        **extra,
    }
    return write_json_atomically(out / STATUS, record)
