"""The ablation report on hand-made sweep folders (fast: no training), the job folder names, and the status.json
that cli.run_or_exit leaves when a run fails or is interrupted."""

import json
import shutil

import pytest
import yaml
from omegaconf import OmegaConf

from fusetune import report
from fusetune.app import callbacks, cli, job_names
from fusetune.app.job_names import MAX_OVERRIDES_CHARS, job_dirname
from fusetune.errors import FusetuneError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def summary(loss: float, tok_s: float = 1000.0, peak: float = 1.0, eval_loss: float | None = None, **extra) -> dict:
    evals = {"exact_match": 0.5} if eval_loss is None else {"eval_loss": eval_loss, "exact_match": 0.5}
    return {
        "kernels": "reference",
        "global_step": 4,
        "train_loss": loss + 0.5,
        "final_loss": loss,
        "eval": evals,
        "train_tokens_per_second": tok_s,
        "peak_memory_gib": peak,
        "runtime_s": 2.0,
        "device": "cuda",
        **extra,
    }


def make_job(sweep, folder, num, overrides, summary=None, status=None, metrics=()):
    """A job folder as Hydra and run() leave it: .hydra/{hydra,overrides}.yaml, then the record."""
    job = sweep / folder
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}, "mode": "MULTIRUN"}}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    if status is not None:
        (job / "status.json").write_text(json.dumps(status))
    (job / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return job


def curve(*losses, evals=()):
    lines = [{"step": i + 1, "split": "train", "loss": v} for i, v in enumerate(losses)]
    return lines + [{"step": s, "split": "eval", "eval_loss": v} for s, v in evals]


def test_jobs_are_found_however_their_folders_are_named(tmp_path):
    make_job(tmp_path, "zz_last_by_name", 0, ["data.path=a"], summary(1.0))
    make_job(tmp_path, "1_data.path=/deep/nested", 2, ["data.path=/deep/nested"], summary(3.0))  # the old scheme
    make_job(tmp_path, "aa_first_by_name", 1, ["data.path=b"], summary(2.0))
    (tmp_path / "not_a_job").mkdir()
    rows = report.build_report(tmp_path).rows
    assert [r["job"] for r in rows] == [0, 1, 2]
    assert [r["final_loss"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[2]["dir"] == "1_data.path=/deep/nested"


def test_seeds_are_aggregated_as_mean_and_std(tmp_path):
    for num, (trainer, seed, loss, tok_s) in enumerate(
        [("sft", 0, 1.0, 100.0), ("sft", 1, 3.0, 300.0), ("packing", 0, 0.5, 400.0), ("packing", 1, 0.5, 400.0)]
    ):
        make_job(tmp_path, f"{num}_x", num, [f"trainer={trainer}", f"seed={seed}", "logger=none"], summary(loss, tok_s))
    built = report.write_report(tmp_path, plots=False)
    groups = {g["overrides"]: g for g in built.groups}
    assert list(groups) == ["trainer=sft logger=none", "trainer=packing logger=none"]
    sft, packing = groups["trainer=sft logger=none"], groups["trainer=packing logger=none"]
    assert sft["n"] == 2 and sft["jobs"] == [0, 1] and sft["seeds"] == [0, 1]
    assert sft["metrics"]["final_loss"]["mean"] == pytest.approx(2.0)
    assert sft["metrics"]["final_loss"]["std"] == pytest.approx(2**0.5)  # sample std of 1 and 3
    assert packing["metrics"]["final_loss"]["std"] == 0.0
    assert packing["metrics"]["tok/s ratio"]["mean"] == pytest.approx(2.0)
    md = (tmp_path / "report.md").read_text()
    assert "## Mean ± std over seeds" in md and "| trainer=sft | 2 | 0 1 | 2 ± 1.4 |" in md
    assert "Every job: `logger=none`" in md
    assert json.loads((tmp_path / "report_groups.json").read_text()) == built.groups
    assert [r["seed"] for r in json.loads((tmp_path / "report.json").read_text())] == [0, 1, 0, 1]


def test_an_override_with_a_space_stays_whole(tmp_path):
    make_job(tmp_path, "0", 0, ["data.path=/a b/x.jsonl", "seed=0"], summary(1.0))
    make_job(tmp_path, "1", 1, ["data.path=/c/x.jsonl", "seed=0"], summary(1.0))
    rows = report.build_report(tmp_path).rows
    assert rows[0]["override_list"] == ["data.path=/a b/x.jsonl", "seed=0"]
    assert "| 0 | data.path=/a b/x.jsonl | finished |" in report.jobs_table(rows)


def test_no_seed_table_when_no_seed_repeats(tmp_path):
    make_job(tmp_path, "0", 0, ["trainer=sft"], summary(1.0))
    make_job(tmp_path, "1", 1, ["trainer=packing"], summary(1.0))
    md = report.build_report(tmp_path).markdown
    assert "over seeds" not in md and "## Jobs" in md


def test_failed_interrupted_and_silent_jobs_are_listed_with_their_error(tmp_path):
    make_job(tmp_path, "0", 0, ["seed=0"], summary(1.0))
    failed = {"status": "failed", "error": "data.path: no such file: /x.jsonl", "last_step": None, "updated": "t"}
    make_job(tmp_path, "1", 1, ["seed=1"], status=failed)
    interrupted = {"status": "interrupted", "error": "KeyboardInterrupt", "last_step": None, "updated": "t"}
    make_job(tmp_path, "2", 2, ["seed=2"], status=interrupted, metrics=curve(4.0, 3.0, 2.5))
    make_job(tmp_path, "3", 3, ["seed=3"])  # killed before it wrote a word
    running = {"status": "running", "error": None, "last_step": 3, "updated": "t"}
    make_job(tmp_path, "4", 4, ["seed=4"], summary(1.0), status=running)  # summary.json is written last
    built = report.write_report(tmp_path, plots=False)
    rows = built.rows
    assert [r["status"] for r in rows] == ["finished", "failed", "interrupted", "incomplete", "finished"]
    assert rows[1]["error"] == "data.path: no such file: /x.jsonl" and rows[1]["last_step"] is None
    assert rows[2]["last_step"] == 3  # from metrics.jsonl, since status.json had none
    assert rows[0]["error"] is None and rows[0]["last_step"] == 4
    assert [r["job"] for r in built.not_finished] == [1, 2, 3]
    assert built.groups[0]["n"] == 2 and built.groups[0]["statuses"] == {
        "finished": 2,
        "failed": 1,
        "interrupted": 1,
        "incomplete": 1,
    }
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | seed=1 | failed |" in md and "data.path: no such file: /x.jsonl |" in md
    assert "2 of 5 finished" in md
    assert "5 jobs (2 finished, 1 failed, 1 interrupted, 1 incomplete)" in md


def test_eval_loss_column(tmp_path):
    make_job(tmp_path, "0", 0, ["trainer=sft"], summary(1.0, eval_loss=1.25))
    make_job(tmp_path, "1", 1, ["trainer=packing"], summary(1.0))
    rows = report.write_report(tmp_path, plots=False).rows
    assert [r["eval_loss"] for r in rows] == [1.25, None]
    table = report.jobs_table(rows)
    assert "| eval_loss |" in table.splitlines()[0]
    assert "| 0 | trainer=sft | finished | reference | 1 | 1.5 | 1.25 | 0.5 |" in table


def test_plots_are_png_files(tmp_path):
    make_job(
        tmp_path, "0", 0, ["trainer=sft", "seed=0"], summary(1.0, 100.0, 2.0), metrics=curve(3, 2, evals=[(2, 2.2)])
    )
    make_job(tmp_path, "1", 1, ["trainer=sft", "seed=1"], summary(1.1, 120.0, 2.1), metrics=curve(3, 2.1))
    make_job(tmp_path, "2", 2, ["trainer=packing", "seed=0"], summary(0.9, 300.0, 1.5), metrics=curve(3, 1.9))
    failed = {"status": "failed", "error": "RuntimeError: boom", "last_step": 1, "updated": "t"}
    make_job(tmp_path, "3", 3, ["trainer=packing", "seed=1"], status=failed, metrics=curve(3.1))
    built = report.write_report(tmp_path)
    for name in (report.LOSS_PNG, report.SPEED_PNG):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR" and len(png) < 200_000, name
        assert tmp_path / name in built.files and f"]({name})" in built.markdown
    assert not list(tmp_path.glob(".*tmp*"))


def test_generation_scores_are_plotted_by_step_per_job(tmp_path, monkeypatch):
    import random

    from matplotlib.axes import Axes

    scores = {job: [(step, random.random(), random.random()) for step in (2, 4)] for job in (0, 1)}
    for job, points in scores.items():
        generated = [{"step": s, "split": "eval", "eval_exact_match": em, "eval_token_f1": f1} for s, em, f1 in points]
        make_job(tmp_path, str(job), job, [f"seed={job}"], summary(1.0), metrics=curve(2, 1, 1, 1) + generated)
    make_job(tmp_path, "2", 2, ["seed=2"], summary(1.0), metrics=curve(2, 1, evals=[(2, 1.5)]))  # none generated
    built = report.write_report(tmp_path)
    png = (tmp_path / report.GENERATION_PNG).read_bytes()
    assert png[:8] == PNG_SIGNATURE and f"]({report.GENERATION_PNG})" in built.markdown

    drawn = []
    plot = Axes.plot

    def recording(self, *args, **kwargs):
        drawn.append((list(args[0]), list(args[1]), kwargs.get("label")))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording)
    assert report.plot_generation(tmp_path, built, tmp_path / "again.png")
    expected = []
    for job, points in scores.items():  # exact match, then token F1, of each job that scored generation
        steps = [s for s, _, _ in points]
        label = f"{job}: seed={job}"
        expected += [(steps, [em for _, em, _ in points], label), (steps, [f1 for _, _, f1 in points], label)]
    assert drawn == expected

    for job in scores:
        shutil.rmtree(tmp_path / str(job))
    (tmp_path / report.GENERATION_PNG).unlink()
    report.write_report(tmp_path)
    assert not (tmp_path / report.GENERATION_PNG).exists()  # no job scored generation while training


def test_a_plot_that_fails_leaves_the_tables_and_the_other_plot(tmp_path, monkeypatch):
    make_job(tmp_path, "0", 0, ["seed=0"], summary(1.0), metrics=curve(2, 1))

    def broken(*args):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(report, "plot_losses", broken)
    built = report.write_report(tmp_path)
    assert built.plot_note == "no loss_curves.png: RuntimeError: no fonts"
    assert (tmp_path / "report.json").is_file() and (tmp_path / report.SPEED_PNG).is_file()
    assert "(no loss_curves.png: RuntimeError: no fonts)" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob(".*tmp*"))


def test_python_m_fusetune_report_rebuilds(tmp_path, capsys):
    make_job(tmp_path, "0", 0, ["seed=0"], summary(1.0), metrics=curve(2, 1))
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"ablation report (1 job, 1 finished): {tmp_path / 'report.md'}" in out
    assert str(tmp_path / report.LOSS_PNG) in out
    assert report.main([str(tmp_path / "nope")]) == 2


def test_empty_sweep_still_gets_a_report(tmp_path):
    built = report.write_report(tmp_path)
    assert built.rows == [] and "0 jobs (none)" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / report.LOSS_PNG).exists()


@pytest.mark.parametrize(
    "num,overrides,expected",
    [
        (0, [], "0"),
        (3, ["trainer=sft", "seed=1"], "3_trainer=sft,seed=1"),
        (1, ["data.path=/tmp/a b/x.jsonl", "seed=2"], "1_data.path=_tmp_a_b_x.jsonl,seed=2"),
        (2, [r"data.path=C:\data\x.jsonl"], "2_data.path=C_data_x.jsonl"),
        (4, ["model.lora.target_modules=[q_proj,v_proj]"], "4_model.lora.target_modules=_q_proj,v_proj"),
        (5, ["experiment=kernels_ablation", "+extra=1", "~trainer.extra"], "5_+extra=1,~trainer.extra"),
    ],
)
def test_job_folder_names_are_one_safe_path_component(num, overrides, expected):
    assert job_dirname(num, overrides, exclude_keys=["experiment"]) == expected


def test_swept_overrides_come_first_in_folder_names(monkeypatch):
    monkeypatch.setenv(job_names.SWEPT_ENV, "trainer,seed")
    overrides = ["logger=none", "seed=1", "kernels=reference", "trainer=packing"]
    assert job_dirname(2, overrides) == "2_trainer=packing,seed=1,logger=none,kernels=reference"


def test_swept_keys_of_a_multirun_config():
    config = OmegaConf.create(
        {"hydra": {"sweeper": {"params": {"kernels": "triton,reference"}}, "overrides": {"task": ["seed=0,1", "x=2"]}}}
    )
    assert callbacks.swept_keys(config) == ["kernels", "seed"]


def test_long_job_folder_names_are_capped_and_stay_distinct():
    long_a = [f"key{i}=/some/long/path/value{i}" for i in range(20)]
    long_b = [*long_a, "seed=2"]
    a, b = job_dirname(7, long_a), job_dirname(7, long_b)
    assert a != b and a.startswith("7_key0=_some_long_path_value0,") and "~" in a
    assert len(a) <= len("7_") + MAX_OVERRIDES_CHARS and "/" not in a
    assert a.split("~")[0].endswith("_value4")  # whole overrides only before the hash


def test_the_resolver_names_sweep_folders():
    cfg = OmegaConf.create(
        {
            "n": 5,
            "task": ["data.path=/a/b.jsonl", "experiment=x"],
            "exclude": ["experiment"],
            "subdir": "${fusetune.job_dir:${n},${task},${exclude}}",
        }
    )
    assert cfg.subdir == "5_data.path=_a_b.jsonl"  # registered on import, as Hydra's instantiation of the callback does


# ---- cli.run_or_exit: status.json ----------------------------------------------------------------------------


@pytest.fixture
def failing_run(monkeypatch, tmp_path, compose_cfg):
    """A run() that starts as the real one does (claims the folder, status.json "running"), logs two steps, then
    raises the given error, or what a given function returns (with started=False: raises at once, before the
    claim, as the run folder check does); gives the call to make, and the run folder."""
    import fusetune.app.run
    from fusetune.app import run_folder
    from fusetune.app.run_record import write_status

    def arrange(error, multirun, started=True):
        cfg = compose_cfg(["logger=none"], output_dir=tmp_path)

        def run(cfg):
            if not started:
                raise error() if callable(error) else error
            with run_folder.owned(tmp_path, cfg):
                write_status(tmp_path, "running", step=0)
                lines = "".join(json.dumps(m) + "\n" for m in curve(3.0, 2.0))
                (tmp_path / "metrics.jsonl").write_text(lines + '{"step": 3, "spl')  # the last line cut short
                raise error() if callable(error) else error

        monkeypatch.setattr(fusetune.app.run, "run", run)
        monkeypatch.setattr(cli, "in_multirun", lambda: multirun)
        return lambda: cli.run_or_exit(cfg)

    return arrange, tmp_path


def status_of(folder):
    return json.loads((folder / "status.json").read_text())


def test_user_error_in_a_single_run_exits_2_and_records_it(failing_run, capsys):
    arrange, folder = failing_run
    with pytest.raises(SystemExit) as exit_info:
        arrange(FusetuneError("data.path: no such file: /x"), multirun=False)()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "fusetune: error: data.path: no such file: /x"
    status = status_of(folder)
    assert status["status"] == "failed" and status["error"] == "data.path: no such file: /x"
    assert status["last_step"] == 2 and status["updated"][:2] == "20"


def test_user_error_in_a_multirun_job_returns(failing_run, capsys):
    arrange, folder = failing_run
    arrange(FusetuneError("bad"), multirun=True)()  # no SystemExit: the sweep goes on
    assert capsys.readouterr().err.strip() == "fusetune: error: bad"
    assert status_of(folder)["status"] == "failed"


def test_a_refusal_before_the_folder_is_claimed_writes_nothing(failing_run, capsys):
    """A folder this run never made its own gets no record from it: the fixed command may use it."""
    arrange, folder = failing_run
    arrange(FusetuneError("run folder x is in use by pid 1 on host h"), multirun=True, started=False)()
    assert capsys.readouterr().err.strip() == "fusetune: error: run folder x is in use by pid 1 on host h"
    assert list(folder.iterdir()) == []


def test_another_runs_record_is_left_as_it_was(failing_run):
    arrange, folder = failing_run
    finished = json.dumps({"status": "finished", "error": None, "last_step": 9, "updated": "then"})
    (folder / "status.json").write_text(finished)
    with pytest.raises(SystemExit):
        arrange(FusetuneError("run folder holds another run's record"), multirun=False, started=False)()
    assert (folder / "status.json").read_text() == finished
    (folder / "status.json").unlink()
    (folder / "summary.json").write_text("{}")  # a record from before status.json
    with pytest.raises(SystemExit):
        arrange(FusetuneError("run folder holds another run's record"), multirun=False, started=False)()
    assert not (folder / "status.json").exists()


def test_a_crash_raises_in_a_single_run_and_returns_in_a_multirun(failing_run):
    arrange, folder = failing_run
    with pytest.raises(RuntimeError):
        arrange(RuntimeError("boom\nsecond line"), multirun=False)()
    assert status_of(folder)["error"] == "RuntimeError: boom second line"
    for entry in folder.iterdir():  # a new run, in a folder of its own
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    arrange(ValueError("bad value"), multirun=True)()
    assert status_of(folder) | {"updated": None} == {
        "status": "failed",
        "error": "ValueError: bad value",
        "last_step": 2,
        "updated": None,
    }


@pytest.mark.parametrize("multirun", [False, True])
def test_a_signal_ends_the_run_and_the_sweep_with_its_exit_code(failing_run, capsys, multirun):
    from fusetune.app.run_record import write_status
    from fusetune.errors import Interrupted

    arrange, folder = failing_run

    def signalled():  # run() records "interrupted" itself, then raises
        write_status(folder, "interrupted", "SIGINT at step 2", 2)
        return Interrupted("interrupted at step 2: checkpoint saved in x; resume=auto continues", 130)

    with pytest.raises(SystemExit) as exit_info:
        arrange(signalled, multirun=multirun)()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fusetune: interrupted at step 2: checkpoint saved in x; resume=auto continues"
    )
    assert status_of(folder)["status"] == "interrupted" and status_of(folder)["error"] == "SIGINT at step 2"


def test_ctrl_c_outside_training_is_recorded_and_goes_on(failing_run):
    arrange, folder = failing_run
    with pytest.raises(KeyboardInterrupt):
        arrange(KeyboardInterrupt(), multirun=True)()
    assert status_of(folder)["status"] == "interrupted"


def test_outside_hydra_is_not_a_multirun():
    assert cli.in_multirun() is False
