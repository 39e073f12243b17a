"""experiment=preference_ablation on the CPU, cut to two arms and a few steps: each job trains DPO with its loss
type, and the sweep's report has the reward columns and draws preference.png."""

import json

from .test_run import train_cli


def test_the_preference_ablation_sweeps_loss_types_and_reports_rewards(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli(
        "-m", "experiment=preference_ablation", "trainer.loss_type=sigmoid,ipo", "trainer.beta=0.3", "seed=4",
        "trainer.max_steps=4", "trainer.logging_steps=1", "trainer.eval_steps=2",
        "trainer.per_device_train_batch_size=4", "data.num_train=32", "data.num_eval=8", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((sweep / "report.json").read_text())
    assert [(r["overrides"].split()[0], r["status"]) for r in rows] == [
        ("trainer.loss_type=sigmoid", "finished"),
        ("trainer.loss_type=ipo", "finished"),
    ]
    for job in sorted(sweep.glob("[0-9]_*")):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["trainer"] == "dpo" and summary["global_step"] == 4
        assert isinstance(summary["eval"]["eval_rewards/accuracies"], float)
    report = (sweep / "report.md").read_text()
    assert "reward acc" in report and "reward margin" in report and "![preference](preference.png)" in report
    assert (sweep / "preference.png").stat().st_size > 10_000
