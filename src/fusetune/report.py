"""The ablation report of a sweep folder: every job with its status, seeds aggregated, and plots.

    python -m fusetune.report SWEEP_DIR    # (re)builds report.md, report.json, report_groups.json and the PNGs

A job is any folder under the sweep folder that holds `.hydra/`, whatever it is called, ordered by Hydra's job
number (`.hydra/hydra.yaml`). Its record gives one row: `summary.json` when it finished, `status.json` when it
failed or was interrupted (its error line and last step), `metrics.jsonl` for the loss curve. A job whose
status.json says "running" while its process (pid, host) is gone is "died"; on another host, "running?". A record
that cannot be read (cut short, not JSON, not UTF-8, the wrong shape) is a problem of its job, listed in the
report, which is written all the same. Jobs whose overrides
differ only in `seed` form a group, reported as mean ± std over its finished jobs.

- report.md: the groups (when some group has more than one job), then every job, then the plots;
- report.json: one row per job (overrides, status, error, last_step, the metrics);
- report_groups.json: one entry per group: its jobs, n finished, and mean/std/n of each metric;
- loss_curves.png: train loss by step of every job (eval loss as points); generation.png: exact match and token
  F1 of the held-out generation by step (jobs that evaluated while training with data.num_generate > 0);
  preference.png: reward accuracy and margin by step (jobs of a preference trainer: dpo, orpo, simpo);
  speed_memory.png: tok/s and peak memory as bars per group (mean, with the std and each seed's value).

This module only reads files (no Hydra); `fusetune.app.callbacks.AblationReport` runs it when a multirun ends.
"""

import argparse
import functools
import json
import math
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import one_line
from .record_files import METRICS, STATUS, STATUSES, SUMMARY, last_step, last_step_of, read_jsonl, write_atomically

LOSS_PNG, SPEED_PNG, GENERATION_PNG = "loss_curves.png", "speed_memory.png", "generation.png"
PREFERENCE_PNG = "preference.png"
INCOMPLETE = "incomplete"  # neither status.json nor summary.json: still running, or killed without a word
DIED, ELSEWHERE = "died", "running?"  # "running", and its process is gone; "running" on a host not checked from here
SEED_KEYS = ("seed", "+seed", "++seed")

# column -> how to read it from summary.json
METRICS_OF = {
    "final_loss": lambda s: s.get("final_loss"),
    "train_loss": lambda s: s.get("train_loss"),
    "eval_loss": lambda s: _eval(s).get("eval_loss"),
    "exact_match": lambda s: _eval(s).get("exact_match"),
    # preference trainers (trainer=dpo): on the eval split where the run evaluated, else the last logged train value
    "reward margin": lambda s: _reward(s, "rewards/margins"),
    "reward acc": lambda s: _reward(s, "rewards/accuracies"),
    "tok/s": lambda s: s.get("train_tokens_per_second"),
    "peak GiB": lambda s: s.get("peak_memory_gib"),
    "runtime s": lambda s: s.get("runtime_s"),
}


def _eval(summary: dict) -> dict:
    evals = summary.get("eval")
    return evals if isinstance(evals, dict) else {}


def _reward(summary: dict, name: str):
    evaluated = _eval(summary).get(f"eval_{name}")
    if evaluated is not None:
        return evaluated
    trained = summary.get("preference")
    return trained.get(name) if isinstance(trained, dict) else None


CPU_MEMORY_NOTE = "On CPU, peak GiB is the process's max RSS: in a multirun (one process) it carries over earlier jobs."
COLUMNS = ("final_loss", "train_loss", "eval_loss", "exact_match", "tok/s", "tok/s ratio", "peak GiB", "runtime s")
# Shown (after exact_match) only where some job has them: a sweep of preference trainers.
PREFERENCE_COLUMNS = ("reward margin", "reward acc")


def columns_of(rows: list[dict]) -> tuple[str, ...]:
    """COLUMNS, with the preference columns where some row (a job, or a group's metrics) has a value."""
    if not any(_has(r, c) for r in rows for c in PREFERENCE_COLUMNS):
        return COLUMNS
    at = COLUMNS.index("exact_match") + 1
    return COLUMNS[:at] + PREFERENCE_COLUMNS + COLUMNS[at:]


def _has(row: dict, column: str) -> bool:
    if "metrics" in row:  # a group
        return row["metrics"].get(column, {}).get("mean") is not None
    return row.get(column) is not None


@dataclass
class Report:
    sweep_dir: Path
    rows: list[dict]  # one per job, in job order
    groups: list[dict]  # jobs that differ only by seed, in order of first appearance
    markdown: str
    files: list[Path] = field(default_factory=list)  # what was written
    plot_note: str | None = None  # why plots are missing, if they are

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for r in self.rows:
            found[r["status"]] = found.get(r["status"], 0) + 1
        return found

    def headline(self) -> str:
        counts = "".join(f", {n} {status}" for status, n in self.counts().items())
        return f"ablation report ({_jobs(len(self.rows))}{counts}): {self.sweep_dir / 'report.md'}"

    @property
    def not_finished(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "finished"]


def _jobs(n: int) -> str:
    return f"{n} job" if n == 1 else f"{n} jobs"


# ---- reading one job -------------------------------------------------------------------------------------------


class RecordProblem(ValueError):
    """A record file that exists but cannot be read as what it should be: its one line says why."""


def read_record(path: Path) -> dict | None:
    """A JSON object file: None when there is none; RecordProblem when it is not a readable JSON object."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise RecordProblem(f"{path.name}: unreadable ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise RecordProblem(f"{path.name}: not UTF-8 (byte {error.start})") from None
    if not text.strip():
        raise RecordProblem(f"{path.name}: empty")
    try:
        value = json.loads(text)
    except ValueError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise RecordProblem(f"{path.name}: not valid JSON, cut short? ({where}: {error.msg})") from None
    if not isinstance(value, dict):
        raise RecordProblem(f"{path.name}: holds a JSON {type(value).__name__}, not an object")
    return value


def _load_json(path: Path, problems: list[str] | None = None) -> dict | None:
    """read_record, with its problem (if any) added to ``problems`` and None returned."""
    try:
        return read_record(path)
    except RecordProblem as problem:
        if problems is not None:
            problems.append(str(problem))
        return None


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Every folder under sweep_dir that holds .hydra/ (not looking inside one), in Hydra's job order."""
    found = []
    for here, dirs, _ in os.walk(sweep_dir):
        if ".hydra" in dirs:
            found.append(Path(here))
            dirs[:] = []  # a job's own subfolders (checkpoints, model/) hold no jobs
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found, key=lambda d: _order(d, Path(sweep_dir)))


def _order(job_dir: Path, sweep_dir: Path) -> tuple:
    num = job_number(job_dir)
    leading = re.match(r"\d+", job_dir.name)
    fallback = int(leading.group()) if leading else math.inf
    return (num if num is not None else fallback, str(job_dir.relative_to(sweep_dir)))


def job_number(job_dir: Path) -> int | None:
    """hydra.job.num from .hydra/hydra.yaml (None without one)."""
    path = Path(job_dir) / ".hydra" / "hydra.yaml"
    try:
        return _job_number(str(path), path.stat().st_mtime_ns)
    except OSError:
        return None


@functools.lru_cache(maxsize=4096)
def _job_number(path: str, mtime_ns: int) -> int | None:  # the report is rebuilt after every job: parse each once
    try:
        hydra_cfg = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        num = hydra_cfg["hydra"]["job"]["num"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):  # ValueError: not UTF-8
        return None
    return num if isinstance(num, int) and not isinstance(num, bool) else None


def job_overrides(job_dir: Path, problems: list[str] | None = None) -> list[str]:
    try:
        overrides = yaml.safe_load((Path(job_dir) / ".hydra" / "overrides.yaml").read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError, yaml.YAMLError) as error:  # ValueError: not UTF-8
        overrides = error
    if isinstance(overrides, list):
        return [str(o) for o in overrides]
    if overrides is not None and problems is not None:
        problems.append(f".hydra/overrides.yaml: not a list of overrides ({one_line(overrides, 80)})")
    return []


def process_state(pid, host) -> str:
    """ "running" while process ``pid`` lives on this host, DIED when it does not, ELSEWHERE for another host."""
    if host is not None and host != socket.gethostname():
        return ELSEWHERE
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return ELSEWHERE  # a record without a pid: nothing to check
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return DIED
    except PermissionError:  # another user's process
        return "running"
    try:  # a zombie has died too: it only waits for its parent to read its exit code
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "running"
    return DIED if state in ("Z", "X") else "running"


def job_status(job_dir: Path, summary: dict | None, problems: list[str] | None = None, lines=None) -> dict:
    """status, error and last_step: status.json where there is one; else finished when summary.json exists.
    A "running" record whose process is gone is DIED ("running?" on another host, or without a pid)."""
    job_dir = Path(job_dir)
    status = _load_json(job_dir / STATUS, problems) or {}
    state = status.get("status")
    error = status.get("error")
    if state not in STATUSES:
        if state is not None and problems is not None:
            problems.append(f"{STATUS}: unknown status {one_line(state, 40)!r}")
        state = "finished" if summary is not None else INCOMPLETE
        if state == INCOMPLETE and problems is not None and not (job_dir / STATUS).exists():
            problems.append(f"no {STATUS}: the job stopped before its run began (or has not begun)")
    elif state == "running" and summary is not None:
        state = "finished"  # summary.json is written last: the run got there
    elif state == "running":
        pid, host = status.get("pid"), status.get("host")
        state = process_state(pid, host)
        if state == DIED:
            error = f"pid {pid} no longer running: killed (out of memory?) or its machine stopped"
        elif state == ELSEWHERE:
            error = f"pid {pid} on {host}: not checked from here" if host else "no pid recorded: cannot tell"
    step = status.get("last_step")
    if not isinstance(step, int) or isinstance(step, bool):
        step = last_step_of(lines) if lines is not None else last_step(job_dir)
    if step is None and summary is not None and isinstance(summary.get("global_step"), int):
        step = summary["global_step"]
    error = error if state != "finished" else None
    return {"status": state, "error": one_line(error) if error else None, "last_step": step}


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def _value(override: str):
    try:
        return yaml.safe_load(override.split("=", 1)[1])
    except (IndexError, yaml.YAMLError):
        return None


def read_job(job_dir: Path, sweep_dir: Path) -> dict:
    """One row of the report; what cannot be read goes into its "problems" (one line each), never raised."""
    job_dir = Path(job_dir)
    problems: list[str] = []
    summary = _load_json(job_dir / SUMMARY, problems)
    lines = read_jsonl(job_dir / METRICS, problems)
    overrides = [o for o in job_overrides(job_dir, problems) if not o.startswith("experiment=")]
    seed = next((_value(o) for o in overrides if _key(o) in SEED_KEYS), None)
    num = job_number(job_dir)
    row = {
        "job": num if num is not None else job_dir.name,
        "dir": str(job_dir.relative_to(sweep_dir)),
        "overrides": " ".join(overrides),
        "override_list": overrides,
        "group": " ".join(o for o in overrides if _key(o) not in SEED_KEYS),
        **job_status(job_dir, summary, problems, lines),
        "problems": problems,
        "seed": (summary or {}).get("seed", seed),
        "kernels": (summary or {}).get("kernels"),
        "device": (summary or {}).get("device"),
    }
    for column, read in METRICS_OF.items():
        value = read(summary) if summary else None
        row[column] = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    return row


# ---- the whole sweep -------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> dict:
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def _groups(rows: list[dict]) -> list[dict]:
    groups: dict[str, dict] = {}
    for r in rows:
        group = [o for o in r["override_list"] if _key(o) not in SEED_KEYS]
        g = groups.setdefault(r["group"], {"overrides": r["group"], "override_list": group, "jobs": [], "statuses": {}})
        g["jobs"].append(r["job"])
        g["statuses"][r["status"]] = g["statuses"].get(r["status"], 0) + 1
    for key, g in groups.items():
        done = [r for r in rows if r["group"] == key and r["status"] == "finished"]
        g["n"] = len(done)
        g["seeds"] = [r["seed"] for r in done]
        g["metrics"] = {c: _mean_std([r[c] for r in done if r[c] is not None]) for c in METRICS_OF}
    return list(groups.values())


def _add_ratios(rows: list[dict], groups: list[dict]) -> None:
    """tok/s ratio: against the first finished job (rows) and the first group with a throughput (groups)."""
    base = next((r["tok/s"] for r in rows if r["tok/s"]), None)
    for r in rows:
        r["tok/s ratio"] = r["tok/s"] / base if base and r["tok/s"] is not None else None
    base = next((g["metrics"]["tok/s"]["mean"] for g in groups if g["metrics"]["tok/s"]["mean"]), None)
    for g in groups:
        mean = g["metrics"]["tok/s"]["mean"]
        g["metrics"]["tok/s ratio"] = {"mean": mean / base if base and mean is not None else None, "std": None}


def varying_keys(rows: list[dict]) -> set[str]:
    """Override keys whose value is not the same in every job."""
    seen: dict[str, set] = {}
    for r in rows:
        for o in r["override_list"]:
            seen.setdefault(_key(o), set()).add(o)
    return {k for k, values in seen.items() if len(values) > 1 or any(k not in _keys(r) for r in rows)}


def _keys(row: dict) -> set[str]:
    return {_key(o) for o in row["override_list"]}


def _label(row_or_group: dict, keys: set[str]) -> str:
    return " ".join(o for o in row_or_group["override_list"] if _key(o) in keys)


def _number_text(value: float, digits: int) -> str:
    """`digits` significant digits, but whole numbers rather than exponents: 3340, 51234, 0.8238."""
    return f"{value:.0f}" if abs(value) >= 10 ** (digits - 1) else f"{value:.{digits}g}"


def _cell(value) -> str:
    if value is None:
        return "-"
    text = _number_text(value, 4) if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")


def _stat_cell(stat: dict) -> str:
    if stat.get("mean") is None:
        return "-"
    return _cell(stat["mean"]) + (f" ± {_number_text(stat['std'], 2)}" if stat.get("std") is not None else "")


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(x) + " |" for x in lines)]


def jobs_table(rows: list[dict], keys: set[str] | None = None) -> str:
    """Every job: its number, swept overrides, status, metrics and error line (markdown)."""
    keys = varying_keys(rows) if keys is None else keys
    columns = columns_of(rows)
    lines = [
        [_cell(r["job"]), _cell(_label(r, keys) or None), r["status"], _cell(r["kernels"])]
        + [_cell(r.get(c)) for c in columns]
        + [_cell(r["error"])]
        for r in rows
    ]
    return "\n".join(_table(["job", "overrides", "status", "kernels", *columns, "error"], lines)) + "\n"


def groups_table(groups: list[dict], keys: set[str]) -> str:
    """Mean ± std over the finished jobs of each group (markdown)."""
    lines = []
    columns = columns_of(groups)
    for g in groups:
        total = len(g["jobs"])
        n = f"{g['n']}" if g["n"] == total else f"{g['n']} of {total} finished"
        lines.append(
            [_cell(_label(g, keys) or None), n, _cell(" ".join(map(str, g["seeds"])) or None)]
            + [_stat_cell(g["metrics"][c]) for c in columns]
        )
    return "\n".join(_table(["overrides", "n", "seeds", *columns], lines)) + "\n"


def build_report(sweep_dir: Path) -> Report:
    """Rows (one per job, in job order, whatever its status), seed groups and the markdown; writes nothing."""
    sweep_dir = Path(sweep_dir)
    rows = [read_job(d, sweep_dir) for d in find_jobs(sweep_dir)]
    groups = _groups(rows)
    _add_ratios(rows, groups)
    keys = varying_keys(rows)
    common = [o for o in rows[0]["override_list"] if _key(o) not in keys] if rows else []
    report = Report(sweep_dir, rows, groups, "")
    counts = ", ".join(f"{n} {status}" for status, n in report.counts().items()) or "none"
    md = [f"# Ablation: {sweep_dir.name}", "", f"{_jobs(len(rows))} ({counts}) in `{sweep_dir}`."]
    if common:
        md += ["", "Every job: `" + " ".join(common) + "`."]
    if any(len(g["jobs"]) > 1 for g in groups):
        md += ["", "## Mean ± std over seeds", "", "Over the finished jobs of each group; std is the sample std."]
        md += ["", groups_table(groups, keys - set(SEED_KEYS)).rstrip()]
    md += ["", "## Jobs", "", jobs_table(rows, keys).rstrip()]
    if any(r["problems"] for r in rows):
        md += ["", "## Unreadable records", ""]
        md += [f"- job {r['job']} (`{r['dir']}`): " + "; ".join(r["problems"]) for r in rows if r["problems"]]
    if any(r["device"] == "cpu" for r in rows):
        md += ["", CPU_MEMORY_NOTE]
    report.markdown = "\n".join(md) + "\n"
    return report


# ---- plots -----------------------------------------------------------------------------------------------------

LINESTYLES = ("-", "--", ":", "-.")


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _curves(sweep_dir: Path, report: Report):
    """Every job's metrics.jsonl lines with a step, and how its curves are drawn: (row, lines, colour, line style,
    label). A group shares a colour; its jobs (seeds) differ by line style."""
    from matplotlib import colormaps

    keys = varying_keys(report.rows)
    colours = colormaps["tab10"]
    group_index = {g["overrides"]: i for i, g in enumerate(report.groups)}
    seen_in_group: dict[str, int] = {}
    for r in report.rows:
        lines = [m for m in read_jsonl(sweep_dir / r["dir"] / METRICS) if _number(m.get("step"))]
        k = seen_in_group.get(r["group"], 0)
        label = f"{r['job']}: {_short(_label(r, keys) or 'run')}"
        if r["status"] != "finished":
            label += f" ({r['status']})"
        yield r, lines, colours(group_index[r["group"]] % 10), LINESTYLES[k % 4], label
        seen_in_group[r["group"]] = k + 1 if lines else k


def _series(lines: list[dict], split: str, key: str) -> list[tuple]:
    return [(m["step"], m[key]) for m in lines if m.get("split") == split and _number(m.get(key))]


def _label_axes(ax, plotted: int, ylabel: str, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if plotted > 8 else 1)


POINTS = {"marker": "o", "markersize": 6, "markeredgecolor": "white", "linestyle": "none", "zorder": 3}


def plot_losses(sweep_dir: Path, report: Report, path: Path) -> bool:
    """Train loss by step of every job on one chart, eval loss as points; a group shares a colour."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    plotted = 0
    for _, lines, colour, linestyle, label in _curves(sweep_dir, report):
        train, evals = _series(lines, "train", "loss"), _series(lines, "eval", "eval_loss")
        if not train and not evals:
            continue
        if train:
            style = {"linestyle": linestyle, "marker": "." if len(train) == 1 else None}
            ax.plot(*zip(*train, strict=True), color=colour, linewidth=1.3, label=label, **style)
            label = None
        if evals:
            ax.plot(*zip(*evals, strict=True), color=colour, label=label, **POINTS)
        plotted += 1
    if not plotted:
        return False
    _label_axes(ax, plotted, "loss (train: lines, eval: points)", f"{sweep_dir.name}: loss by step")
    fig.savefig(path)
    return True


def plot_generation(sweep_dir: Path, report: Report, path: Path) -> bool:
    """Exact match (left) and token F1 (right) of the held-out generation by step, of every job that scored it
    while training (fusetune.evaluate.GenerationEval: each eval step); a group shares a colour."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    plotted = 0
    for _, lines, colour, linestyle, label in _curves(sweep_dir, report):
        curves = [_series(lines, "eval", key) for key in ("eval_exact_match", "eval_token_f1")]
        if not any(curves):
            continue
        for ax, curve in zip(axes, curves, strict=True):
            if curve:
                ax.plot(*zip(*curve, strict=True), color=colour, linestyle=linestyle, marker="o", label=label)
        plotted += 1
    if not plotted:
        return False
    axes[0].set_ylim(-0.03, 1.03)
    _label_axes(axes[0], plotted, "exact match", f"{sweep_dir.name}: held-out generation, exact match")
    _label_axes(axes[1], plotted, "token F1", "token F1")
    fig.savefig(path)
    return True


def plot_preference(sweep_dir: Path, report: Report, path: Path) -> bool:
    """Reward accuracy (left) and reward margin (right) by step of every job of a preference trainer (train: lines,
    eval: points); a group shares a colour."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    plotted = 0
    for _, lines, colour, linestyle, label in _curves(sweep_dir, report):
        curves = [
            (_series(lines, "train", key), _series(lines, "eval", f"eval_{key}"))
            for key in ("rewards/accuracies", "rewards/margins")
        ]
        if not any(train or evals for train, evals in curves):
            continue
        for ax, (train, evals) in zip(axes, curves, strict=True):
            if train:
                ax.plot(*zip(*train, strict=True), color=colour, linestyle=linestyle, linewidth=1.3, label=label)
            if evals:
                ax.plot(*zip(*evals, strict=True), color=colour, label=None if train else label, **POINTS)
        plotted += 1
    if not plotted:
        return False
    axes[0].set_ylim(-0.03, 1.03)
    _label_axes(axes[0], plotted, "reward accuracy", f"{sweep_dir.name}: chosen over rejected (train: lines)")
    _label_axes(axes[1], plotted, "reward margin", "reward margin (chosen - rejected)")
    fig.savefig(path)
    return True


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def plot_speed_memory(sweep_dir: Path, report: Report, path: Path) -> bool:
    """tok/s and peak memory as bars, one per group (the mean; error bar: std; dots: each finished job)."""
    from matplotlib.figure import Figure

    groups = [g for g in report.groups if g["n"]]
    if not groups:
        return False
    keys = varying_keys(report.rows) - set(SEED_KEYS)
    labels = [_wrap(_label(g, keys) or "all") for g in groups]
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, column, title in zip(axes, ("tok/s", "peak GiB"), ("train tokens / s", "peak memory (GiB)"), strict=True):
        means = [g["metrics"][column]["mean"] or 0.0 for g in groups]
        x = range(len(groups))
        ax.bar(x, means, color="#4c72b0", alpha=0.8)
        for i, g in enumerate(groups):
            if g["metrics"][column]["std"]:
                ax.errorbar(i, means[i], yerr=g["metrics"][column]["std"], color="black", capsize=4)
            values = [r[column] for r in report.rows if r["group"] == g["overrides"] and r["status"] == "finished"]
            values = [v for v in values if v is not None]
            if len(values) > 1:
                ax.plot([i] * len(values), values, "o", color="black", markersize=3)
        ax.set_xticks(list(x), labels, fontsize=7, rotation=30 if len(groups) > 4 else 0)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(sweep_dir.name, fontsize=10)
    fig.savefig(path)
    return True


def _wrap(text: str, width: int = 18) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)[:4]) or text


# ---- writing ---------------------------------------------------------------------------------------------------


def write_report(sweep_dir: Path, plots: bool = True) -> Report:
    """Build the report of sweep_dir and write report.md, report.json, report_groups.json and (plots) the PNGs."""
    sweep_dir = Path(sweep_dir)
    report = build_report(sweep_dir)
    md = report.markdown
    if plots:
        made = []
        for name, plot in (
            (LOSS_PNG, plot_losses),
            (GENERATION_PNG, plot_generation),
            (PREFERENCE_PNG, plot_preference),
            (SPEED_PNG, plot_speed_memory),
        ):
            tmp = sweep_dir / f".{name}.{os.getpid()}.tmp.png"
            try:
                if plot(sweep_dir, report, tmp):
                    os.replace(tmp, sweep_dir / name)
                    made.append(sweep_dir / name)
                elif name == LOSS_PNG and report.rows:  # said, not skipped in silence
                    report.plot_note = f"no {name}: no job has logged a loss yet"
            except Exception as error:  # a broken matplotlib, odd numbers: the tables matter more than the plots
                report.plot_note = f"no {name}: {type(error).__name__}: {one_line(error)}"
                tmp.unlink(missing_ok=True)
        if made:
            md += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in made) + "\n"
        report.files += made
        if report.plot_note:
            md += f"\n({report.plot_note})\n"
    report.markdown = md
    report.files[:0] = [
        write_atomically(sweep_dir / "report.md", md),
        write_atomically(sweep_dir / "report.json", json.dumps(report.rows, indent=2) + "\n"),
        write_atomically(sweep_dir / "report_groups.json", json.dumps(report.groups, indent=2) + "\n"),
    ]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusetune.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (hydra.sweep.dir)")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"fusetune: error: {args.sweep_dir}: no such folder", file=sys.stderr)
        return 2
    if not find_jobs(args.sweep_dir) and not (args.sweep_dir / "multirun.yaml").is_file():
        print(
            f"fusetune: error: {args.sweep_dir}: not a sweep folder (no multirun.yaml, no job with .hydra/)",
            file=sys.stderr,
        )
        return 2
    try:
        report = write_report(args.sweep_dir, plots=not args.no_plots)
    except OSError as error:  # a read-only or full disk: the jobs' records were read, the report not written
        print(
            f"fusetune: error: cannot write the report into {args.sweep_dir}: {error.strerror or error}",
            file=sys.stderr,
        )
        return 2
    print(report.headline())
    print(jobs_table(report.rows), end="")
    print("wrote: " + ", ".join(str(p) for p in report.files))
    if report.plot_note:
        print(report.plot_note)
    for row in report.rows:
        if row["problems"]:
            print(f"job {row['job']}: " + "; ".join(row["problems"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
