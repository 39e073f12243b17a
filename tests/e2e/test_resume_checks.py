"""Resume checks what it resumes: the config a checkpoint was trained with against the new one.

A change of a key that changes the math is refused with a one-line diff, and the run folder is left byte for
byte as it was (.hydra/config.yaml included), unless resume.allow_changes names the key (or a prefix of it). Other
changes (the logger, the eval cadence, a longer run) are allowed and listed. The table runs the guard in-process
(the claim train.py makes before Hydra writes .hydra/); a refusal through run() (multirun, library) and through the
real app, and resumed runs that train on, prove the rest.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from fusetune.app import run_lock
from fusetune.app.cli import run_or_exit
from fusetune.app.config import expand_resume_shorthand
from fusetune.app.run import run
from fusetune.app.run_folder import MANIFEST, GuardRunFolder

from ..conftest import CONF, ROOT

BASE = ("logger=none", "model=tiny_llama_lora", "data.num_train=64", "data.num_eval=8", "data.num_generate=0",
        "trainer.per_device_train_batch_size=8", "seed=5", "save_model=false")  # fmt: skip
STEPS = ("trainer.max_steps=2", "trainer.save_strategy=steps", "trainer.save_steps=1", "trainer.logging_steps=1")


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA run killed after its checkpoint at step 2: status "running", no summary, a .hydra/ of its own."""
    run_dir = tmp_path_factory.mktemp("trained")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*BASE, *STEPS])
    cfg.output_dir = str(run_dir)
    run(cfg)
    (run_dir / "summary.json").unlink()
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "status": "running"}))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 5\n")
    return run_dir


@pytest.fixture
def run_dir(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    yield copy
    run_lock.release_all()


def guard(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=expand_resume_shorthand([*BASE, *STEPS, *overrides,
                      f"hydra.run.dir={run_dir}"]), return_hydra_config=True)  # fmt: skip
    GuardRunFolder().on_run_start(config=cfg)


REFUSED = [
    ("learning-rate", ("trainer.learning_rate=1e-3",), "trainer.learning_rate changed 0.01 -> 0.001"),
    ("schedule", ("trainer.lr_scheduler_type=linear",), "trainer.lr_scheduler_type changed cosine -> linear"),
    ("seed", ("seed=6",), "seed changed 5 -> 6"),
    ("data-size", ("data.num_train=128",), "data.num_train changed 64 -> 128"),
    (
        "model",
        ("model.name_or_path=/elsewhere/model",),
        "model.name_or_path changed fusetune:tiny_llama -> /elsewhere/model",
    ),
    ("lora-rank", ("model.lora.r=4",), "model.lora.r changed 8 -> 4"),
    ("full-fine-tune", ("model.lora=null",), "model.lora changed {{"),
    ("kernels", ("kernels=triton",), "kernels.backend changed auto -> triton"),
    ("batch-size", ("trainer.per_device_train_batch_size=4",), "trainer.per_device_train_batch_size changed 8 -> 4"),
    ("accumulation", ("trainer.gradient_accumulation_steps=2",), "trainer.gradient_accumulation_steps changed 1 -> 2"),
    ("sequence-length", ("model.max_seq_length=64",), "model.max_seq_length changed 128 -> 64"),
    ("precision", ("model.dtype=bfloat16",), "model.dtype changed auto -> bfloat16"),
    ("packing", ("trainer=packing",), "trainer.packing changed false -> true"),
    ("fewer-steps", ("trainer.max_steps=1",), "trainer.max_steps changed 2 -> 1"),
    (
        "two-at-once",
        ("seed=6", "data.num_train=128"),
        "resume: data.num_train changed 64 -> 128; seed changed 5 -> 6 (since {run}/checkpoint-2 was saved); "
        "resume.allow_changes=[data.num_train,seed] accepts them",
    ),
    (
        "allowed-one-not-the-other",
        ("seed=6", "data.num_train=128", "resume.allow_changes=[seed]"),
        "resume: data.num_train changed 64 -> 128 (since",
    ),
    (
        "allowed-a-longer-prefix",
        ("data.num_train=128", "resume.allow_changes=[data.num_train_x]"),
        "data.num_train changed 64 -> 128",
    ),
]


@pytest.mark.parametrize(("case", "overrides", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_resume_that_changes_the_math_is_refused(case, overrides, message, run_dir, capsys):
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exited:
        guard(run_dir, "resume=auto", *overrides)
    lines = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("fusetune: error: resume: ") and message.format(run=run_dir) in lines[0], lines[0]
    assert "resume.allow_changes=[" in lines[0]
    assert snapshot(run_dir) == before


ALLOWED = [
    ("nothing-changed", (), None),
    ("logger", ("logger=tensorboard",), "logger.kind changed none -> tensorboard"),
    ("longer", ("trainer.max_steps=4",), "trainer.max_steps changed 2 -> 4"),
    (
        "eval-cadence",
        ("trainer.eval_strategy=steps", "trainer.eval_steps=1"),
        "trainer.eval_strategy changed no -> steps; trainer.eval_steps changed null -> 1",
    ),
    (
        "logging-and-saving",
        ("trainer.logging_steps=2", "trainer.save_steps=2", "run_name=again"),
        "trainer.logging_steps changed 1 -> 2; trainer.save_steps changed 1 -> 2; run_name changed null -> again",
    ),
    (
        "allowed-learning-rate",
        ("trainer.learning_rate=1e-3", "resume.allow_changes=[trainer.learning_rate]"),
        "trainer.learning_rate changed 0.01 -> 0.001",
    ),
    (
        "allowed-by-prefix",
        ("data.num_train=128", "seed=6", "resume.allow_changes=[data,seed]"),
        "data.num_train changed 64 -> 128; seed changed 5 -> 6",
    ),
]


@pytest.mark.parametrize(("case", "overrides", "note"), ALLOWED, ids=[r[0] for r in ALLOWED])
def test_a_resume_that_keeps_the_math_is_accepted(case, overrides, note, run_dir, caplog):
    from fusetune.app.run_folder import _claims

    guard(run_dir, "resume=auto", *overrides)
    claim = _claims[run_dir.absolute()]
    assert claim.checkpoint == run_dir / "checkpoint-2"
    notes = [line for _, line in claim.notes]
    if note is None and case == "nothing-changed":
        assert notes == []
    elif note is not None:
        assert notes == [f"resume: continuing {run_dir / 'checkpoint-2'} with {note}"], notes
    saved = json.loads((run_dir / MANIFEST).read_text())["config"]  # the new reference for the next resume
    assert saved["seed"] == (6 if "seed=6" in overrides else 5)


def test_a_refused_resume_through_run_writes_nothing(run_dir, compose_cfg, capsys):
    """The claim in run() (a multirun job, the library): the same refusal, before the model loads."""
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exited:
        run_or_exit(compose_cfg([*BASE, *STEPS, "resume=auto", "model.name_or_path=/elsewhere"], output_dir=run_dir))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("fusetune: error: resume: model.name_or_path changed")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [(("trainer.max_steps=3", "logger=tensorboard"), 3),
     (("trainer.max_steps=3", "trainer.learning_rate=5e-3", "resume.allow_changes=[trainer.learning_rate]"), 3)],
    ids=["longer-with-another-logger", "allowed-learning-rate"],
)  # fmt: skip
def test_an_accepted_resume_trains_on(overrides, steps, run_dir, compose_cfg):
    summary = run(compose_cfg([*BASE, *STEPS, "resume=auto", *overrides], output_dir=run_dir))
    assert summary["resumed_from"] == str(run_dir / "checkpoint-2") and summary["global_step"] == steps
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


def test_the_app_refuses_a_changed_resume_and_leaves_the_folder(run_dir):
    before = snapshot(run_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *BASE, *STEPS, "resume=auto", "trainer.learning_rate=1e-3",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"fusetune: error: resume: trainer.learning_rate changed 0.01 -> 0.001 (since {run_dir / 'checkpoint-2'} "
        "was saved); resume.allow_changes=[trainer.learning_rate] accepts it"
    ]
    assert snapshot(run_dir) == before


def test_another_number_of_processes_changes_the_math(run_dir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 0 of two: the global batch doubles
    before = snapshot(run_dir)
    with pytest.raises(SystemExit):
        guard(run_dir, "resume=auto", "distributed=ddp")
    assert "distributed changed none -> ddp; world_size changed 1 -> 2" in capsys.readouterr().err
    assert snapshot(run_dir) == before
    guard(run_dir, "resume=auto", "distributed=ddp", "resume.allow_changes=[distributed,world_size]")
    assert json.loads((run_dir / MANIFEST).read_text())["config"]["world_size"] == 2


def record_from_before_the_keys_moved(run_dir, batch_offset: int) -> int:
    """Its record as a run saved it before the keys moved: model.batch_size (the run's, plus ``batch_offset``) and
    model.learning_rate, the trainer's keys null (they fell back to the model's). Returns the run's batch size."""
    manifest = json.loads((run_dir / MANIFEST).read_text())
    config = manifest["config"]
    trainer = config["trainer"]
    batch = trainer["per_device_train_batch_size"]
    config["model"] |= {"batch_size": batch + batch_offset, "learning_rate": trainer["learning_rate"]}
    trainer |= {"per_device_train_batch_size": None, "learning_rate": None}
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    return batch


def test_a_checkpoint_from_before_the_keys_moved_resumes_as_it_trained(run_dir, capsys):
    record_from_before_the_keys_moved(run_dir, 0)
    guard(run_dir, "resume=auto")
    assert "resume:" not in capsys.readouterr().err


def test_a_checkpoint_from_before_the_keys_moved_names_a_change_at_the_new_key(run_dir, capsys):
    batch = record_from_before_the_keys_moved(run_dir, 3)
    before = snapshot(run_dir)
    with pytest.raises(SystemExit):
        guard(run_dir, "resume=auto")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fusetune: error: resume: trainer.per_device_train_batch_size changed {batch + 3} -> {batch} "
        f"(since {run_dir / 'checkpoint-2'} was saved); resume.allow_changes=[trainer.per_device_train_batch_size] "
        "accepts it"
    )
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("given", "read"),
    [("resume=auto", "resume.checkpoint=auto"), ("+resume=/r/checkpoint-2", "+resume.checkpoint=/r/checkpoint-2"),
     ("++resume=null", "++resume.checkpoint=null"), ("resume.allow_changes=[seed]", "resume.allow_changes=[seed]"),
     ("resume={checkpoint: auto}", "resume={checkpoint: auto}"), ("resumed=1", "resumed=1")],
)  # fmt: skip
def test_the_command_lines_short_form(given, read):
    assert expand_resume_shorthand([given]) == [read]


@pytest.mark.parametrize("into", ["its-own-folder", "a-new-folder"])
def test_resume_from_a_path_compares_with_the_checkpoints_run(into, run_dir, tmp_path, capsys):
    target = run_dir if into == "its-own-folder" else tmp_path / "new"
    checkpoint = run_dir / "checkpoint-2"
    before = snapshot(run_dir)
    with pytest.raises(SystemExit):
        guard(target, f"resume={checkpoint}", "seed=6")
    assert f"resume: seed changed 5 -> 6 (since {checkpoint} was saved)" in capsys.readouterr().err
    assert snapshot(run_dir) == before and not (tmp_path / "new").exists()
    guard(target, f"resume={checkpoint}", "seed=6", "resume.allow_changes=[seed]")
    assert json.loads((target / MANIFEST).read_text())["config"]["seed"] == 6
