"""One run folder, one run, and one process that owns it.

``claim`` makes a folder this run's. It refuses, with one line and before writing anything:
- a folder another live process owns (app.run_lock: ``fusetune.lock``, held for the whole run);
- a folder that holds another run's record, unless this run resumes it (``resume=auto`` or ``resume=PATH``) or
  replaces it (``overwrite=true``);
- files that no fusetune run recorded writing. ``fusetune_run.json``, the run's manifest, lists what a run writes
  (status.json, summary.json, metrics.jsonl, checkpoint-N/ and TRL's README.md, model/ or adapter/, merged/, the
  logger's folder, .hydra/, the job log) and the config its checkpoints were trained with. ``overwrite=true``
  deletes only what the manifest lists, never through a symbolic link, and refuses a folder holding anything else;
- a resume whose config changes the math since the checkpoint was saved (app.resume_check).
Then it locks the folder, checks again under the lock, signs the lock, clears the old record for ``overwrite``
and writes the manifest.

``GuardRunFolder`` claims a single run's folder before Hydra writes .hydra/ into it, so a refused run leaves the
folder as it was; ``run()`` claims it for a multirun job and a library call (or takes the guard's claim). Before
that, the guard refuses a mistake in the config (config.validate: a secret such as a token or an API key, a key
added with ``+`` that the schema lacks, a number out of its range, ...), so Hydra writes nothing to disk for it.
"""

import json
import logging
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback

from ..errors import FusetuneError
from ..record_files import METRICS, STATUS, SUMMARY, write_json_atomically
from ..training.checkpoints import newest_complete, problem, step_of
from . import distributed, resume_check, run_lock
from .config import check_composed, refuse_secrets, validate

log = logging.getLogger(__name__)
MANIFEST = "fusetune_run.json"
CHECKPOINTS = "checkpoint-N"  # in a manifest: every checkpoint-<step> folder (and checkpoint-<step>.<suffix>)
_CHECKPOINT = re.compile(r"^checkpoint-\d+(\.\w+)?$")
_ATOMIC_TMP = re.compile(r"^\.?(.+?)(\.\d+)?\.tmp$")  # record_files.write_atomically's temporary file
ALWAYS_WRITTEN = (STATUS, SUMMARY, METRICS, CHECKPOINTS)
# names that look like a run's record, in a folder with no manifest
RECORD_LIKE = (*ALWAYS_WRITTEN, "model", "adapter", "merged", "tensorboard", "wandb", "mlflow")
OWN = (run_lock.LOCK, MANIFEST)  # the claim's own files: never another run's record, never deleted
MODEL_CARD = "README.md"  # TRL writes one into the run folder with each checkpoint


@dataclass
class Claim:
    """What ``claim`` found: the checkpoint to resume from, what overwrite removes, the manifest to write."""

    checkpoint: Path | None = None
    remove: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    notes: list[tuple[int, str]] = field(default_factory=list)  # logged once the run's logging is set up


_claims: dict[Path, Claim] = {}


def _matches(name: str, writes) -> bool:
    tmp = _ATOMIC_TMP.match(name)  # an atomic write's temporary file counts as the file it becomes
    name = tmp.group(1) if tmp else name
    return name in writes or (CHECKPOINTS in writes and bool(_CHECKPOINT.match(name)))


def _shown(names: list[str], folder: Path) -> str:
    names = [f"{n} (a symbolic link)" if (folder / n).is_symlink() else n for n in names]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FusetuneError(f"run folder {folder}: {MANIFEST} cannot be read ({error}): move it away") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("writes"), list):
        raise FusetuneError(f"run folder {folder}: {MANIFEST} lists no writes: move it away")
    return manifest


def previous_status(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / STATUS).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def failed_before_training(folder: Path) -> str | None:
    """The error of a run in ``folder`` that failed before its first step (no step logged, no checkpoint, no
    summary): nothing in it is worth keeping. None for any other folder."""
    folder = Path(folder)
    try:
        status = json.loads((folder / STATUS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("status") != "failed" or status.get("last_step") not in (0, None):
        return None
    if (folder / SUMMARY).exists() or any(_CHECKPOINT.match(p.name) for p in folder.iterdir()):
        return None
    return status.get("error") or "failed"


def writes_of(cfg, hydra_names) -> list[str]:
    """What a run of ``cfg`` writes into its folder."""
    names = [*OWN, *ALWAYS_WRITTEN, MODEL_CARD, "model" if cfg.model.lora is None else "adapter", *hydra_names]
    if cfg.export.merged:
        names.append("merged")
    if cfg.export.gguf is not None:
        names.append("gguf")
    kind = getattr(cfg.logger.kind, "value", cfg.logger.kind)
    if kind in ("tensorboard", "wandb", "mlflow"):  # mlflow: run.json, where the run went (the store is elsewhere)
        names.append(kind)
    return names


def hydra_names(hydra) -> list[str]:
    """What Hydra writes into a run folder: its output subfolder (.hydra) and the job's log."""
    return [name for name in (hydra.output_subdir, f"{hydra.job.name}.log") if name]


def written_by_hydra(folder: Path) -> list[str]:
    """What Hydra has written into ``folder`` for this run already (a job of a multirun), else nothing."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hydra = HydraConfig.get()
    if Path(hydra.runtime.output_dir).absolute() != Path(folder).absolute():
        return []
    return hydra_names(hydra)


def _refuse_foreign(folder: Path, foreign: list[str]) -> FusetuneError:
    return FusetuneError(
        f"run folder {folder} holds {_shown(foreign, folder)}, which no fusetune run recorded writing ({MANIFEST} "
        "lists what a run wrote): fusetune neither resumes nor deletes them; move them away, or choose another "
        "hydra.run.dir"
    )


def _checkpoint_given(resume: str) -> Path:
    checkpoint = Path(resume).expanduser()
    if not checkpoint.is_dir() or step_of(checkpoint) is None:
        raise FusetuneError(f"resume: {resume} is not a checkpoint-N folder")
    why = problem(checkpoint)
    if why is not None:
        raise FusetuneError(f"resume: {resume} cannot be resumed: {why}")
    return checkpoint


def inspect(folder: Path, cfg, hydra=(), hydra_wrote: bool = False) -> Claim:
    """Everything ``claim`` decides, read without writing; raises FusetuneError for a folder it refuses."""
    refuse_secrets(cfg)  # the manifest holds the config
    resume, overwrite = cfg.resume.checkpoint, bool(cfg.overwrite)
    if resume and overwrite:
        raise FusetuneError("resume and overwrite=true: choose one (overwrite removes what resume continues)")
    given = _checkpoint_given(resume) if resume and resume != "auto" else None
    run_lock.check_free(folder)
    manifest = read_manifest(folder)
    keep = set(OWN) | (set(hydra) if hydra_wrote else set())
    entries = sorted(p.name for p in folder.iterdir() if p.name not in keep) if folder.is_dir() else []
    writes = manifest["writes"] if manifest else []
    ours = [n for n in entries if _matches(n, writes) and not (folder / n).is_symlink()]
    foreign = [n for n in entries if n not in ours]
    record_like = [n for n in foreign if _matches(n, RECORD_LIKE)]
    new_config = resume_check.run_config(cfg, distributed.world_size())
    found = Claim(manifest={"writes": sorted(set(writes) | set(writes_of(cfg, hydra))), "config": new_config})
    if overwrite:
        if foreign:
            raise _refuse_foreign(folder, foreign)
        found.remove = ours
        if ours:
            found.notes.append((logging.INFO, f"overwrite=true: removed the previous run's record from {folder}"))
        return found
    if record_like:
        raise _refuse_foreign(folder, foreign)
    if not resume:
        failed = failed_before_training(folder) if manifest is not None and not foreign else None
        if failed is not None:  # nothing there to keep: this run takes the folder over
            found.remove = ours
            line = f"run folder {folder}: replaced the record of an attempt that failed before its first step: {failed}"
            found.notes.append((logging.INFO, line))
            return found
        if manifest is not None:
            ours = sorted(ours, key=lambda n: (not _matches(n, RECORD_LIKE), n))  # the record's files first
            rest = f"; it also holds {_shown(foreign, folder)}, which fusetune did not write" if foreign else ""
            raise FusetuneError(
                f"run folder {folder} holds another run's record ({_shown(ours or [MANIFEST], folder)}): resume=auto "
                f"continues that run, {'' if foreign else 'overwrite=true replaces it, '}or choose another "
                f"hydra.run.dir{rest}"
            )
        return found
    if previous_status(folder) == "finished":
        raise FusetuneError(f"resume: the run in {folder} has finished; there is nothing to continue")
    found.checkpoint = given or newest_complete(folder)
    if found.checkpoint is None:
        found.notes.append((logging.INFO, f"resume=auto: no complete checkpoint in {folder}, starting from step 0"))
        return found
    saved = manifest if given is None else read_manifest(given.parent)
    if saved is None or "config" not in saved:
        found.notes.append(
            (
                logging.WARNING,
                f"resume: {found.checkpoint.parent} holds no {MANIFEST}: the config {found.checkpoint.name} was "
                "trained with is unknown, so it is not compared",
            )
        )
        return found
    line = resume_check.check(saved["config"], new_config, cfg.resume.allow_changes, found.checkpoint)
    if line:
        found.notes.append((logging.INFO, line))
    return found


def _remove(path: Path) -> None:
    """Delete what the manifest lists: a folder's tree, or a file; a symbolic link is never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def claim(folder: Path, cfg, hydra=(), hydra_wrote: bool = False) -> Claim:
    """Make ``folder`` this run's, or refuse with one line (see the module's docstring). Takes the folder's lock;
    ``run_lock.give_back`` returns it. A folder this process has claimed already returns that claim."""
    folder = Path(folder)
    key = folder.absolute()
    if key in _claims and run_lock.holds(folder):
        run_lock.take(folder)
        return _claims[key]
    try:
        inspect(folder, cfg, hydra, hydra_wrote)  # a refusal leaves the folder as it was: nothing is written yet
    except FusetuneError:
        run_lock.check_free(folder)  # a run that took the folder meanwhile is the reason to give
        raise
    except OSError as error:
        raise run_lock.unwritable(folder, error) from None
    run_lock.take(folder)
    try:
        stale = run_lock.sign(folder)  # at once: a run refused meanwhile names this one
        found = inspect(folder, cfg, hydra, hydra_wrote)  # again, under the lock
        found.manifest["updated"] = datetime.now().astimezone().isoformat(timespec="seconds")
        write_json_atomically(folder / MANIFEST, found.manifest)
        if stale:
            found.notes.insert(0, (logging.WARNING, stale))
        for name in found.remove:
            _remove(folder / name)
    except FusetuneError:
        run_lock.give_back(folder)
        raise
    except OSError as error:
        run_lock.give_back(folder)
        raise run_lock.unwritable(folder, error) from None
    _claims[key] = found
    return found


def claimed(folder: Path) -> bool:
    """Whether this process has made ``folder`` its run's and still owns it."""
    return Path(folder).absolute() in _claims and run_lock.holds(folder)


def follow(folder: Path, resume: str | None) -> Path | None:
    """Another rank of a distributed run: the checkpoint rank 0 resumes from, read without writing. The same
    verification on the same files gives the same answer; only rank 0 warns about the ones passed over."""
    if resume == "auto":
        return newest_complete(folder, warn=False)
    return Path(resume).expanduser() if resume else None


@contextmanager
def owned(folder: Path, cfg):
    """The run in ``folder``: rank 0 claims it (logging what the claim found) and owns it inside the block; the
    other ranks follow. Yields the checkpoint to resume from, or None."""
    if not distributed.is_rank_zero():
        yield follow(folder, cfg.resume.checkpoint)
        return
    found = claim(folder, cfg, written_by_hydra(folder), hydra_wrote=True)
    try:
        while found.notes:
            log.log(*found.notes.pop(0))
        yield found.checkpoint
    finally:
        run_lock.give_back(folder)


def remove_attempt(folder: Path) -> None:
    """Delete a run folder of an attempt that failed before its first step: what its manifest lists, then the
    folder itself if nothing else is left in it."""
    folder = Path(folder)
    manifest = read_manifest(folder) or {"writes": []}
    for entry in folder.iterdir():
        if _matches(entry.name, manifest["writes"]) or entry.name in OWN:
            _remove(entry)
    if not any(folder.iterdir()):
        folder.rmdir()


def _writable(folder: Path, what: str) -> None:
    """Make ``folder`` and write into it once, or refuse with one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fusetune-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise run_lock.unwritable(folder, error, what) from None


class GuardRunFolder(Callback):
    """Claim a single run's folder before Hydra writes .hydra/ into it; check a sweep's folder can be written.

    Hydra only warns about an exception raised in a callback, so a refusal ends the process here:
    one line and exit code 2, as for any user mistake.
    """

    def on_run_start(self, config, **kwargs) -> None:
        self._refuse(lambda: validate(config))  # a mistake in the config leaves the folder untouched
        if not distributed.is_rank_zero():  # the others follow rank 0 into the folder it claims
            return
        self._refuse(lambda: claim(Path(config.hydra.run.dir), config, hydra_names(config.hydra)))

    def on_multirun_start(self, config, **kwargs) -> None:
        self._refuse(lambda: check_composed(config))
        self._refuse(lambda: _writable(Path(config.hydra.sweep.dir), "sweep folder"))

    @staticmethod
    def _refuse(check_it) -> None:
        try:
            check_it()
        except FusetuneError as error:
            print(f"fusetune: error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
