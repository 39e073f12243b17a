"""Divergence is not completion: nan_policy=skip stops a run whose skipped steps pass the bound as failed;
skipped steps log null losses, never 0.0; the summary counts them and final_loss is a finite, unskipped one."""

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.app.cli import run_or_exit
from fusetune.data.synthetic import synthetic_splits
from fusetune.errors import FusetuneError
from fusetune.patching import remove_kernels
from fusetune.report import read_jsonl
from fusetune.training.checkpoints import newest_complete

FAST = ["logger=none", "data.num_train=256", "data.num_eval=0", "data.num_generate=0", "trainer.logging_steps=1"]


@pytest.fixture(autouse=True)
def unpatch_kernels():
    yield
    remove_kernels()


class NanGradsAt(TrainerCallback):
    """The gradients of the given steps (1-based) are NaN."""

    def __init__(self, steps):
        self.steps, self.armed, self.param = set(steps), False, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.param = next(p for p in model.parameters() if p.requires_grad)
        self.param.register_hook(lambda g: g * float("nan") if self.armed else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step + 1 in self.steps


def library_run(tmp_path, skip_at, max_steps, **config):
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    args = FastSFTConfig(
        output_dir=str(tmp_path), report_to=[], max_steps=max_steps, logging_steps=1, save_strategy="steps",
        save_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, **{"nan_policy": "skip", **config},
    )  # fmt: skip
    data = Dataset.from_list(synthetic_splits(64, 0, seed=4)[0])
    t = FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=args)
    t.add_callback(NanGradsAt(skip_at))
    t.train()
    return t


BOUND = [
    # (id, steps with NaN gradients, max_steps, config, the step it stops at or None, part of why)
    ("three-in-a-row", {4, 5, 6}, 12, {}, 6, "3 steps in a row (max_skipped_in_a_row=3), at steps 4, 5, 6"),
    ("two-in-a-row-when-bound-is-2", {3, 4}, 12, {"max_skipped_in_a_row": 2}, 4, "2 steps in a row"),
    (
        "scattered-over-10-percent",
        {2, 5, 8},
        16,
        {},
        10,
        "3 of 10 steps (over max_skipped_fraction=0.1), at steps 2, 5, 8",
    ),
    ("two-of-ten-judged-at-ten", {2, 5}, 16, {}, 10, "2 of 10 steps"),
    ("share-judged-later", {11, 13}, 16, {}, 13, "2 of 13 steps"),
    ("two-apart-within-a-looser-share", {2, 5}, 12, {"max_skipped_fraction": 0.25}, None, None),
    ("one-skip-among-many-finishes", {7}, 12, {}, None, None),
    ("two-in-a-row-under-the-bound", {7, 8}, 12, {"max_skipped_fraction": 0.2}, None, None),
]


@pytest.mark.parametrize(("skip_at", "max_steps", "config", "stops_at", "why"),
                         [row[1:] for row in BOUND], ids=[row[0] for row in BOUND])  # fmt: skip
def test_the_skipped_steps_bound(tmp_path, skip_at, max_steps, config, stops_at, why):
    t = library_run(tmp_path, skip_at, max_steps, **config)
    guard = t.nonfinite_guard
    assert guard.skipped_at == sorted(s for s in skip_at if s <= (stops_at or max_steps))
    losses = {row["step"]: row["loss"] for row in t.state.log_history if "loss" in row}
    assert [s for s, loss in losses.items() if loss is None] == guard.skipped_at  # null, never 0.0
    assert all(math.isfinite(loss) and loss > 0 for loss in losses.values() if loss is not None)
    if stops_at is None:
        assert guard.stopped is None and t.state.global_step == max_steps
        return
    assert t.state.global_step == stops_at and guard.stopped.startswith("diverged: non-finite gradients skipped ")
    assert why in guard.stopped
    assert not (tmp_path / f"checkpoint-{stops_at}").exists()  # the diverged step is not saved
    assert newest_complete(tmp_path).name == f"checkpoint-{(stops_at - 1) // 2 * 2}"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_skipped_fraction", 1.5, "max_skipped_fraction must be in [0, 1], got 1.5"),
        ("max_skipped_fraction", -0.1, "max_skipped_fraction must be in [0, 1], got -0.1"),
        ("max_skipped_in_a_row", 0, "max_skipped_in_a_row must be >= 1, got 0"),
    ],
)
def test_a_bound_out_of_range_is_an_error(tmp_path, field, value, message):
    with pytest.raises(FusetuneError) as raised:
        FastSFTConfig(output_dir=str(tmp_path), **{field: value})
    assert str(raised.value) == message


def app_run(compose_cfg, out, *overrides, capsys=None):
    """run_or_exit in-process: (exit code, the last stderr line)."""
    cfg = compose_cfg([*FAST, *overrides], output_dir=out)
    code = 0
    try:
        run_or_exit(cfg)
    except SystemExit as ended:
        code = ended.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


EXPLODING = [
    # (id, overrides, the error line after "fusetune: error: training stopped: ", the steps logged with a null loss)
    (
        "skip-diverges",
        ["trainer.nan_policy=skip"],
        "diverged: non-finite gradients skipped 3 steps in a row (max_skipped_in_a_row=3), at steps 3, 4, 5; "
        "there is no checkpoint to resume from",
        [3, 4, 5],
    ),
    (
        "skip-diverges-after-a-checkpoint",
        ["trainer.nan_policy=skip", "trainer.save_strategy=steps", "trainer.save_steps=2"],
        "diverged: non-finite gradients skipped 3 steps in a row (max_skipped_in_a_row=3), at steps 3, 4, 5; "
        "the last good checkpoint is {out}/checkpoint-4 (resume=auto continues from it)",
        [3, 4, 5],
    ),
    (
        "skip-with-a-bound-of-two",
        ["trainer.nan_policy=skip", "trainer.max_skipped_in_a_row=2"],
        "diverged: non-finite gradients skipped 2 steps in a row (max_skipped_in_a_row=2), at steps 3, 4; "
        "there is no checkpoint to resume from",
        [3, 4],
    ),
    ("stop-unchanged", [], "non-finite loss and grad_norm at step 3; there is no checkpoint to resume from", []),
]


@pytest.mark.parametrize(("overrides", "line", "null_steps"), [row[1:] for row in EXPLODING],
                         ids=[row[0] for row in EXPLODING])  # fmt: skip
def test_an_exploding_learning_rate_fails_the_run(compose_cfg, tmp_path, capsys, overrides, line, null_steps):
    out = tmp_path / "run"
    code, last = app_run(compose_cfg, out, "trainer.max_steps=12", "trainer.learning_rate=1e10", *overrides,
                         capsys=capsys)  # fmt: skip
    line = line.format(out=out)
    assert code == 2 and last == f"fusetune: error: training stopped: {line}"
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == f"training stopped: {line}"
    assert not (out / "summary.json").exists() and not (out / "model").exists()
    train = [m for m in read_jsonl(out / "metrics.jsonl") if m["split"] == "train"]
    assert [m["step"] for m in train if m["loss"] is None] == null_steps
    assert 0.0 not in [m["loss"] for m in train]
    if null_steps:
        assert train[-1]["skipped_steps"] == len(null_steps)


def test_a_single_skipped_step_is_counted_and_never_the_final_loss(compose_cfg, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr("fusetune.app.run.logger_callbacks", lambda: [NanGradsAt({12})])
    code, _ = app_run(compose_cfg, out, "trainer.max_steps=12", "trainer.nan_policy=skip", capsys=capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    train = {m["step"]: m["loss"] for m in read_jsonl(out / "metrics.jsonl") if m["split"] == "train"}
    assert sorted(train) == list(range(1, 13)) and train[12] is None
    assert summary["skipped_steps"] == 1 and summary["global_step"] == 12
    assert summary["final_loss_step"] == 11 and summary["final_loss"] == train[11]
    assert summary["train_loss"] == pytest.approx(sum(train[s] for s in range(1, 12)) / 11)
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    saved = [p for p in (out / "model").glob("*.safetensors")]
    assert saved and all(torch.isfinite(t).all() for t in _tensors(saved))


def _tensors(paths):
    from safetensors.torch import load_file

    for path in paths:
        yield from load_file(path).values()
