"""Hydra's joblib launcher, made to survive a worker process that dies (the OOM killer, a segfault).

Loky, under joblib, cannot tell which job a dead worker was running: it marks its whole pool broken, kills the
other workers, and joblib's Parallel raises TerminatedWorkerError, which would end the sweep with the jobs still
running recorded as "running". ``launch`` (hydra_plugins.fusetune_launcher.JoblibLauncher's) runs the jobs as
Hydra's launcher does, and when the pool breaks:

- the jobs that returned keep their results;
- each job that had started and not returned (the one whose worker died, and those the pool took down with it)
  runs again, each in a pool of one worker, so a death can only be its own. Its earlier folder is moved aside,
  into SWEEP_DIR/.crashed/. A job that dies again is failed: its status.json says ``killed by SIGKILL (out of
  memory?)`` (or the signal or exit code it died of), and its JobReturn is what a failed job returns
  (fusetune.app.cli): None to the grid sweeper, a failure to Optuna;
- the jobs that had not started run in parallel again.

Each job, as it starts in a worker, writes SWEEP_DIR/.started/N.json (its pid, host and folder), which is how
the launcher knows which jobs had started. With n_jobs=1 joblib runs the jobs in the sweep's own process, which
a killed job takes down; the report then says the job died (fusetune.report).
"""

import json
import logging
import os
import re
import shutil
import socket
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra_plugins.hydra_joblib_launcher import _core
from joblib import Parallel, delayed
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)
STARTED, CRASHED = ".started", ".crashed"
OOM_HINT = {"SIGKILL": " (out of memory?)"}


def register_launcher() -> None:
    """Make hydra/launcher=local's class known to Hydra. Hydra finds plugins by walking the hydra_plugins
    namespace, which an editable install (pip install -e, the README's) does not expose to that walk."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.fusetune_launcher import JoblibLauncher

    Plugins.instance().register(JoblibLauncher)


def died_of(exit_code: int | None) -> str:
    """``killed by SIGKILL (out of memory?)``, ``killed by SIGSEGV``, ``exited with code 3``."""
    import signal

    if exit_code is None:
        return "its worker process died"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name}{OOM_HINT.get(name, '')}"
    return f"its worker process exited with code {exit_code}"


def _exit_code(error: BaseException) -> int | None:
    """The worker's exit code, from loky's message ("The exit codes of the workers are {SIGKILL(-9)}")."""
    codes = re.findall(r"\w+\((-?\d+)\)", str(error).split("exit codes of the workers are", 1)[-1])
    return int(codes[0]) if len(codes) == 1 else None


def job_dir(sweep_config) -> Path:
    return Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)


def execute_job(idx: int, overrides, hydra_context, config, task_function, singleton_state) -> tuple[int, JobReturn]:
    """In a worker: note that job ``idx`` started here, then run it as Hydra's joblib launcher does."""
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.num = idx
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(sweep_config)
    started = Path(str(config.hydra.sweep.dir)) / STARTED
    started.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "dir": str(job_dir(sweep_config))}
    (started / f"{idx}.json").write_text(json.dumps(record) + "\n")
    return idx, _core.execute_job(idx, overrides, hydra_context, config, task_function, singleton_state)


def started_record(sweep_dir: Path, idx: int) -> dict | None:
    try:
        return json.loads((sweep_dir / STARTED / f"{idx}.json").read_text())
    except (OSError, ValueError):
        return None


def launch(launcher, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    """Hydra's JoblibLauncher.launch, and the guarantees of this module; returns one JobReturn per job, in order."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    joblib_cfg = launcher.joblib
    joblib_cfg["backend"] = "loky"  # as Hydra's: its threading backend does not work with Hydra
    _core.process_joblib_cfg(joblib_cfg)
    log.info(
        "Joblib.Parallel({}) is launching {} jobs".format(
            ",".join(f"{k}={v}" for k, v in joblib_cfg.items()), len(job_overrides)
        )
    )
    log.info("Launching jobs, sweep output dir : %s", sweep_dir)
    jobs = {initial_job_idx + i: list(o) for i, o in enumerate(job_overrides)}
    for idx, overrides in jobs.items():
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        (sweep_dir / STARTED / f"{idx}.json").unlink(missing_ok=True)

    returns: dict[int, JobReturn] = {}
    pending = list(jobs)
    while pending:
        crash = _run(launcher, pending, jobs, returns, joblib_cfg)
        if crash is None:
            break
        suspects = [i for i in pending if i not in returns and started_record(sweep_dir, i)]
        if not suspects and all(i not in returns for i in pending):
            raise crash  # workers die before any job starts (in the initializer?): running again would loop
        for idx in suspects:
            log.warning("job #%d was running when a worker died: it runs again, in a worker of its own", idx)
            _set_aside(sweep_dir, idx)
        for idx, outcome in _run_alone(launcher, suspects, jobs, joblib_cfg).items():
            if isinstance(outcome, BaseException):
                outcome = _failed(launcher, sweep_dir, idx, jobs[idx], died_of(_exit_code(outcome)))
            returns[idx] = outcome
        pending = [i for i in pending if i not in returns]
    return [returns[i] for i in jobs]


def _run(launcher, indices, jobs, returns, joblib_cfg) -> BaseException | None:
    """Run these jobs in parallel, their returns into ``returns``; the error if a worker died."""
    hydra = (launcher.hydra_context, launcher.config, launcher.task_function, Singleton.get_state())
    tasks = (delayed(execute_job)(i, jobs[i], *hydra) for i in indices)
    try:
        for idx, job_return in Parallel(**joblib_cfg, return_as="generator_unordered")(tasks):
            returns[idx] = job_return
    except BrokenProcessPool as crash:
        log.warning("a worker of the sweep died: %s", " ".join(str(crash).split()))
        return crash
    return None


def _run_alone(launcher, indices, jobs, joblib_cfg) -> dict[int, JobReturn | BrokenProcessPool]:
    """Run each of these jobs at once, each in a pool of one worker, so a worker's death is its job's own."""
    from joblib.externals.loky import ProcessPoolExecutor

    state = Singleton.get_state()
    hydra = (launcher.hydra_context, launcher.config, launcher.task_function, state)
    pools = {i: ProcessPoolExecutor(max_workers=1, initializer=joblib_cfg.get("initializer")) for i in indices}
    futures = {i: pool.submit(execute_job, i, jobs[i], *hydra) for i, pool in pools.items()}
    outcomes: dict[int, JobReturn | BrokenProcessPool] = {}
    for i, future in futures.items():
        try:
            outcomes[i] = future.result()[1]
        except BrokenProcessPool as crash:
            outcomes[i] = crash
        pools[i].shutdown()
    return outcomes


def _set_aside(sweep_dir: Path, idx: int) -> None:
    """Move the folder of a job that runs again into SWEEP_DIR/.crashed/, so its new run starts clean."""
    record = started_record(sweep_dir, idx) or {}
    folder = Path(record.get("dir") or "")
    if not record.get("dir") or not folder.is_dir():
        return
    aside, n = sweep_dir / CRASHED / folder.name, 1
    while aside.exists():
        n += 1
        aside = sweep_dir / CRASHED / f"{folder.name}.{n}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(aside))


def _failed(launcher, sweep_dir: Path, idx: int, overrides: list[str], why: str) -> JobReturn:
    """The failed JobReturn of a job whose process died; writes its status.json and tells the callbacks."""
    from ..record_files import write_status
    from .objective import BASIC_SWEEPER, TrialFailed

    log.error("job #%d failed: %s", idx, why)
    folder = Path(started_record(sweep_dir, idx)["dir"])  # it started: it runs again only then
    sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.num = idx
        sweep_config.hydra.runtime.output_dir = str(folder)
    write_status(folder, "failed", why)
    # as cli.run_or_exit returns a failed job: raised to a sweeper that optimizes (Optuna), None to the grid
    optimizing = OmegaConf.select(launcher.config, "hydra.sweeper._target_") != BASIC_SWEEPER
    job_return = JobReturn(
        overrides=overrides,
        cfg=OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"]),
        hydra_cfg=sweep_config,
        working_dir=os.getcwd(),
        task_name=str(sweep_config.hydra.job.name),
        status=JobStatus.FAILED if optimizing else JobStatus.COMPLETED,
        _return_value=TrialFailed(why) if optimizing else None,
    )
    launcher.hydra_context.callbacks.on_job_end(config=sweep_config, job_return=job_return)
    return job_return
