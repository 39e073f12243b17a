"""fusetune's checkpointing on patched models: where a decoder layer only adds its MLP's output to the
residual, the recompute leaves the fused LoRA down projection's product out, and every gradient equals
that of an uncheckpointed step."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from fusetune import families, forwards, testing
from fusetune.modules import PROJECTIONS
from fusetune.patching import apply_kernels, remove_kernels
from fusetune_kernels.offloaded_checkpoint import LayerCheckpoint, enable_checkpointing

from ..kernels.conftest import DEVICE, needs_triton_backend
from ..kernels.tiny_models import COMMON, FAMILIES, batch, tiny_model

RANK = 4


@pytest.fixture(autouse=True)
def clean_state():
    needs_triton_backend()
    yield
    testing.set_cpu_simulation(False)
    remove_kernels()


def lora_model(family: str):
    model = get_peft_model(
        tiny_model(family).to(DEVICE),
        LoraConfig(r=RANK, lora_alpha=8, lora_dropout=0.0, target_modules=list(PROJECTIONS)),
    )
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    apply_kernels(model, "triton", rms_norm=False, rope=False, loss=False)  # the MLP and LoRA ops matter here
    return model.train()


class MatmulFlops(TorchDispatchMode):
    """2 * m * n * k for every mm, addmm and addmm_ (torch's FlopCounterMode leaves the in-place one out)."""

    flops = 0
    MM = {torch.ops.aten.mm.default: 0, torch.ops.aten.addmm.default: 1, torch.ops.aten.addmm_.default: 1}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MM:
            first, second = args[self.MM[func]], args[self.MM[func] + 1]
            self.flops += 2 * first.shape[0] * first.shape[1] * second.shape[1]
        return func(*args, **(kwargs or {}))


def step(model, inputs) -> tuple[torch.Tensor, dict, int]:
    """Loss, LoRA gradients, and the matmul FLOPs of the backward (the recompute included)."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, use_cache=False).loss
    with MatmulFlops() as counter:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.flops


def down_projection_flops(tokens: int) -> int:
    """The products into the down projections' outputs, x W^T and xa B^T, over the layers."""
    hidden, intermediate = COMMON["hidden_size"], COMMON["intermediate_size"]
    return COMMON["num_hidden_layers"] * 2 * tokens * hidden * (intermediate + RANK)


@pytest.mark.parametrize(
    "family, offload", [(family, False) for family in FAMILIES] + [("llama", True), ("gemma2", True)]
)
def test_recompute_skips_only_what_nobody_reads(family, offload, monkeypatch):
    testing.set_cpu_simulation(offload)
    model = lora_model(family)
    inputs = {k: v.to(DEVICE) for k, v in batch(model.config.vocab_size).items()}
    tokens = inputs["input_ids"].numel()
    loss, grads, flops = step(model, inputs)  # no checkpointing

    assert enable_checkpointing(model, offload=offload).startswith("offloaded" if offload else "plain")
    layers = model.get_base_model().model.layers
    assert all(isinstance(layer._gradient_checkpointing_func, LayerCheckpoint) for layer in layers)
    ckpt_loss, ckpt_grads, ckpt_flops = step(model, inputs)
    assert torch.equal(ckpt_loss, loss) and set(ckpt_grads) == set(grads)
    for name, grad in ckpt_grads.items():
        assert torch.isfinite(grad).all() and torch.equal(grad, grads[name]), f"{family}: grad {name} differs"

    monkeypatch.setattr(forwards, "recomputing", lambda: None)  # the recompute computes everything
    full_recompute_flops = step(model, inputs)[2]
    skipped = down_projection_flops(tokens) if FEEDS_RESIDUAL_ONLY[family] else 0
    assert full_recompute_flops - ckpt_flops == skipped
    assert full_recompute_flops > flops  # the recompute is counted at all


def test_a_norm_after_the_mlp_would_read_the_skipped_output(monkeypatch):
    """Gemma-2 normalises the MLP's output before the residual add: skipping its product there would
    train on NaN. Its derived row says so, and the test above would see it."""
    monkeypatch.setattr(families, "_rows", {})
    monkeypatch.setitem(families.OVERRIDES, "gemma2", {"mlp_output_feeds_residual_only": True})
    model = lora_model("gemma2")
    enable_checkpointing(model, offload=False)
    _, grads, _ = step(model, {k: v.to(DEVICE) for k, v in batch(model.config.vocab_size).items()})
    assert not all(torch.isfinite(g).all() for g in grads.values())


# Read off each decoder layer by hand: Gemma-2 normalises the MLP's output (post_feedforward_layernorm).
FEEDS_RESIDUAL_ONLY = {"llama": True, "mistral": True, "qwen2": True, "qwen3": True, "gemma": True, "gemma2": False}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_derived_flag_matches_the_decoder_layer(family):
    assert families.derive(tiny_model(family).config).mlp_output_feeds_residual_only == FEEDS_RESIDUAL_ONLY[family]
