"""Run the app on a list of overrides and read how it ended: for the tables of user mistakes."""

import subprocess
import sys

import pytest

from fusetune.app.cli import run_or_exit

from ..conftest import ROOT


def exit_and_stderr(overrides: list[str], run_dir, cli: bool, compose_cfg, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python train.py` (``cli``) or of cli.run_or_exit in-process, which must exit."""
    if cli:
        proc = subprocess.run(
            [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return proc.returncode, proc.stderr
    with pytest.raises(SystemExit) as exited:
        run_or_exit(compose_cfg(overrides, output_dir=run_dir))
    return exited.value.code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    """The one `fusetune: error: ...` line, last, with no traceback anywhere."""
    lines = stderr.splitlines()
    assert lines and lines[-1].startswith("fusetune: error: "), stderr[-3000:]
    assert sum(line.startswith("fusetune: error:") for line in lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]
