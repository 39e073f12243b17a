"""Hydra callbacks of the app, and the resolver that names the job folders of a multirun.

- AblationReport: keeps report.md / report.json current after every job, and at the end of the multirun writes
  the full report with its plots (fusetune.report), whatever became of the jobs. Then the multirun exits 1 if a
  job failed, was interrupted or left no record. On Ctrl-C (or a crash of Hydra itself) the report is written
  at exit.
- `${fusetune.job_dir:NUM,OVERRIDES,EXCLUDE_KEYS}` (conf/train.yaml, hydra.sweep.subdir): a job folder name
  that is one safe path component, the swept overrides first (job_dirname). Registered when this module is
  imported, which Hydra does when it instantiates the callbacks, before the first job's folder is named.
"""

import atexit
import hashlib
import re
import sys
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..report import STATUS, jobs_table, write_report
from .cli import exception_line

MAX_OVERRIDES_CHARS = 150  # folder names stay well under the 255 bytes of a path component
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@%~-]+")  # path separators, spaces, quotes, brackets, globs, non-ASCII
SWEPT: list[str] = []  # the keys this multirun sweeps, set by AblationReport.on_multirun_start: named first


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def job_dirname(num, overrides, exclude_keys=()) -> str:
    """`3_trainer=packing,seed=1,data.path=_tmp_a_train.jsonl`: the job number, then its overrides (the swept ones
    first, then the others in command-line order, leaving out exclude_keys), each run of unsafe characters made
    one `_`. Past MAX_OVERRIDES_CHARS it keeps the whole overrides that fit, then `~` and a hash of them all.
    The number makes it unique within the sweep; the report orders jobs by it."""
    items = [str(o) for o in overrides or () if _key(str(o)) not in set(exclude_keys or ())]
    items.sort(key=lambda o: SWEPT.index(_key(o)) if _key(o) in SWEPT else len(SWEPT))  # stable: the rest keep order
    safe = ",".join(filter(None, (UNSAFE.sub("_", o).strip("_") for o in items)))
    if len(safe) > MAX_OVERRIDES_CHARS:
        digest = hashlib.sha1(",".join(items).encode()).hexdigest()[:8]
        kept = safe[: MAX_OVERRIDES_CHARS - 9]
        kept = kept[: kept.rfind(",")] if "," in kept else kept  # whole overrides only, where there is one
        safe = f"{kept}~{digest}"
    return f"{num}_{safe}" if safe else str(num)


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun sweeps: hydra.sweeper.params (experiment files) and sweep overrides (`seed=0,1`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [str(k) for k in (OmegaConf.select(config, "hydra.sweeper.params") or {})]
    try:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    except Exception:  # Hydra has parsed them already; this only orders folder names
        parsed = []
    keys += [o.key_or_group for o in parsed if o.is_sweep_override() and o.key_or_group not in keys]
    return keys


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fusetune.job_dir"):
        OmegaConf.register_new_resolver("fusetune.job_dir", job_dirname)


register_resolvers()


class AblationReport(Callback):
    """Writes the ablation report into the sweep folder: tables after each job, everything when the multirun ends."""

    def __init__(self, plots: bool = True, fail_exit_code: int = 1) -> None:
        self.plots = plots
        self.fail_exit_code = fail_exit_code
        self.sweep_dir: Path | None = None
        self.done = False

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        SWEPT[:] = swept_keys(config)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.done = False
        atexit.register(self._at_exit)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if job_return.status == JobStatus.FAILED:  # an error that got past cli.run_or_exit (another task function)
            out = Path(config.hydra.runtime.output_dir)
            if not (out / STATUS).is_file():
                from .record import write_status  # torch and transformers: only when needed

                write_status(out, "failed", exception_line(job_return._return_value))
        if self.sweep_dir is not None and self.sweep_dir.is_dir():  # a multirun (a single run has no sweep)
            write_report(self.sweep_dir, plots=False)  # tables only: cheap, and current if the sweep dies

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self.done = True
        atexit.unregister(self._at_exit)
        report = self._write(Path(config.hydra.sweep.dir))
        if report is not None and report.not_finished:
            jobs = ", ".join(f"{r['job']} ({r['status']})" for r in report.not_finished)
            message = f"fusetune: {len(report.not_finished)} of {len(report.rows)} jobs did not finish: {jobs}"
            print(message, file=sys.stderr, flush=True)
            # After the other callbacks (on_multirun_end runs them in reverse order; this one is listed first).
            sys.exit(self.fail_exit_code)

    def _at_exit(self) -> None:
        """The multirun ended without on_multirun_end: Ctrl-C, or an error that stopped the sweep."""
        if not self.done and self.sweep_dir is not None:
            self.done = True
            print("\nthe multirun stopped early", file=sys.stderr, flush=True)
            self._write(self.sweep_dir)

    def _write(self, sweep_dir: Path):
        if not sweep_dir.is_dir():
            return None
        report = write_report(sweep_dir, plots=self.plots)
        print(f"\n{report.headline()}\n{jobs_table(report.rows)}", end="", flush=True)
        plots = [p.name for p in report.files if p.suffix == ".png"]
        if plots or report.plot_note:
            print(f"plots: {', '.join(plots) or report.plot_note}", flush=True)
        return report
