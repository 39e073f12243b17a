"""A sweep job whose process dies (the OOM killer's SIGKILL, a segfault): under the joblib launcher it alone fails,
with its signal, and the others run on; under the basic launcher the sweep dies with it, and the report says the
job died, never "running". The job kills itself through a test-only Hydra callback (hydra.callbacks)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from fusetune import report

from ..conftest import ROOT

TINY = [
    "trainer.max_steps=2",
    "logger=none",
    "save_model=false",
    "data.num_train=64",
    "data.num_eval=8",
    "data.num_generate=1",
]

# Kills the process of the job whose seed is `seed`, with `signal`, at `point`: "start" (before its run writes
# anything) or "running" (just after its run wrote its "running" status.json).
KILL_JOB = """
import os
import signal

from hydra.experimental.callback import Callback


class KillJob(Callback):
    def __init__(self, seed, signal="SIGKILL", point="start"):
        self.seed, self.signal, self.point = seed, signal, point

    def on_job_start(self, config, **kwargs):
        if config.seed != self.seed:
            return
        sig = getattr(signal, self.signal)
        if self.point == "start":
            os.kill(os.getpid(), sig)
        from fusetune.app import run_record

        write_status = run_record.write_status

        def then_die(out, status, *args, **kw):
            path = write_status(out, status, *args, **kw)
            if status == "running":
                os.kill(os.getpid(), sig)
            return path

        run_record.write_status = then_die
"""


def sweep(tmp_path, *overrides, kill_seed, sig, point):
    (tmp_path / "kill_job.py").write_text(KILL_JOB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    kill = ["+hydra.callbacks.kill._target_=kill_job.KillJob", f"+hydra.callbacks.kill.seed={kill_seed}"]
    kill += [f"+hydra.callbacks.kill.signal={sig}", f"+hydra.callbacks.kill.point={point}"]
    command = [sys.executable, "train.py", "-m", *TINY, *overrides, *kill, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def job_dirs(sweep_dir):
    return sorted((d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()), key=lambda d: int(d.name.split("_")[0]))


# seeds, the seed whose job dies, the signal, where in the job: one worker per job (n_jobs=2), so the killed job's
# neighbour dies with the pool and runs again; the jobs not yet started run after.
CASES = {
    "OOM kill while training, a neighbour running, a job waiting": ("1,2,3", 2, "SIGKILL", "running"),
    "segfault as the job starts": ("1,2", 1, "SIGSEGV", "start"),
}


@pytest.mark.parametrize("seeds, kill_seed, sig, point", CASES.values(), ids=CASES.keys())
def test_joblib_sweep_a_dead_worker_fails_its_job_alone(tmp_path, seeds, kill_seed, sig, point):
    proc = sweep(
        tmp_path,
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        f"seed={seeds}",
        kill_seed=kill_seed,
        sig=sig,
        point=point,
    )
    sweep_dir = tmp_path / "sweep"
    seeds = [int(s) for s in seeds.split(",")]
    killed = seeds.index(kill_seed)
    why = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")

    assert proc.returncode == 1, proc.stderr[-3000:]  # a job failed; the sweep ran to its end
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"fusetune: 1 of {len(seeds)} jobs did not finish: {killed} (failed)" in proc.stderr
    jobs = job_dirs(sweep_dir)
    assert [d.name.split(",")[0] for d in jobs] == [f"{i}_seed={s}" for i, s in enumerate(seeds)]
    for i, job in enumerate(jobs):
        status = json.loads((job / "status.json").read_text())
        if i == killed:
            assert status["status"] == "failed" and status["error"] == why, status
            assert not (job / "summary.json").exists()
        else:
            assert status["status"] == "finished", status
            assert json.loads((job / "summary.json").read_text())["global_step"] == 2
    rows = json.loads((sweep_dir / "report.json").read_text())
    assert [(r["status"], r["error"]) for r in rows] == [
        ("failed", why) if i == killed else ("finished", None) for i in range(len(seeds))
    ]
    md = (sweep_dir / "report.md").read_text()
    assert f"| {killed} | seed={kill_seed} | failed |" in md and f"| {why} |" in md
    assert "| running |" not in md


def test_basic_sweep_killed_with_its_job_the_report_says_died(tmp_path):
    """The basic launcher runs the jobs in the sweep's own process: a SIGKILL takes it all."""
    proc = sweep(tmp_path, "seed=1,2", kill_seed=1, sig="SIGKILL", point="running")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    (job,) = job_dirs(sweep_dir)  # the second job never began
    status = json.loads((job / "status.json").read_text())
    assert status["status"] == "running" and status["pid"] > 0 and status["host"]  # as the dead run left it

    assert report.main([str(sweep_dir), "--no-plots"]) == 0
    (row,) = json.loads((sweep_dir / "report.json").read_text())
    assert row["status"] == report.DIED and row["error"].startswith(f"pid {status['pid']} no longer running")
    md = (sweep_dir / "report.md").read_text()
    assert "| 0 | - | died |" in md and "1 job (1 died)" in md
