"""Gradient accumulation is exact: 4 micro-batches x 4 steps equal one batch of 16, loss and LoRA gradients.

Sequences have different numbers of trained tokens, so only a loss normalised by the tokens of the
whole accumulated batch (num_items_in_batch) gets this right. Runs through FastSFTTrainer with the
patched fused loss head, on both kernel backends.
"""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from fusetune.data.synthetic import synthetic_splits
from fusetune.loading import load_model
from fusetune.patching import apply_kernels, remove_kernels
from fusetune.training.trainer import FastSFTConfig, FastSFTTrainer


class CaptureGradients(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(backend, batch_size, accumulation, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = load_model("fusetune:tiny_llama", torch.float32, random_init=True)
    # interpreted Triton: the ops that accumulate across micro-batches (the loss's normalisation, LoRA's gradients)
    interpreted = backend == "triton" and not torch.cuda.is_available()
    apply_kernels(
        model, backend, **(dict(rms_norm=False, add_norm=False, rope=False, glu=False) if interpreted else {})
    )
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    )  # B != 0: every factor has a gradient
    train, _ = synthetic_splits(8, 0, seed=5)
    capture = CaptureGradients()
    args = FastSFTConfig(
        output_dir=str(tmp_path / f"{backend}-{batch_size}"),
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,  # fp32 throughout: the tolerance is fp32's
        fp16=False,
        seed=0,
        data_seed=0,
        save_strategy="no",
    )
    trainer = FastSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train), processing_class=tokenizer, callbacks=[capture]
    )
    trainer.train()
    remove_kernels()
    loss = next(log["loss"] for log in trainer.state.log_history if "loss" in log)
    return loss, capture.grads


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_accumulated_micro_batches_equal_one_big_batch(backend, tiny_tokenizer, tmp_path):
    if backend == "triton":
        from ..kernels.conftest import needs_triton_backend

        needs_triton_backend()
    big_loss, big = one_step(backend, 8, 1, tiny_tokenizer, tmp_path)
    small_loss, small = one_step(backend, 2, 4, tiny_tokenizer, tmp_path)
    assert abs(small_loss - big_loss) <= 1e-5 * abs(big_loss), (small_loss, big_loss)
    assert big.keys() == small.keys() and len(big) == 4 * 3 * 2  # 4 layers x 3 modules x (A, B)
    for name, grad in big.items():
        err = ((small[name] - grad).norm() / grad.norm()).item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
