"""Fused LoRA linear: y = x @ W^T + b + scaling * (x @ A^T) @ B^T as one autograd node.

PEFT's LoRA layer runs the base linear, then the adapter branch as separate modules: a cast of
x to the adapter dtype (a full fp32 copy of the activations when the adapters are kept in fp32),
two linears, a scaling multiply and an add, each its own op and autograd node. On a 1B model with
LoRA on all seven projections that is about 900 matmul launches and as many small ops per step,
whose host time exceeds the GPU time of a few thousand tokens.

Here the branch is folded into the base product and nothing else is launched:

    forward:   xa = x A^T;  y = s * xa B^T (+ b);  y += x W^T            (mm, addmm, addmm_)
    backward:  g = dy B;  dx = s * g A;  dx += dy W;  dA = s * g^T x;  dB = s * dy^T xa

The rank-r product is written first and the large product accumulates onto it (beta=1: the GEMM's
epilogue reads it while the GEMM is bound by its arithmetic). Adding the rank-r term after the large
product instead would read and write all of y once more, a pass bound by memory bandwidth.

All products run in the compute dtype (autocast's, else x's), with fp32 accumulation; dA and dB
come out in the adapters' dtype (fp32 for PEFT's default), computed by an out_dtype matmul on CUDA.
Saved for backward: x, W, the cast adapters and xa [tokens, r]; no fp32 copy of x. dW and db
only when the base layer trains, dx only when x needs it.

``compute_output=False`` saves the same tensors but skips both products into y and returns y
filled with NaN (so any use of it shows). Checkpointing's recompute runs a layer only for what it
saves; where nothing reads the projection's output there (a decoder layer's down projection),
this drops one matmul per recompute. The reference twin ignores it: its saved tensors are
PyTorch's own, so it always computes y.

The base product is swappable: a frozen base held as an ``FP8Weight`` (``fusetune_kernels.fp8``) runs
x W^T and dy W as scaled FP8 GEMMs instead. Their output cannot be accumulated into an existing y, so the
order turns: the FP8 product writes y (dx), and the rank-r product is added onto it (beta=1), the same
traffic. Saved then: x, the adapters and xa, and the FP8Weight in place of W. The reference twin runs the
plain product with the dequantized W (``fp8.linear_fp8_reference``'s convention).
"""

import torch
import torch.nn.functional as F

from fusetune_kernels.fp8 import FP8Weight, fp8_input_grad, fp8_product
from fusetune_kernels.utils import matmul


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, alpha: float = 1.0) -> torch.Tensor:
    """alpha * a @ b in ``out_dtype``, accumulated in fp32 (``fusetune_kernels.utils.matmul``)."""
    return matmul(a, b, out_dtype, alpha)


def base_plus_lora(x2, w, bias, xa, b, scaling: float) -> torch.Tensor:
    """y = x W^T (+ bias) + s * xa B^T [tokens, out]: the rank-r product first, then x W^T onto it
    (an FP8Weight: x W^T first, then the rank-r product onto it)."""
    if isinstance(w, FP8Weight):
        y = fp8_product(x2, w, xa.dtype)
        if bias is not None:
            y.add_(bias)
        return y.addmm_(xa, b.t(), alpha=scaling)
    if bias is None:
        y = xa.new_empty(xa.shape[0], b.shape[0]).addmm_(xa, b.t(), beta=0, alpha=scaling)
    else:
        y = torch.addmm(bias, xa, b.t(), alpha=scaling)
    return y.addmm_(x2, w.t())


def input_grad(dy2, w, g, a, scaling: float) -> torch.Tensor:
    """dx = dy W + s * g A [tokens, in], in the same order: the rank-r product first (last for an FP8Weight)."""
    if isinstance(w, FP8Weight):
        return fp8_input_grad(dy2, w, g.dtype).addmm_(g, a, alpha=scaling)
    return g.new_empty(g.shape[0], a.shape[1]).addmm_(g, a, beta=0, alpha=scaling).addmm_(dy2, w)


def unused_output(x2: torch.Tensor, out_features: int) -> torch.Tensor:
    """The [tokens, out] output of a node told not to compute it: NaN, so that any use of it shows."""
    return torch.full((x2.shape[0], out_features), float("nan"), dtype=x2.dtype, device=x2.device)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the products run in: autocast's (as F.linear would use), else x's."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, compute_output):
        dtype = matmul_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        fp8 = isinstance(weight, FP8Weight)  # a frozen base held in FP8: no gradient, no cast
        w = weight if fp8 else weight.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        # Every operand is in the compute dtype already, so autocast (if on) has nothing to cast.
        xa = torch.mm(x2, a.t())
        if compute_output:
            y = base_plus_lora(x2, w, None if bias is None else bias.to(dtype), xa, b, scaling)
        else:
            y = unused_output(x2, w.shape[0])
        ctx.scaling = scaling
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, lora_a.dtype, lora_b.dtype)
        ctx.fp8_weight = w if fp8 else None
        ctx.save_for_backward(x2, None if fp8 else w, a, b, xa)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, w, a, b, xa = ctx.saved_tensors
        w = ctx.fp8_weight if w is None else w
        x_dtype, w_dtype, bias_dtype, a_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        s = ctx.scaling
        shape = dy.shape
        dy2 = dy.reshape(-1, shape[-1]).to(x2.dtype)
        dx = dw = dbias = da = db = None
        g = torch.mm(dy2, b) if (need_x or need_a) else None  # [tokens, r]
        if need_x:
            dx = input_grad(dy2, w, g, a, s).to(x_dtype).view(*shape[:-1], w.shape[1])
        if need_a:
            da = _mm(g.t(), x2, a_dtype, alpha=s)
        if need_b:
            db = _mm(dy2.t(), xa, b_dtype, alpha=s)
        if need_w:
            dw = _mm(dy2.t(), x2, w_dtype)
        if need_bias:
            dbias = dy2.sum(0, dtype=torch.float32).to(bias_dtype)
        return dx, dw, dbias, da, db, None, None


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, compute_output: bool = True) -> torch.Tensor:
    """x [..., in], weight [out, in] (or a frozen FP8Weight), bias [out] or None, lora_a [r, in], lora_b [out, r]
    -> [..., out]. ``compute_output=False``: only what backward needs (the output is NaN; see the module docstring)."""
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, float(scaling), compute_output)


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling: float, compute_output: bool = True) -> torch.Tensor:
    """PEFT's own arithmetic: the base linear, then the adapter branch in the adapters' dtype, added.
    ``compute_output`` is accepted and ignored (the output is always computed)."""
    if isinstance(weight, FP8Weight):
        weight = weight.dequantize(x.dtype)
    result = F.linear(x, weight, bias)
    branch = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling
    return (result + branch).to(result.dtype)
