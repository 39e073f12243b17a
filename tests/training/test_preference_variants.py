"""ORPO, SimPO and KTO on fusetune's kernels: the first step's loss and LoRA gradients equal TRL's own trainer's
on the same model, data and seed, with the model patched; then a short run whose preference metric rises."""

import warnings

import pytest
import torch
from datasets import Dataset
from trl import KTOConfig, KTOTrainer

from fusetune.patching import active_backends, remove_kernels
from fusetune.state import state_of
from fusetune.training.preference_variants import (
    FastKTOConfig,
    FastKTOTrainer,
    FastORPOConfig,
    FastORPOTrainer,
    FastSimPOConfig,
    FastSimPOTrainer,
)

from .test_dpo import BATCH, _tokenizer, dpo_args, lora, preference_pairs, tiny_model

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer


@pytest.fixture(autouse=True)
def unpatch_kernels():
    remove_kernels()  # TRL's own trainer runs the model's own modules
    yield
    remove_kernels()


def unpaired(pairs: Dataset) -> Dataset:
    """KTO's rows: each pair's chosen completion desirable, its rejected one not, interleaved."""
    rows = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return Dataset.from_list(rows)


# name -> (TRL's trainer and config, ours, the data, options)
VARIANTS = {
    "orpo": (ORPOTrainer, ORPOConfig, FastORPOTrainer, FastORPOConfig, lambda: preference_pairs(8, seed=3), {}),
    "simpo": (
        CPOTrainer, CPOConfig, FastSimPOTrainer, FastSimPOConfig, lambda: preference_pairs(8, seed=3),
        {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5},
    ),
    "kto": (KTOTrainer, KTOConfig, FastKTOTrainer, FastKTOConfig, lambda: unpaired(preference_pairs(8, seed=3)), {}),
}  # fmt: skip


def build(name: str, ours: bool, tmp_path, model=None, **options):
    trl_trainer, trl_config, fast_trainer, fast_config, data, defaults = VARIANTS[name]
    trainer_cls, config_cls = (fast_trainer, fast_config) if ours else (trl_trainer, trl_config)
    extra = {"kernels": "reference"} if ours else {}
    if name == "kto":
        extra["per_device_eval_batch_size"] = BATCH
    args = dpo_args(config_cls, tmp_path, beta=0.5, **defaults, **extra, **options)
    return trainer_cls(
        model or tiny_model(), args=args, train_dataset=data(), processing_class=_tokenizer(), peft_config=lora()
    )


def first_step(trainer):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_first_step_equals_trl_s_own_trainer(name, tmp_path):
    torch.manual_seed(0)
    theirs = build(name, False, tmp_path / "trl")
    their_loss, their_grads = first_step(theirs)
    assert not active_backends()  # TRL's trainer ran the model's own modules
    torch.manual_seed(0)
    ours = build(name, True, tmp_path / "ours")
    assert state_of(ours.model).backend == "reference" and active_backends() == {"llama": "reference"}
    loss, grads = first_step(ours)
    assert torch.isfinite(loss) and abs(loss.item() - their_loss.item()) <= 1e-5 * max(1.0, abs(their_loss.item()))
    assert grads.keys() == their_grads.keys() and grads
    for key, grad in grads.items():
        assert torch.allclose(grad, their_grads[key], rtol=1e-4, atol=1e-6), key


def test_simpo_s_config_defaults_are_simpo_s():
    config = FastSimPOConfig(output_dir="unused", report_to=[])
    assert (config.loss_type, config.cpo_alpha, config.kernels) == ("simpo", 0.0, "auto")


@pytest.mark.parametrize(("name", "metric"), [("orpo", "rewards/accuracies"), ("kto", "kl")])
def test_a_short_run_trains(name, metric, tmp_path):
    """Ten steps at a high learning rate on eight examples: the loss falls (ORPO's reward accuracy rises)."""
    trainer = build(name, True, tmp_path, max_steps=10, learning_rate=5e-3, save_strategy="no")
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 10 and logs[-1]["loss"] < logs[0]["loss"], [r["loss"] for r in logs]
    assert metric in logs[-1]
    if name == "orpo":
        assert logs[-1][metric] >= 0.75, logs[-1]
