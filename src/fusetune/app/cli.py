"""The boundary between the Hydra app and the library: user mistakes become one line, not a traceback.

How a run ends, and what its folder's status.json then says (run() writes "running" at its start, and
"finished" or "interrupted" itself; this module writes "failed", and "interrupted" for a Ctrl-C outside training):

- a user mistake (FusetuneError): `fusetune: error: ...` on stderr; "failed" with that line (a single run in a
  default folder that failed so before its first step removes the folder instead: nothing in it is worth keeping);
- anything else: "failed" with the exception's last line (`ValueError: ...`) and the traceback;
- a signal during the run (Interrupted: run() recorded "interrupted", the signal and the phase, with a checkpoint
  where a consistent one exists): `fusetune: interrupted at step ...` or `... during data preparation ...` and exit
  128 + the signal (130 for SIGINT), in a single run and in a multirun alike: the sweep stops, as asked;
- a KeyboardInterrupt before run() handles signals: "interrupted", and it goes on.

A single run exits 2 for a user mistake; for anything else Hydra prints the traceback (exit 1). A job of a
multirun returns instead, so the sweep goes on to its other jobs: the traceback goes into the job's log, and
fusetune.app.callbacks.AblationReport lists the failure and ends the multirun with exit code 1. In a multirun whose
sweeper optimizes the returned objective (Optuna), a failed job raises instead, so the sweeper marks the trial
failed (fusetune.app.objective).

status.json is written only into a folder this run made its own: one whose status.json this run wrote, or a
fresh one, and (on rank 0) one this process claimed and still owns (app.run_folder). A folder that holds another
run's record, or that another process owns, which run() refused, is left as it was.
"""

import json
import logging
import os
import sys
import traceback
from pathlib import Path

from ..errors import FusetuneError, Interrupted, one_line
from ..noise import quiet_third_party
from ..record_files import METRICS, STATUS, SUMMARY
from . import run_lock

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    """Whether this is one job of a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def exception_line(error: BaseException) -> str:
    """`ValueError: what went wrong`: the last line of the traceback."""
    return one_line(traceback.format_exception_only(type(error), error)[-1])


def _output_dir(cfg) -> Path | None:
    try:
        return Path(cfg.output_dir)
    except Exception:  # no Hydra to resolve ${hydra:runtime.output_dir}, or no output_dir at all
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def record_end(out: Path | None, before: str | None, status: str, error: str) -> None:
    """status.json says how the run ended, if the folder is this run's (see the module's docstring).

    ``before``: status.json's text before the run began (None: there was none)."""
    from . import distributed, run_folder

    if out is None or (distributed.is_rank_zero() and not run_folder.claimed(out)):
        return
    now = _read(out / STATUS)
    if now != before:  # this run wrote it: it got past the folder check
        try:
            if json.loads(now or "{}").get("status") != "running":
                return  # run() said how it ended (interrupted, finished) itself
        except ValueError:
            pass
    elif before is not None or (out / SUMMARY).exists() or (out / METRICS).exists():
        return  # another run's record: this run was refused, or never got to the folder
    from ..record_files import write_status

    try:
        write_status(out, status, error)
    except OSError as failure:  # a read-only folder: the error itself matters more
        log.warning("could not write %s: %s", out / STATUS, failure)


def default_run_folder() -> bool:
    """Whether this single run's folder is Hydra's default (outputs/runs/<time>), not one the user named."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    named = (o.lstrip("+~").partition("=")[0] for o in HydraConfig.get().overrides.hydra)
    return "hydra.run.dir" not in named


def drop_default_folder(out: Path | None) -> None:
    """A user mistake found before the first step leaves no folder behind in outputs/runs/: the one line says
    it all. A folder the user named keeps its record, which a rerun into it replaces (app.run_folder)."""
    from . import run_folder

    if out is None or not default_run_folder() or not run_folder.claimed(out):
        return
    if run_folder.failed_before_training(out) is not None:
        try:
            run_folder.remove_attempt(out)
        except OSError as failure:
            log.warning("could not remove %s: %s", out, failure)


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, which takes seconds after a run (a collection over every object
    of torch, transformers and the data): the record is written and the logger closed by then. The run folder's
    lock is given back as at a normal exit, so the resume does not find it stale."""
    run_lock.release_all()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_or_exit(cfg) -> float | None:
    """Run; returns the objective (eval_loss unless ``objective`` names another) for a sweeper, or None."""
    out = _output_dir(cfg)
    with run_lock.kept(out):  # the run folder stays this process's until status.json says how the run ended
        return _run_or_exit(cfg, out)


def _run_or_exit(cfg, out: Path | None) -> float | None:
    quiet_third_party()
    from . import objective
    from .run import run

    multirun = in_multirun()
    optimizing = objective.optimizing()
    before = _read(out / STATUS) if out is not None else None
    try:
        if optimizing:
            objective.check(cfg)
        summary = run(cfg)
        return objective.value_of(summary, objective.name_of(cfg), required=optimizing)
    except FusetuneError as error:
        record_end(out, before, "failed", str(error))
        if not multirun:
            drop_default_folder(out)
        print(f"fusetune: error: {error}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(2)
        if optimizing:
            raise
    except Interrupted as stop:
        print(f"fusetune: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)  # train.py's process then ends at once (hydra_errors.main_exits_2)
    except KeyboardInterrupt:
        record_end(out, before, "interrupted", "KeyboardInterrupt")
        raise
    except Exception as error:
        record_end(out, before, "failed", exception_line(error))
        if not multirun:
            raise
        if optimizing:
            log.exception("this trial failed; the sweeper records it as failed")
            raise objective.TrialFailed(exception_line(error)) from None
        log.exception("this job failed; the sweep goes on to the next")
    return None
