"""FP8 base products (fusetune_kernels.fp8) against the exact product, within e4m3's error bounds.

The bounds (u = 2^-4, e4m3's unit roundoff; see the module docstring):
- element-wise, exactly: |y - x W^T| <= eA |B| + |A| eB + eA eB + 2^-8 |y| (+ fp32 accumulation), where an
  operand's error e is u |value| + 2^-10 scale (the subnormal spacing is 2^-9 scale);
- norm-wise: ||y - x W^T|| / ||x W^T|| <= 5% (3.7% measured on Gaussian data, forward and backward).
"""

import re

import pytest
import torch

from fusetune_kernels import fp8, lora_nf4
from fusetune_kernels.fp8 import (
    E4M3_MAX,
    UNIT_ROUNDOFF,
    FP8Weight,
    linear_fp8,
    linear_fp8_reference,
    nf4_to_fp8,
    quantize_weight,
)
from fusetune_kernels.lora import lora_linear, lora_linear_reference
from fusetune_kernels.lora_nf4 import lora_nf4_linear, lora_nf4_linear_reference
from fusetune_kernels.nf4 import NF4Weight, dequantize_nf4_reference

from .conftest import DEVICE, needs_triton_backend
from .parity import assert_unused_output_recompute, rel_err

NORM_BOUND = 0.05
SUBNORMAL = 2.0**-10  # half of e4m3's subnormal spacing, in units of the row's scale
# (tokens, in, out): aligned, an out of 136 and 17, an in of 40 and 33 (padded to 16), one token
SHAPES = [(32, 192, 160), (13, 96, 136), (5, 40, 24), (7, 33, 17), (1, 16, 16)]
DTYPES = [torch.bfloat16, torch.float32]


def _scale(t: torch.Tensor) -> torch.Tensor:
    amax = t.abs().amax(dim=1, keepdim=True)
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def _elementwise_bound(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The bound on |fp8(a b^T) - a b^T| for a [M, K], b [N, K], each quantized per row (float64)."""
    a, b = a.double(), b.double()
    ea = UNIT_ROUNDOFF * a.abs() + SUBNORMAL * _scale(a)
    eb = UNIT_ROUNDOFF * b.abs() + SUBNORMAL * _scale(b)
    accumulation = a.shape[1] * 2.0**-23 * (a.abs() @ b.abs().t())
    return ea @ b.abs().t() + a.abs() @ eb.t() + ea @ eb.t() + 2.0**-8 * out.double().abs() + accumulation


def _inputs(tokens, inp, out, dtype):
    x = torch.randn(tokens, inp).to(dtype)
    w = (torch.randn(out, inp) / inp**0.5).to(dtype)
    dy = torch.randn(tokens, out).to(dtype)
    return x, w, dy


def _run(x, w, dy, bias=None):
    x = x.detach().clone().requires_grad_()
    y = linear_fp8(x, w, bias)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_input_grad_within_bounds(shape, dtype):
    x, w, dy = _inputs(*shape, dtype)
    y, dx = _run(x, w, dy)
    exact_y = x.double() @ w.double().t()
    exact_dx = dy.double() @ w.double()
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == exact_y.shape and dx.shape == exact_dx.shape
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (y.double() - exact_y).abs().le(_elementwise_bound(x, w, y)).all()
    # backward: (dy diag(sw)) Wq, i.e. dy against W^T's rows with dy's error measured through the folded scale
    sw = _scale(w.double())
    folded = dy.double() * sw.t()
    e_dy = UNIT_ROUNDOFF * dy.double().abs() + SUBNORMAL * _scale(folded) / sw.t()
    e_w = UNIT_ROUNDOFF * w.double().abs() + SUBNORMAL * sw
    bound = e_dy @ (w.double().abs() + e_w) + dy.double().abs() @ e_w + 2.0**-8 * dx.double().abs()
    bound += shape[2] * 2.0**-23 * (dy.double().abs() @ w.double().abs())
    assert (dx.double() - exact_dx).abs().le(bound).all()
    if shape[0] * shape[2] >= 256:  # enough elements for the norm-wise figure to mean something
        assert rel_err(y, exact_y) <= NORM_BOUND and rel_err(dx, exact_dx) <= NORM_BOUND


def _awkward_rows(dtype) -> torch.Tensor:
    """Rows spanning 1e-6 to 1e3, a zero row, a row mostly in e4m3's subnormal range, exact rounding ties."""
    t = torch.randn(48, 100) * torch.logspace(-6, 3, 48)[:, None]
    t[3] = 0
    t[5, :50] = 1e-4 * t[5, :50].sign()
    t[7, :8] = torch.tensor([448, 106.25, 1.1875, 3 * 2**-10, 1.5 * 2**-7, -0.0, 5 * 2**-10, 240])  # ties at 448
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["plain", "padded", "column-scale"])
def test_row_quantizer_equals_its_reference_bit_for_bit(dtype, case):
    needs_triton_backend()
    t = _awkward_rows(dtype).to(DEVICE)  # on CUDA: the compiled kernel against torch's CUDA conversion
    kwargs = {
        "plain": {},
        "padded": {"width": 112},
        "column-scale": {"width": 112, "column_scale": torch.rand(100, device=DEVICE) * 9},
    }
    codes, scales = fp8.quantize_rows(t, **kwargs[case])
    ref_codes, ref_scales = fp8.quantize_rows_reference(t, **kwargs[case])
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (48, kwargs[case].get("width", 100))
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8)) and torch.equal(scales, ref_scales)
    codes, scales = codes.cpu(), scales.cpu()
    assert (scales[3] == 1).all() and (codes[3].float() == 0).all()  # a zero row: unit scale, zero codes
    assert (codes[:, 100:].float() == 0).all()
    assert codes.float().abs().amax(dim=1)[torch.arange(48) != 3].eq(E4M3_MAX).all()  # each row's amax is 448


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_gemms_are_the_products_of_the_quantized_operands(shape):
    """Apart from the rounding of its inputs, each product is exact to its bf16 output: y = (sx xq)(sw Wq)^T and
    dx = (sd dq) Wq with dq sd = dy diag(sw), element-wise within 2^-8 of the value (+ fp32 accumulation)."""
    x, w, dy = _inputs(*shape, torch.bfloat16)
    y, dx = _run(x, w, dy)
    held = quantize_weight(w)
    out, inp = held.shape
    xq, sx = fp8.quantize_rows(x)
    w_codes = held.data[:out, :inp].double()
    y_exact = (xq.double() * sx.double()) @ (w_codes * held.scale[0, :out, None].double()).t()
    dq, sd = fp8.quantize_rows(dy.float() * held.scale[:, :out])
    dx_exact = (dq.double() * sd.double()) @ w_codes
    for got, exact, k in [(y, y_exact, inp), (dx, dx_exact, out)]:
        slack = 2.0**-8 * exact.abs() + k * 2.0**-23 * exact.abs().amax()
        assert (got.double() - exact).abs().le(slack).all()


@pytest.mark.parametrize("where", ["tokens", "output-channels"])
def test_outliers_are_absorbed_by_their_scales(where):
    """Tokens (rows of x) or output channels (rows of W) 1e3 and 1e-3 times the rest: each keeps its own error."""
    x, w, dy = _inputs(32, 128, 96, torch.bfloat16)
    factor = torch.ones(32 if where == "tokens" else 96)
    factor[:4], factor[4:8] = 1e3, 1e-3
    if where == "tokens":
        x = (x.float() * factor[:, None]).bfloat16()
    else:
        w = (w.float() * factor[:, None]).bfloat16()
    y, dx = _run(x, w, dy)
    exact = x.double() @ w.double().t()
    rows = exact if where == "tokens" else exact.t()
    got = y.double() if where == "tokens" else y.double().t()
    per_row = (got - rows).norm(dim=1) / rows.norm(dim=1)
    assert per_row.max() <= 2 * NORM_BOUND, per_row
    assert rel_err(dx, dy.double() @ w.double()) <= NORM_BOUND


@pytest.mark.parametrize("zero", ["token", "output-channel", "dy-row", "all"])
def test_zero_rows_stay_zero_and_finite(zero):
    x, w, dy = _inputs(12, 48, 32, torch.bfloat16)
    if zero in ("token", "all"):
        x[3] = 0
    if zero in ("output-channel", "all"):
        w[5] = 0
    if zero in ("dy-row", "all"):
        dy[7] = 0
    if zero == "all":
        x.zero_(), w.zero_(), dy.zero_()
    y, dx = _run(x, w, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (y[3] == 0).all() if zero in ("token", "all") else True
    assert (y[:, 5] == 0).all() if zero in ("output-channel", "all") else True
    assert (dx[7] == 0).all() if zero in ("dy-row", "all") else True
    assert rel_err(y, x.double() @ w.double().t()) <= NORM_BOUND if zero != "all" else (y == 0).all()


@pytest.mark.parametrize("shape", [(136, 96), (17, 33), (160, 192)], ids=lambda s: "x".join(map(str, s)))
def test_weight_is_padded_to_16_with_zeros_and_unit_scales(shape):
    w = torch.randn(*shape).bfloat16()
    held = quantize_weight(w)
    out16, in16 = (-(-shape[0] // 16) * 16, -(-shape[1] // 16) * 16)
    assert held.data.shape == (out16, in16) and held.data.dtype == torch.float8_e4m3fn and held.data.is_contiguous()
    assert held.scale.shape == (1, out16) and held.scale.dtype == torch.float32
    assert (held.data[shape[0] :].float() == 0).all() and (held.data[:, shape[1] :].float() == 0).all()
    assert (held.scale[0, shape[0] :] == 1).all()
    assert held.nbytes == out16 * in16 + 4 * out16
    assert rel_err(held.dequantize(), w.double()) <= 0.04  # one operand's rounding alone
    assert held.data[: shape[0], : shape[1]].float().abs().amax(dim=1).eq(E4M3_MAX).all()  # amax maps to 448


def test_the_weight_gets_no_gradient_and_the_bias_its_own():
    x, w, dy = _inputs(6, 32, 48, torch.float32)
    w.requires_grad_()
    bias = torch.randn(48, requires_grad=True)
    x.requires_grad_()
    y = linear_fp8(x, w, bias)
    y.backward(dy)
    assert w.grad is None and x.grad is not None
    torch.testing.assert_close(bias.grad, dy.sum(0))
    held = quantize_weight(w)
    assert not any(t.requires_grad for t in (held.data, held.scale))
    ref = linear_fp8_reference(x, held, bias)  # the twin dequantizes a held weight
    assert rel_err(y, ref) <= NORM_BOUND


def test_reference_is_the_plain_product():
    x, w, _ = _inputs(5, 32, 16, torch.float32)
    torch.testing.assert_close(linear_fp8_reference(x, w), x @ w.t())


def _lora_inputs(tokens=9, inp=96, out=136, r=8, dtype=torch.bfloat16):
    x, w, dy = _inputs(tokens, inp, out, dtype)
    a = (torch.randn(r, inp) / inp**0.5).requires_grad_()
    b = (torch.randn(out, r) / r**0.5).requires_grad_()
    return x, w, dy, a, b


def _lora_grads(op, x, w, a, b, dy):
    for p in (a, b):
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = op(x, w, None, a, b, 1.5)
    y.backward(dy)
    return [y.detach(), x.grad, a.grad.clone(), b.grad.clone()]


def test_lora_node_over_an_fp8_base_against_its_reference():
    x, w, dy, a, b = _lora_inputs()
    got = _lora_grads(lora_linear, x, quantize_weight(w), a, b, dy)
    expected = _lora_grads(lora_linear_reference, x.double(), w.double(), a, b, dy.double())
    for name, g, e in zip(["y", "dx", "dA", "dB"], got, expected, strict=True):
        assert torch.isfinite(g).all() and rel_err(g, e) <= NORM_BOUND, name


def test_lora_node_over_an_fp8_base_recomputes_without_its_output():
    x, w, dy, a, b = _lora_inputs()
    held = quantize_weight(w)

    def node(inp, compute_output=True):
        return lora_linear(inp, held, None, a, b, 1.5, compute_output=compute_output)

    assert_unused_output_recompute(node, x, [a, b], dy)


@pytest.fixture
def nf4_weight():
    needs_triton_backend()
    from .test_lora_nf4 import nf4_weight

    return nf4_weight


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "fp32-absmax"])
@pytest.mark.parametrize("shape", [(80, 96), (24, 40), (7, 33)], ids=lambda s: "x".join(map(str, s)))
def test_nf4_to_fp8_equals_dequantize_then_quantize(nf4_weight, shape, nested):
    """One kernel, NF4 to e4m3 codes and channel scales, equal bit for bit to the fp32 dequantization quantized
    (quantization blocks that straddle rows, an odd element count, padding to 16)."""
    weight = nf4_weight(*shape)
    if not nested:  # the same codes with the absmax resolved to fp32
        absmax = (
            weight.code2[weight.absmax.long()]
            * weight.absmax2.repeat_interleave(weight.blocksize2)[: weight.absmax.numel()]
            + weight.offset
        )
        weight = NF4Weight(weight.data, absmax, weight.blocksize, weight.code, weight.shape, weight.dtype)
    got = nf4_to_fp8(weight)
    want = quantize_weight(dequantize_nf4_reference(weight, dtype=torch.float32))
    assert got.shape == shape and got.data.shape == want.data.shape and got.dtype == weight.dtype
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(got.scale, want.scale)
    reference = fp8.nf4_to_fp8_reference(weight)
    assert torch.equal(reference.data.view(torch.uint8), want.data.view(torch.uint8))


def test_qlora_node_with_fp8_against_its_reference(nf4_weight, monkeypatch):
    monkeypatch.setattr(lora_nf4, "_workspaces", {})
    weight = nf4_weight(80, 96)
    x, _, dy, a, b = (t.detach().to(DEVICE).requires_grad_(t.requires_grad) for t in _lora_inputs(out=80))
    got = [g for g in _run_nf4(lora_nf4_linear, x, weight, a, b, dy, fp8=True)]
    expected = _run_nf4(lora_nf4_linear_reference, x.double(), weight, a, b, dy.double(), fp8=True)
    for name, g, e in zip(["y", "dx", "dA", "dB"], got, expected, strict=True):
        assert torch.isfinite(g).all() and rel_err(g, e) <= NORM_BOUND, name
    plain = _run_nf4(lora_nf4_linear, x, weight, a, b, dy, fp8=False)
    assert rel_err(got[0], plain[0]) > 1e-3  # fp8=True did take the FP8 products


def _run_nf4(op, x, weight, a, b, dy, fp8):
    for p in (a, b):
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = op(x, weight, None, a, b, 1.5, fp8=fp8)
    y.backward(dy.to(y.dtype))
    return [y.detach(), x.grad, a.grad.clone(), b.grad.clone()]


def test_fp8_weight_is_frozen_data():
    held = quantize_weight(torch.randn(32, 16))
    assert isinstance(held, FP8Weight)
    with pytest.raises(AttributeError):
        held.data = held.data  # frozen: a held weight is never swapped under a saved node


# ---- on a GPU with FP8 tensor cores (the lead runs these) --------------------------------------------------------

needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)",
)
# cuBLASLt's sm90_xmma_gemm_e4m3..., CUTLASS's f8f8bf16_rowwise / float_e4m3_t: a GEMM kernel on e4m3 operands
# (the quantizing casts are elementwise kernels whose names hold Float8_e4m3fn too, and no GEMM word);
# cuBLAS's nvjet kernels spell the operand types as letters, "q" for e4m3 (nvjet_sm90_qqtst_..._ovscale on an H100)
FP8_KERNEL_NAMES = ("e4m3", "f8f8", "fp8", "float8")
GEMM_KERNEL_NAMES = ("gemm", "xmma", "cutlass", "matmul")
NVJET_FP8 = re.compile(r"^nvjet_(sm\d+_)?qq")


def is_fp8_gemm(name: str) -> bool:
    lower = name.lower()
    named = any(k in lower for k in FP8_KERNEL_NAMES) and any(k in lower for k in GEMM_KERNEL_NAMES)
    return named or bool(NVJET_FP8.match(lower))


def _cuda_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("out_in", [(4096, 4096), (14336, 4096), (4096, 14336)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_fp8_gemms_error_against_bf16_on_real_shapes(out_in):
    """2048 tokens through a Llama-8B-shaped weight (a few output channels 8x larger, as trained weights have):
    FP8 within the element-wise bound and 5% norm-wise of the exact product, forward and input gradient, run on
    FP8 GEMM kernels; the bf16 product's error is printed beside it."""
    out_f, in_f = out_in
    torch.manual_seed(0)
    x = torch.randn(2048, in_f, device="cuda").bfloat16()
    w = torch.randn(out_f, in_f, device="cuda") * 0.02
    w[torch.randperm(out_f, device="cuda")[:16]] *= 8
    w = w.bfloat16()
    dy = (torch.randn(2048, out_f, device="cuda") * 1e-3).bfloat16()
    held = quantize_weight(w)
    x_ = x.clone().requires_grad_()
    y = linear_fp8(x_, held)
    y.backward(dy)
    exact_y, exact_dx = x.double() @ w.double().t(), dy.double() @ w.double()
    assert (y.double() - exact_y).abs().le(_elementwise_bound(x, w, y)).all()
    errors = {
        "fp8 y": rel_err(y, exact_y),
        "fp8 dx": rel_err(x_.grad, exact_dx),
        "bf16 y": rel_err(x @ w.t(), exact_y),
        "bf16 dx": rel_err(dy @ w, exact_dx),
    }
    print(f"\n{out_f}x{in_f}, 2048 tokens, relative error against float64: {errors}")
    assert errors["fp8 y"] <= NORM_BOUND and errors["fp8 dx"] <= NORM_BOUND
    names = _cuda_kernels(lambda: linear_fp8(x_, held).backward(dy))
    fp8_gemms = [n for n in names if is_fp8_gemm(n)]
    assert fp8_gemms, f"no FP8 GEMM kernel among {names}"
