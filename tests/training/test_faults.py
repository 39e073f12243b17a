"""Faults in the library: non-finite losses and gradients (nan_policy), whole checkpoints only."""

import json
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.data.synthetic import synthetic_splits
from fusetune.errors import FusetuneError
from fusetune.patching import remove_kernels
from fusetune.training.checkpoints import MARKER, is_complete, newest_complete


@pytest.fixture(autouse=True)
def unpatch_kernels():
    yield
    remove_kernels()


class PoisonAt(TrainerCallback):
    """At the end of step ``step``: a NaN weight (``what="weight"``), or NaN gradients in the next step."""

    def __init__(self, model, step: int, what: str):
        self.param = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
        self.step, self.what, self.armed = step, what, False
        self.param.register_hook(lambda g: g * float("nan") if self.armed else g)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if self.what == "weight":
                with torch.no_grad():
                    self.param.view(-1)[0] = float("nan")
            else:
                self.armed = True
        elif self.armed:
            self.armed = False


def trainer(tmp_path, nan_policy="stop", max_steps=8):
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    args = FastSFTConfig(
        output_dir=str(tmp_path),
        report_to=[],
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        nan_policy=nan_policy,
    )
    data = Dataset.from_list(synthetic_splits(64, 0, seed=4)[0])
    return FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=args)


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint_newest(tmp_path):
    t = trainer(tmp_path)
    t.add_callback(PoisonAt(t.model, step=3, what="weight"))
    t.train()
    assert t.state.global_step == 4  # stopped at the first log that saw it, not at max_steps
    assert t.nonfinite_guard.stopped == "non-finite loss and grad_norm at step 4"
    assert newest_complete(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists() or not is_complete(tmp_path / "checkpoint-4")


def test_a_save_of_non_finite_weights_is_set_aside_and_stops(tmp_path):
    t = trainer(tmp_path)
    t.add_callback(PoisonAt(t.model, step=4, what="weight"))  # poisoned after step 4's log, before its save
    t.train()
    assert t.checkpoint_marker.bad_step == 4 and t.state.global_step == 4
    assert (tmp_path / "checkpoint-4.nonfinite").is_dir() and newest_complete(tmp_path).name == "checkpoint-2"


def test_skip_drops_a_step_with_non_finite_gradients_and_counts_it(tmp_path):
    t = trainer(tmp_path, nan_policy="skip", max_steps=6)
    poison = PoisonAt(t.model, step=2, what="grad")  # step 3's gradients are NaN
    t.add_callback(poison)
    before = {}

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                before.update({n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad})

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:  # the skipped step changed no weight
                after = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
                assert all(torch.equal(after[n], before[n]) for n in before)

    t.add_callback(Snapshot())
    t.train()
    assert t.state.global_step == 6 and t.nonfinite_guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    logs = [row for row in t.state.log_history if "loss" in row]
    assert logs[-1]["skipped_steps"] == 1 and [r["step"] for r in logs if r["loss"] is None] == [3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs if r["step"] != 3)


def test_an_unknown_nan_policy_is_an_error(tmp_path):
    with pytest.raises(FusetuneError, match="nan_policy: expected one of stop, skip"):
        FastSFTConfig(output_dir=str(tmp_path), nan_policy="ignore")


def test_only_whole_checkpoints_are_resumed_from(tmp_path):
    t = trainer(tmp_path, max_steps=4)
    t.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert newest_complete(tmp_path).name == "checkpoint-4"
    listed = json.loads((tmp_path / "checkpoint-4" / MARKER).read_text())["files"]
    assert "trainer_state.json" in listed and any(name.endswith(".safetensors") for name in listed)
    # a copy killed while writing: its marker never came
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-6" / MARKER).unlink()
    # a later one whose optimizer file was cut short after the marker was written
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-8")
    optimizer = tmp_path / "checkpoint-8" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert not is_complete(tmp_path / "checkpoint-6") and not is_complete(tmp_path / "checkpoint-8")
    assert newest_complete(tmp_path).name == "checkpoint-4"
