"""fusetune.report on run records that are malformed, or that claim "running" for a process that is gone: each is a
problem (or a status) of its own job, the report is still written, and nothing raises."""

import json
import os
import socket
import subprocess
import sys

import pytest

from fusetune import report

from .test_report import make_job, summary

HOST = socket.gethostname()
NO_STATUS = "no status.json: the job stopped before its run began (or has not begun)"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has it (pids are not reused this soon)


def zombie_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    ZOMBIES.append(child)
    return child.pid


ZOMBIES: list[subprocess.Popen] = []


def running(pid, host=HOST):
    return json.dumps({"status": "running", "error": None, "last_step": 0, "updated": "t", "pid": pid, "host": host})


# name -> (files written into job 1 (path: text or bytes, or a callable giving the text), its status, its error
# (None: none), its problem lines (None: none; a string: that one))
CASES = {
    "status.json holds a list": (
        {"status.json": "[1, 2]"},
        "incomplete",
        None,
        "status.json: holds a JSON list, not an object",
    ),
    "status.json holds a string": (
        {"status.json": '"failed"'},
        "incomplete",
        None,
        "status.json: holds a JSON str, not an object",
    ),
    "status.json cut short": (
        {"status.json": '{"status": "fail'},
        "incomplete",
        None,
        "status.json: not valid JSON, cut short? (line 1, column 12: Unterminated string starting at)",
    ),
    "status.json empty": ({"status.json": ""}, "incomplete", None, "status.json: empty"),
    "status.json not JSON": (
        {"status.json": "status: failed\nerror: x\n"},
        "incomplete",
        None,
        "status.json: not valid JSON, cut short? (line 1, column 1: Expecting value)",
    ),
    "status.json not UTF-8": (
        {"status.json": b'{"status": "failed", "error": "caf\xe9"}'},
        "incomplete",
        None,
        "status.json: not UTF-8 (byte 34)",
    ),
    "status.json with an unknown status": (
        {"status.json": '{"status": "exploded"}'},
        "incomplete",
        None,
        "status.json: unknown status 'exploded'",
    ),
    "summary.json holds a string": (
        {"summary.json": '"done"'},
        "incomplete",
        None,
        ["summary.json: holds a JSON str, not an object", NO_STATUS],
    ),
    "summary.json cut short, status finished": (
        {"summary.json": '{"final_loss": 1.0, "eval": {"eval_', "status.json": '{"status": "finished"}'},
        "finished",
        None,
        "summary.json: not valid JSON, cut short? (line 1, column 30: Unterminated string starting at)",
    ),
    "summary.json with an eval list": (
        {"summary.json": json.dumps({**summary(1.0), "eval": [1, 2]})},
        "finished",
        None,
        None,
    ),
    "metrics.jsonl cut mid-line": (
        {"metrics.jsonl": '{"step": 1, "split": "train", "loss": 3.0}\n{"step": 2, "spl'},
        "incomplete",
        None,
        ["metrics.jsonl: line 2 of 2 skipped, not a JSON object (the last, cut short?)", NO_STATUS],
    ),
    "metrics.jsonl with a non-UTF-8 byte": (
        {"metrics.jsonl": b'{"step": 1, "split": "train", "loss": 3.0}\n{"step": 2, "n\xff": 1}\n'},
        "incomplete",
        None,
        [NO_STATUS],  # the byte is replaced; the line is still a JSON object
    ),
    "metrics.jsonl with lists and a string step": (
        {"metrics.jsonl": '[1]\n{"step": "two", "split": "train", "loss": 1.0}\n"x"\n'},
        "incomplete",
        None,
        ["metrics.jsonl: line 1, 3 of 3 skipped, not a JSON object (the last, cut short?)", NO_STATUS],
    ),
    "overrides.yaml a mapping": (
        {".hydra/overrides.yaml": "seed: 1\n"},
        "incomplete",
        None,
        [".hydra/overrides.yaml: not a list of overrides ({'seed': 1})", NO_STATUS],
    ),
    "no status.json, no summary.json": ({}, "incomplete", None, [NO_STATUS]),
    "running, its process gone": (
        {"status.json": lambda: running(dead_pid())},
        report.DIED,
        "no longer running: killed (out of memory?) or its machine stopped",
        None,
    ),
    "running, its process a zombie": (
        {"status.json": lambda: running(zombie_pid())},
        report.DIED,
        "no longer running",
        None,
    ),
    "running, its process alive": ({"status.json": lambda: running(os.getpid())}, "running", None, None),
    "running on another host": (
        {"status.json": lambda: running(1, host="elsewhere.example")},
        report.ELSEWHERE,
        "pid 1 on elsewhere.example: not checked from here",
        None,
    ),
    "running, no pid recorded": (
        {"status.json": '{"status": "running", "last_step": 2}'},
        report.ELSEWHERE,
        "no pid recorded: cannot tell",
        None,
    ),
}


@pytest.mark.parametrize("files, status, error, problem", CASES.values(), ids=CASES.keys())
def test_a_malformed_record_is_a_problem_of_its_job(tmp_path, files, status, error, problem):
    make_job(tmp_path, "0_seed=0", 0, ["seed=0"], summary(1.0))
    job = make_job(tmp_path, "1_seed=1", 1, ["seed=1"])
    (job / "metrics.jsonl").unlink()
    make_job(tmp_path, "2_seed=2", 2, ["seed=2"], summary(2.0))
    for name, content in files.items():
        content = content() if callable(content) else content
        path = job / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    assert report.main([str(tmp_path), "--no-plots"]) == 0  # the report is written; no traceback
    rows = json.loads((tmp_path / "report.json").read_text())
    assert [r["dir"] for r in rows] == ["0_seed=0", "1_seed=1", "2_seed=2"]  # the odd job keeps its place
    assert [r["status"] for r in rows[::2]] == ["finished", "finished"] and rows[0]["problems"] == []
    row = rows[1]
    assert row["status"] == status
    assert (row["error"] is None) if error is None else (error in row["error"]), row["error"]
    md = (tmp_path / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| 1 |"))
    assert f" | {status} | " in line
    problems = [] if problem is None else [problem] if isinstance(problem, str) else problem
    assert len(row["problems"]) == len(problems), row["problems"]
    assert all(got.startswith(want) for got, want in zip(row["problems"], problems, strict=True)), row["problems"]
    if problems:
        assert f"- job 1 (`1_seed=1`): {'; '.join(row['problems'])}" in md.splitlines()
    else:
        assert "## Unreadable records" not in md


def test_a_killed_sequential_sweep_never_reads_running(tmp_path):
    """The basic launcher runs the jobs in the sweep's process: a SIGKILL ends it all, and the report says so."""
    job = make_job(tmp_path, "0_seed=0", 0, ["seed=0"])
    (job / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 3.0}\n')
    (job / "status.json").write_text(running(dead_pid()))
    built = report.write_report(tmp_path, plots=False)
    assert [(r["status"], r["last_step"]) for r in built.rows] == [(report.DIED, 0)]
    assert [r["job"] for r in built.not_finished] == [0]  # AblationReport: exit 1
    table = report.jobs_table(built.rows)
    assert "| 0 | - | died |" in table and "| running |" not in table


@pytest.mark.parametrize(
    "make, line",
    [
        (lambda d: d / "missing", "no such folder"),
        (lambda d: d, "not a sweep folder (no multirun.yaml, no job with .hydra/)"),
        (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", "no such folder"),
    ],
    ids=["missing", "empty folder", "a file"],
)
def test_not_a_sweep_folder_is_one_line_and_exit_2(tmp_path, capsys, make, line):
    path = make(tmp_path)
    assert report.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"fusetune: error: {path}: {line}\n"
    assert not (tmp_path / "report.md").exists()


def teardown_module():
    for child in ZOMBIES:
        child.wait()
