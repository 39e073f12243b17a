"""A real multirun in which one job fails: every job runs, and the report, with plots, says what happened."""

import json

from fusetune import report

from .test_run import train_cli

ALPACA = [{"instruction": "Double it", "input": str(x), "output": str(2 * x)} for x in range(40)]
TINY = [
    "trainer.max_steps=2",
    "trainer.logging_steps=1",
    "trainer.eval_strategy=steps",
    "trainer.eval_steps=2",
    "data.eval_fraction=0.25",
    "logger=none",
    "save_model=false",
]


def test_a_sweep_over_data_paths_survives_a_failed_job(tmp_path):
    paths = []
    for name in ("a/x", "b/x"):  # the same file name in two folders: only the slashes tell the jobs apart
        path = tmp_path / "data" / name / "train.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
        paths.append(str(path))
    missing = str(tmp_path / "data" / "missing" / "train.jsonl")  # passes composition, fails in data loading
    sweep = tmp_path / "sweep"
    proc = train_cli(
        "-m", "data=alpaca", f"data.path={paths[0]},{missing},{paths[1]}", *TINY, f"hydra.sweep.dir={sweep}"
    )

    assert proc.returncode == 1, proc.stderr[-3000:]  # some job failed; the sweep itself ran to the end
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fusetune: error:")]
    assert errors == [f"fusetune: error: data.path: no such file: {missing}"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "fusetune: 1 of 3 jobs did not finish: 1 (failed)" in proc.stderr

    jobs = sorted(d for d in sweep.iterdir() if (d / ".hydra").is_dir())
    assert [d.name.split("_")[0] for d in jobs] == ["0", "1", "2"]  # one level down: no nesting by the slashes
    assert (jobs[0] / "summary.json").is_file() and (jobs[2] / "summary.json").is_file()
    assert not (jobs[1] / "summary.json").exists()
    status = json.loads((jobs[1] / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == f"data.path: no such file: {missing}"
    assert status["last_step"] is None and status["updated"]

    rows = json.loads((sweep / "report.json").read_text())
    assert [r["status"] for r in rows] == ["finished", "failed", "finished"]
    assert [r["overrides"].split()[1] for r in rows] == [f"data.path={p}" for p in (paths[0], missing, paths[1])]
    assert rows[1]["error"] == status["error"]
    assert all(isinstance(rows[i]["eval_loss"], float) and rows[i]["final_loss"] for i in (0, 2))
    md = (sweep / "report.md").read_text()
    assert f"| 1 | data.path={missing} | failed |" in md and f"no such file: {missing} |" in md
    assert "3 jobs (2 finished, 1 failed)" in md and "ablation report (3 jobs, 2 finished, 1 failed)" in proc.stdout
    for name in (report.LOSS_PNG, report.SPEED_PNG):
        png = (sweep / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", name

    (sweep / "report.md").unlink()
    (sweep / report.LOSS_PNG).unlink()
    assert report.main([str(sweep)]) == 0  # python -m fusetune.report SWEEP_DIR
    assert (sweep / "report.md").read_text() == md and (sweep / report.LOSS_PNG).is_file()
