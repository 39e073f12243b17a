"""The run's logger (the logger group): TensorBoard (the default, local), W&B, MLflow or none.

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

MLflow (``logger=mlflow``; mlflow is imported only then): the same contents as W&B, through fusetune's own
``MlflowMetrics`` callback (not HF's MLflowCallback, which logs the TrainingArguments rather than the config and
reads its own environment variables; ``report_to`` stays empty so nothing is logged twice). ``start_logger``
creates the run, named and grouped as the W&B run (tags ``group`` and ``job``), with the resolved config as params
(``mlflow_params``: flattened keys, cut to MLflow's limits); every logging step's metrics follow, named as W&B names
them (``train/loss``, ``eval/loss``, ``eval/exact_match``), and ``close_logger`` adds summary.json's numbers as
metrics and its words as tags, then ends the run FINISHED, FAILED, or KILLED where W&B says interrupted.

- Where: ``logger.tracking_uri``, else MLFLOW_TRACKING_URI, else a sqlite file under the working folder,
  ``outputs/mlflow/mlflow.db`` beside Hydra's ``outputs/runs`` and ``outputs/multirun``, which the runs and sweeps
  started there share (MLflow 3 refuses a plain folder store). The experiment: ``logger.experiment``, else
  MLFLOW_EXPERIMENT_NAME, else "fusetune". ``<run>/mlflow/run.json`` says where the run went; a resumed run
  continues the MLflow run it names (in the same store).
- Only the process of rank 0 starts an MLflow run.
"""

import hashlib
import importlib.util
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from transformers import TrainerCallback

from ..errors import FusetuneError, Interrupted, one_line
from .distributed import rank

log = logging.getLogger(__name__)
NAMED_BY = ("model", "data", "kernels", "trainer")  # the groups whose choices name a W&B run


@dataclass
class _Started:
    run: object  # the wandb Run that start_logger started
    config: dict  # the resolved config it was given


_started: _Started | None = None  # one run at a time: run() is not reentrant


RUN_ID_FILE = "fusetune-run-id"  # in <run>/wandb/: the W&B run a resumed run continues
MLFLOW_MISSING = "logger=mlflow needs mlflow: pip install 'fusetune[mlflow]'"
MLFLOW_STORE = Path("outputs") / "mlflow" / "mlflow.db"  # under the working folder, beside outputs/runs
MLFLOW_RECORD = Path("mlflow") / "run.json"  # in the run folder: the store, the experiment and the run


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
    if kind == "mlflow" and rank() == 0 and importlib.util.find_spec("mlflow") is None:
        raise FusetuneError(MLFLOW_MISSING)
    return []  # MLflow: fusetune's own callback logs (logger_callbacks), not HF's


def start_logger(cfg, out: Path, resuming: bool = False) -> None:
    """Start the W&B or MLflow run where that is the logger and this is rank 0; a resumed run continues its run."""
    if cfg.logger.kind.value == "wandb" and rank() == 0:
        _start_wandb(cfg, out, resuming)
    if cfg.logger.kind.value == "mlflow" and rank() == 0:
        _start_mlflow(cfg, out, resuming)


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
    callbacks = [WandbRunConfig(_started.run, _started.config)] if _started is not None else []
    return callbacks + ([MlflowMetrics(_mlflow)] if _mlflow is not None else [])


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


def end_status(error: BaseException | None) -> str:
    """How the run ended, in the words of the W&B summary and the MLflow tag: finished, failed or interrupted."""
    if error is None:
        return "finished"
    return "interrupted" if isinstance(error, Interrupted | KeyboardInterrupt) else "failed"


def close_logger(cfg, summary: dict | None, error: BaseException | None = None) -> None:
    """Finish the W&B or MLflow run that start_logger started: summary.json's scalars and how the run ended (for
    W&B, its exit code)."""
    global _started, _mlflow
    mlflow_run, _mlflow = _mlflow, None
    if mlflow_run is not None:
        mlflow_run.finish(summary, error)
    started, _started = _started, None
    if started is None:
        return
    status = end_status(error)
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


# ---- MLflow ------------------------------------------------------------------------------------------------------

MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
PARAM_VALUE_LIMIT, KEY_LIMIT, BATCH = 6000, 250, 100  # MLflow's limits: a param's value, a key; params per call
CUT = " …[cut]"
_NOT_IN_A_NAME = re.compile(r"[^\w./\- ]")  # MLflow's names: letters, digits, _ . / - and space


def mlflow_settings(cfg) -> dict:
    """tracking_uri and experiment: the config's where it sets them, else MLflow's environment, else fusetune's."""
    uri = cfg.logger.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or str(Path.cwd() / MLFLOW_STORE)
    if "://" not in uri and uri.endswith(".db"):  # a path: a sqlite file (a folder store needs an opt-in in MLflow 3)
        uri = f"sqlite:///{Path(uri).absolute()}"
    experiment = cfg.logger.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "fusetune"
    return {"tracking_uri": uri, "experiment": experiment}


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _name(key: str) -> str:
    """A key as MLflow accepts it: its characters, and at most KEY_LIMIT of them (a cut key ends with a hash of the
    whole, so two long keys stay apart)."""
    name = _NOT_IN_A_NAME.sub("_", key)
    if len(name) > KEY_LIMIT:
        name = f"{name[: KEY_LIMIT - 9]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return name


def _param_text(value) -> str:
    """A config value as text, spelled as on the command line: null, true/false, lists and dicts in JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def mlflow_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: one per leaf, its dotted path as the key (``model.lora.r``; a list of
    dicts by index: ``data.sources.0.path``), its value as text cut to PARAM_VALUE_LIMIT characters."""
    params = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(mlflow_params(value, f"{path}."))
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            params.update(mlflow_params(dict(enumerate(value)), f"{path}."))
        else:
            text = _param_text(value)
            if len(text) > PARAM_VALUE_LIMIT:
                text = text[: PARAM_VALUE_LIMIT - len(CUT)] + CUT
            params[_name(path)] = text
    return params


def mlflow_metrics(logs: dict, prefix_train: bool = True) -> dict[str, float]:
    """A Trainer log's numbers under W&B's names: ``eval_x`` as ``eval/x``, ``test_x`` as ``test/x``, any other
    as ``train/x`` (``prefix_train``; else as it is)."""
    metrics = {}
    for key, value in logs.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        kind, _, rest = key.partition("_")
        if kind in ("eval", "test") and rest:
            key = f"{kind}/{rest}"
        elif prefix_train:
            key = f"train/{key}"
        metrics[_name(key)] = float(value)
    return metrics


class MlflowRun:
    """The MLflow run that start_logger started: logs metrics into it, and ends it."""

    def __init__(self, client, run_id: str, uri: str):
        self.client, self.run_id, self.uri = client, run_id, uri
        self.failed_to_log = False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if not metrics:
            return
        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        except Exception as error:  # a server gone for a while: training goes on, said once
            if not self.failed_to_log:
                log.warning("MLflow: could not log step %d (%s); training goes on", step, one_line(str(error)))
            self.failed_to_log = True

    def finish(self, summary: dict | None, error: BaseException | None) -> None:
        """summary.json's numbers as metrics at its last step, its words as tags; the status and the error line."""
        status = end_status(error)
        values = summary_scalars(summary) if summary else {}
        tags = {k: _param_text(v) for k, v in values.items() if isinstance(v, str | bool)}
        tags["status"] = status
        if error is not None:
            tags["error"] = one_line(str(error) or type(error).__name__)
        try:
            numbers = {k: v for k, v in values.items() if not isinstance(v, str | bool)}
            self.log_metrics(mlflow_metrics(numbers, prefix_train=False), int(values.get("global_step") or 0))
            self._set_tags(tags)
            self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[status])
        except Exception as failure:  # the run's own error, if any, matters more
            log.warning("MLflow: could not end the run %s in %s: %s", self.run_id, self.uri, one_line(str(failure)))

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        _log_batched(self.client, self.run_id, "tags", [RunTag(_name(k), v[:8000]) for k, v in tags.items()])


def _log_batched(client, run_id: str, kind: str, items: list) -> None:
    """``log_batch`` of params or tags, BATCH at a time (MLflow's limit per call)."""
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, **{kind: items[start : start + BATCH]})


_mlflow: MlflowRun | None = None  # one run at a time, as for W&B


class MlflowMetrics(TrainerCallback):
    """Logs every Trainer log (each logging step, each evaluation) into the MLflow run, at its global step."""

    def __init__(self, run: MlflowRun):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.run.log_metrics(mlflow_metrics(logs), state.global_step)


def _experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created where it does not exist (a local store keeps its artifacts beside it)."""
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise FusetuneError(
            f"logger=mlflow: the experiment '{name}' is deleted in {uri}: restore it, or choose another "
            "(logger.experiment or MLFLOW_EXPERIMENT_NAME)"
        )
    if found is not None:
        return found.experiment_id
    db = _sqlite_file(uri)
    location = (db.parent / "artifacts").as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another job of the sweep created it a moment ago
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _previous_run(client, record: Path, uri: str) -> str | None:
    """The MLflow run of the first session of this run folder, in this store, if it is there still."""
    try:
        previous = json.loads(record.read_text())
        if previous.get("tracking_uri") != uri:
            return None
        run = client.get_run(previous["run_id"])
    except Exception:  # no record, or a run that is gone: a new MLflow run
        return None
    return run.info.run_id if run.info.lifecycle_stage != "deleted" else None


def _start_mlflow(cfg, out: Path, resuming: bool) -> None:
    global _mlflow
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Param
    except ImportError:
        raise FusetuneError(MLFLOW_MISSING) from None

    settings = mlflow_settings(cfg)
    uri, experiment = settings["tracking_uri"], settings["experiment"]
    from hydra.types import RunMode

    name, group = run_identity(cfg)
    hydra = _hydra()
    multirun = hydra is not None and hydra.mode == RunMode.MULTIRUN
    tags = {"group": group, "job": str(hydra.job.num) if multirun else None}
    record = out / MLFLOW_RECORD
    params = mlflow_params(wandb_config(cfg))
    db = _sqlite_file(uri)
    try:
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        run_id = _previous_run(client, record, uri) if resuming else None
        continued = run_id is not None
        if continued:
            client.update_run(run_id, status="RUNNING")
            previous = client.get_run(run_id)
            logged = previous.data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            if changed:  # resume.allow_changes let them change; MLflow keeps a param's first value
                log.warning("MLflow: params kept from the first session, changed since: %s", ", ".join(changed))
            params = {k: v for k, v in params.items() if k not in logged}
            experiment_id = previous.info.experiment_id
        else:
            experiment_id = _experiment_id(client, experiment, uri)
            given = {k: v for k, v in tags.items() if v is not None}
            run_id = client.create_run(experiment_id, run_name=name, tags=given).info.run_id
        _log_batched(client, run_id, "params", [Param(k, v) for k, v in params.items()])
    except FusetuneError:
        raise
    except Exception as error:  # a server out of reach, a database it cannot open, a name it refuses
        raise FusetuneError(
            f"logger=mlflow: MLflow could not start the run in {uri} ({one_line(str(error))})"
        ) from None
    _mlflow = MlflowRun(client, run_id, uri)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(
        json.dumps(
            {"tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id, "run_id": run_id}, indent=2
        )
        + "\n"
    )
    how = "continued the run" if continued else "run"
    log.info("MLflow: %s '%s' (%s) in experiment '%s' of %s", how, name, run_id, experiment, uri)
