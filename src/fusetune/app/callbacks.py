"""Hydra callbacks of the app (the run-folder guard is in run_folder.py; job folder names in job_names.py).

- AblationReport: keeps report.md / report.json current after every job, and at the end of the multirun writes
  the full report with its plots (fusetune.report), whatever became of the jobs. Then the multirun exits 1 if a
  job failed, was interrupted, died or left no record. On Ctrl-C (or a crash of Hydra itself) the report is written
  at exit. It also tells job_names which keys the multirun sweeps, so they come first in folder names.
"""

import atexit
import sys
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..record_files import STATUS, write_status
from ..report import jobs_table, write_report
from .cli import exception_line
from .job_names import set_swept, swept_keys

_active: list["AblationReport"] = []  # the multirun's report, for end_multirun


def end_multirun() -> None:
    """The sweeper ended the multirun with an error (hydra_errors.study_ended): the whole report now, as at its
    normal end, so that the error's one line comes last."""
    for report in _active:
        report.finish()


class AblationReport(Callback):
    """Writes the ablation report into the sweep folder: tables after each job, everything when the multirun ends."""

    def __init__(self, plots: bool = True, fail_exit_code: int = 1) -> None:
        self.plots = plots
        self.fail_exit_code = fail_exit_code
        self.sweep_dir: Path | None = None
        self.done = False

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        set_swept(swept_keys(config))
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.done = False
        atexit.register(self._at_exit)
        _active[:] = [self]

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if job_return.status == JobStatus.FAILED:  # an error that got past cli.run_or_exit (another task function)
            out = Path(config.hydra.runtime.output_dir)
            if not (out / STATUS).is_file():
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

    def finish(self) -> None:
        if not self.done and self.sweep_dir is not None:
            self.done = True
            atexit.unregister(self._at_exit)
            self._write(self.sweep_dir)

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
