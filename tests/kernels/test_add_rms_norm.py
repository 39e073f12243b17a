import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import fusetune_kernels.rms_norm as rms_norm_module
from fusetune_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference
from fusetune_kernels.rms_norm import rms_norm
from fusetune_kernels.utils import interpreted

from .conftest import DEVICE, TOLERANCE, needs_triton_backend, record_allocations
from .parity import assert_close
from .test_rms_norm import DTYPES, SHAPES, make_weight

UPSTREAMS = ["both", "normed", "summed"]  # which outputs the loss reads


def make_pair(leading, hidden, dtype, delta_dtype=None):
    residual = torch.randn(*leading, hidden, device=DEVICE).to(dtype)
    delta = (0.5 * torch.randn(*leading, hidden, device=DEVICE)).to(delta_dtype or dtype)
    return residual, delta


def upstream_grads(normed, summed, upstream):
    dnormed = torch.randn_like(normed) if upstream in ("both", "normed") else None
    dsummed = torch.randn_like(summed) if upstream in ("both", "summed") else None
    return dnormed, dsummed


def backward(outputs, grads):
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def check_parity(residual, delta, weight, gemma, upstream="both", eps=1e-6):
    """Both outputs and every gradient against the float64 reference."""
    dtype = residual.dtype
    tol = max(TOLERANCE[t.dtype] for t in (residual, delta, weight))  # the least precise input's
    residual = residual.detach().requires_grad_()
    delta = delta.detach().requires_grad_()
    normed, summed = add_rms_norm(residual, delta, weight, eps, gemma)
    r64, d64 = (t.detach().double().requires_grad_() for t in (residual, delta))
    w64 = weight.detach().double().requires_grad_(weight.requires_grad)
    normed_ref, summed_ref = add_rms_norm_reference(r64, d64, w64, eps, gemma)

    summed_dtype = torch.promote_types(residual.dtype, delta.dtype)
    assert summed.dtype == summed_dtype
    assert normed.dtype == (summed_dtype if gemma else torch.promote_types(summed_dtype, weight.dtype))
    assert_close(summed, summed_ref, dtype, "summed", tol)
    assert_close(normed, normed_ref, dtype, "normed", tol)
    if not (summed_dtype == torch.bfloat16 and interpreted()):  # the interpreter truncates to bf16
        assert torch.equal(summed, residual.detach() + delta.detach())  # rounded as torch's add rounds
    # The norm reads the rounded sum: exactly rms_norm of the summed output.
    assert torch.equal(normed, rms_norm(summed.detach(), weight.detach(), eps, gemma))

    grads = upstream_grads(normed, summed, upstream)
    backward((normed, summed), grads)
    backward((normed_ref, summed_ref), [None if g is None else g.double() for g in grads])
    assert residual.grad.dtype == residual.dtype and delta.grad.dtype == delta.dtype
    assert_close(residual.grad, r64.grad, dtype, "dresidual", tol)
    assert_close(delta.grad, d64.grad, dtype, "ddelta", tol)
    if weight.requires_grad and upstream != "summed":
        assert weight.grad.dtype == weight.dtype
        assert_close(weight.grad, w64.grad, dtype, "dweight", tol)
    else:
        assert weight.grad is None
    return residual, delta, grads


@pytest.mark.parametrize("train_weight", [True, False], ids=["full", "frozen"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("leading,hidden", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(dtype, leading, hidden, gemma, train_weight):
    needs_triton_backend()
    residual, delta = make_pair(leading, hidden, dtype)
    weight = make_weight(hidden, gemma, dtype).requires_grad_(train_weight)
    check_parity(residual, delta, weight, gemma)


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_from_either_output(dtype, gemma, upstream):
    needs_triton_backend()
    residual, delta = make_pair((3, 7), 136, dtype)
    weight = make_weight(136, gemma, dtype).requires_grad_()
    residual, delta, (_, dsummed) = check_parity(residual, delta, weight, gemma, upstream)
    assert torch.equal(residual.grad, delta.grad)  # one sum feeds both
    if upstream == "summed":
        assert torch.equal(residual.grad, dsummed)  # no norm backward, no rounding


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_fp32_weight_bf16_input(gemma):
    # Mixed precision: fp32 parameters, bf16 activations. Llama's normed promotes to fp32, Gemma's stays bf16.
    needs_triton_backend()
    residual, delta = make_pair((5,), 96, torch.bfloat16)
    weight = make_weight(96, gemma, torch.float32).requires_grad_()
    check_parity(residual, delta, weight, gemma)


@pytest.mark.parametrize(
    "residual_dtype,delta_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)], ids=str
)
def test_mixed_residual_and_delta_dtypes(residual_dtype, delta_dtype):
    # summed promotes to fp32 as torch's add does; each input's gradient comes back in its own dtype.
    needs_triton_backend()
    residual, delta = make_pair((2, 9), 200, residual_dtype, delta_dtype)
    weight = make_weight(200, False, torch.bfloat16).requires_grad_()
    check_parity(residual, delta, weight, False)


def test_frozen_residual():
    # Only delta needs a gradient (e.g. a frozen embedding feeds the residual stream).
    needs_triton_backend()
    residual, delta = make_pair((4, 3), 72, torch.float32)
    delta.requires_grad_()
    weight = make_weight(72, True, torch.float32).requires_grad_()
    normed, summed = add_rms_norm(residual, delta, weight, gemma=True)
    d64 = delta.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    normed_ref, summed_ref = add_rms_norm_reference(residual.double(), d64, w64, gemma=True)
    grads = upstream_grads(normed, summed, "both")
    backward((normed, summed), grads)
    backward((normed_ref, summed_ref), [g.double() for g in grads])
    assert residual.grad is None
    assert_close(delta.grad, d64.grad, torch.float32, "ddelta")
    assert_close(weight.grad, w64.grad, torch.float32, "dweight")


def test_in_place_change_of_summed_is_caught():
    # summed is saved for backward: editing it in place must fail loudly, not give wrong gradients.
    needs_triton_backend()
    residual, delta = (t.requires_grad_() for t in make_pair((5,), 64, torch.float32))
    normed, summed = add_rms_norm(residual, delta, make_weight(64, False, torch.float32))
    summed.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        normed.sum().backward()


def test_large_eps_and_scale():
    needs_triton_backend()
    residual, delta = (1e-3 * t for t in make_pair((9,), 200, torch.float32))
    weight = make_weight(200, False, torch.float32).requires_grad_()
    check_parity(residual, delta, weight, False, eps=1e-5)


def test_non_contiguous_inputs_and_grads():
    needs_triton_backend()
    residual = torch.randn(40, 6, device=DEVICE).t()[:, :33]  # [6, 33] views with strides (1, 6)
    delta = torch.randn(40, 6, device=DEVICE).t()[:, 5:38]
    weight = make_weight(33, False, torch.float32).requires_grad_()
    r, d = residual.requires_grad_(), delta.requires_grad_()
    normed, summed = add_rms_norm(r, d, weight)
    dnormed, dsummed = (torch.randn(33, 6, device=DEVICE).t() for _ in range(2))
    backward((normed, summed), (dnormed, dsummed))
    r64, d64 = (t.detach().double().requires_grad_() for t in (residual, delta))
    w64 = weight.detach().double().requires_grad_()
    normed_ref, summed_ref = add_rms_norm_reference(r64, d64, w64)
    backward((normed_ref, summed_ref), (dnormed.double(), dsummed.double()))
    assert_close(normed, normed_ref, torch.float32, "normed")
    assert_close(r.grad, r64.grad, torch.float32, "dresidual")
    assert_close(weight.grad, w64.grad, torch.float32, "dweight")


def test_frozen_weight_skips_weight_gradient(monkeypatch):
    # With a frozen weight the backward allocates only the one input gradient.
    needs_triton_backend()
    residual, delta = (t.requires_grad_() for t in make_pair((11,), 72, torch.float32))
    weight = make_weight(72, False, torch.float32)
    normed, summed = add_rms_norm(residual, delta, weight)
    allocations = record_allocations(monkeypatch, rms_norm_module)
    backward((normed, summed), (torch.randn_like(normed), torch.randn_like(summed)))
    assert allocations == [(11, 72)]  # dx only, shared by residual and delta
    assert weight.grad is None

    weight.requires_grad_()
    allocations.clear()
    add_rms_norm(residual, delta, weight)[0].backward(torch.randn_like(normed))
    assert len(allocations) == 5  # summed, normed, rstd, dx, dweight partials
    assert weight.grad is not None


def test_empty_rows():
    needs_triton_backend()
    residual, delta = (t.requires_grad_() for t in make_pair((0,), 64, torch.float32))
    weight = make_weight(64, False, torch.float32).requires_grad_()
    normed, summed = add_rms_norm(residual, delta, weight)
    (normed.sum() + summed.sum()).backward()
    assert normed.shape == summed.shape == (0, 64)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_bad_shapes():
    residual = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="differs from delta shape"):
        add_rms_norm(residual, torch.randn(4, 1, device=DEVICE), torch.ones(64, device=DEVICE))
    with pytest.raises(ValueError, match="hidden size"):
        add_rms_norm(residual, residual, torch.ones(63, device=DEVICE))
    with pytest.raises(ValueError, match="differs from delta shape"):
        add_rms_norm_reference(residual, torch.randn(64, device=DEVICE), torch.ones(64, device=DEVICE))


HF_MODULES = [(LlamaRMSNorm, False), (Gemma2RMSNorm, True)]


def hugging_face_case(module_cls, gemma, dtype):
    """The module with a random weight, an input pair and upstream gradients for both outputs."""
    hidden = 136
    module = module_cls(hidden, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.copy_(make_weight(hidden, gemma, dtype))
    residual, delta = make_pair((3, 5), hidden, dtype)
    dnormed, dsummed = (torch.randn(3, 5, hidden, device=DEVICE).to(dtype) for _ in range(2))
    return module, residual, delta, dnormed, dsummed


def through(fn, module, residual, delta, dnormed, dsummed):
    """Outputs and (dresidual, ddelta, dweight) of ``fn(residual, delta, weight)``, gradients into both outputs."""
    r, d = residual.clone().requires_grad_(), delta.clone().requires_grad_()
    weight = module.weight.detach().clone().requires_grad_()
    normed, summed = fn(r, d, weight)
    backward((normed, summed), (dnormed, dsummed))
    return (normed, summed), (r.grad, d.grad, weight.grad)


def hugging_face(module):
    def run(residual, delta, weight):
        summed = residual + delta
        return torch.func.functional_call(module, {"weight": weight}, (summed,)), summed

    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module_cls,gemma", HF_MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_reference_equals_hugging_face(module_cls, gemma, dtype):
    # The reference is bit-for-bit the module applied to residual + delta, forward and backward.
    module, *case = hugging_face_case(module_cls, gemma, dtype)
    outs_hf, grads_hf = through(hugging_face(module), module, *case)
    outs_ref, grads_ref = through(lambda r, d, w: add_rms_norm_reference(r, d, w, 1e-5, gemma), module, *case)
    for got, expected in zip((*outs_ref, *grads_ref), (*outs_hf, *grads_hf), strict=True):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("module_cls,gemma", HF_MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_kernel_matches_hugging_face_fp32(module_cls, gemma):
    # The kernel against the module itself in fp32, forward and backward, gradients into both outputs.
    needs_triton_backend()
    module, *case = hugging_face_case(module_cls, gemma, torch.float32)
    outs_hf, grads_hf = through(hugging_face(module), module, *case)
    outs, grads = through(lambda r, d, w: add_rms_norm(r, d, w, 1e-5, gemma), module, *case)
    names = ["normed", "summed", "dresidual", "ddelta", "dweight"]
    for got, expected, name in zip((*outs, *grads), (*outs_hf, *grads_hf), names, strict=True):
        assert got.dtype == expected.dtype
        assert_close(got, expected, torch.float32, name)
    assert torch.equal(outs[1], outs_hf[1])  # the same fp32 add


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("train_weight", [True, False], ids=["full", "frozen"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("hidden", [4096, 3072, 5120])
def test_parity_large(hidden, gemma, train_weight):
    residual, delta = make_pair((4, 2048), hidden, torch.bfloat16)
    weight = make_weight(hidden, gemma, torch.bfloat16).requires_grad_(train_weight)
    check_parity(residual, delta, weight, gemma)
