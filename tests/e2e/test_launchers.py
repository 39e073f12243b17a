"""The launcher presets: a joblib sweep with one GPU per worker (GPUs faked on CPU); SLURM composed, not submitted."""

import json
import multiprocessing
import os
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fusetune.app import gpus

from ..conftest import CONF, ROOT

TINY = [
    "trainer.max_steps=2",
    "logger=none",
    "save_model=false",
    "data.num_train=128",
    "data.num_eval=16",
    "data.num_generate=2",
    "trainer.logging_steps=1",
]

# Loaded by every Python process of the sweep (PYTHONPATH): logs each CUDA probe with the CUDA_VISIBLE_DEVICES it saw.
# A worker that probes CUDA before its GPU is set would have seen both fake GPUs, and CUDA would then ignore the
# variable (on a GPU host, importing bitsandbytes alone initialises CUDA).
CUDA_PROBE = """
import os
import torch

def _probe(name, fn):
    def probe(*args, **kwargs):
        with open(os.environ["CUDA_PROBE_LOG"], "a") as f:
            f.write(f"{os.getpid()} {name} {os.environ.get('CUDA_VISIBLE_DEVICES')}\\n")
        return fn(*args, **kwargs)
    return probe

for _name in ("is_available", "device_count", "init", "current_device", "get_device_capability", "is_bf16_supported"):
    setattr(torch.cuda, _name, _probe(_name, getattr(torch.cuda, _name)))
"""


def test_joblib_sweep_runs_jobs_in_parallel_each_worker_on_its_own_gpu(tmp_path):
    probe_dir, probe_log, sweep = tmp_path / "probe", tmp_path / "cuda_probes.log", tmp_path / "sweep"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(CUDA_PROBE)
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "3,5",  # two GPUs, as far as the launcher can tell; CPU torch ignores the variable
        "CUDA_PROBE_LOG": str(probe_log),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=local", *TINY, "seed=1,2", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2,initializer=OneGPUPerWorker(gpus='3,5'" in proc.stdout  # n_jobs: one per GPU

    rows = json.loads((sweep / "report.json").read_text())
    seeds = [(next(o for o in r["overrides"].split() if o.startswith("seed=")), r["status"]) for r in rows]
    assert seeds == [("seed=1", "finished"), ("seed=2", "finished")]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [name.split(",")[0] for name in jobs] == ["0_seed=1", "1_seed=2"], jobs  # named in the workers, swept first

    workers = dict(re.findall(r"fusetune: worker (\d+) runs its jobs on GPU (\d+) \(slot \d\)", proc.stderr))
    assert sorted(workers.values()) == ["3", "5"], proc.stderr[-3000:]  # two workers, one GPU each
    probes = [line.split() for line in probe_log.read_text().splitlines()]
    in_workers = [(pid, name, seen) for pid, name, seen in probes if pid in workers]
    assert in_workers, "the jobs ran in the workers, and asked torch about CUDA there"
    assert all(seen == workers[pid] for pid, _, seen in in_workers), in_workers  # never before the GPU was set


def _hold_slot(folder, queue, release):
    queue.put(gpus.use_one_gpu("3,5,7", folder))
    release.wait()


def test_live_workers_get_distinct_slots_and_share_gpus_evenly(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "_held", {})  # this process's slot, forgotten after the test
    ctx = multiprocessing.get_context("fork")  # no CUDA here; spawn would import torch four times
    queue, release = ctx.Queue(), ctx.Event()
    workers = [ctx.Process(target=_hold_slot, args=(str(tmp_path), queue, release)) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        got = sorted(queue.get(timeout=60) for _ in workers)
    finally:
        release.set()
        for w in workers:
            w.join(timeout=60)
    assert got == ["3", "3", "5", "7"]  # slots 0..3 on three GPUs: the fourth worker shares the first GPU
    assert gpus.claim_slot(tmp_path) == 0  # the four workers are gone: their slots are free again
    assert gpus.claim_slot(tmp_path / "elsewhere") == 0  # a process keeps the slot it claimed first


def test_one_gpu_leaves_the_environment_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert gpus.use_one_gpu("0", tmp_path) is None and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert gpus.parallel_jobs() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.parallel_jobs() == -1  # no GPU: joblib's one job per CPU core


def compose_hydra(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_local_launcher_composes_and_instantiates(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b,GPU-c")
    gpus.register_resolvers()  # train.py does this
    cfg = compose_hydra(["hydra/launcher=local", f"hydra.sweep.dir={tmp_path}"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.fusetune_launcher.JoblibLauncher"  # Hydra's, surviving a dead worker
    assert launcher.n_jobs == 3 and launcher.initializer.gpus == "GPU-a,GPU-b,GPU-c"
    from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf

    plugin_keys = set(OmegaConf.structured(JobLibLauncherConf).keys())
    assert set(launcher.keys()) == plugin_keys | {"initializer"}  # the plugin's keys, all of them
    built = instantiate(launcher)
    assert type(built).__mro__[1].__module__ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher"  # a subclass
    assert built.joblib["n_jobs"] == 3 and isinstance(built.joblib["initializer"], gpus.OneGPUPerWorker)
    assert built.joblib["initializer"].slots_dir == f"{tmp_path}/.gpu_slots"


@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm"])
def test_slurm_launcher_composes(launcher):
    cfg = compose_hydra([f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu"])
    slurm = cfg.hydra.launcher
    assert slurm._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert slurm.partition == "gpu" and slurm.nodes == 1 and slurm.tasks_per_node == 1
    assert OmegaConf.to_container(slurm)["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    if launcher == "slurm":  # the preset: one GPU per job
        assert slurm.gpus_per_node == 1 and slurm.cpus_per_task == 8 and slurm.timeout_min == 240
    built = instantiate(slurm)  # the plugin takes every key as it stands; nothing is submitted
    assert built.params["gpus_per_node"] == slurm.gpus_per_node and built.params["partition"] == "gpu"
