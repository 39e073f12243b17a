"""The examples in examples/: each runs as its own process, offline on CPU, and exits 0 when its own
checks pass. Each runs from an empty working directory and must write only under its --out folder."""

import os
import subprocess
import sys

import pytest

from ..conftest import ROOT

EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("[0-9][0-9]_*.py"))


def test_every_example_is_listed_in_the_readme():
    readme = (ROOT / "examples" / "README.md").read_text()
    assert len(EXAMPLES) == 9
    assert all(name in readme for name in EXAMPLES), [n for n in EXAMPLES if n not in readme]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--out", str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ok:" in proc.stdout, proc.stdout[-2000:]
    assert out.is_dir() and any(out.iterdir())
    assert not any(cwd.iterdir()), f"{name} wrote outside --out: {sorted(p.name for p in cwd.iterdir())}"
