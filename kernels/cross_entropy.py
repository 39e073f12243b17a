"""Cross-entropy over a large vocabulary, chunked along the vocabulary.

Computes, per row i of logits x [N, V] with label y_i,

    z = softcap * tanh(scale * x / softcap)      (or z = scale * x without a softcap)
    loss_i = logsumexp(z_i) - z_i[y_i]           (0 where y_i == ignore_index)

then reduces: "sum", "mean" (over non-ignored rows; 0 when all are ignored), "none" (per row, [N]),
or sum / num_items_in_batch when that is given (Hugging Face's exact gradient accumulation).

One program per row walks the row in BLOCK-sized pieces with an online log-sum-exp (running max
and running sum), so no block holds the whole row and nothing of size [N, V] is ever upcast: fp32
lives only in registers. Losses are returned in fp32.

Saved for backward: the logits (a reference, no copy), the labels, and the per-row logsumexp
(fp32, N floats). Backward recomputes softmax blockwise and writes dlogits in the logits dtype.
We do not compute the gradient in forward: that would need a second pass over the logits in
forward plus an [N, V] buffer held from forward to backward (or overwriting the caller's logits),
whereas recomputing reads the logits once more in backward, where the gradient buffer is needed
anyway. Traffic: forward reads N*V logits once; backward reads them once and writes N*V dlogits.

The same row kernel (``ce_rows``) also serves fused_linear_cross_entropy: it can add per-row
entropy and top-1 statistics, and write the gradient in forward, in place, into a scratch buffer.
"""

import torch
import triton
import triton.language as tl

from fusetune_kernels.utils import interpreted, new_empty

REDUCTIONS = ("mean", "sum", "none")
# Largest block of a row that one loop iteration loads (tests lower it to force many blocks).
MAX_BLOCK = 4096


@triton.jit
def _tanh_and_sech2(y):
    """tanh(y) and its derivative 1 - tanh(y)^2, from exp and stable for any |y|: exp(-2|y|)
    never overflows, and 4e / (1 + e)^2 avoids the cancellation in 1 - t^2 as |t| -> 1. Near 0 the
    odd Taylor series keeps full relative precision where 1 - exp(-2|y|) would cancel."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    one_plus_e = 1.0 + e
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    small = a < 0.1
    t = tl.where(small, series, (1.0 - e) / one_plus_e)
    sech2 = tl.where(small, 1.0 - series * series, 4.0 * e / (one_plus_e * one_plus_e))
    return tl.where(y < 0, -t, t), sech2


@triton.jit
def _to_z(x, logit_scale, softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr):
    """Logits as the softmax sees them (fp32), and dz/dx / logit_scale (1 without a softcap)."""
    z = x.to(tl.float32) * logit_scale
    dz = 1.0
    if HAS_SOFTCAP:
        t, dz = _tanh_and_sech2(z * inv_softcap)
        z = softcap * t
    return z, dz


@triton.jit
def _ce_row_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    lse_ptr,
    loss_ptr,
    entropy_ptr,
    top1_ptr,
    row_scale_ptr,
    row_scale_stride,
    n_cols,
    ignore_index,
    logit_scale,
    softcap,
    inv_softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row. COMPUTE_LSE: online pass writing lse, loss (and entropy, top-1); otherwise lse is
    loaded. WRITE_GRAD: a second pass writing row_scale * d loss / d logits (may alias logits)."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    row_logits = logits_ptr + row * logits_row_stride
    cols = tl.arange(0, BLOCK)
    # Ignored rows skip the reading loop entirely.
    n_active = tl.where(valid, n_cols, 0)

    if COMPUTE_LSE:
        m = float("-inf")  # running max of z
        s = 0.0  # running sum of exp(z - m)
        t = 0.0  # running sum of exp(z - m) * (z - m), for the entropy
        best = -1  # running argmax (first index on ties, like torch.argmax)
        for start in range(0, n_active, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(row_logits + offs, mask=mask, other=0.0)
            z, _ = _to_z(x, logit_scale, softcap, inv_softcap, HAS_SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            block_max = tl.max(z, axis=0)
            m_new = tl.maximum(m, block_max)
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            if WRITE_STATS:
                # sum e^(z-m_new)(z-m_new) = alpha * (t + (m - m_new) * s) + sum over this block.
                # The wheres keep -inf * 0 (first block, masked lanes, -inf logits) out of the sums.
                shift = tl.where(s > 0, m - m_new, 0.0) * s
                z_shifted = tl.where(e > 0, z - m_new, 0.0)
                t = alpha * (t + shift) + tl.sum(e * z_shifted, axis=0)
                block_arg = tl.argmax(z, axis=0) + start
                best = tl.where(block_max > m, block_arg, best)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        s = tl.where(valid, s, 1.0)  # ignored rows: no loop ran; keep log finite
        lse = m + tl.log(s)
        in_range = valid & (label >= 0) & (label < n_cols)
        x_label = tl.load(row_logits + label, mask=in_range, other=0.0)
        z_label, _ = _to_z(x_label, logit_scale, softcap, inv_softcap, HAS_SOFTCAP)
        lse = tl.where(valid, lse, 0.0)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(valid, lse - z_label, 0.0))
        if WRITE_STATS:
            # entropy = lse - E[z] = log s - t / s (both relative to the running max).
            entropy = tl.log(s) - t / s
            tl.store(entropy_ptr + row, tl.where(valid, entropy, 0.0))
            tl.store(top1_ptr + row, (valid & (best == label)).to(tl.int8))
    else:
        lse = tl.load(lse_ptr + row)

    if WRITE_GRAD:
        row_scale = tl.load(row_scale_ptr + row * row_scale_stride).to(tl.float32)
        row_grad = grad_ptr + row * grad_row_stride
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(row_logits + offs, mask=offs < n_active, other=0.0)
            z, dz = _to_z(x, logit_scale, softcap, inv_softcap, HAS_SOFTCAP)
            g = (tl.exp(z - lse) - tl.where(offs == label, 1.0, 0.0)) * dz
            g = tl.where(valid, g * (row_scale * logit_scale), 0.0)
            tl.store(row_grad + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_cols: int, elem_size: int):
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    if interpreted():
        return block, 1
    return block, 8 if block * elem_size >= 4096 else 4


def ce_rows(
    logits,
    labels,
    *,
    ignore_index,
    softcap=None,
    logit_scale=1.0,
    lse=None,
    loss=None,
    entropy=None,
    top1=None,
    grad=None,
    row_scale=None,
):
    """Launch the row kernel on 2-D ``logits`` (unit column stride).

    With ``loss`` given: computes lse into ``lse`` (fp32 [N]), loss, and with ``entropy``/``top1``
    the statistics. Without ``loss``: reads ``lse``. With ``grad`` (may be ``logits`` itself): writes
    row_scale[i] * d loss_i / d logits; ``row_scale`` is fp32 of one element (all rows) or [N].
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    assert logits.stride(1) == 1 and labels.is_contiguous() and lse.is_contiguous()
    compute_lse = loss is not None
    write_stats = entropy is not None
    write_grad = grad is not None
    dummy = lse
    if write_grad:
        assert grad.stride(1) == 1 and row_scale.dtype == torch.float32
        scale_stride = 0 if row_scale.numel() == 1 else row_scale.stride(0)
    block, num_warps = _launch_config(n_cols, logits.element_size())
    _ce_row_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        grad if write_grad else logits,
        grad.stride(0) if write_grad else 0,
        labels,
        lse,
        loss if compute_lse else dummy,
        entropy if write_stats else dummy,
        top1 if write_stats else dummy,
        row_scale if write_grad else dummy,
        scale_stride if write_grad else 0,
        n_cols,
        ignore_index,
        float(logit_scale),
        float(softcap) if softcap is not None else 1.0,
        1.0 / softcap if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_LSE=compute_lse,
        WRITE_STATS=write_stats,
        WRITE_GRAD=write_grad,
        BLOCK=block,
        num_warps=num_warps,
    )


def check_reduction(reduction, num_items_in_batch, softcap):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction == "none":
        raise ValueError('num_items_in_batch divides the summed loss; it cannot go with reduction="none"')
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")


def loss_denominator(labels, ignore_index, reduction, num_items_in_batch):
    """What the summed loss is divided by: a tensor or number, or None for "sum" and "none"."""
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            return num_items_in_batch.to(device=labels.device, dtype=torch.float32)
        return float(num_items_in_batch)
    if reduction == "mean":
        return (labels != ignore_index).sum().clamp_min(1).to(torch.float32)
    return None


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, num_items_in_batch, softcap):
        n_rows = logits.shape[0]
        lse = new_empty((n_rows,), dtype=torch.float32, device=logits.device)
        losses = new_empty((n_rows,), dtype=torch.float32, device=logits.device)
        ce_rows(logits, labels, ignore_index=ignore_index, softcap=softcap, lse=lse, loss=losses)
        denominator = loss_denominator(labels, ignore_index, reduction, num_items_in_batch)
        if reduction == "none":
            out = losses
        else:
            out = losses.sum()
            if denominator is not None:
                out = out / denominator
        ctx.save_for_backward(logits, labels, lse)
        ctx.denominator = denominator
        ctx.options = (ignore_index, reduction, softcap)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        ignore_index, reduction, softcap = ctx.options
        row_scale = grad_out.float()
        if reduction != "none":
            if ctx.denominator is not None:
                row_scale = row_scale / ctx.denominator
            row_scale = row_scale.reshape(1)
        dlogits = new_empty(logits.shape, dtype=logits.dtype, device=logits.device)
        ce_rows(
            logits,
            labels,
            ignore_index=ignore_index,
            softcap=softcap,
            lse=lse,
            grad=dlogits,
            row_scale=row_scale,
        )
        return dlogits, None, None, None, None, None


def _flatten(logits, labels):
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1]: got logits {tuple(logits.shape)}, labels {tuple(labels.shape)}"
        )
    if not logits.is_floating_point() or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"need float logits and integer labels, got {logits.dtype} and {labels.dtype}")
    n_cols = logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.reshape(-1, n_cols), labels.reshape(-1).contiguous()


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` [..., V] against integer ``labels`` [...] (fp32 result).

    Ignored rows give 0 loss and 0 gradient. ``num_items_in_batch`` (int or 0-dim tensor) turns the
    loss into sum / num_items_in_batch. ``softcap`` applies z = softcap * tanh(z / softcap) first.
    Labels are used as given: shifting for causal LM stays with the caller.
    """
    check_reduction(reduction, num_items_in_batch, softcap)
    logits_2d, labels_1d = _flatten(logits, labels)
    out = _CrossEntropy.apply(logits_2d, labels_1d, ignore_index, reduction, num_items_in_batch, softcap)
    return out.reshape(labels.shape) if reduction == "none" else out


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    softcap: float | None = None,
) -> torch.Tensor:
    """torch.nn.functional.cross_entropy on logits upcast to (at least) fp32, as Hugging Face does."""
    check_reduction(reduction, num_items_in_batch, softcap)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    if reduction == "none":
        losses = torch.nn.functional.cross_entropy(z, flat_labels, ignore_index=ignore_index, reduction="none")
        return losses.reshape(labels.shape)
    total = torch.nn.functional.cross_entropy(z, flat_labels, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "mean":
        # F.cross_entropy's mean, except 0 (not NaN) when every row is ignored.
        return total / (flat_labels != ignore_index).sum().clamp_min(1)
    return total
