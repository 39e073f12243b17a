"""scripts/profile_step.py on CPU (the embedded tiny Llama): every backend and trainer variant it
offers for CPU runs to the end, writes its report, and gives the same losses on the same batches."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import profile_step  # noqa: E402


@pytest.mark.slow
def test_profile_step_smoke_on_cpu(tmp_path):
    profile_step.main(
        ["--out", str(tmp_path), "--tiny", "--steps", "2", "--warmup", "1", "--kernels", "reference"]
        + ["--backends", "varlen,varlen_graphs", "--trainer", "fused,fused_async"]
    )
    report = json.loads((tmp_path / "profile.json").read_text())
    assert set(report["backends"]) == {"varlen", "varlen_graphs"}
    graphed = report["backends"]["varlen_graphs"]
    assert graphed["graphs"]["replays"] == 2 * 3 and graphed["graphs"]["disabled"] is None  # timed and profiled
    eager_losses = [s["loss"] for s in report["backends"]["varlen"]["steps"]]
    graph_losses = [s["loss"] for s in graphed["steps"]]
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    assert all(report["trainer"][v]["summary"]["step_ms"] > 0 for v in ("fused", "fused_async"))
    assert "varlen_graphs" in (tmp_path / "profile.md").read_text()
