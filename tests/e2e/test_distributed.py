"""The app under torchrun: 2 CPU processes over gloo (DDP through the HF Trainer), one shared run folder.

Each rank trains its own half of every global batch; the losses equal one process training the same global
batch, and rank 0 alone writes the record.
"""

import json
import os
import subprocess
import sys

import pytest

from ..conftest import ROOT

COMMON = [
    "logger=none",
    "data.num_train=128",
    "data.num_eval=8",
    "trainer.max_steps=4",
    "trainer.logging_steps=1",
    "trainer.train_sampling_strategy=sequential",  # the same global batches in both runs
    "save_model=false",
]


def env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # CPU processes, also on a host with a GPU
        "PYTHONUNBUFFERED": "1",
    }


def losses(run_dir) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [m for m in lines if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4], "every step logged once"
    return [m["loss"] for m in train]


def launch(cmd, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_ddp_over_two_processes_equals_one_process_with_the_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    launch([sys.executable, "train.py", *COMMON, "trainer.per_device_train_batch_size=16", f"hydra.run.dir={one}"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    launch([*torchrun, "train.py", *COMMON, "distributed=ddp", "trainer.per_device_train_batch_size=8",
            f"hydra.run.dir={two}"])  # fmt: skip
    single, ddp = losses(one), losses(two)
    assert ddp == pytest.approx(single, rel=1e-5, abs=1e-6), (ddp, single)
    summaries = list(tmp_path.rglob("summary.json"))
    assert sorted(p.parent.name for p in summaries) == ["one", "two"]  # rank 1 wrote none
    summary = json.loads((two / "summary.json").read_text())
    assert summary["distributed"] == {"mode": "ddp", "world_size": 2} and summary["global_step"] == 4
    assert json.loads((two / "status.json").read_text())["status"] == "finished"


def test_several_processes_need_a_distributed_choice(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, "train.py", *COMMON, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "distributed=none, but 2 processes were launched: set distributed=ddp or distributed=fsdp" in done.stderr


def test_fsdp_without_cuda_is_refused(compose_cfg, tmp_path):
    from fusetune.app.distributed import check
    from fusetune.errors import FusetuneError

    with pytest.raises(FusetuneError, match="distributed=fsdp needs CUDA"):
        check("fsdp", on_gpu=False, quantized=False)
    assert compose_cfg(["distributed=fsdp"]).distributed.value == "fsdp"
