"""MLflow through run(): the store, read back with MLflow's own client, holds the run named from the group choices,
the resolved config as params, every logging step's metrics, the summary, and how the run ended."""

import json
import random
import string
import sys

import pytest

from fusetune.app import run as run_module
from fusetune.app.loggers import KEY_LIMIT, PARAM_VALUE_LIMIT, mlflow_params
from fusetune.app.run import run
from fusetune.errors import FusetuneError
from fusetune.report import read_jsonl

from .app_runs import error_line, exit_and_stderr

FAST = [
    "logger=mlflow",
    "data.num_train=128",
    "data.num_eval=8",
    "data.num_generate=2",
    "trainer.logging_steps=1",
    "save_model=false",
]


def only_run(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    (only,) = client.search_runs([found.experiment_id])
    return only


def test_a_finished_run_in_the_default_store(compose_cfg, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default store is outputs/mlflow/mlflow.db under the working folder
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-the-environment")  # wins over the default, "fusetune"
    steps = ["trainer.max_steps=4", "trainer.eval_strategy=steps", "trainer.eval_steps=2"]
    summary = run(compose_cfg([*FAST, *steps], output_dir=tmp_path / "run"))

    store = work / "outputs" / "mlflow" / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    logged = only_run(client, "from-the-environment")
    assert logged.info.run_name == "tiny_llama-synthetic-auto-sft" and logged.info.status == "FINISHED"
    record = json.loads((tmp_path / "run" / "mlflow" / "run.json").read_text())
    assert record["run_id"] == logged.info.run_id and record["tracking_uri"] == f"sqlite:///{store}"

    # the resolved config, flattened
    params = logged.data.params
    assert params["model.name_or_path"] == "fusetune:tiny_llama" and params["model.lora"] == "null"
    assert params["trainer.max_steps"] == "4" and params["trainer.eval_steps"] == "2.0"
    assert params["data.num_generate"] == "2" and params["logger.kind"] == "mlflow"
    assert params["kernels.fp8"] == "false" and params["output_dir"] == str(tmp_path / "run")

    # every logging step, as metrics.jsonl has it, under W&B's names
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    losses = sorted(client.get_metric_history(logged.info.run_id, "train/loss"), key=lambda m: m.step)
    train = [m for m in lines if m["split"] == "train"]
    assert [m.step for m in losses] == [m["step"] for m in train] == [1, 2, 3, 4]
    assert [m.value for m in losses] == pytest.approx([m["loss"] for m in train], rel=1e-6)
    eval_losses = client.get_metric_history(logged.info.run_id, "eval/loss")
    assert {m.step for m in eval_losses} == {2, 4}  # each eval step; the final evaluation's, the summary's at 4
    generated = client.get_metric_history(logged.info.run_id, "eval/exact_match")
    assert {m.step for m in generated} == {2, 4}  # each eval step; and the summary's, at the last step

    # summary.json: numbers as metrics, words as tags
    assert logged.data.metrics["final_loss"] == pytest.approx(summary["final_loss"])
    assert logged.data.metrics["global_step"] == 4 and logged.data.metrics["eval/exact_match_n"] == 2
    tags = logged.data.tags
    assert tags["status"] == "finished" and tags["kernels"] == summary["kernels"] and "error" not in tags
    assert "group" not in tags and "job" not in tags  # a single run, no logger.group


@pytest.mark.parametrize(
    "error,status,word",
    [(RuntimeError("something broke"), "FAILED", "failed"), (KeyboardInterrupt(), "KILLED", "interrupted")],
    ids=["exception", "ctrl-c"],
)
def test_a_run_that_does_not_finish_is_marked_so(compose_cfg, tmp_path, monkeypatch, error, status, word):
    from mlflow import MlflowClient

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(run_module, "_train_steps", fail)  # training, after the MLflow run started
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "not-this-one")
    store = tmp_path / "store" / "runs.db"  # a path ending .db: a sqlite file
    given = [f"logger.tracking_uri={store}", "logger.experiment=mine", "logger.group=g1", "run_name=r"]
    with pytest.raises(type(error)):
        run(compose_cfg([*FAST, *given], output_dir=tmp_path / "run"))
    logged = only_run(MlflowClient(f"sqlite:///{store}"), "mine")  # the config wins over the environment
    assert logged.info.status == status and logged.info.run_name == "r"
    assert logged.data.tags["status"] == word and logged.data.tags["group"] == "g1"
    assert logged.data.tags["error"] == (str(error) or type(error).__name__)
    assert "global_step" not in logged.data.metrics  # there is no summary.json to add
    assert logged.data.params["run_name"] == "r"


def test_params_fit_mlflows_limits_and_stay_apart(tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import Param

    long_key = "".join(random.choices(string.ascii_lowercase, k=300))
    config = {
        "a": {"b": "x" * (PARAM_VALUE_LIMIT + 500), "empty": {}, "list": [1, 2], "none": None, "flag": True},
        long_key: 1,
        long_key[:-1] + "!": 2,  # the same first 249 characters, and one MLflow refuses
        "sources": [{"path": "p.jsonl", "weight": 0.5}],
    }
    params = mlflow_params(config)
    assert len(params) == 9 and all(len(k) <= KEY_LIMIT for k in params)
    assert len(params["a.b"]) == PARAM_VALUE_LIMIT and params["a.b"].endswith("[cut]")
    assert params["a.empty"] == "{}" and params["a.list"] == "[1, 2]" and params["a.none"] == "null"
    assert params["a.flag"] == "true" and params["sources.0.path"] == "p.jsonl" and params["sources.0.weight"] == "0.5"
    # MLflow takes them as they are
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("limits")).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    assert client.get_run(run_id).data.params == params


def test_without_mlflow_one_line(compose_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    code, stderr = exit_and_stderr([*FAST, "trainer.max_steps=1"], tmp_path, False, compose_cfg, capsys)
    assert code == 2
    assert error_line(stderr) == "fusetune: error: logger=mlflow needs mlflow: pip install 'fusetune[mlflow]'"


def test_an_unreachable_store_is_one_line(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "_train_steps", lambda *a, **k: pytest.fail("trained without its logger"))
    folder = tmp_path / "a-file"
    folder.write_text("not a folder")
    with pytest.raises(FusetuneError, match=r"^logger=mlflow: MLflow could not start the run in sqlite:///"):
        run(compose_cfg([*FAST, f"logger.tracking_uri={folder / 'sub' / 'x.db'}"], output_dir=tmp_path / "run"))


def test_a_resumed_run_continues_its_mlflow_run(compose_cfg, tmp_path):
    """start_logger and close_logger alone (no training): a second session of the run folder with resume continues
    the MLflow run that the first one left KILLED, keeping its params; a new run would start afresh."""
    from mlflow import MlflowClient

    from fusetune.app.loggers import close_logger, start_logger

    store = tmp_path / "mlflow.db"
    cfg = compose_cfg([*FAST, f"logger.tracking_uri={store}"], output_dir=tmp_path / "run")
    start_logger(cfg, tmp_path / "run")
    close_logger(cfg, None, KeyboardInterrupt())
    cfg.trainer.learning_rate = 0.5  # changed on resume (resume.allow_changes): MLflow keeps the first value
    start_logger(cfg, tmp_path / "run", resuming=True)
    client = MlflowClient(f"sqlite:///{store}")
    (running,) = client.search_runs([client.get_experiment_by_name("fusetune").experiment_id])
    assert running.info.status == "RUNNING" and running.data.tags["status"] == "interrupted"
    close_logger(cfg, {"global_step": 3, "kernels": "reference"})
    (logged,) = client.search_runs([running.info.experiment_id])
    assert logged.info.run_id == running.info.run_id and logged.info.status == "FINISHED"
    assert logged.data.tags["status"] == "finished" and logged.data.params["trainer.learning_rate"] == "0.003"
    start_logger(cfg, tmp_path / "run")  # not a resume: a new MLflow run
    close_logger(cfg, None)
    assert len(client.search_runs([running.info.experiment_id])) == 2
