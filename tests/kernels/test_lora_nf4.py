"""QLoRA linear over an NF4 weight against its float64 reference: output and every gradient."""

import pytest
import torch

from fusetune_kernels import lora_nf4
from fusetune_kernels.lora_nf4 import lora_nf4_linear, lora_nf4_linear_reference
from fusetune_kernels.nf4 import NF4Weight

from .conftest import DEVICE, needs_triton_backend
from .parity import assert_close

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALING = 1.75


@pytest.fixture(autouse=True)
def triton_and_a_fresh_workspace(monkeypatch):
    needs_triton_backend()
    monkeypatch.setattr(lora_nf4, "_workspaces", {})


def nf4_weight(out_f, in_f, blocksize=64) -> NF4Weight:
    """A random fp32 weight quantized (double quant) by bitsandbytes on the CPU."""
    w = torch.randn(out_f, in_f) / in_f**0.5
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    param = bnb.nn.Params4bit(packed, quant_state=state, blocksize=blocksize, quant_type="nf4", bnb_quantized=True)
    return NF4Weight.from_bnb(param if DEVICE == "cpu" else param.to(DEVICE))


def adapters(out_f, in_f, r, dtype, bias=True):
    b = (0.1 * torch.randn(out_f, device=DEVICE)).to(dtype) if bias else None
    # B is nonzero (a trained adapter), so every gradient path carries signal.
    lora_a = (torch.randn(r, in_f, device=DEVICE) / in_f**0.5).to(dtype)
    lora_b = (torch.randn(out_f, r, device=DEVICE) / r**0.5).to(dtype)
    return b, lora_a, lora_b


def leaves(tensors, trains, cast=None):
    return [
        None if t is None else (t if cast is None else t.to(cast)).detach().clone().requires_grad_(train)
        for t, train in zip(tensors, trains, strict=True)
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adapters_fp32", [True, False], ids=["fp32-adapters", "same-dtype-adapters"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("x_trains", [True, False], ids=["dx", "no-dx"])
def test_parity(dtype, adapters_fp32, bias, x_trains):
    out_f, in_f, r = 80, 96, 8
    weight = nf4_weight(out_f, in_f)
    x = torch.randn(2, 5, in_f, device=DEVICE).to(dtype)
    tensors = [x, *adapters(out_f, in_f, r, torch.float32 if adapters_fp32 else dtype, bias)]
    trains = (x_trains, True, True, True)
    grad = torch.randn(2, 5, out_f, device=DEVICE)

    x_, b_, a_, b2_ = fast = leaves(tensors, trains)
    out = lora_nf4_linear(x_, weight, b_, a_, b2_, SCALING)
    out.backward(grad.to(out.dtype))
    x_, b_, a_, b2_ = ref = leaves(tensors, trains, cast=torch.float64)
    ref_out = lora_nf4_linear_reference(x_, weight, b_, a_, b2_, SCALING)
    ref_out.backward(grad.double())

    assert out.dtype == dtype and out.shape == (2, 5, out_f)
    assert_close(out, ref_out, dtype, "out")
    for name, t, t_ref in zip(("dx", "dbias", "dA", "dB"), fast, ref, strict=True):
        if t is None:
            continue
        if not t.requires_grad:
            assert t.grad is None, f"{name} computed for a frozen input"
            continue
        assert t.grad.dtype == t.dtype, f"{name}: {t.grad.dtype} != {t.dtype}"
        assert_close(t.grad, t_ref.grad, dtype, name)


def test_saves_no_dequantized_weight():
    out_f, in_f, r = 96, 64, 4
    weight = nf4_weight(out_f, in_f)
    bias, lora_a, lora_b = adapters(out_f, in_f, r, torch.float32)
    x = torch.randn(3, 7, in_f, device=DEVICE, requires_grad=True)
    lora_a.requires_grad_()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lora_nf4_linear(x, weight, bias, lora_a, lora_b, SCALING)
    assert saved, "nothing saved: the hook did not see the node"
    assert all(torch.Size(s).numel() != out_f * in_f for s in saved), f"a weight-sized tensor is saved: {saved}"
    assert sorted(saved) == sorted([(21, in_f), (r, in_f), (out_f, r), (21, r)]), saved
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(lora_a.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layers_in_sequence_share_the_workspace(dtype):
    # 64 -> 96 -> 128 -> 48: the workspace grows for the second layer and is reused by the third,
    # then backward dequantizes all three again, in reverse, into the same buffer.
    dims, r = [64, 96, 128, 48], 4
    weights = [nf4_weight(o, i) for i, o in zip(dims[:-1], dims[1:], strict=True)]
    params = [t for i, o in zip(dims[:-1], dims[1:], strict=True) for t in adapters(o, i, r, torch.float32)]
    x = torch.randn(2, 6, dims[0], device=DEVICE).to(dtype)
    grad = torch.randn(2, 6, dims[-1], device=DEVICE)

    def chain(fn, x, params):
        for k, weight in enumerate(weights):
            x = fn(x, weight, *params[3 * k : 3 * k + 3], SCALING)
        return x

    fast = leaves([x, *params], [True] * (1 + len(params)))
    out = chain(lora_nf4_linear, fast[0], fast[1:])
    out.backward(grad.to(out.dtype))
    ref = leaves([x, *params], [True] * (1 + len(params)), cast=torch.float64)
    ref_out = chain(lora_nf4_linear_reference, ref[0], ref[1:])
    ref_out.backward(grad.double())

    (buffer,) = lora_nf4._workspaces.values()
    assert buffer.numel() == 128 * 96 and buffer.dtype == dtype
    assert_close(out, ref_out, dtype, "out")
    names = ["dx"] + [f"{n}{k}" for k in range(3) for n in ("dbias", "dA", "dB")]
    for name, t, t_ref in zip(names, fast, ref, strict=True):
        assert_close(t.grad, t_ref.grad, dtype, name)


def test_autocast_computes_in_the_autocast_dtype():
    dtype = torch.bfloat16
    weight = nf4_weight(40, 48)
    bias, lora_a, lora_b = adapters(40, 48, 8, torch.float32)
    x = torch.randn(3, 5, 48, device=DEVICE, requires_grad=True)
    lora_a.requires_grad_()
    with torch.autocast(DEVICE, dtype=dtype):
        out = lora_nf4_linear(x, weight, bias, lora_a, lora_b, 2.0)
        ref = lora_nf4_linear_reference(x.double(), weight, bias.double(), lora_a.double(), lora_b.double(), 2.0)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out")
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lora_a.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(lora_a.grad).all()


def test_rejects_mismatched_adapters():
    weight = nf4_weight(40, 48)
    bias, lora_a, lora_b = adapters(40, 64, 8, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        lora_nf4_linear(torch.randn(2, 64, device=DEVICE), weight, bias, lora_a, lora_b, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unused_output_saves_what_backward_needs(dtype):
    """compute_output=False in a checkpoint's recompute: the same gradients, no dequantization or product
    into y (the workspace is not even created)."""
    from .parity import assert_unused_output_recompute

    out_f, in_f, r = 80, 96, 8
    weight = nf4_weight(out_f, in_f)
    bias, lora_a, lora_b = (t.requires_grad_() for t in adapters(out_f, in_f, r, torch.float32))
    x = torch.randn(2, 5, in_f, device=DEVICE).to(dtype)
    lora_nf4_linear(x, weight, bias, lora_a, lora_b, SCALING, compute_output=False)
    assert lora_nf4._workspaces == {}

    def node(inp, **kw):
        return lora_nf4_linear(inp, weight, bias, lora_a, lora_b, SCALING, **kw)

    assert_unused_output_recompute(node, x, [bias, lora_a, lora_b], torch.randn(2, 5, out_f, device=DEVICE))
