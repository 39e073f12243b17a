"""RMSNorm over the last dimension, with the exact rounding of Hugging Face's modules.

Llama / Mistral / Qwen2 / Qwen3 (``gemma=False``)::

    n = x.float() * rsqrt(mean(x.float() ** 2, -1) + eps)
    y = weight * n.to(x.dtype)                 # dtype: promote(weight, x)

Gemma / Gemma2 (``gemma=True``)::

    y = (n * (1 + weight.float())).to(x.dtype)

Saved for backward: x (flattened to rows; a view when x is contiguous), weight and one fp32
rstd per row. Memory traffic: forward reads x and writes y (plus 4 bytes a row); backward
reads dy and x and writes dx. The weight gradient, computed only when weight requires grad,
adds one fp32 partial row per program, summed with torch. ``forward_rows`` and ``backward_rows`` also
serve ``add_rms_norm``, whose residual add the same two kernels perform when their ``ADD`` flags are on.
"""

import functools

import torch
import triton
import triton.language as tl

from fusetune_kernels.utils import new_empty, num_warps_for, row_block


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,
    delta_ptr,
    summed_ptr,
    weight_ptr,
    y_ptr,
    rstd_ptr,
    x_row_stride,
    delta_row_stride,
    summed_row_stride,
    y_row_stride,
    n_cols,
    eps,
    GEMMA: tl.constexpr,
    ADD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # With ADD the normalised row is summed = x + delta, stored rounded to summed's dtype; without it,
    # summed_ptr is x itself and only names the dtype the normalised row rounds to.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        delta = tl.load(delta_ptr + row * delta_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + delta).to(summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + row * summed_row_stride + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = x * rstd
    if GEMMA:
        y = normed * (1.0 + weight)
    else:
        # Hugging Face rounds the normalised row to the input dtype before the weight multiply.
        y = normed.to(summed_ptr.dtype.element_ty).to(tl.float32) * weight
    tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr,
    dsummed_ptr,
    x_ptr,
    weight_ptr,
    rstd_ptr,
    dx_ptr,
    dweight_partial_ptr,
    dy_row_stride,
    dsummed_row_stride,
    x_row_stride,
    dx_row_stride,
    n_rows,
    n_cols,
    rows_per_program,
    GEMMA: tl.constexpr,
    ADD_DSUMMED: tl.constexpr,
    COMPUTE_DWEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # With ADD_DSUMMED, dx also carries the gradient that reached the normalised input directly.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        weight = weight + 1.0
    dweight_acc = tl.zeros([BLOCK], dtype=tl.float32)

    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row64 in range(row_start, row_end):
        dy = tl.load(dy_ptr + row64 * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row64 * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row64)
        normed = x * rstd
        dnormed = dy * weight
        # d/dx of x * rstd(x): rstd * (g - n * mean(g * n)).
        dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / n_cols))
        if ADD_DSUMMED:
            dx += tl.load(dsummed_ptr + row64 * dsummed_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row64 * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DWEIGHT:
            if GEMMA:
                dweight_acc += dy * normed
            else:
                dweight_acc += dy * normed.to(x_ptr.dtype.element_ty).to(tl.float32)

    if COMPUTE_DWEIGHT:
        tl.store(dweight_partial_ptr + pid * n_cols + cols, dweight_acc, mask=mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: a few programs, so the row loop is exercised


def forward_rows(x_rows, weight, eps, gemma, out_shape, delta_rows=None):
    """Launch the forward over contiguous rows: ``(y, rstd, summed)``, y (and summed) allocated in
    ``out_shape``, so they are no views. With ``delta_rows`` the rows normalised are
    ``summed = x_rows + delta_rows`` (promoted dtype); without, ``summed`` is ``x_rows``."""
    n_rows, n_cols = x_rows.shape
    if delta_rows is None:
        summed = summed_rows = x_rows
    else:
        summed_dtype = torch.promote_types(x_rows.dtype, delta_rows.dtype)
        summed = new_empty(out_shape, dtype=summed_dtype, device=x_rows.device)
        summed_rows = summed.view(n_rows, n_cols)
    out_dtype = summed.dtype if gemma else torch.promote_types(summed.dtype, weight.dtype)
    y = new_empty(out_shape, dtype=out_dtype, device=x_rows.device)
    y_rows = y.view(n_rows, n_cols)
    rstd = new_empty((n_rows,), dtype=torch.float32, device=x_rows.device)
    block = row_block(n_cols)
    if n_rows > 0:
        delta = x_rows if delta_rows is None else delta_rows  # unread without ADD
        _rms_norm_forward_kernel[(n_rows,)](
            x_rows,
            delta,
            summed_rows,
            weight,
            y_rows,
            rstd,
            x_rows.stride(0),
            delta.stride(0),
            summed_rows.stride(0),
            y_rows.stride(0),
            n_cols,
            eps,
            GEMMA=gemma,
            ADD=delta_rows is not None,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
    return y, rstd, summed


def backward_rows(dy_rows, x_rows, weight, rstd, gemma, compute_dweight, dsummed_rows=None):
    """Launch the backward over contiguous rows: ``(dx, dweight)``, dx in x's dtype, plus ``dsummed_rows``
    where given; dweight is None unless ``compute_dweight``."""
    n_rows, n_cols = x_rows.shape
    dx = new_empty((n_rows, n_cols), dtype=x_rows.dtype, device=x_rows.device)
    if compute_dweight:
        # Few programs, each summing its block of rows into one fp32 partial.
        n_programs = max(1, min(n_rows, 4 * _num_sms(x_rows.device)))
        rows_per_program = triton.cdiv(n_rows, n_programs) if n_rows > 0 else 1
        n_programs = triton.cdiv(n_rows, rows_per_program) if n_rows > 0 else 1
        dweight_partial = new_empty((n_programs, n_cols), dtype=torch.float32, device=x_rows.device)
    else:
        n_programs, rows_per_program = n_rows, 1
        dweight_partial = dx  # unused by the kernel
    block = row_block(n_cols)
    if n_rows > 0:
        dsummed = dy_rows if dsummed_rows is None else dsummed_rows  # unread without ADD_DSUMMED
        _rms_norm_backward_kernel[(n_programs,)](
            dy_rows,
            dsummed,
            x_rows,
            weight,
            rstd,
            dx,
            dweight_partial,
            dy_rows.stride(0),
            dsummed.stride(0),
            x_rows.stride(0),
            dx.stride(0),
            n_rows,
            n_cols,
            rows_per_program,
            GEMMA=gemma,
            ADD_DSUMMED=dsummed_rows is not None,
            COMPUTE_DWEIGHT=compute_dweight,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
    elif compute_dweight:
        dweight_partial.zero_()
    dweight = dweight_partial.sum(0).to(weight.dtype) if compute_dweight else None
    return dx, dweight


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma):
        x_rows = x.reshape(-1, x.shape[-1]).contiguous()
        weight = weight.contiguous()
        y, rstd, _ = forward_rows(x_rows, weight, eps, gemma, x.shape)
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.gemma = gemma
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x_rows, weight, rstd = ctx.saved_tensors
        dy_rows = dy.reshape(-1, x_rows.shape[1]).contiguous()
        dx, dweight = backward_rows(dy_rows, x_rows, weight, rstd, ctx.gemma, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dweight, None, None


def check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension (Triton). See the module docstring."""
    check_weight(x, weight)
    return _RMSNormFunction.apply(x, weight, float(eps), bool(gemma))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False) -> torch.Tensor:
    """Plain PyTorch twin of ``rms_norm``: LlamaRMSNorm, or Gemma2RMSNorm when ``gemma``.

    Where Hugging Face calls ``.float()`` this promotes to at least fp32 instead: the same for
    fp16/bf16/fp32, and a true float64 reference for float64 inputs.
    """
    check_weight(x, weight)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute_dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.to(torch.promote_types(weight.dtype, compute_dtype)))).to(x.dtype)
    return weight * h.to(x.dtype)
