"""FP8 (e4m3) products with a frozen weight: y = x W^T and dx = dy W as scaled FP8 GEMMs.

Quantization (float8_e4m3fn: 3 mantissa bits, largest finite value 448):

    W  ~ diag(sw) Wq,   sw[n] = amax(|W[n, :]|) / 448      one scale per output channel, held with Wq
    x  ~ diag(sx) xq,   sx[m] = amax(|x[m, :]|) / 448      one scale per token, every call
    a row of zeros gets scale 1 (its codes are zeros), never 0/0

    forward:   y  = diag(sx) (xq Wq^T) diag(sw)                                  (torch._scaled_mm, bf16 out)
    backward:  dx = dy W = (dy diag(sw)) Wq;  dy diag(sw) ~ diag(sd) dq          (torch._scaled_mm, bf16 out)

Why the weight's scale is folded into dy in backward: dx[m, k] = sum_n dy[m, n] sw[n] Wq[n, k] sums over
the output channels, the axis that carries sw, so sw cannot come out of the sum as a per-column scale of
the GEMM. Multiplying dy's columns by sw before dy is quantized per token puts it where it belongs, and then
(1) one e4m3 copy of W serves both products (backward reads it transposed, a byte copy; nothing is quantized
twice), and (2) dx is the exact derivative of the forward's own map diag(sw) Wq, up to dy's rounding: the
gradient belongs to the loss that was computed. Quantizing W^T again per input channel would instead give
backward a second, different W. e4m3 keeps a 2^15 range of normal values per row, so channels whose sw is far
below the row's largest one still round with 3 mantissa bits.

The error (u = 2^-4, e4m3's unit roundoff): each element of x, W and dy diag(sw) rounds with |relative
error| <= u (normal range; below 2^-6 of a row's scale the spacing is 2^-9 scale, absolute), the products
accumulate in fp32 and round once to bf16 (2^-8). So, element-wise,
    |y_fp8 - x W^T| <= (2u + u^2) (|x| |W|^T) + 2^-8 |y| + (subnormal terms),
and norm-wise, with rounding errors that do not line up, ||y_fp8 - y|| / ||y|| is about sqrt(2) times the RMS
relative rounding error of one operand (~2.6%), forward and backward alike (tests/kernels/test_fp8.py holds
both bounds: the element-wise one exactly, the norm-wise one at 5%; kernels/README.md has the errors found
for Gaussian data, against bf16's).

Saved for backward: the FP8Weight only (no weight gradient, so neither x nor xq is kept): 0 bytes per token.
Memory traffic per call beyond the GEMMs: one Triton program per row quantizes x (or dy, its column scales
applied in the same pass, padded columns written as zeros): 2 bytes read and 1 written per element, and 4
bytes of scale per row. Backward also writes W's e4m3 transpose (1 byte per weight element), freed after the
call. An FP8Weight holds 1 byte per weight element plus 4 per output channel, half of bf16. The codes round
to nearest even in integer arithmetic, so ``quantize_rows`` equals its twin ``quantize_rows_reference``
(torch's own conversion) bit for bit; a row holding NaN gives NaN products (its scale may differ then).

CUDA's rules for ``torch._scaled_mm`` with per-row scales: mat1 row-major, mat2 column-major, mat1's columns
and both of mat2's dimensions multiples of 16, fp32 scales of shape [M, 1] and [1, N], bf16 output. Here W is
stored padded with zeros to multiples of 16 in both dimensions (zero rows and columns add nothing), and x or
dy are padded with zero columns only where their width is not a multiple of 16; the output's extra columns are
cut off. The same padded path runs on the CPU, the GEMM as fp32 sums of the (exact) e4m3 products scaled
afterwards, as CUDA's kernel does, so CPU tests cover it.
Accumulation is the GEMM's accurate mode (``use_fast_accum=False``).

The reference twin, ``linear_fp8_reference``, is the plain product x W^T (W dequantized where only an
FP8Weight is held): parity against it measures the whole FP8 error.

``nf4_to_fp8`` takes a QLoRA base (``fusetune_kernels.nf4``) straight to an FP8Weight in one kernel: each
program dequantizes one output channel in fp32 and codes it, so it equals dequantize (in fp32) then quantize
bit for bit, with 0.5 byte read and 1 written per weight element (no 16-bit copy of W is written).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fusetune_kernels.nf4 import NF4Weight, block_scales, dequantize_nf4_reference
from fusetune_kernels.utils import interpreted, new_empty, num_warps_for, row_block

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
UNIT_ROUNDOFF = 2.0**-4  # half of e4m3's relative spacing (3 mantissa bits)
ALIGN = 16  # what torch._scaled_mm needs of the reduced and the weight's dimensions on CUDA
OUT_DTYPE = torch.bfloat16  # the output dtype _scaled_mm supports with per-row scales on every FP8 GPU


def _padded(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


@triton.jit
def _store_row_codes(v, codes_ptr, scales_ptr, row, cols, width):
    # One row of fp32 values (zeros past its end): its amax, its scale, and its codes up to ``width``, rounded to
    # nearest even with integer arithmetic, so they equal torch's own conversion bit for bit (interpreter included).
    amax = tl.max(tl.abs(v), axis=0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    q = tl.math.div_rn(v, scale)
    bits = q.to(tl.int32, bitcast=True)
    sign = ((bits >> 31) & 1) << 7
    magnitude = bits & 0x7FFFFFFF
    a = magnitude.to(tl.float32, bitcast=True)
    # below 2^-6: subnormal codes 0..7 (8 is the smallest normal), a * 2^9 rounded to an integer
    subnormal = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    # 3 mantissa bits: round the fp32 mantissa at bit 20, then rebias the exponent from 127 to 7
    normal = ((magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) - (120 << 3)
    code = tl.where(a < 0.015625, subnormal, normal)
    code = tl.where(magnitude > 0x7F800000, 0x7F, code) | sign  # NaN stays NaN
    tl.store(codes_ptr + row * width + cols, code.to(tl.uint8), mask=cols < width)
    tl.store(scales_ptr + row, scale)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, column_scale_ptr, codes_ptr, scales_ptr, n_cols, width, x_stride,
    HAS_COLUMN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + row * x_stride + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    if HAS_COLUMN_SCALE:
        v = v * tl.load(column_scale_ptr + cols, mask=cols < n_cols, other=0.0)
    _store_row_codes(v, codes_ptr, scales_ptr, row, cols, width)


@triton.jit
def _nf4_rows_kernel(
    data_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, codes_ptr, scales_ptr, n_cols, width,
    NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One row of the NF4 weight dequantized in fp32 as fusetune_kernels.nf4 does (mul, then add), then coded.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    elem = row * n_cols + cols
    packed = tl.load(data_ptr + elem // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(elem % 2 == 0, packed >> 4, packed & 15)  # high nibble first
    blocks = elem // BLOCKSIZE
    scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, mask, NESTED, BLOCKSIZE2)
    v = tl.where(mask, tl.load(code_ptr + nibble) * scale, 0.0)
    _store_row_codes(v, codes_ptr, scales_ptr, row, cols, width)


def _check_rows(t: torch.Tensor, column_scale, width: int | None) -> int:
    if t.dim() != 2:
        raise ValueError(f"quantize_rows takes a 2-D tensor, got {tuple(t.shape)}")
    width = t.shape[1] if width is None else width
    if width < t.shape[1] or (column_scale is not None and column_scale.numel() != t.shape[1]):
        raise ValueError(f"width {width} or column_scale does not fit {tuple(t.shape)}")
    return width


def quantize_rows(t: torch.Tensor, column_scale: torch.Tensor | None = None, width: int | None = None):
    """(e4m3 codes [R, width], fp32 scales [R, 1]) with t diag(column_scale) ~ scales * codes, one scale per row
    (amax / 448; 1 for a row of zeros); columns past t's are zero codes. One Triton program per row on CUDA and
    under TRITON_INTERPRET=1 (rows up to 65536 wide), else ``quantize_rows_reference``; the two agree bit for bit."""
    width = _check_rows(t, column_scale, width)
    if not (t.is_cuda or interpreted()) or width > 65536:
        return quantize_rows_reference(t, column_scale, width)
    t = t if t.stride(1) == 1 else t.contiguous()
    codes = new_empty((t.shape[0], width), dtype=E4M3, device=t.device)
    scales = new_empty((t.shape[0], 1), dtype=torch.float32, device=t.device)
    if t.shape[0] > 0:
        block = row_block(width)
        _quantize_rows_kernel[(t.shape[0],)](
            t, t if column_scale is None else column_scale.float().contiguous(),
            codes.view(torch.uint8), scales, t.shape[1], width, t.stride(0),
            HAS_COLUMN_SCALE=column_scale is not None, BLOCK=block,
            num_warps=num_warps_for(block), enable_fp_fusion=False,
        )  # fmt: skip
    return codes, scales


def quantize_rows_reference(t: torch.Tensor, column_scale: torch.Tensor | None = None, width: int | None = None):
    """Plain PyTorch twin of ``quantize_rows``: the same codes and scales."""
    width = _check_rows(t, column_scale, width)
    v = t.float() if column_scale is None else t.float() * column_scale.float()
    amax = v.abs().amax(dim=1, keepdim=True)
    # divided by a tensor: CUDA divides by a Python number as a product with its reciprocal, one ulp off div_rn
    scale = torch.where(amax > 0, amax / torch.full_like(amax, E4M3_MAX), torch.ones_like(amax))
    codes = (v / scale).to(E4M3)  # |v / scale| <= 448: rounds to nearest even, never saturates
    return (codes if width == t.shape[1] else F.pad(codes.view(torch.uint8), (0, width - t.shape[1])).view(E4M3)), scale


@dataclass(frozen=True, eq=False)
class FP8Weight:
    """A frozen [out, in] weight as e4m3 codes with one fp32 scale per output channel, padded to multiples of 16."""

    data: torch.Tensor  # e4m3 [out16, in16], row-major; rows and columns past ``shape`` are zeros
    scale: torch.Tensor  # fp32 [1, out16]; 1 past ``shape``
    shape: tuple[int, int]  # (out_features, in_features)
    dtype: torch.dtype  # the dtype the weight was quantized from

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """diag(sw) Wq as [out, in] in ``dtype`` (default: the dtype it was quantized from)."""
        out, inp = self.shape
        w = self.data[:out, :inp].float() * self.scale[0, :out, None]
        return w.to(dtype or self.dtype)


def quantize_weight(weight: torch.Tensor) -> FP8Weight:
    """``weight`` [out, in] as an FP8Weight (per-output-channel scales); it is not changed."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight takes a 2-D floating weight, got {tuple(weight.shape)} {weight.dtype}")
    out, inp = weight.shape
    codes, scale = quantize_rows(weight.detach(), width=_padded(inp))
    if out != _padded(out):  # zero rows with unit scales
        codes = F.pad(codes.view(torch.uint8), (0, 0, 0, _padded(out) - out)).view(E4M3)
        scale = F.pad(scale, (0, 0, 0, _padded(out) - out), value=1.0)
    return FP8Weight(data=codes, scale=scale.reshape(1, -1).contiguous(), shape=(out, inp), dtype=weight.dtype)


def _padded_weight(shape: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero codes [out16, in16] and unit scales [out16, 1]: what the padding of an FP8Weight holds."""
    out16, in16 = _padded(shape[0]), _padded(shape[1])
    codes = torch.zeros(out16, in16, dtype=E4M3, device=device)
    return codes, torch.ones(out16, 1, dtype=torch.float32, device=device)


def nf4_to_fp8(weight: NF4Weight) -> FP8Weight:
    """The NF4 weight as an FP8Weight in one pass, one Triton program per output channel: each row dequantized in
    fp32 (no rounding to a 16-bit dtype on the way) and quantized; 0.5 byte read and 1 written per element. On the
    CPU without TRITON_INTERPRET=1, ``nf4_to_fp8_reference``; the two agree bit for bit."""
    if not (weight.device.type == "cuda" or interpreted()) or weight.shape[1] > 65536:
        return nf4_to_fp8_reference(weight)
    codes, scales = _padded_weight(weight.shape, weight.device)
    block = row_block(codes.shape[1])
    dummy = weight.code  # stands in for the unused nested pointers
    _nf4_rows_kernel[(weight.shape[0],)](
        weight.data, weight.absmax, weight.code,
        weight.absmax2 if weight.nested else dummy, weight.code2 if weight.nested else dummy,
        weight.offset if weight.nested else dummy,
        codes.view(torch.uint8), scales, weight.shape[1], codes.shape[1],
        NESTED=weight.nested, BLOCKSIZE=weight.blocksize, BLOCKSIZE2=weight.blocksize2 if weight.nested else 1,
        BLOCK=block, num_warps=num_warps_for(block), enable_fp_fusion=False,
    )  # fmt: skip
    return FP8Weight(data=codes, scale=scales.reshape(1, -1), shape=weight.shape, dtype=weight.dtype)


def nf4_to_fp8_reference(weight: NF4Weight) -> FP8Weight:
    """Dequantize in fp32 (``dequantize_nf4_reference``), then quantize per output channel."""
    fp8 = quantize_weight(dequantize_nf4_reference(weight, dtype=torch.float32))
    return FP8Weight(data=fp8.data, scale=fp8.scale, shape=fp8.shape, dtype=weight.dtype)


def _scaled_mm(a_codes, a_scale, b_codes_t, b_scale, columns: int, dtype: torch.dtype) -> torch.Tensor:
    if a_codes.is_cuda:
        out = torch._scaled_mm(a_codes, b_codes_t, scale_a=a_scale, scale_b=b_scale, out_dtype=OUT_DTYPE)
    else:  # the same product: fp32 sums of exact e4m3 products, then the scales (some CPU builds take per-tensor only)
        out = (torch.mm(a_codes.float(), b_codes_t.float()) * a_scale * b_scale).to(OUT_DTYPE)
    if out.shape[1] != columns:
        out = out[:, :columns].contiguous()
    return out if dtype == OUT_DTYPE else out.to(dtype)


def fp8_product(x2: torch.Tensor, weight: FP8Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x W^T [tokens, out] in ``dtype`` (default x's): x quantized per token, one scaled FP8 GEMM."""
    codes, scale = quantize_rows(x2, width=weight.data.shape[1])
    return _scaled_mm(codes, scale, weight.data.t(), weight.scale, weight.shape[0], dtype or x2.dtype)


def fp8_input_grad(dy2: torch.Tensor, weight: FP8Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dy W [tokens, in] in ``dtype`` (default dy's): W's channel scales folded into dy, which is quantized per
    token; one scaled FP8 GEMM against W's codes read transposed (see the module docstring)."""
    out16, in16 = weight.data.shape
    codes, scale = quantize_rows(dy2, column_scale=weight.scale[0, : dy2.shape[1]], width=out16)
    transposed = weight.data.t().contiguous().t()  # [out16, in16] column-major, as mat2 must be
    ones = torch.ones(1, in16, dtype=torch.float32, device=dy2.device)
    return _scaled_mm(codes, scale, transposed, ones, weight.shape[1], dtype or dy2.dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = fp8_product(x2, weight)
        if bias is not None:
            y = y.add_(bias.to(y.dtype))
        ctx.weight = weight  # the codes and scales, not x: W gets no gradient
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x_dtype, bias_dtype = ctx.dtypes
        need_x, _, need_bias = ctx.needs_input_grad
        shape = dy.shape
        dy2 = dy.reshape(-1, shape[-1])
        dx = dbias = None
        if need_x:
            dx = fp8_input_grad(dy2, ctx.weight, x_dtype).view(*shape[:-1], ctx.weight.shape[1])
        if need_bias:
            dbias = dy2.sum(0, dtype=torch.float32).to(bias_dtype)
        return dx, None, dbias


def _as_fp8(weight) -> FP8Weight:
    return weight if isinstance(weight, FP8Weight) else quantize_weight(weight)


def linear_fp8(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] W^T (+ bias) -> [..., out] through FP8 GEMMs. ``weight``: an FP8Weight, or a frozen [out, in]
    tensor quantized on this call. W never gets a gradient; x and bias do."""
    return _FP8Linear.apply(x, _as_fp8(weight), bias)


def linear_fp8_reference(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain product x W^T (+ bias) in x's dtype; an FP8Weight is dequantized first (it is all that is held)."""
    w = weight.dequantize(x.dtype) if isinstance(weight, FP8Weight) else weight.detach().to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
