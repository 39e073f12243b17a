"""One run folder, one run: a new run refuses a folder that holds another run's record.

The record of a run is what the app writes into its folder: status.json, summary.json, metrics.jsonl, the
trained model/ or adapter/, and checkpoint-N/ folders. A run may use a folder that holds one only when it
resumes that run (``resume=auto`` or ``resume=PATH``) or is told to replace it (``overwrite=true``), which
removes the old record first. ``GuardRunFolder`` asks the same question before Hydra writes the new run's
.hydra/ into the folder, so a refused run leaves the other run's config as it was; it also refuses a secret
(a token, an API key) given in the config, a key added with ``+`` that the schema lacks, and a number out of its
range (config.check_composed), before Hydra writes anything to disk.
"""

import json
import logging
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from ..checkpoints import newest_complete, problem, step_of
from ..errors import FusetuneError
from . import distributed
from .config import check_composed

log = logging.getLogger(__name__)
STATUS = "status.json"
RECORD_FILES = (STATUS, "summary.json", "metrics.jsonl")
RECORD_FOLDERS = ("model", "adapter", "merged", "tensorboard")


def record_in(folder: Path) -> list[str]:
    """The parts of a run record that ``folder`` holds (empty for a new folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [name for name in RECORD_FILES + RECORD_FOLDERS if (folder / name).exists()]
    found += sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())
    return found


def previous_status(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / STATUS).read_text()).get("status")
    except (OSError, ValueError):
        return None


def check(folder: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse, with one line, a folder that holds another run's record and no leave to use it."""
    found = record_in(folder)
    if found and not resume and not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise FusetuneError(
            f"run folder {folder} holds another run's record ({shown}): resume=auto continues that run, "
            "overwrite=true replaces it, or choose another hydra.run.dir"
        )
    if resume and overwrite:
        raise FusetuneError("resume and overwrite=true: choose one (overwrite removes what resume continues)")


def claim(folder: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Make ``folder`` this run's: check it, clear it for ``overwrite``; returns the checkpoint to resume from."""
    folder = Path(folder)
    check(folder, resume, overwrite)
    if overwrite:
        for name in record_in(folder):
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        log.info("overwrite=true: removed the previous run's record from %s", folder)
        return None
    if not resume:
        return None
    if previous_status(folder) == "finished":
        raise FusetuneError(f"resume: the run in {folder} has finished; there is nothing to continue")
    if resume == "auto":
        checkpoint = newest_complete(folder)
        if checkpoint is None:
            log.info("resume=auto: no complete checkpoint in %s, starting from step 0", folder)
        return checkpoint
    checkpoint = Path(resume).expanduser()
    if not checkpoint.is_dir() or step_of(checkpoint) is None:
        raise FusetuneError(f"resume: {resume} is not a checkpoint-N folder")
    why = problem(checkpoint)
    if why is not None:
        raise FusetuneError(f"resume: {resume} cannot be resumed: {why}")
    return checkpoint


def follow(folder: Path, resume: str | None) -> Path | None:
    """Another rank of a distributed run: the checkpoint rank 0 resumes from, read without writing. The same
    verification on the same files gives the same answer; only rank 0 warns about the ones passed over."""
    if resume == "auto":
        return newest_complete(folder, warn=False)
    return Path(resume).expanduser() if resume else None


class GuardRunFolder(Callback):
    """Refuse a used run folder before Hydra writes the new run's .hydra/ into it (single runs).

    Hydra only warns about an exception raised in a callback, so a refusal ends the process here:
    one line and exit code 2, as for any user mistake.
    """

    def on_run_start(self, config, **kwargs) -> None:
        if not distributed.is_rank_zero():  # the others follow rank 0 into the folder it claims
            return
        self._refuse(lambda: check(Path(config.hydra.run.dir), config.get("resume"), bool(config.get("overwrite"))))
        self._refuse(lambda: check_composed(config))

    def on_multirun_start(self, config, **kwargs) -> None:
        self._refuse(lambda: check_composed(config))

    @staticmethod
    def _refuse(check_it) -> None:
        try:
            check_it()
        except FusetuneError as error:
            print(f"fusetune: error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
