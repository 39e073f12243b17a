"""experiment=fp8_ablation on the CPU: the bf16 jobs train, each fp8 job fails with the one refusal line naming
the device, and the sweep's report lists both arms (exit code 1: a job failed)."""

import json

import pytest
import torch

from .test_run import train_cli
from .test_sweep import TINY

CPU_LINE = (
    "fusetune: error: kernels.fp8 (fp8_base): the FP8 base GEMMs need a GPU with FP8 tensor cores (compute "
    "capability 8.9 or later); this run is on the CPU"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal; on a GPU both arms may run")
def test_on_the_cpu_the_fp8_arm_is_refused_and_the_bf16_arm_runs(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if "eval" not in o]
    proc = train_cli("-m", "experiment=fp8_ablation", "seed=5", *overrides, f"hydra.sweep.dir={sweep}")

    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fusetune: error:")]
    assert errors == [CPU_LINE], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    rows = json.loads((sweep / "report.json").read_text())
    assert [(r["overrides"].split()[:2], r["status"]) for r in rows] == [
        (["kernels.fp8=False", "seed=5"], "finished"),  # bf16 first: the report's tok/s ratios are against it
        (["kernels.fp8=True", "seed=5"], "failed"),
    ]
    assert rows[1]["error"] == CPU_LINE.removeprefix("fusetune: error: ")
    summary = json.loads(next(sweep.glob("0_*/summary.json")).read_text())
    assert summary["fp8_base"] is False and summary["global_step"] == 2
