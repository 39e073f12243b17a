"""Residual add + RMSNorm in one launch: the decoder layer's ``hidden = residual + delta; norm(hidden)``.

::

    summed = residual + delta                  # dtype: promote(residual, delta), rounded as torch's add
    normed = rms_norm(summed, weight, eps, gemma)

``normed`` has exactly the rounding of ``fusetune_kernels.rms_norm`` applied to ``summed`` (Llama:
normalise in fp32, round to summed's dtype, multiply by weight; Gemma: ``(1 + weight)`` in fp32).
Both outputs may receive gradients; residual and delta both get::

    d_summed_total = d_summed + d(rms_norm)/d(summed) · d_normed

summed once in fp32 and rounded once (then cast to each input's dtype, as torch's add does).

Saved for backward: summed (flattened to rows), weight and one fp32 rstd per row; not residual or
delta. Memory traffic: forward reads residual and delta and writes summed and normed (plus 4 bytes a
row); backward reads d_normed, d_summed and summed and writes one gradient. The weight gradient,
computed only when weight requires grad, adds one fp32 partial row per program, summed with torch.
The Triton kernels are ``rms_norm``'s own, with their add switched on.
"""

import torch

from fusetune_kernels.rms_norm import backward_rows, check_weight, forward_rows, rms_norm_reference


class _AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, delta, weight, eps, gemma):
        n_cols = residual.shape[-1]
        residual_rows = residual.reshape(-1, n_cols).contiguous()
        delta_rows = delta.reshape(-1, n_cols).contiguous()
        weight = weight.contiguous()
        # Outputs in the caller's shape, not views: summed carries on as the residual stream, and autograd
        # forbids in-place changes to the views a function returns, while a changed saved summed fails loudly.
        normed, rstd, summed = forward_rows(residual_rows, weight, eps, gemma, residual.shape, delta_rows)
        ctx.save_for_backward(summed, weight, rstd)
        ctx.set_materialize_grads(False)  # an output that gets no gradient costs no zeros
        ctx.gemma = gemma
        ctx.input_dtypes = (residual.dtype, delta.dtype)
        return normed, summed

    @staticmethod
    def backward(ctx, dnormed, dsummed):
        summed, weight, rstd = ctx.saved_tensors
        shape, n_cols = summed.shape, summed.shape[-1]
        summed = summed.view(-1, n_cols)
        dsummed_rows = None if dsummed is None else dsummed.reshape(-1, n_cols).contiguous()
        if dnormed is None:
            dx, dweight = dsummed_rows, None
        else:
            dnormed_rows = dnormed.reshape(-1, n_cols).contiguous()
            compute_dweight = ctx.needs_input_grad[2]
            dx, dweight = backward_rows(dnormed_rows, summed, weight, rstd, ctx.gemma, compute_dweight, dsummed_rows)
        dx = dx.view(shape)
        residual_dtype, delta_dtype = ctx.input_dtypes
        dresidual = dx.to(residual_dtype) if ctx.needs_input_grad[0] else None
        ddelta = dx.to(delta_dtype) if ctx.needs_input_grad[1] else None
        return dresidual, ddelta, dweight, None, None


def _check_pair(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> None:
    if residual.shape != delta.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from delta shape {tuple(delta.shape)}")
    if residual.device != delta.device:
        raise ValueError(f"residual is on {residual.device} but delta is on {delta.device}")
    check_weight(residual, weight)


def add_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + delta), residual + delta)`` in one Triton launch. See the module docstring."""
    _check_pair(residual, delta, weight)
    return _AddRMSNormFunction.apply(residual, delta, weight, float(eps), bool(gemma))


def add_rms_norm_reference(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch twin of ``add_rms_norm``: ``summed = residual + delta``, then ``rms_norm_reference``
    (LlamaRMSNorm, or Gemma2RMSNorm when ``gemma``; a true float64 reference for float64 inputs)."""
    _check_pair(residual, delta, weight)
    summed = residual + delta
    return rms_norm_reference(summed, weight, eps, gemma), summed
