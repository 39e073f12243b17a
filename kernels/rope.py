"""Rotary position embedding of Q and K in one launch (Hugging Face's rotate_half convention).

    out = x * cos + rotate_half(x) * sin,    rotate_half([x1, x2]) = [-x2, x1]

cos/sin are the [batch or 1, seq, head_dim] tables the model's rotary module built from its
position_ids, so scaled RoPE (e.g. llama3) and packed rows whose positions restart per
document need nothing special here. The backward is the transposed rotation
(dx1 = g1*cos1 + g2*sin2, dx2 = g2*cos2 - g1*sin1), again one launch for both.

Layout: q/k are read through their strides (no copies; HF hands over transposed views), and each
output takes its input's memory layout, as torch's elementwise ops do. Math is fp32 in registers.
Each output keeps its input's dtype: wider tables (OLMo 2 keeps cos/sin in fp32 beside bf16 heads)
are applied and the result cast back, as the models that hand them over do (a wider q would not meet
v in attention).
Saved for backward: cos and sin only (the model holds them anyway). Memory traffic: Q and K are
read once and written once; each program reads one token's cos/sin row for all of its heads.
"""

import torch
import triton
import triton.language as tl

from fusetune_kernels.utils import new_empty


@triton.jit
def _rotate_heads(
    in_ptr,
    out_ptr,
    in_base,
    out_base,
    in_stride_h,
    in_stride_d,
    out_stride_h,
    out_stride_d,
    n_heads,
    half_dim,
    cos1,
    cos2,
    sin1,
    sin2,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    for head_start in range(0, n_heads, BLOCK_H):
        head = head_start + heads
        mask = (head < n_heads) & (dims < half_dim)
        in_first = in_ptr + in_base + head * in_stride_h + dims * in_stride_d
        out_first = out_ptr + out_base + head * out_stride_h + dims * out_stride_d
        x1 = tl.load(in_first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(in_first + half_dim * in_stride_d, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * cos1 + x2 * sin2
            y2 = x2 * cos2 - x1 * sin1
        else:
            y1 = x1 * cos1 - x2 * sin1
            y2 = x2 * cos2 + x1 * sin2
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_first, y1.to(out_ty), mask=mask)
        tl.store(out_first + half_dim * out_stride_d, y2.to(out_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    seq_len,
    n_q_heads,
    n_k_heads,
    half_dim,
    q_stride_b,
    q_stride_h,
    q_stride_s,
    q_stride_d,
    k_stride_b,
    k_stride_h,
    k_stride_s,
    k_stride_d,
    q_out_stride_b,
    q_out_stride_h,
    q_out_stride_s,
    q_out_stride_d,
    k_out_stride_b,
    k_out_stride_h,
    k_out_stride_s,
    k_out_stride_d,
    cos_stride_b,
    BACKWARD: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per (batch, position) token: every Q and K head of that token.
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    s = (token % seq_len).to(tl.int64)

    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < half_dim
    table_row = b * cos_stride_b + s * (2 * half_dim)  # cos/sin are contiguous
    cos1 = tl.load(cos_ptr + table_row + dims, mask=dim_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + table_row + half_dim + dims, mask=dim_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + table_row + dims, mask=dim_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + table_row + half_dim + dims, mask=dim_mask, other=0.0).to(tl.float32)

    _rotate_heads(
        q_ptr,
        q_out_ptr,
        b * q_stride_b + s * q_stride_s,
        b * q_out_stride_b + s * q_out_stride_s,
        q_stride_h,
        q_stride_d,
        q_out_stride_h,
        q_out_stride_d,
        n_q_heads,
        half_dim,
        cos1,
        cos2,
        sin1,
        sin2,
        BACKWARD,
        BLOCK_HQ,
        BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        b * k_stride_b + s * k_stride_s,
        b * k_out_stride_b + s * k_out_stride_s,
        k_stride_h,
        k_stride_d,
        k_out_stride_h,
        k_out_stride_d,
        n_k_heads,
        half_dim,
        cos1,
        cos2,
        sin1,
        sin2,
        BACKWARD,
        BLOCK_HK,
        BLOCK_HALF,
    )


def _empty_with_layout(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor shaped like ``like`` whose memory order follows ``like``'s strides."""
    order = sorted(range(like.dim()), key=lambda dim: -like.stride(dim))  # outermost first
    buffer = new_empty([like.shape[dim] for dim in order], dtype=dtype, device=like.device)
    return buffer.permute([order.index(dim) for dim in range(like.dim())])


def _launch(q, k, cos, sin, q_out, k_out, backward):
    """Rotate [batch, heads, seq, head_dim] views q, k into q_out, k_out (any strides)."""
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    n_tokens = batch * seq_len
    if q.numel() + k.numel() == 0:
        return
    half_dim = head_dim // 2
    block_half = triton.next_power_of_2(half_dim)
    max_heads = max(1, 4096 // block_half)  # at most 4096 elements of each half in registers
    block_hq = min(triton.next_power_of_2(max(n_q_heads, 1)), max_heads)
    block_hk = min(triton.next_power_of_2(max(n_k_heads, 1)), max_heads)
    cos_stride_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope_kernel[(n_tokens,)](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        seq_len,
        n_q_heads,
        n_k_heads,
        half_dim,
        *q.stride(),
        *k.stride(),
        *q_out.stride(),
        *k_out.stride(),
        cos_stride_b,
        BACKWARD=backward,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        num_warps=4 if block_half * max(block_hq, block_hk) <= 2048 else 8,
    )


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        cos, sin = cos.contiguous(), sin.contiguous()
        q_out, k_out = _empty_with_layout(q, q.dtype), _empty_with_layout(k, k.dtype)
        q_view, k_view, q_out_view, k_out_view = _heads_first(unsqueeze_dim, q, k, q_out, k_out)
        _launch(q_view, k_view, cos, sin, q_out_view, k_out_view, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.dtypes = (q.dtype, k.dtype)
        if not ctx.needs_input_grad[0]:
            ctx.mark_non_differentiable(q_out)
        if not ctx.needs_input_grad[1]:
            ctx.mark_non_differentiable(k_out)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        needs_dq, needs_dk = ctx.needs_input_grad[:2]
        dq = _empty_with_layout(dq_out, ctx.dtypes[0]) if needs_dq else dq_out
        dk = _empty_with_layout(dk_out, ctx.dtypes[1]) if needs_dk else dk_out
        dq_out_view, dk_out_view, dq_view, dk_view = _heads_first(ctx.unsqueeze_dim, dq_out, dk_out, dq, dk)
        # A gradient nobody needs gets zero heads, so the kernel skips it.
        if not needs_dq:
            dq_out_view, dq_view, dq = dq_out_view[:, :0], dq_view[:, :0], None
        if not needs_dk:
            dk_out_view, dk_view, dk = dk_out_view[:, :0], dk_view[:, :0], None
        _launch(dq_out_view, dk_out_view, cos, sin, dq_view, dk_view, backward=True)
        return dq, dk, None, None, None


def _heads_first(unsqueeze_dim, *tensors):
    """[batch, seq, heads, head_dim] views as [batch, heads, seq, head_dim] when unsqueeze_dim is 2."""
    return tensors if unsqueeze_dim == 1 else tuple(t.transpose(1, 2) for t in tensors)


def _check(q, k, cos, sin, unsqueeze_dim):
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ([b, h, s, d]) or 2 ([b, s, h, d]), got {unsqueeze_dim}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    seq_dim = 3 - unsqueeze_dim  # 2 for [b, h, s, d], 1 for [b, s, h, d]
    batch, seq_len, head_dim = q.shape[0], q.shape[seq_dim], q.shape[3]
    if (k.shape[0], k.shape[seq_dim], k.shape[3]) != (batch, seq_len, head_dim):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or head_dim")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if cos.dim() != 3 or cos.shape[0] not in (1, batch) or tuple(cos.shape[1:]) != (seq_len, head_dim):
        raise ValueError(f"cos/sin must be [{batch} or 1, {seq_len}, {head_dim}], got {tuple(cos.shape)}")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError("q, k, cos and sin must be on one device")


def rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Apply rotary embeddings to q and k (Triton). Returns (q_rot, k_rot); cos/sin get no gradient."""
    _check(q, k, cos, sin, unsqueeze_dim)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope gives cos/sin no gradient; build them under torch.no_grad() (as HF does)")
    return _RopeFunction.apply(q, k, cos, sin, unsqueeze_dim)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Plain PyTorch twin of ``rope``: transformers' ``apply_rotary_pos_emb``, each output in its input's dtype."""
    _check(q, k, cos, sin, unsqueeze_dim)
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos + _rotate_half(q) * sin).to(q.dtype), (k * cos + _rotate_half(k) * sin).to(k.dtype)
