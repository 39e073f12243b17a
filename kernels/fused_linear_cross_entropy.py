"""Fused linear cross-entropy: the lm_head matmul and the loss, without [N, V] logits.

Computes cross_entropy((hidden @ weight.T + bias) * logit_scale, labels) with the options of
fusetune_kernels.cross_entropy (ignore_index, reduction, num_items_in_batch, softcap), and
optionally per-token statistics of the softmax: ``entropy`` (fp32) and ``is_top1``
(argmax == label, ties to the first index like torch.argmax); both are 0 / False on ignored rows.

How: only non-ignored rows are kept (one gather). Finding them costs one host sync, since their
count sizes the chunk loop; a caller that knows the labels early (the patched causal-LM forward,
before the backbone runs) passes ``kept_rows`` from ``find_kept_rows(labels)``, so that the sync
happens while the GPU queue is nearly empty instead of at the end of the forward. They are
processed in chunks of C rows. Per chunk: logits = hidden_c @ W^T (+ bias) by torch.matmul in the
input dtype, into one reused [C, V] buffer; the Triton row kernel (logit_scale and softcap folded
in, fp32 in registers) writes loss, lse, stats, and the scaled dlogits in place in that buffer;
then dhidden_c = dlogits @ W and dW += dlogits^T @ hidden_c, dbias += column sums.
dW and dbias accumulate in fp32 across chunks (for fp16/bf16 via torch's out_dtype matmul on CUDA;
one chunk needs no accumulator and goes straight to the weight dtype). dW/dbias are computed only
when weight/bias require grad (a frozen LoRA lm_head pays nothing), dhidden only when hidden does.

A LoRA adapter on the head (logits of h (W + s B A)^T) enters as an optional low-rank term
lora_in @ lora_b^T, lora_in = s h A^T [N, r] (made by the caller, so that its autograd carries A, s and any
dropout on the adapter input) and lora_b = B [V, r]: per chunk the logits gain lora_in_c @ B^T (C*V*r
multiply-adds, r << H), and backward makes dlora_in_c = dlogits @ B and dB += dlogits^T @ lora_in_c
(fp32 accumulator across chunks, like dW). The adapted head W + s B A is never formed.

So gradients are made in forward and backward only scales them by grad_output (in place, so
backward may run once). For reduction="none" the grad_output is per token: dhidden (and dlora_in) rows are scaled
in backward, but dW (dB) cannot be, so when weight, bias or lora_b needs grad, forward keeps only the
per-row lse and backward recomputes each chunk's logits with the per-token scale (one extra
matmul per chunk).

Default chunk: C = the largest multiple of 128 rows with C * V * elem <= 256 MiB (at least 128),
e.g. 1024 rows for V = 128256 in bf16, 512 for V = 256000. When the weight trains the budget is
1 GiB (4096 / 2048 rows): each chunk reads and writes the V*H fp32 dW accumulator, which stays
cheap next to the chunk's matmul only when C is large (timings per C: kernels/README.md).

Peak extra memory of one call (N tokens, n of them not ignored, bf16, e = 2 bytes):
    chunk buffer C*V*e + gathered hidden n*H*e + dhidden n*H*e (+ scatter N*H*e in backward)
    + if weight trains: fp32 accumulator V*H*4 and the final dW V*H*e (+ fp32 dbias V*4)
    + with a head adapter of rank r: gathered lora_in n*r*e + dlora_in n*r*e (r elements a token each, against
      H for hidden) and for dB an fp32 accumulator V*r*4 and dB V*r*e: N=8192, V=128256, r=16, bf16: ~13 MB.
N=8192, H=4096, V=128256: 263 MB + 2 * 67 MB ~= 0.4 GB with a frozen lm_head, and with a trained one
1.05 GB (C=4096) + 2.1 GB + 1.05 GB ~= 4.3 GB, versus 2.1 GB for the bf16 logits alone; the materialised
reference holds the bf16 logits, their fp32 copy, fp32 and bf16 dlogits (peaks on a GPU: kernels/README.md).
Saved for backward: the gradients (n*H, V*H, V, n*r, V*r in the input dtypes), or for "none" with a
trained weight or adapter: the inputs (references), the kept-row index and the per-row lse (fp32).
"""

import torch

from fusetune_kernels.cross_entropy import (
    ce_rows,
    check_reduction,
    cross_entropy_reference,
    loss_denominator,
)
from fusetune_kernels.utils import matmul, new_empty

CHUNK_BYTES = 256 * 2**20
CHUNK_BYTES_TRAINED_WEIGHT = 2**30


def default_chunk_size(vocab: int, elem_size: int, weight_trains: bool = False) -> int:
    budget = CHUNK_BYTES_TRAINED_WEIGHT if weight_trains else CHUNK_BYTES
    return max(128, budget // (vocab * elem_size) // 128 * 128)


def find_kept_rows(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Flat indices (int64) of the rows whose label is not ignore_index.

    One host sync: the count decides the shapes. Pass the result to
    ``fused_linear_cross_entropy(kept_rows=...)`` with the same ``labels``.
    """
    return (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)


def _add_matmul_fp32(acc, a, b):
    """acc (fp32) += a @ b, accumulating in fp32 even when a and b are fp16/bf16 (``utils.matmul``)."""
    matmul(a, b, torch.float32, add_to=acc)


def _chunked_pass(
    h,
    weight,
    bias,
    lora_in,
    lora_b,
    labels,
    opts,
    chunk,
    *,
    lse,
    row_scale,
    need_dh,
    need_dw,
    need_db,
    need_dlora_in,
    need_dlora_b,
    loss=None,
    entropy=None,
    top1=None,
):
    """Run all chunks of the kept rows. Returns (dhidden, dweight, dbias, dlora_in, dlora_b) where requested."""
    n, hidden_size = h.shape
    vocab = weight.shape[0]
    ignore_index, softcap, logit_scale = opts
    write_grad = need_dh or need_dw or need_db or need_dlora_in or need_dlora_b
    single = n <= chunk
    dh = new_empty((n, hidden_size), dtype=h.dtype, device=h.device) if need_dh else None
    dw = db = dlb = None
    if need_dw and not single:
        dw = torch.zeros(vocab, hidden_size, dtype=torch.float32, device=h.device)
    if need_db:
        db = torch.zeros(vocab, dtype=torch.float32, device=h.device)
    dli = new_empty(lora_in.shape, dtype=h.dtype, device=h.device) if need_dlora_in else None
    if need_dlora_b and not single:
        dlb = torch.zeros(lora_b.shape, dtype=torch.float32, device=h.device)
    buf = torch.empty(min(chunk, n), vocab, dtype=h.dtype, device=h.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        h_c = h[start:stop]
        logits = buf[: stop - start]
        if bias is None:
            torch.mm(h_c, weight.t(), out=logits)
        else:
            torch.addmm(bias, h_c, weight.t(), out=logits)
        rows = slice(start, stop)
        if lora_b is not None:  # the low-rank term: rank r, C*V*r more multiply-adds
            logits.addmm_(lora_in[rows], lora_b.t())
        ce_rows(
            logits,
            labels[rows],
            ignore_index=ignore_index,
            softcap=softcap,
            logit_scale=logit_scale,
            lse=lse[rows],
            loss=None if loss is None else loss[rows],
            entropy=None if entropy is None else entropy[rows],
            top1=None if top1 is None else top1[rows],
            grad=logits if write_grad else None,
            row_scale=(row_scale if row_scale.numel() == 1 else row_scale[rows]) if write_grad else None,
        )
        if need_dh:
            torch.mm(logits, weight, out=dh[rows])
        if need_dw:
            if single:
                dw = torch.mm(logits.t(), h_c)
            else:
                _add_matmul_fp32(dw, logits.t(), h_c)
        if need_db:
            db += logits.sum(0, dtype=torch.float32)
        if need_dlora_in:
            torch.mm(logits, lora_b, out=dli[rows])
        if need_dlora_b:
            if single:
                dlb = torch.mm(logits.t(), lora_in[rows])
            else:
                _add_matmul_fp32(dlb, logits.t(), lora_in[rows])
    if dw is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    if dlb is not None and dlb.dtype != lora_b.dtype:
        dlb = dlb.to(lora_b.dtype)
    return dh, dw, db, dli, dlb


def _scatter_rows(values, keep, n_rows, fill_dtype=None):
    """Rows of ``values`` put back at ``keep`` in a zero tensor of n_rows rows (no-op if all kept)."""
    if keep is None:
        return values
    out = torch.zeros((n_rows, *values.shape[1:]), dtype=fill_dtype or values.dtype, device=values.device)
    return out.index_copy_(0, keep, values.to(out.dtype))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        lora_in,
        lora_b,
        labels,
        num_items_in_batch,
        ignore_index,
        reduction,
        softcap,
        logit_scale,
        chunk_size,
        return_stats,
        needs,
        keep,
    ):
        # needs: which of (hidden, weight, bias, lora_in, lora_b) get a gradient
        need_dh, need_dw, need_db, need_dli, need_dlb = needs
        n_rows = hidden.shape[0]
        device = hidden.device
        n_kept = keep.numel()
        if n_kept == n_rows:
            keep = None  # every row kept: no gather, no scatter
        h = hidden if keep is None else hidden.index_select(0, keep)
        kept_lora_in = lora_in if keep is None or lora_in is None else lora_in.index_select(0, keep)
        kept_labels = labels if keep is None else labels.index_select(0, keep)
        chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.element_size(), need_dw)
        opts = (ignore_index, softcap, logit_scale)

        denominator = loss_denominator(labels, ignore_index, reduction, num_items_in_batch)
        # "none" with a trained lm_head (or head adapter): dW needs the per-token grad_output, so wait for backward.
        defer = reduction == "none" and (need_dw or need_db or need_dlb)
        eager = any(needs) and not defer
        row_scale = torch.ones(1, dtype=torch.float32, device=device)
        if eager and denominator is not None:
            row_scale = row_scale / denominator

        lse = new_empty((n_kept,), dtype=torch.float32, device=device)
        loss = new_empty((n_kept,), dtype=torch.float32, device=device)
        entropy = new_empty((n_kept,), dtype=torch.float32, device=device) if return_stats else None
        top1 = new_empty((n_kept,), dtype=torch.int8, device=device) if return_stats else None
        grads = _chunked_pass(
            h,
            weight,
            bias,
            kept_lora_in,
            lora_b,
            kept_labels,
            opts,
            chunk,
            lse=lse,
            row_scale=row_scale,
            need_dh=need_dh and eager,
            need_dw=need_dw and eager,
            need_db=need_db and eager,
            need_dlora_in=need_dli and eager,
            need_dlora_b=need_dlb and eager,
            loss=loss,
            entropy=entropy,
            top1=top1,
        )
        if eager:
            grads = _zeros_where_nothing_kept(grads, needs, weight, bias, lora_b)

        if reduction == "none":
            out = _scatter_rows(loss, keep, n_rows)
        else:
            out = loss.sum()
            if denominator is not None:
                out = out / denominator

        ctx.options = (opts, reduction, chunk, needs, defer, n_rows)
        ctx.grads = grads if eager else None
        if defer:
            ctx.save_for_backward(h, weight, bias, kept_lora_in, lora_b, kept_labels, lse, keep)
        else:
            ctx.save_for_backward(keep)
        if not return_stats:
            return out
        entropy = _scatter_rows(entropy, keep, n_rows)
        is_top1 = _scatter_rows(top1 == 1, keep, n_rows)
        ctx.mark_non_differentiable(entropy, is_top1)
        return out, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_out, *unused_stat_grads):
        opts, reduction, chunk, needs, defer, n_rows = ctx.options
        need_dh, need_dw, need_db, need_dli, need_dlb = needs
        keep = ctx.saved_tensors[-1]
        grad_out = grad_out.float()
        if reduction == "none" and keep is not None:
            grad_out = grad_out.index_select(0, keep)
        if defer:
            h, weight, bias, lora_in, lora_b, kept_labels, lse, _ = ctx.saved_tensors
            grads = _chunked_pass(
                h,
                weight,
                bias,
                lora_in,
                lora_b,
                kept_labels,
                opts,
                chunk,
                lse=lse,
                row_scale=grad_out.contiguous(),
                need_dh=need_dh,
                need_dw=need_dw,
                need_db=need_db,
                need_dlora_in=need_dli,
                need_dlora_b=need_dlb,
            )
            dh, dw, db, dli, dlb = _zeros_where_nothing_kept(grads, needs, weight, bias, lora_b)
        else:
            if ctx.grads is None:
                raise RuntimeError("fused_linear_cross_entropy: backward can run only once per forward")
            dh, dw, db, dli, dlb = ctx.grads
            ctx.grads = None
            if reduction == "none":  # per-row grads only: the summed ones were deferred
                dh = dh.mul_(grad_out[:, None]) if need_dh else None
                dli = dli.mul_(grad_out[:, None]) if need_dli else None
            else:
                dh, dw, db, dli, dlb = (None if g is None else g.mul_(grad_out) for g in (dh, dw, db, dli, dlb))
        if need_dh:
            dh = _scatter_rows(dh, keep, n_rows)
        if need_dli:
            dli = _scatter_rows(dli, keep, n_rows)
        return dh, dw, db, dli, dlb, *([None] * 10)


def _zeros_where_nothing_kept(grads, needs, weight, bias, lora_b):
    """The summed gradients (dW, dbias, dB) as zeros where no row was kept and the chunk loop made none."""
    dh, dw, db, dli, dlb = grads
    if needs[1] and dw is None:
        dw = torch.zeros_like(weight)
    if needs[2] and db is None:
        db = torch.zeros_like(bias)
    if needs[4] and dlb is None:
        dlb = torch.zeros_like(lora_b)
    return dh, dw, db, dli, dlb


def _check_inputs(hidden, weight, labels, bias, lora_in=None, lora_b=None):
    if weight.dim() != 2 or hidden.shape[-1:] != weight.shape[1:]:
        raise ValueError(f"need hidden [..., H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape hidden.shape[:-1]: got {tuple(labels.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
            f"{'' if bias is None else ', ' + str(bias.dtype)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if (lora_in is None) != (lora_b is None):
        raise ValueError("lora_in and lora_b come together: give both or neither")
    if lora_b is None:
        return
    if (
        lora_b.dim() != 2
        or lora_b.shape[0] != weight.shape[0]
        or lora_in.shape != (*hidden.shape[:-1], lora_b.shape[1])
    ):
        raise ValueError(
            f"need lora_in [..., r] (hidden's leading shape) and lora_b [V, r], got {tuple(lora_in.shape)} and "
            f"{tuple(lora_b.shape)} for hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if lora_in.dtype != weight.dtype or lora_b.dtype != weight.dtype:
        raise ValueError(
            f"lora_in and lora_b must have the weight's dtype {weight.dtype}, got {lora_in.dtype}, {lora_b.dtype}"
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    return_stats: bool = False,
    kept_rows: torch.Tensor | None = None,
    lora_in: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
):
    """Cross-entropy of (hidden @ weight.T + bias + lora_in @ lora_b.T) * logit_scale against labels,
    chunked over tokens.

    hidden [..., H], weight [V, H], labels [...]. Returns the loss (fp32; shape labels.shape for
    "none"), or with return_stats (loss, entropy, is_top1), the last two per token and no-grad.
    ``kept_rows``: ``find_kept_rows(labels, ignore_index)``, computed earlier by the caller; if
    None, it is found here, at the cost of a host sync in the middle of the caller's work.
    ``lora_in`` [..., r] and ``lora_b`` [V, r]: an optional low-rank term, both or neither; with
    lora_in = s * hidden @ A.T it is a LoRA adapter (A [r, H], B [V, r], scaling s) on the head.
    """
    check_reduction(reduction, num_items_in_batch, softcap)
    _check_inputs(hidden, weight, labels, bias, lora_in, lora_b)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    need_dli = grad_on and lora_in is not None and lora_in.requires_grad
    need_dlb = grad_on and lora_b is not None and lora_b.requires_grad
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    lora_in_2d = None if lora_in is None else lora_in.reshape(-1, lora_in.shape[-1])
    labels_1d = labels.reshape(-1).contiguous()
    if kept_rows is None:
        kept_rows = find_kept_rows(labels_1d, ignore_index)
    elif kept_rows.dim() != 1 or kept_rows.dtype != torch.int64 or kept_rows.numel() > labels_1d.numel():
        raise ValueError(f"kept_rows must be find_kept_rows(labels), got {kept_rows.dtype} {tuple(kept_rows.shape)}")
    outs = _FusedLinearCrossEntropy.apply(
        hidden_2d,
        weight,
        bias,
        lora_in_2d,
        lora_b,
        labels_1d,
        num_items_in_batch,
        ignore_index,
        reduction,
        softcap,
        float(logit_scale),
        chunk_size,
        return_stats,
        (need_dh, need_dw, need_db, need_dli, need_dlb),
        kept_rows,
    )
    if not return_stats:
        return outs.reshape(labels.shape) if reduction == "none" else outs
    loss, entropy, is_top1 = outs
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    return loss, entropy.reshape(labels.shape), is_top1.reshape(labels.shape)


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    return_stats: bool = False,
    kept_rows: torch.Tensor | None = None,
    lora_in: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
):
    """Materialises logits = (hidden @ weight.T + bias + lora_in @ lora_b.T) * logit_scale (input dtype),
    then cross_entropy_reference. ``chunk_size`` and ``kept_rows`` are accepted and ignored."""
    check_reduction(reduction, num_items_in_batch, softcap)
    _check_inputs(hidden, weight, labels, bias, lora_in, lora_b)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if lora_b is not None:
        logits = logits + lora_in @ lora_b.t()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    loss = cross_entropy_reference(logits, labels, ignore_index, reduction, num_items_in_batch, softcap)
    if not return_stats:
        return loss
    with torch.no_grad():
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        kept = labels != ignore_index
        log_p = torch.log_softmax(z, dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        entropy = torch.where(kept, entropy, torch.zeros_like(entropy)).float()
        is_top1 = (z.argmax(-1) == labels) & kept
    return loss, entropy, is_top1
