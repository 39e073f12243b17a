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
relative rounding error of one operand (~2.6%), 3.7% measured for Gaussian data, forward and backward alike
(tests/kernels/test_fp8.py holds both bounds: the element-wise one exactly, the norm-wise one at 5%). bf16
products of the same data err by ~0.17%.

Saved for backward: the FP8Weight only (no weight gradient, so neither x nor xq is kept): 0 bytes per token.
Memory traffic per call beyond the GEMMs: quantizing x reads its bf16 values twice (amax, then the scaled
copy, through an fp32 temporary) and writes 1 byte per element, and the same for dy; backward writes W's
e4m3 transpose (1 byte per weight element), freed after the call. An FP8Weight holds 1 byte per weight
element plus 4 per output channel, half of bf16.

CUDA's rules for ``torch._scaled_mm`` with per-row scales: mat1 row-major, mat2 column-major, mat1's columns
and both of mat2's dimensions multiples of 16, fp32 scales of shape [M, 1] and [1, N], bf16 output. Here W is
stored padded with zeros to multiples of 16 in both dimensions (zero rows and columns add nothing), and x or
dy are padded with zero columns only where their width is not a multiple of 16; the output's extra columns are
cut off. The same padded path runs on the CPU (its _scaled_mm has no such rules), so CPU tests cover it.
Accumulation is the GEMM's accurate mode (``use_fast_accum=False``).

The reference twin, ``linear_fp8_reference``, is the plain product x W^T (W dequantized where only an
FP8Weight is held): parity against it measures the whole FP8 error.

``nf4_to_fp8`` takes a QLoRA base (``fusetune_kernels.nf4``) to an FP8Weight: NF4 is dequantized into a
workspace shared by every layer (as ``fusetune_kernels.lora_nf4`` does) in the compute dtype, then quantized
per output channel, so it equals dequantize-then-quantize exactly.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusetune_kernels.nf4 import NF4Weight, dequantize_nf4

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
UNIT_ROUNDOFF = 2.0**-4  # half of e4m3's relative spacing (3 mantissa bits)
ALIGN = 16  # what torch._scaled_mm needs of the reduced and the weight's dimensions on CUDA
OUT_DTYPE = torch.bfloat16  # the output dtype _scaled_mm supports with per-row scales on every FP8 GPU


def _padded(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [R, C], fp32 scales [R, 1]) with t ~ scales * codes: one scale per row, amax / 448; 1 for a zero row."""
    amax = t.abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    codes = (t.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale


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
    w = weight.detach()
    if (out, inp) != (_padded(out), _padded(inp)):
        w = F.pad(w, (0, _padded(inp) - inp, 0, _padded(out) - out))
    codes, scale = quantize_rows(w)
    return FP8Weight(data=codes, scale=scale.reshape(1, -1).contiguous(), shape=(out, inp), dtype=weight.dtype)


_nf4_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def nf4_to_fp8(weight: NF4Weight, dtype: torch.dtype = torch.bfloat16) -> FP8Weight:
    """The NF4 weight as an FP8Weight: dequantized in ``dtype`` into a shared workspace, quantized per channel."""
    key = (weight.device, dtype)
    buffer = _nf4_workspaces.get(key)
    if buffer is None or buffer.numel() < weight.numel:
        _nf4_workspaces[key] = buffer = None  # free the old one first
        _nf4_workspaces[key] = buffer = torch.empty(weight.numel, dtype=dtype, device=weight.device)
    w = dequantize_nf4(weight, out=buffer[: weight.numel].view(weight.shape))
    return quantize_weight(w)


def _pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]))


def _scaled_mm(a_codes, a_scale, b_codes_t, b_scale, columns: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch._scaled_mm(a_codes, b_codes_t, scale_a=a_scale, scale_b=b_scale, out_dtype=OUT_DTYPE)
    if out.shape[1] != columns:
        out = out[:, :columns].contiguous()
    return out if dtype == OUT_DTYPE else out.to(dtype)


def fp8_product(x2: torch.Tensor, weight: FP8Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x W^T [tokens, out] in ``dtype`` (default x's): x quantized per token, one scaled FP8 GEMM."""
    out16, in16 = weight.data.shape
    codes, scale = quantize_rows(_pad_columns(x2, in16))
    return _scaled_mm(codes, scale, weight.data.t(), weight.scale, weight.shape[0], dtype or x2.dtype)


def fp8_input_grad(dy2: torch.Tensor, weight: FP8Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dy W [tokens, in] in ``dtype`` (default dy's): W's channel scales folded into dy, which is quantized per
    token; one scaled FP8 GEMM against W's codes read transposed (see the module docstring)."""
    out16, in16 = weight.data.shape
    folded = _pad_columns(dy2, out16).float() * weight.scale  # padded channels: dy is 0 there
    codes, scale = quantize_rows(folded)
    del folded
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
