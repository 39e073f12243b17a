"""Short runs are visible: they log losses (trainer.logging_steps null: ten points or more), always their last
step, a requested eval set is evaluated at the end, and a sweep of them gets its loss plot."""

import json

import pytest

from fusetune import report
from fusetune.app.config import logging_steps_for
from fusetune.app.run import run
from fusetune.report import read_jsonl

from .test_report import curve, make_job, summary

FAST = ["logger=none", "data.num_train=64", "data.num_eval=8", "data.num_generate=0", "save_model=false"]


@pytest.mark.parametrize(
    "max_steps,every", [(1, 1), (5, 1), (19, 1), (20, 2), (99, 9), (100, 10), (5000, 10), (-1, 10)]
)
def test_the_default_logging_interval(max_steps, every):
    assert logging_steps_for(max_steps) == every


@pytest.mark.parametrize(
    "steps,overrides,logged",
    [
        (5, [], [1, 2, 3, 4, 5]),  # the default: every step of a 5-step run
        (5, ["trainer.logging_steps=3"], [3, 5]),  # the last step, whatever the interval
        (3, ["trainer.logging_steps=10"], [3]),  # TRL's interval alone would log nothing
    ],
    ids=["default", "interval-3", "interval-beyond-the-run"],
)
def test_a_short_run_records_its_losses(steps, overrides, logged, compose_cfg, tmp_path):
    done = run(compose_cfg([*FAST, f"trainer.max_steps={steps}", *overrides], output_dir=tmp_path))
    train = [m for m in read_jsonl(tmp_path / "metrics.jsonl") if m["split"] == "train"]
    assert [m["step"] for m in train] == logged
    assert all(isinstance(m["loss"], float) for m in train)
    assert done["final_loss_step"] == steps and done["final_loss"] == train[-1]["loss"]
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == train[-1]["loss"]


def test_a_requested_eval_set_is_evaluated_at_the_end(compose_cfg, tmp_path):
    """data.eval_fraction without trainer.eval_strategy: evaluated once, after training."""
    path = tmp_path / "c.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{i} plus 1 is", "completion": f" {i + 1}"}) + "\n" for i in range(40))
    )
    overrides = [*FAST, "data=completion", f"data.path={path}", "data.eval_fraction=0.25", "trainer.max_steps=2"]
    out = tmp_path / "run"
    done = run(compose_cfg(overrides, output_dir=out))
    assert isinstance(done["eval"]["eval_loss"], float)
    evals = [m for m in read_jsonl(out / "metrics.jsonl") if m["split"] == "eval"]
    assert [m["step"] for m in evals] == [2]


def test_the_synthetic_eval_split_alone_is_not_evaluated(compose_cfg, tmp_path):
    """The embedded default always holds an eval split: it is evaluated when trainer.eval_strategy asks."""
    done = run(compose_cfg([*FAST, "trainer.max_steps=1"], output_dir=tmp_path))
    assert done["eval"] == {}


@pytest.mark.parametrize(
    "metrics,plotted,note",
    [
        ([curve(3.0), curve(2.5)], True, None),  # one point each: drawn
        ([curve(3.0), []], True, None),
        ([[], []], False, "no loss_curves.png: no job has logged a loss yet"),
    ],
    ids=["one-point-each", "one-job-with-points", "no-points"],
)
def test_a_sweep_of_short_runs_draws_the_points_it_has(metrics, plotted, note, tmp_path):
    for num, lines in enumerate(metrics):
        make_job(tmp_path, str(num), num, [f"seed={num}"], summary(1.0), metrics=lines)
    built = report.write_report(tmp_path)
    assert (tmp_path / report.LOSS_PNG).is_file() == plotted
    assert built.plot_note == note
