"""Optuna searches through the app: each trial returns its objective, and a failed trial is marked failed."""

import json
from importlib.util import find_spec

import pytest
import yaml

from fusetune.app import objective
from fusetune.errors import FusetuneError

from .test_run import train_cli

# Optuna's TPE sampler (the sweeper's default) needs scipy, which a GPU host's carried wheelhouse leaves out (35 MB)
needs_tpe = pytest.mark.skipif(
    find_spec("scipy") is None, reason="scipy is not installed: Optuna's TPE sampler needs it"
)

TINY = [
    "trainer.max_steps=2",
    "trainer.eval_steps=2",
    "data.num_train=128",
    "data.num_eval=16",
    "data.num_generate=2",
    "trainer.logging_steps=1",
]


def trials(sweep):
    return sorted((d for d in sweep.iterdir() if (d / ".hydra").is_dir()), key=lambda d: int(d.name.split("_")[0]))


@needs_tpe
def test_lr_rank_search_runs_three_trials_and_reports_the_best(tmp_path):
    proc = train_cli(
        "-m", "experiment=lr_rank_search", "hydra.sweeper.n_trials=3", *TINY, f"hydra.sweep.dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and set(results["best_params"]) == {"trainer.learning_rate", "model.lora.r"}
    runs = trials(tmp_path)
    assert len(runs) == 3
    losses = []
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        losses.append(summary["eval"]["eval_loss"])  # the objective, in every trial's record
        assert summary["global_step"] == 2
    assert results["best_value"] == min(losses)
    best = runs[losses.index(min(losses))]
    overrides = yaml.safe_load((best / ".hydra" / "overrides.yaml").read_text())
    assert f"model.lora.r={results['best_params']['model.lora.r']}" in overrides
    assert 1e-4 <= results["best_params"]["trainer.learning_rate"] <= 3e-2
    assert [r["status"] for r in json.loads((tmp_path / "report.json").read_text())] == ["finished"] * 3


@needs_tpe
def test_a_failed_trial_is_marked_failed_and_the_study_goes_on(tmp_path):
    proc = train_cli(
        "-m",
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",  # draws 0, then 2 (Optuna 2.10)
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.max_failure_rate=1.0",
        "trainer.max_steps=choice(2,0)",  # 0 fails in validation, before anything loads
        "model=tiny_llama_lora",
        "trainer.eval_strategy=steps",
        "logger=none",
        "save_model=false",
        *TINY[1:],
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # the report: a job failed
    assert "fusetune: error: trainer.max_steps=0 trains nothing" in proc.stderr
    assert "Failed experiment: trainer.max_steps=0 trains nothing" in proc.stdout  # Optuna: TrialState.FAIL
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    rows = json.loads((tmp_path / "report.json").read_text())
    assert [(r["overrides"].split()[0], r["status"]) for r in rows] == [
        ("trainer.max_steps=0", "failed"),
        ("trainer.max_steps=2", "finished"),
    ]
    assert results["best_params"] == {"trainer.max_steps": 2} and results["best_value"] == rows[1]["eval_loss"]


@needs_tpe
def test_a_study_where_no_trial_finished_ends_with_the_report_and_one_line(tmp_path):
    """Every trial fails (in validation, before anything loads): no traceback, the report, then one line."""
    proc = train_cli(
        "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failure_rate=1.0",
        "seed=choice(1,2)", "trainer.max_steps=0", "trainer.eval_strategy=steps", "logger=none",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "No trials are completed" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "fusetune: error: no trial of the study finished: every one failed (the report above lists why)"
    )
    assert "ablation report (2 jobs, 2 failed)" in proc.stdout
    rows = json.loads((tmp_path / "report.json").read_text())
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("trainer.max_steps=0 trains nothing" in r["error"] for r in rows)
    assert not (tmp_path / "optimization_results.yaml").exists()


@needs_tpe
def test_an_objective_without_evaluation_fails_before_training(tmp_path):
    sweep = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1", "seed=choice(1)", f"hydra.sweep.dir={tmp_path}"]
    proc = train_cli(*sweep, "logger=none", *TINY[2:])
    assert proc.returncode == 1
    assert "fusetune: error: objective eval_loss needs evaluation: set trainer.eval_strategy=steps" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith(
        "fusetune: error: the study stopped: more trials failed than hydra.sweeper.max_failure_rate allows"
    )
    assert not (tmp_path / "optimization_results.yaml").exists()  # max_failure_rate 0: the study stops
    assert json.loads((tmp_path / "report.json").read_text())[0]["status"] == "failed"


SUMMARY = {"train_loss": 1.5, "global_step": 10, "eval": {"eval_loss": 0.75, "exact_match": 0.5}, "final_loss": None}


@pytest.mark.parametrize(
    "name,value",
    [("eval_loss", 0.75), ("eval.eval_loss", 0.75), ("exact_match", 0.5), ("train_loss", 1.5), ("global_step", 10.0)],
)
def test_the_objective_names_a_summary_value(name, value):
    assert objective.value_of(SUMMARY, name, required=True) == value


@pytest.mark.parametrize(
    "summary,name,message",
    [
        (SUMMARY, "eval_accuracy", "objective eval_accuracy: not in this run's summary \\(it has: train_loss, global"),
        (SUMMARY, "final_loss", "not in this run's summary"),
        ({"eval": {"eval_loss": float("nan")}}, "eval_loss", "objective eval_loss is nan: this run gives the sweeper"),
    ],
)
def test_a_missing_or_non_finite_objective_fails_when_a_sweeper_needs_it(summary, name, message):
    assert objective.value_of(summary, name, required=False) is None  # a single run or a grid: nothing to say
    with pytest.raises(FusetuneError, match=message):
        objective.value_of(summary, name, required=True)


def test_the_objective_defaults_to_eval_loss(compose_cfg):
    cfg = compose_cfg(["experiment=lr_rank_search"])
    assert objective.name_of(cfg) == "eval_loss"
    objective.check(cfg)  # the experiment evaluates
    with pytest.raises(FusetuneError, match="needs evaluation"):
        objective.check(compose_cfg([]))
