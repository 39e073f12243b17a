"""Fused LoRA linear against its float64 reference: output and every gradient, per dtype."""

import pytest
import torch

from fusetune_kernels.lora import lora_linear, lora_linear_reference

from .conftest import DEVICE
from .parity import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(dtype, adapter_dtype, in_f=48, out_f=40, r=8, bias=True, leading=(3, 7)):
    x = torch.randn(*leading, in_f, device=DEVICE).to(dtype)
    weight = (torch.randn(out_f, in_f, device=DEVICE) / in_f**0.5).to(dtype)
    b = (0.1 * torch.randn(out_f, device=DEVICE)).to(dtype) if bias else None
    # B is nonzero (a trained adapter), so every gradient path carries signal.
    lora_a = (torch.randn(r, in_f, device=DEVICE) / in_f**0.5).to(adapter_dtype)
    lora_b = (torch.randn(out_f, r, device=DEVICE) / r**0.5).to(adapter_dtype)
    return x, weight, b, lora_a, lora_b


def run(fn, tensors, trains, grad):
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(train)
        for t, train in zip(tensors, trains, strict=True)
    ]
    out = fn(*leaves, 1.75)
    out.backward(grad.to(out.dtype))
    return out, [None if t is None or not t.requires_grad else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adapters_fp32", [True, False], ids=["fp32-adapters", "same-dtype-adapters"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("base_trains", [False, True], ids=["frozen-base", "trained-base"])
def test_parity(dtype, adapters_fp32, bias, base_trains):
    adapter_dtype = torch.float32 if adapters_fp32 else dtype
    tensors = make(dtype, adapter_dtype, bias=bias)
    trains = (True, base_trains, base_trains, True, True)
    grad = torch.randn(3, 7, 40, device=DEVICE)
    out, grads = run(lora_linear, tensors, trains, grad)
    ref, ref_grads = run(lora_linear_reference, [None if t is None else t.double() for t in tensors], trains, grad)
    assert out.dtype == dtype and out.shape == (3, 7, 40)
    assert_close(out, ref, dtype, "out")
    names = ("dx", "dweight", "dbias", "dA", "dB")
    for name, g, g_ref, t, train in zip(names, grads, ref_grads, tensors, trains, strict=True):
        if t is None:
            continue
        if not train:
            assert g is None, f"{name} computed for a frozen input"
            continue
        assert g.dtype == t.dtype, f"{name}: {g.dtype} != {t.dtype}"
        assert_close(g, g_ref, dtype, name)


def test_autocast_computes_in_the_autocast_dtype():
    dtype = torch.bfloat16
    x, weight, bias, lora_a, lora_b = make(torch.float32, torch.float32)
    x.requires_grad_()
    lora_a.requires_grad_()
    with torch.autocast(DEVICE, dtype=dtype):
        out = lora_linear(x, weight, bias, lora_a, lora_b, 2.0)
        ref = lora_linear_reference(x.double(), weight.double(), bias.double(), lora_a.double(), lora_b.double(), 2.0)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out")
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lora_a.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(lora_a.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unused_output_saves_what_backward_needs(dtype):
    """compute_output=False in a checkpoint's recompute: the same gradients, no product into y."""
    from .parity import assert_unused_output_recompute

    x, weight, bias, lora_a, lora_b = make(dtype, torch.float32)
    lora_a.requires_grad_()
    lora_b.requires_grad_()

    def node(inp, **kw):
        return lora_linear(inp, weight, bias, lora_a, lora_b, 1.75, **kw)

    assert_unused_output_recompute(node, x, [lora_a, lora_b], torch.randn(3, 7, 40, device=DEVICE))
