"""The run's logger (the logger group): TensorBoard (the default, local), W&B or none.

The logger starts only once the config, the data and the model have loaded (``start_logger``, called by run()
with the Trainer built): a run that dies on a mistake before that starts no W&B run at all. ``trainer_report_to``
says what the Trainer reports to before that, and refuses a logger that is not installed.

W&B: ``start_logger`` starts the W&B run itself, with the whole resolved config, a name and a group. HF's
WandbCallback (``report_to=["wandb"]``) then finds that run and logs every logging step into it; nothing here
logs metrics by hand. ``WandbRunConfig`` puts the config back after the callback has merged the
TrainingArguments into it (``kernels``, ``seed``, ``run_name`` and ``output_dir`` are names in both).
``close_logger`` adds summary.json's scalars and finishes the run, on every way out of ``run()``: exit code 0
when it finished, otherwise the code the app exits with (2 for a user mistake, 128 + the signal for an
interruption, 1 for anything else), so that W&B marks it failed.

- Name: ``run_name``, else the group choices ``model-data-kernels-trainer`` (Hydra's runtime.choices; without
  Hydra, the same read from the config). In a multirun the job number is appended, and the group is the sweep
  folder's name unless ``logger.group`` is set.
- W&B's environment wins over fusetune's defaults, never over a value the config sets: ``logger.project``,
  ``entity``, ``mode`` and ``tags`` left null are WANDB_PROJECT (else "fusetune"), WANDB_ENTITY (else the
  account's), WANDB_MODE (else online where an API key is configured, WANDB_API_KEY or ~/.netrc, and offline
  otherwise) and WANDB_TAGS (comma-separated). The files go into ``<run>/wandb/``.
- Only the process of rank 0 (RANK, else LOCAL_RANK, as torchrun sets them) starts a W&B run.
- A resumed run (``resume=auto|PATH`` from a checkpoint) continues the W&B run of the first, whose id is kept in
  ``<run>/wandb/fusetune-run-id``; its steps continue from the checkpoint's.
- The API key is read by wandb from the environment or ~/.netrc; no config key holds it (config.refuse_secrets).
"""

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from transformers import TrainerCallback

from ..errors import FusetuneError, Interrupted
from ..report import one_line
from .distributed import rank

log = logging.getLogger(__name__)
NAMED_BY = ("model", "data", "kernels", "trainer")  # the groups whose choices name a W&B run


@dataclass
class _Started:
    run: object  # the wandb Run that start_logger started
    config: dict  # the resolved config it was given


_started: _Started | None = None  # one run at a time: run() is not reentrant


RUN_ID_FILE = "fusetune-run-id"  # in <run>/wandb/: the W&B run a resumed run continues


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg) -> str:
    if cfg.logger.mode is not None:
        return cfg.logger.mode.value
    return os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")


def wandb_settings(cfg) -> dict:
    """project, entity, mode and tags: the config's where it sets them, else W&B's environment, else fusetune's."""
    logger = cfg.logger
    tags = logger.tags if logger.tags is not None else os.environ.get("WANDB_TAGS", "").split(",")
    return {
        "project": logger.project or os.environ.get("WANDB_PROJECT") or "fusetune",
        "entity": logger.entity or os.environ.get("WANDB_ENTITY") or None,
        "mode": wandb_mode(cfg),
        "tags": [tag.strip() for tag in tags if tag.strip()] or None,
    }


def _hydra():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _choices_from(cfg) -> dict[str, str]:
    """What the group choices would be, read from the config (a run composed without Hydra's app)."""
    return {
        "model": Path(cfg.model.name_or_path.removeprefix("fusetune:")).name,
        "data": cfg.data.formatter.value,
        "kernels": cfg.kernels.backend.value,
        "trainer": cfg.trainer.name,
    }


def run_identity(cfg) -> tuple[str, str | None]:
    """(name, group) of the W&B run."""
    from hydra.types import RunMode

    hydra = _hydra()
    choices = dict(hydra.runtime.choices) if hydra is not None else _choices_from(cfg)
    name = cfg.run_name or "-".join(str(choices[g]) for g in NAMED_BY if choices.get(g))
    group = cfg.logger.group
    if hydra is not None and hydra.mode == RunMode.MULTIRUN:
        name = f"{name}-{hydra.job.num}"
        group = group or Path(hydra.sweep.dir).name
    return name, group


def wandb_config(cfg) -> dict:
    """The resolved config, and the group choices where Hydra made them (``choices``)."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    hydra = _hydra()
    if hydra is not None:
        config["choices"] = {k: v for k, v in hydra.runtime.choices.items() if not k.startswith("hydra/")}
    return config


def trainer_report_to(cfg, out: Path) -> list[str]:
    """The Trainer's ``report_to`` for the chosen logger; starts nothing (``start_logger`` does, later)."""
    kind = cfg.logger.kind.value
    if kind == "wandb":
        if rank() != 0:
            log.info("W&B: this process has rank %d; rank 0 logs the run", rank())
            return []
        if importlib.util.find_spec("wandb") is None:
            raise FusetuneError("logger=wandb needs the wandb package (pip install wandb), or choose logger=none")
        return ["wandb"]
    if kind == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
        return ["tensorboard"]
    return []


def start_logger(cfg, out: Path, resuming: bool = False) -> None:
    """Start the W&B run where the logger is W&B and this is rank 0; a resumed run continues its W&B run."""
    if cfg.logger.kind.value == "wandb" and rank() == 0:
        _start_wandb(cfg, out, resuming)


def _start_wandb(cfg, out: Path, resuming: bool) -> None:
    global _started
    import wandb

    settings = wandb_settings(cfg)
    mode = settings["mode"]
    name, group = run_identity(cfg)
    config = wandb_config(cfg)
    wandb.teardown()  # settings left by an earlier run in this process (another trainer's callback) go first
    id_file = out / "wandb" / RUN_ID_FILE
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
    try:
        run = wandb.init(
            **settings,
            name=name,
            group=group,
            config=config,
            dir=str(out),
            id=run_id,
            resume="allow" if run_id else None,
        )
    except Exception as error:  # no network, a wrong key, a project one may not write to
        raise FusetuneError(
            f"logger=wandb: W&B could not start the run ({one_line(str(error))}); "
            "logger.mode=offline keeps it in the run folder"
        ) from None
    _started = _Started(run, config)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.id)
    if run_id:
        log.info("W&B: resumed run %s", run_id)
    where = f"project '{settings['project']}'" + (f", group '{group}'" if group else "")
    log.info("W&B run '%s' in %s, %s, into %s", name, where, mode, out / "wandb")


class WandbRunConfig(TrainerCallback):
    """Puts the run's config back into wandb.config once HF's WandbCallback has merged the TrainingArguments and the
    model config into it (that callback comes first: the Trainer puts its reporting callbacks before those it is
    given). Where a name is in both, the config's value is kept: ``kernels`` stays the group, not the backend."""

    def __init__(self, run, config: dict):
        self.run, self.config = run, config

    def on_train_begin(self, args, state, control, **kwargs):
        self.run.config.update(self.config, allow_val_change=True)


def logger_callbacks() -> list[TrainerCallback]:
    """The Trainer callbacks the started logger needs besides ``report_to`` (none before ``start_logger``)."""
    return [WandbRunConfig(_started.run, _started.config)] if _started is not None else []


def summary_scalars(summary: dict) -> dict:
    """summary.json's scalar values, and its eval values as ``eval/NAME`` (HF's spelling)."""
    values = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
    evals = summary.get("eval") or {}
    values.update({f"eval/{k.removeprefix('eval_')}": v for k, v in evals.items() if isinstance(v, int | float)})
    return values


def exit_code(error: BaseException | None) -> int:
    """The code the app exits with (app.cli): W&B marks a run with any other code than 0 failed."""
    if error is None:
        return 0
    if isinstance(error, Interrupted):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) and error.code else 1
    return 2 if isinstance(error, FusetuneError) else 1


def close_logger(cfg, summary: dict | None, error: BaseException | None = None) -> None:
    """Finish the W&B run that start_logger started: summary.json's scalars, how it ended, and its exit code."""
    global _started
    started, _started = _started, None
    if started is None:
        return
    status = "finished" if error is None else "failed"
    if isinstance(error, Interrupted | KeyboardInterrupt):
        status = "interrupted"
    try:
        if summary:
            started.run.summary.update(summary_scalars(summary))
        started.run.summary.update({"status": status})
        if error is not None:
            started.run.summary.update({"error": one_line(str(error) or type(error).__name__)})
        started.run.finish(exit_code=exit_code(error))
    except Exception as failure:  # the run's own error, if any, matters more
        log.warning("W&B: could not finish the run: %s", failure)
    finally:
        # wandb keeps its settings (the run folder among them) process-wide from its first setup: a later run
        # in this process (a library user's next trainer, a test) starts from its own environment again
        import wandb

        wandb.teardown()
