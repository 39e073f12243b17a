"""The preference trainers (DPO, ORPO, SimPO, KTO) keep the run's guards as FastSFTTrainer does: each checkpoint
marked whole, a resumed run continuing the loss curve and the token count, a non-finite weight stopping the run
with the last good checkpoint the newest; ORPO and SimPO, whose TRL trainers count no tokens, count them."""

import pytest
import torch
from transformers import TrainerCallback

from fusetune import FastDPOConfig, FastDPOTrainer
from fusetune.compat.trl import trained_tokens
from fusetune.training.checkpoints import is_complete, newest_complete

from .test_dpo import _tokenizer, dpo_args, lora, preference_pairs, tiny_model
from .test_preference_variants import VARIANTS, build, unpatch_kernels  # noqa: F401 (the fixture)

NAMES = ["dpo", *VARIANTS]


def trainer_for(name: str, tmp_path, **options):
    torch.manual_seed(0)
    if name != "dpo":
        return build(name, True, tmp_path, **options)
    args = dpo_args(FastDPOConfig, tmp_path, kernels="reference", beta=0.5, **options)
    return FastDPOTrainer(
        tiny_model(), args=args, train_dataset=preference_pairs(8, seed=3), processing_class=_tokenizer(),
        peft_config=lora(),
    )  # fmt: skip


def train_losses(trainer) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row}


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_are_marked_and_a_resumed_run_continues_the_losses_and_tokens(name, tmp_path):
    options = dict(max_steps=4, learning_rate=5e-3, save_strategy="steps", save_steps=2)
    whole = trainer_for(name, tmp_path / "whole", **options)
    whole.train()
    assert is_complete(tmp_path / "whole" / "checkpoint-2") and is_complete(tmp_path / "whole" / "checkpoint-4")
    tokens = trained_tokens(whole)
    assert tokens and whole.state.log_history[-2]["num_tokens"] == tokens
    resumed = trainer_for(name, tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert trained_tokens(resumed) == tokens  # not restarted at 0 on resume
    losses = train_losses(whole)  # steps 1 and 2 from the checkpoint's state, 3 and 4 trained again
    assert sorted(losses) == [1, 2, 3, 4] and train_losses(resumed) == pytest.approx(losses, rel=1e-5)


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_orpo_and_simpo_count_the_tokens_they_read(name, tmp_path):
    """Two epochs of eight pairs: every pair's chosen and rejected rows (their prompts included) read twice."""
    trainer = trainer_for(name, tmp_path, max_steps=4, save_strategy="no")
    assert len(trainer.train_dataset) == 8 and trainer.args.per_device_train_batch_size == 4
    trainer.train()
    rows = trainer.train_dataset
    per_epoch = sum(len(ids) for ids in rows["chosen_input_ids"]) + sum(len(ids) for ids in rows["rejected_input_ids"])
    assert trained_tokens(trainer) == 2 * per_epoch
    logged = [row["num_tokens"] for row in trainer.state.log_history if "loss" in row]
    assert logged[-1] == 2 * per_epoch and logged == sorted(logged) and logged[0] > 0


class PoisonAfterStep(TrainerCallback):
    """Sets one trainable weight to NaN at the end of ``step``, before that step's save."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


@pytest.mark.parametrize("name", ["dpo", "orpo", "kto"])  # SimPO is CPO's trainer, built as ORPO's is
def test_a_non_finite_weight_stops_the_run_and_its_checkpoint_is_set_aside(name, tmp_path):
    trainer = trainer_for(name, tmp_path, max_steps=6, save_strategy="steps", save_steps=1)
    trainer.add_callback(PoisonAfterStep(2))
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.checkpoint_marker.bad_step == 2
    assert (tmp_path / "checkpoint-2.nonfinite").is_dir() and not (tmp_path / "checkpoint-3").exists()
    assert newest_complete(tmp_path) == tmp_path / "checkpoint-1"
