"""Gated activations of a Llama-style MLP: ``act(gate) * up``.

The MLP is ``down_proj(act(gate_proj(x)) * up_proj(x))``; this module fuses only
``act(gate) * up``, for act = silu (SwiGLU, Llama/Mistral/Qwen) or gelu (GeGLU,
Gemma: exact erf gelu or its tanh approximation).

Forward computes in fp32 registers and stores the product in the input dtype.
Saved for backward: ``gate`` and ``up`` (the inputs), not the output; the
backward recomputes the activation and its derivative.
Memory traffic, one launch and one pass each: forward reads gate and up and
writes out (3 tensors); backward reads dout, gate and up and writes dgate and
dup (5 tensors).

``gate`` and ``up`` may be strided along rows (e.g. the two halves of a fused
gate_up projection) without a copy; other layouts are made contiguous.
"""

import torch
import triton
import triton.language as tl

from fusetune_kernels.utils import new_empty

SILU, GELU_ERF, GELU_TANH = 0, 1, 2
_GELU_KINDS = {"none": GELU_ERF, "tanh": GELU_TANH}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(x):
    # exp(-x) overflows to inf for x < -88 and then 1 / inf = 0: no NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _act_and_grad(g, ACTIVATION: tl.constexpr):
    """act(g) and act'(g) in fp32."""
    if ACTIVATION == 0:  # silu(g) = g * sigmoid(g)
        s = _sigmoid(g)
        act = g * s
        grad = s * (1.0 + g * (1.0 - s))
    elif ACTIVATION == 1:  # gelu(g) = g * Phi(g), Phi the normal CDF
        cdf = 0.5 * (1.0 + tl.math.erf(g * SQRT_HALF))
        act = g * cdf
        grad = cdf + g * INV_SQRT_2PI * tl.exp(-0.5 * g * g)
    else:
        # gelu_tanh(g) = 0.5 g (1 + tanh(z)) = g * sigmoid(2 z),
        # z = sqrt(2/pi) (g + 0.044715 g^3). The sigmoid form is tanh written from
        # exp, stable for any |z|. Clamping g to +-100 changes nothing (2|z| > 7e4
        # there, so s is exactly 0 or 1) but keeps g^3 finite for huge fp32 g.
        gc = tl.minimum(tl.maximum(g, -100.0), 100.0)
        gc2 = gc * gc
        z = SQRT_2_OVER_PI * gc * (1.0 + TANH_CUBIC * gc2)
        dz = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * gc2)
        s = _sigmoid(2.0 * z)
        act = g * s
        grad = s + g * (2.0 * s * (1.0 - s)) * dz
    return act, grad


@triton.jit
def _glu_forward_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    gate_row_stride,
    up_row_stride,
    n_cols,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(gate, ACTIVATION)
    out = act * up
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward_kernel(
    dout_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    dout_row_stride,
    gate_row_stride,
    up_row_stride,
    n_cols,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dout = tl.load(dout_ptr + row * dout_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    act, act_grad = _act_and_grad(gate, ACTIVATION)
    dup = dout * act
    dgate = dout * up * act_grad
    out_offsets = row * n_cols + cols
    tl.store(dgate_ptr + out_offsets, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + out_offsets, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] view with unit column stride; copies only when no such view exists."""
    n_cols = t.shape[-1]
    if t.stride(-1) == 1:
        try:
            return t.view(-1, n_cols)
        except RuntimeError:  # leading dims not collapsible into one row stride
            pass
    return t.contiguous().view(-1, n_cols)


def _launch_config(n_cols: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(n_cols), 2048)
    return block, 4 if block <= 1024 else 8


def _check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")
    if gate.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {gate.dtype}; expected one of {_DTYPES}")
    if gate.device != up.device:
        raise ValueError(f"gate and up are on different devices: {gate.device} and {up.device}")
    if gate.dim() == 0:
        raise ValueError("gate and up must have at least one dimension")


class _GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
        shape = gate.shape
        gate2d, up2d = _as_rows(gate), _as_rows(up)
        n_rows, n_cols = gate2d.shape
        out = new_empty(shape, dtype=gate.dtype, device=gate.device)
        if out.numel() > 0:
            block, num_warps = _launch_config(n_cols)
            grid = (n_rows, triton.cdiv(n_cols, block))
            _glu_forward_kernel[grid](
                gate2d,
                up2d,
                out,
                gate2d.stride(0),
                up2d.stride(0),
                n_cols,
                ACTIVATION=activation,
                BLOCK=block,
                num_warps=num_warps,
            )
        ctx.save_for_backward(gate2d, up2d)
        ctx.activation = activation
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate2d, up2d = ctx.saved_tensors
        dout2d = _as_rows(dout)
        n_rows, n_cols = gate2d.shape
        dgate = new_empty(ctx.shape, dtype=gate2d.dtype, device=gate2d.device)
        dup = new_empty(ctx.shape, dtype=up2d.dtype, device=up2d.device)
        if dgate.numel() > 0:
            block, num_warps = _launch_config(n_cols)
            grid = (n_rows, triton.cdiv(n_cols, block))
            _glu_backward_kernel[grid](
                dout2d,
                gate2d,
                up2d,
                dgate,
                dup,
                dout2d.stride(0),
                gate2d.stride(0),
                up2d.stride(0),
                n_cols,
                ACTIVATION=ctx.activation,
                BLOCK=block,
                num_warps=num_warps,
            )
        return dgate, dup, None


def _gelu_kind(approximate: str) -> int:
    if approximate not in _GELU_KINDS:
        raise ValueError(f"approximate must be 'none' (erf gelu) or 'tanh', got {approximate!r}")
    return _GELU_KINDS[approximate]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, fused (Llama/Mistral/Qwen MLP)."""
    _check_inputs(gate, up)
    return _GLUFunction.apply(gate, up, SILU)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What HF's LlamaMLP computes: ACT2FN["silu"](gate) * up."""
    return torch.nn.functional.silu(gate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(gate, approximate) * up, fused; approximate is "none" (erf) or "tanh" (Gemma)."""
    activation = _gelu_kind(approximate)
    _check_inputs(gate, up)
    return _GLUFunction.apply(gate, up, activation)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """ACT2FN["gelu"] ("none") or ACT2FN["gelu_pytorch_tanh"] ("tanh") of gate, times up."""
    _gelu_kind(approximate)
    return torch.nn.functional.gelu(gate, approximate=approximate) * up
