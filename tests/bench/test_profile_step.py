"""fusetune.profiling on CPU (the embedded tiny Llama): every backend and trainer variant it offers for CPU
runs to the end, writes its report, and gives the same losses on the same batches; scripts/profile_step.py
is the command line over it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusetune.profiling import Setup, profile_steps, write_report

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "profile_step.py"


@pytest.mark.slow
def test_profile_step_smoke_on_cpu(tmp_path):
    setup = Setup(tiny=True, steps=2, warmup=1, kernels="reference")
    report = profile_steps(setup, ["varlen", "varlen_graphs"], ["fused", "fused_async"])
    write_report(report, tmp_path)
    report = json.loads((tmp_path / "profile.json").read_text())
    assert set(report["backends"]) == {"varlen", "varlen_graphs"}
    graphed = report["backends"]["varlen_graphs"]
    # 2 timed and profiled passes of 3 steps; a CUDA host replays its first captured step once more (seen on an H200)
    expected = {6, 7} if torch.cuda.is_available() else {6}
    assert graphed["graphs"]["replays"] in expected and graphed["graphs"]["disabled"] is None
    eager_losses = [s["loss"] for s in report["backends"]["varlen"]["steps"]]
    graph_losses = [s["loss"] for s in graphed["steps"]]
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)  # 1.03e-5 seen on an H100: another reduction order
    assert all(report["trainer"][v]["summary"]["step_ms"] > 0 for v in ("fused", "fused_async"))
    assert "varlen_graphs" in (tmp_path / "profile.md").read_text()


@pytest.mark.slow
def test_the_script_is_a_command_line_over_the_module(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--backends", "varlen,nonsense"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown backends ['nonsense']" in proc.stderr, proc.stderr[-2000:]
