"""The 4-bit LoRA entry of the patch table: PEFT's LoRA over bitsandbytes' NF4 Linear4bit trains the same
through the fused node (kernels/lora_nf4.py), and every case the node does not cover keeps PEFT's forward."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from fusetune.patching import apply_kernels, remove_kernels

from ..kernels.conftest import DEVICE, needs_triton_backend
from ..kernels.parity import assert_close
from ..kernels.tiny_models import batch, tiny_model
from .lora_helpers import TARGETS, count_fused, loss_and_grads, randomize_lora_b


@pytest.fixture(autouse=True)
def unpatch_after():
    yield
    remove_kernels()


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """The tiny Llama with in_features that are multiples of 64, which bitsandbytes' CPU kernels need."""
    folder = tmp_path_factory.mktemp("tiny_nf4")
    tiny_model("llama", hidden_size=128, intermediate_size=192, num_attention_heads=8).save_pretrained(folder)
    return folder


def nf4_lora_model(folder, quant_type="nf4", **lora):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map=DEVICE)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS, **lora})
    model = get_peft_model(model, config)
    # On CPU bitsandbytes repacks a weight for its own kernels when the input needs no grad (layer 0's q, k, v
    # over frozen embeddings); the fused node then steps aside. Input grads, as checkpointing sets them, keep
    # every layer in the NF4 layout.
    model.enable_input_require_grads()
    randomize_lora_b(model)
    return model


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_nf4_lora_trains_like_peft_over_bitsandbytes(backend, saved_tiny, monkeypatch):
    if backend == "triton":
        needs_triton_backend()
    model = nf4_lora_model(saved_tiny)
    inputs = {k: v.to(DEVICE) for k, v in batch(model.config.vocab_size).items()}
    ref_loss, ref_grads = loss_and_grads(model, inputs)  # PEFT's forward over bitsandbytes' matmul
    calls = count_fused(monkeypatch, backend, "lora_nf4_linear")
    apply_kernels(model, backend)
    assert getattr(LoraLinear4bit.forward, "_fusetune", False)
    loss, grads = loss_and_grads(model, inputs)
    assert len(calls) == 2 * len(TARGETS)  # every 4-bit LoRA layer of both decoder layers
    assert_close(loss, ref_loss, torch.float32, "loss", tol=1e-4)
    assert set(grads) == set(ref_grads) and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}", tol=1e-3)
    remove_kernels()
    assert not getattr(LoraLinear4bit.forward, "_fusetune", False)


@pytest.mark.parametrize("case", ["fp4", "dropout", "disabled"])
def test_everything_else_keeps_peft_forward_over_4bit(case, saved_tiny, monkeypatch):
    model = nf4_lora_model(
        saved_tiny, quant_type="fp4" if case == "fp4" else "nf4", lora_dropout=0.1 if case == "dropout" else 0.0
    )
    inputs = {k: v.to(DEVICE) for k, v in batch(model.config.vocab_size).items()}
    model.train()

    def forward():
        torch.manual_seed(0)
        if case == "disabled":
            with model.disable_adapter():
                return model(**inputs, use_cache=False).loss
        return model(**inputs, use_cache=False).loss

    expected = forward()
    calls = count_fused(monkeypatch, "reference", "lora_nf4_linear")
    apply_kernels(model, "reference")
    got = forward()
    assert calls == []
    assert_close(got.detach(), expected.detach(), torch.float32, "loss")
