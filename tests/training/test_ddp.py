"""DDP through torchrun and the HF Trainer: 2 CPU processes over gloo.

The fused loss and metrics (summed over ranks once, at log time) must log what TRL's own
compute_loss logs (gathered every micro-batch), with gradient accumulation and evaluation.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
KEYS = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")
EVAL_KEYS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens")


def torchrun(tmp_path: Path, variant: str) -> dict:
    out = tmp_path / f"{variant}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes, also on a host with a GPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(HERE / "ddp_train.py"), str(out), variant],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ddp_fused_metrics_match_trl(tmp_path):
    fused, trl = torchrun(tmp_path, "fused"), torchrun(tmp_path, "trl")
    assert fused["world_size"] == trl["world_size"] == 2
    for keys in (KEYS, EVAL_KEYS):
        got = [{k: log[k] for k in keys} for log in fused["log_history"] if keys[0] in log]
        want = [{k: log[k] for k in keys} for log in trl["log_history"] if keys[0] in log]
        assert len(got) == len(want) == (2 if keys is KEYS else 1)
        for g, w in zip(got, want, strict=True):
            for k in keys:
                assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (k, got, want)
