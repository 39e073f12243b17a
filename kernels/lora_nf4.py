"""QLoRA linear: y = x @ W^T + b + scaling * (x @ A^T) @ B^T over a frozen NF4 weight W, one autograd node.

    forward:   W = dequant(Wq);  xa = x A^T;  y = s * xa B^T (+ b);  y += x W^T
    backward:  W = dequant(Wq);  g = dy B;  dx = s * g A;  dx += dy W;  dA = s * g^T x;  dB = s * dy^T xa

(the order of the products as in ``fusetune_kernels.lora``, whose helpers run them)

W is dequantized (``fusetune_kernels.nf4``) straight into the compute dtype (autocast's, else
x's) with one rounding from fp32, into a workspace shared by every layer: one buffer per device
and dtype, grown to the largest weight seen. The products run in the compute dtype with fp32
accumulation; dA and dB come out in the adapters' dtype (fp32 for PEFT's default), db in the
bias's, and W gets no gradient. Saved for backward: x (in the compute dtype), the cast adapters
and xa [tokens, r], never the dequantized W: backward dequantizes it again, only if dx is needed.

Why one workspace is safe: every dequantization and matmul is queued on the current stream, and
each dequantized W is consumed by the matmuls queued right after it, before the next layer's
dequantization is queued to overwrite it; nothing that outlives the call (outputs, saved tensors)
aliases the workspace. A grown buffer's old storage goes back to the caching allocator, which
reuses it on the same stream only after the work queued on it. (This holds as long as layers
are not run concurrently on different streams.)

``compute_output=False`` (a recompute whose output nobody reads; see ``fusetune_kernels.lora``)
saves the same tensors and skips the dequantization and both products into y.

``fp8=True`` runs the base products as scaled FP8 GEMMs (``fusetune_kernels.fp8``): W goes from NF4 to
e4m3 with per-output-channel scales in one kernel (``fp8.nf4_to_fp8``, no 16-bit W written) in forward and
again in backward, where dy W uses the same codes transposed. Nothing more is saved. The
reference twin ignores it (the plain product with the dequantized W: parity measures the FP8 error).

Memory traffic per call beyond the matmuls: the dequantization writes out * in elements once in
forward and once in backward, instead of keeping them alive from forward to backward.
"""

import torch
import torch.nn.functional as F

from fusetune_kernels.fp8 import nf4_to_fp8
from fusetune_kernels.lora import _mm, base_plus_lora, input_grad, matmul_dtype, unused_output
from fusetune_kernels.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference
from fusetune_kernels.utils import new_empty

_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _dequantize_into_workspace(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] in ``dtype``, in the shared buffer: valid until the next call on this device."""
    key = (weight.device, dtype)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < weight.numel:
        _workspaces[key] = buffer = None  # free the old one first
        _workspaces[key] = buffer = new_empty((weight.numel,), dtype=dtype, device=weight.device)
    return dequantize_nf4(weight, out=buffer[: weight.numel].view(weight.shape))


class _LoRANF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, compute_output, fp8):
        dtype = matmul_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        # Every operand is in the compute dtype already, so autocast (if on) has nothing to cast.
        xa = torch.mm(x2, a.t())
        if compute_output:
            w = nf4_to_fp8(weight) if fp8 else _dequantize_into_workspace(weight, dtype)
            y = base_plus_lora(x2, w, None if bias is None else bias.to(dtype), xa, b, scaling)
        else:
            y = unused_output(x2, weight.shape[0])
        ctx.weight = weight  # the packed NF4 tensors, not the dequantized W
        ctx.scaling = scaling
        ctx.fp8 = fp8
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype, lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(x2, a, b, xa)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, a, b, xa = ctx.saved_tensors
        x_dtype, bias_dtype, a_dtype, b_dtype = ctx.dtypes
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        s = ctx.scaling
        shape = dy.shape
        dy2 = dy.reshape(-1, shape[-1]).to(x2.dtype)
        dx = dbias = da = db = None
        g = torch.mm(dy2, b) if (need_x or need_a) else None  # [tokens, r]
        if need_x:
            w = nf4_to_fp8(ctx.weight) if ctx.fp8 else _dequantize_into_workspace(ctx.weight, x2.dtype)
            dx = input_grad(dy2, w, g, a, s).to(x_dtype).view(*shape[:-1], w.shape[1])
        if need_a:
            da = _mm(g.t(), x2, a_dtype, alpha=s)
        if need_b:
            db = _mm(dy2.t(), xa, b_dtype, alpha=s)
        if need_bias:
            dbias = dy2.sum(0, dtype=torch.float32).to(bias_dtype)
        return dx, None, dbias, da, db, None, None, None


def _check(weight, lora_a, lora_b) -> None:
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    out_f, in_f = weight.shape
    if lora_a.shape[1] != in_f or lora_b.shape[0] != out_f or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"adapters {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not fit weight {weight.shape}")


def lora_nf4_linear(
    x, weight: NF4Weight, bias, lora_a, lora_b, scaling: float, compute_output: bool = True, fp8: bool = False
) -> torch.Tensor:
    """x [..., in], weight NF4 [out, in], bias [out] or None, lora_a [r, in], lora_b [out, r] -> [..., out].
    ``compute_output=False``: only what backward needs (the output is NaN). ``fp8``: FP8 base products."""
    _check(weight, lora_a, lora_b)
    return _LoRANF4Linear.apply(x, weight, bias, lora_a, lora_b, float(scaling), compute_output, fp8)


def lora_nf4_linear_reference(
    x, weight: NF4Weight, bias, lora_a, lora_b, scaling: float, compute_output: bool = True, fp8: bool = False
) -> torch.Tensor:
    """PEFT over bitsandbytes' Linear4bit: W dequantized to its own dtype, cast to x's, the base linear,
    then the adapter branch in the adapters' dtype, added. ``compute_output`` and ``fp8`` are ignored."""
    _check(weight, lora_a, lora_b)
    w = dequantize_nf4_reference(weight).to(x.dtype)
    result = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    branch = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling
    return (result + branch).to(result.dtype)
