import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

import fusetune_kernels.rms_norm as rms_norm_module
from fusetune_kernels.rms_norm import rms_norm, rms_norm_reference
from fusetune_kernels.utils import interpreted

from .conftest import DEVICE, needs_triton_backend, record_allocations
from .parity import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading dims, hidden): odd token counts, hidden sizes that are not powers of two.
SHAPES = [((7,), 72), ((2, 37), 1000), ((3, 2, 5), 1536)]


def make_weight(hidden, gemma, dtype):
    # Llama weights sit near 1, Gemma's near 0 (it multiplies by 1 + weight).
    centre = 0.0 if gemma else 1.0
    return (centre + 0.5 * torch.randn(hidden, device=DEVICE)).to(dtype)


def check_parity(x, weight, gemma, eps=1e-6, dy=None):
    """Kernel output and gradients against the float64 reference."""
    dtype = x.dtype
    x = x.detach().requires_grad_()
    y = rms_norm(x, weight, eps, gemma)
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_(weight.requires_grad)
    y_ref = rms_norm_reference(x64, w64, eps, gemma)
    expected_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    assert y.dtype == expected_dtype
    assert_close(y, y_ref, dtype, "y")

    if dy is None:
        dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert_close(x.grad, x64.grad, dtype, "dx")
    if weight.requires_grad:
        assert weight.grad.dtype == weight.dtype
        assert_close(weight.grad, w64.grad, dtype, "dweight")  # x.dtype rounding bounds it


@pytest.mark.parametrize("train_weight", [True, False], ids=["full", "frozen"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("leading,hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(dtype, leading, hidden, gemma, train_weight):
    needs_triton_backend()
    x = torch.randn(*leading, hidden, device=DEVICE).to(dtype)
    weight = make_weight(hidden, gemma, dtype).requires_grad_(train_weight)
    check_parity(x, weight, gemma)
    if not train_weight:
        assert weight.grad is None


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_fp32_weight_bf16_input(gemma):
    # Mixed precision: fp32 parameters, bf16 activations. Llama promotes to fp32, Gemma keeps bf16.
    needs_triton_backend()
    x = torch.randn(5, 96, device=DEVICE).to(torch.bfloat16)
    weight = make_weight(96, gemma, torch.float32).requires_grad_()
    check_parity(x, weight, gemma)


def test_large_eps_and_scale():
    # eps matters when rows are tiny; a large eps also checks it is added inside the rsqrt.
    needs_triton_backend()
    x = 1e-3 * torch.randn(9, 200, device=DEVICE)
    weight = make_weight(200, False, torch.float32).requires_grad_()
    check_parity(x, weight, False, eps=1e-5)


def test_non_contiguous_input_and_grad():
    needs_triton_backend()
    x = torch.randn(40, 6, device=DEVICE).t()[:, :33]  # [6, 33] view with strides (1, 6)
    weight = make_weight(33, False, torch.float32).requires_grad_()
    dy = torch.randn(33, 6, device=DEVICE).t()
    check_parity(x, weight, False, dy=dy)


def test_frozen_weight_skips_weight_gradient(monkeypatch):
    # With a frozen weight the backward allocates no fp32 partial sums for dweight.
    needs_triton_backend()
    x = torch.randn(11, 72, device=DEVICE, requires_grad=True)
    weight = make_weight(72, False, torch.float32)
    y = rms_norm(x, weight)
    allocations = record_allocations(monkeypatch, rms_norm_module)
    y.backward(torch.randn_like(y))
    assert allocations == [(11, 72)]  # dx only
    assert weight.grad is None

    weight.requires_grad_()
    allocations.clear()
    rms_norm(x, weight).backward(torch.randn_like(y))
    assert len(allocations) == 4  # y, rstd, dx, dweight partials
    assert weight.grad is not None


def test_empty_rows():
    needs_triton_backend()
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    weight = make_weight(64, False, torch.float32).requires_grad_()
    y = rms_norm(x, weight)
    y.sum().backward()
    assert y.shape == (0, 64)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_bad_weight_shape():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm(x, torch.ones(63, device=DEVICE))
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm_reference(x, torch.ones(2, 64, device=DEVICE))


HF_MODULES = [
    (LlamaRMSNorm, False),
    (Qwen3RMSNorm, False),
    (GemmaRMSNorm, True),
    (Gemma2RMSNorm, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module_cls,gemma", HF_MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_reference_equals_hugging_face(module_cls, gemma, dtype):
    # The reference is bit-for-bit the Hugging Face module, forward and backward.
    hidden, eps = 136, 1e-5
    module = module_cls(hidden, eps=eps).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.copy_(make_weight(hidden, gemma, dtype))
    x = torch.randn(3, 5, hidden, device=DEVICE).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weight = module.weight.detach().clone().requires_grad_()
    dy = torch.randn(3, 5, hidden, device=DEVICE).to(dtype)

    y_hf = module(x)
    y_ref = rms_norm_reference(x_ref, weight, eps, gemma)
    assert y_ref.dtype == y_hf.dtype
    assert torch.equal(y_ref, y_hf)
    y_hf.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(x_ref.grad, x.grad)
    assert torch.equal(weight.grad, module.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_kernel_matches_hugging_face_module(gemma, dtype):
    # The kernel against the module itself, not only the float64 reference: same roundings,
    # so only rare one-ulp differences remain.
    needs_triton_backend()
    if dtype == torch.bfloat16 and interpreted():
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest")
    module_cls = Gemma2RMSNorm if gemma else LlamaRMSNorm
    module = module_cls(200, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.copy_(make_weight(200, gemma, dtype))
    x = torch.randn(13, 200, device=DEVICE).to(dtype)
    y = rms_norm(x, module.weight, 1e-6, gemma)
    y_hf = module(x)
    assert_close(y, y_hf, dtype, "y", tol=1e-4)  # skipping the HF cast gives ~3e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("train_weight", [True, False], ids=["full", "frozen"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("hidden", [4096, 3072, 5120])
def test_parity_large(hidden, gemma, train_weight):
    x = torch.randn(4, 2048, hidden, device=DEVICE).to(torch.bfloat16)
    weight = make_weight(hidden, gemma, torch.bfloat16).requires_grad_(train_weight)
    check_parity(x, weight, gemma)
