"""FastDPOTrainer: its fused preference loss against TRL's own DPOTrainer, a short run that learns, and TRL's
path for a loss type the fused loss does not compute."""

import os
import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from fusetune import FastDPOConfig, FastDPOTrainer
from fusetune.data.synthetic import LETTERS, synthetic_splits
from fusetune.errors import FusetuneError
from fusetune.loading import resolve
from fusetune.patching import apply_kernels, remove_kernels
from fusetune.state import state_of
from fusetune_kernels.preference import fused_linear_preference_loss, fused_linear_preference_loss_reference

BATCH = 4


@pytest.fixture(autouse=True)
def unpatch_kernels():
    remove_kernels()  # TRL's own trainer runs the model's own modules
    yield
    remove_kernels()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve("fusetune:tiny_llama")))


def preference_pairs(n, seed):
    """The embedded tasks' prompts; chosen: the right answer, rejected: random letters of the same length."""
    rng = random.Random(seed)
    rows = synthetic_splits(n, 0, seed=seed)[0]
    return Dataset.from_list(
        [
            {
                "prompt": r["prompt"],
                "chosen": r["completion"],
                "rejected": "".join(rng.choice(LETTERS) for _ in r["completion"]),
            }
            for r in rows
        ]
    )


def lora(random_b=True):
    """LoRA on q and v; random_b: B is random too (init_lora_weights=False), so the policy differs from its
    reference (the adapters disabled) at step 1."""
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=not random_b
    )


def dpo_args(config_cls, tmp_path, **kwargs):
    options = dict(
        output_dir=str(tmp_path),
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=BATCH,
        max_length=64,
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
    )
    return config_cls(**{**options, **kwargs})


def first_step(trainer):
    """Loss, LoRA gradients and logged metrics of one compute_loss on the first BATCH pairs."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def trainer_pair(tmp_path, kernels, setup, **options):
    """TRL's own DPOTrainer and a FastDPOTrainer on the same model, data and seed. setup: "lora" (the reference is
    the base model, adapters disabled), "checkpointing" (that, with gradient checkpointing), "precomputed" (that,
    with the reference log-probs precomputed once) or "ref_model" (full fine-tuning against a second model)."""
    data = preference_pairs(8, seed=3)
    options = {"beta": 0.5, "gradient_checkpointing": setup == "checkpointing", **options}
    options["precompute_ref_log_probs"] = setup == "precomputed"

    def build(trainer_cls, config_cls, model, **extra):
        ref = {"ref_model": tiny_model(seed=1)} if setup == "ref_model" else {"peft_config": lora()}
        args = dpo_args(config_cls, tmp_path, **options, **extra)
        return trainer_cls(model, args=args, train_dataset=data, processing_class=_tokenizer(), **ref)

    theirs = build(DPOTrainer, DPOConfig, tiny_model())
    model = tiny_model()
    if kernels == "triton":  # the preference kernel on Triton; the layers' kernels (tested elsewhere) stay off,
        # as the interpreter would take half a minute over them
        apply_kernels(model, "triton", rms_norm=False, add_norm=False, rope=False, glu=False, lora=False)
    ours = build(FastDPOTrainer, FastDPOConfig, model, kernels=kernels, fused_loss=True)
    assert ours.fused_preference and (ours.ref_model is None) == (setup != "ref_model")
    assert state_of(ours.model).backend == kernels
    assert ours._preference_op() is (
        fused_linear_preference_loss if kernels == "triton" else fused_linear_preference_loss_reference
    )
    return theirs, ours


def assert_same_step(theirs, ours):
    want_loss, want_grads, want_metrics = first_step(theirs)
    loss, grads, metrics = first_step(ours)
    assert abs(want_metrics["rewards/margins"]) > 1e-3  # the policy is not its reference: a real test
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-6), key
    assert metrics["num_tokens"] == want_metrics["num_tokens"]
    return grads


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_loss_and_gradients_equal_trls(tmp_path, kernels, loss_type):
    if kernels == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1: Triton kernels cannot run")
    smoothing = {"label_smoothing": 0.2} if loss_type == "robust" else {}
    grads = assert_same_step(*trainer_pair(tmp_path, kernels, "lora", loss_type=loss_type, **smoothing))
    assert len(grads) == 16  # LoRA A and B of q and v in 4 layers


@pytest.mark.parametrize("setup", ["checkpointing", "precomputed", "ref_model"])
def test_the_reference_equals_trls_however_it_is_given(tmp_path, setup):
    assert_same_step(*trainer_pair(tmp_path, "reference", setup, loss_type="sigmoid"))


def test_a_short_run_learns_the_preference(tmp_path):
    args = dpo_args(FastDPOConfig, tmp_path, kernels="reference", max_steps=10, learning_rate=2e-2, beta=0.5)
    trainer = FastDPOTrainer(
        tiny_model(),
        args=args,
        train_dataset=preference_pairs(8, seed=5),
        processing_class=_tokenizer(),
        peft_config=lora(random_b=False),
    )
    assert trainer.fused_preference
    trainer.train()
    logs = [row for row in trainer.state.log_history if "rewards/margins" in row]
    assert len(logs) == 10 and logs[0]["rewards/margins"] == 0.0  # LoRA starts as its reference
    assert logs[-1]["rewards/margins"] > 0.5 and logs[-1]["rewards/accuracies"] == 1.0, logs[-1]
    assert logs[-1]["loss"] < logs[0]["loss"]
    evaluated = trainer.evaluate(preference_pairs(4, seed=6))  # the fused path under no_grad, TRL's eval_ names
    assert evaluated["eval_loss"] > 0 and "eval_rewards/margins" in evaluated and "eval_logps/rejected" in evaluated
    assert "eval_entropy" not in evaluated  # TRL's path would log it


def test_a_loss_type_the_fused_loss_lacks_trains_on_trls_path(tmp_path, caplog):
    data = preference_pairs(8, seed=3)
    with caplog.at_level("INFO", logger="fusetune.training.preference_trainer"):
        trainer = FastDPOTrainer(
            tiny_model(),
            args=dpo_args(FastDPOConfig, tmp_path, kernels="reference", loss_type="bco_pair"),
            train_dataset=data,
            processing_class=_tokenizer(),
            peft_config=lora(),
        )
    assert not trainer.fused_preference
    assert "fused preference loss off, TRL's compute_loss instead: loss_type=['bco_pair']" in caplog.text
    loss, _, metrics = first_step(trainer)
    assert torch.isfinite(loss) and "entropy" in metrics  # TRL's own metrics: its path ran
    with pytest.raises(FusetuneError, match=r"^fused_loss=True: not possible here: loss_type=\['bco_pair'\]"):
        FastDPOTrainer(
            tiny_model(),
            args=dpo_args(FastDPOConfig, tmp_path, kernels="reference", loss_type="bco_pair", fused_loss=True),
            train_dataset=data,
            processing_class=_tokenizer(),
            peft_config=lora(),
        )


def _tokenizer():
    from fusetune.loading import load_tokenizer

    return load_tokenizer("fusetune:tiny_llama")


def test_the_config_shares_the_sft_configs_kernels_field_and_precision(tmp_path):
    from fusetune import FastSFTConfig

    assert (
        FastDPOConfig.__dataclass_fields__["kernels"].metadata == FastSFTConfig.__dataclass_fields__["kernels"].metadata
    )
    config = FastDPOConfig(output_dir=str(tmp_path), report_to=[])
    assert config.kernels == "auto" and config.fused_loss is None
    if not torch.cuda.is_available():  # TRL's DPOConfig would say bf16=True
        assert (config.bf16, config.fp16) == (False, False)
        with pytest.warns(UserWarning, match="bf16=True, but there is no CUDA GPU: training in fp32 on the CPU"):
            assert FastDPOConfig(output_dir=str(tmp_path), report_to=[], bf16=True).bf16 is False


def test_a_lora_adapter_on_lm_head_is_refused_in_one_line(tmp_path):
    head_lora = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported") as refused:
        FastDPOTrainer(
            tiny_model(),
            args=dpo_args(FastDPOConfig, tmp_path, kernels="reference"),
            train_dataset=preference_pairs(4, seed=3),
            processing_class=_tokenizer(),
            peft_config=head_lora,
        )
    assert "\n" not in str(refused.value)
