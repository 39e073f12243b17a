"""The LoRA entry of the patch table: PEFT models train the same through the fused node, and every
case the node does not cover keeps PEFT's own forward."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from fusetune.patching import apply_kernels, remove_kernels

from ..kernels.conftest import DEVICE, needs_triton_backend
from ..kernels.parity import assert_close
from ..kernels.tiny_models import batch, tiny_model
from .lora_helpers import TARGETS, count_fused, loss_and_grads, randomize_lora_b


@pytest.fixture(autouse=True)
def unpatch_after():
    yield
    remove_kernels()


def lora_model(dtype=torch.float32, **lora):
    model = tiny_model("llama", dtype=dtype).to(DEVICE)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS, **lora})
    model = get_peft_model(model, config)
    randomize_lora_b(model)
    return model


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_lora_trains_like_peft(backend, monkeypatch):
    if backend == "triton":
        needs_triton_backend()
    model = lora_model()
    inputs = {k: v.to(DEVICE) for k, v in batch(model.config.vocab_size).items()}
    ref_loss, ref_grads = loss_and_grads(model, inputs)  # PEFT's forward, HF's loss
    calls = count_fused(monkeypatch, backend)
    apply_kernels(model, backend)
    assert getattr(LoraLinear.forward, "_fusetune", False)
    loss, grads = loss_and_grads(model, inputs)
    assert len(calls) == 2 * len(TARGETS)  # every LoRA layer of both decoder layers took the fused node
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert set(grads) == set(ref_grads) and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}", tol=1e-4)
    remove_kernels()
    assert not getattr(LoraLinear.forward, "_fusetune", False)


@pytest.mark.parametrize(
    "case",
    ["dropout", "dora", "disabled", "merged", "two-adapters", "lora-bias"],
)
def test_everything_else_keeps_peft_forward(case, monkeypatch):
    lora = {"lora_dropout": 0.1} if case == "dropout" else {"use_dora": True} if case == "dora" else {}
    if case == "lora-bias":
        lora["lora_bias"] = True
    model = lora_model(**lora)
    if case == "two-adapters":
        model.add_adapter("second", LoraConfig(r=2, target_modules=TARGETS))
        model.base_model.set_adapter(["default", "second"])
    inputs = {k: v.to(DEVICE) for k, v in batch(model.config.vocab_size).items()}
    model.train()
    torch.manual_seed(0)

    def forward():
        if case == "disabled":
            with model.disable_adapter():
                return model(**inputs, use_cache=False).loss
        return model(**inputs, use_cache=False).loss

    if case == "merged":
        model.merge_adapter()
    expected = forward()
    calls = count_fused(monkeypatch, "reference")
    apply_kernels(model, "reference")
    torch.manual_seed(0)
    got = forward()
    assert calls == []
    assert_close(got.detach(), expected.detach(), torch.float32, "loss")


def test_dropout_in_eval_is_fused(monkeypatch):
    model = lora_model(lora_dropout=0.1).eval()
    calls = count_fused(monkeypatch, "reference")
    apply_kernels(model, "reference")
    with torch.no_grad():
        model(**{k: v.to(DEVICE) for k, v in batch(model.config.vocab_size).items()}, use_cache=False)
    assert len(calls) == 2 * len(TARGETS)
