"""Mixture-of-experts feed-forward with LoRA on the experts, as one autograd node.

The experts hold 3-D weights as transformers keeps them: ``gate_up [E, 2I, H]`` (the gate rows
first, then the up rows: ``gate, up = h.chunk(2, -1)``) and ``down [E, H, I]``. Each token goes to
k experts chosen by ``route``; its output is the routing-weighted sum of those experts' SwiGLU MLPs.
Per-expert LoRA adapters (``A [E, r, in]``, ``B [E, out, r]``, a scaling s of their own) may sit
on either projection; they act as PEFT's merged weight ``W[e] + s * B[e] @ A[e]`` would, computed as
``x W^T + s * (x A^T) B^T`` on the same permuted rows, so no merged weight is formed.

Forward, with the S = tokens * k (token, slot) pairs sorted by expert (a stable sort: rows of
one expert stay in token order); every product is a grouped GEMM over the experts' row segments:

    xs = x[token of row]                  (gathered inside the Triton GEMM, never stored)
    h = xs W_gu[e]^T + s (xs A_gu[e]^T) B_gu[e]^T           [S, 2I]
    act = silu(h[:, :I]) * h[:, I:]                         [S, I]   (fused into h's GEMM)
    y = act W_d[e]^T + s (act A_d[e]^T) B_d[e]^T            [S, H]
    out[t] = sum_j w[t, j] * y[row of (t, j)]               (scaled in the GEMM, summed in fp32)

Backward, g = d out [tokens, H] gathered per row:

    d_act_u = g W_d[e] + s (g B_d[e]) A_d[e]                 (unweighted by w)
    d w = <d_act_u, act> per row;  d act = w * d_act_u;  dh from SwiGLU's derivative
    d x[t] = sum_j (dh W_gu[e] + s (dh B_gu[e]) A_gu[e])[row of (t, j)]
    dA_d = s (g B_d)^T (w act),  dB_d = s g^T (w * act A_d^T),  dW_d = g^T (w act)   per expert
    dA_gu = s (dh B_gu)^T xs,    dB_gu = s dh^T (xs A_gu^T),    dW_gu = dh^T xs       per expert

The expert weights get a gradient only if they require one (frozen under LoRA: none is computed).
The routing weights' gradient is exact, so a trained router's logits get theirs through ``route``.

Two executors of the grouped GEMMs, the same bookkeeping around them:
``"torch"``: ``torch.nn.functional.grouped_mm`` (CUDA bf16 on SM80+, or the CPU kernel), every
dimension a multiple of 16 bytes; the gather, the rank-r term, the scaling and the scatter as separate
ops, SwiGLU by ``fusetune_kernels.glu``'s kernel.
``"triton"``: one Triton grouped GEMM with the gather of rows, SwiGLU, the LoRA rank-r term, the
routing weight and the scatter back to token order fused in, and a Triton segmented GEMM for the
per-expert gradients. ``"auto"`` takes torch where it fits, else Triton.
Experts that receive no token are skipped by the forward and get zero gradients.

All products run in the compute dtype (autocast's, else x's) with fp32 accumulation; the output
is in x's dtype, the routing weights' and adapters' gradients in their own dtypes.

Saved for backward (b = bytes of the compute dtype, per token): x (H b; usually alive anyway as
the block's input), h (2 k I b), x A_gu^T and act A_d^T (2 k r b), the row order and token index
(8 k), the sorted routing weights (k times their size); the weights and adapters by reference (a
copy only where the compute dtype differs: fp32 adapters are saved cast, E r (in + out) b each).
Qwen3-30B-A3B in bf16 (H 2048, I 768, k 8, r 16): 25.2 KB per token plus x. The eager loop's autograd
graph keeps per routed row the gathered input, h, silu(gate), act and the output, k (4I + 2H) b per token
(115 KB there), and PEFT's LoRA on the expert parameters adds each layer's merged weights, a copy of all
its experts, for the whole step.
Transient in forward and backward: one [S, H] buffer of rows in token order (k H b per token); the
torch executor also gathers x's and d out's rows into one.
Expert weights in a dtype other than the compute dtype are cast, all experts, on every call.

FLOPs per token, frozen experts: forward 6 k H I, backward 6 k H I (6 k H I more if the expert weights
train); LoRA adds 2 k r (2H + 3I) forward and twice that backward.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fusetune_kernels.glu import swiglu
from fusetune_kernels.lora import matmul_dtype
from fusetune_kernels.utils import interpreted, new_empty

BACKENDS = ("auto", "torch", "triton")


# ----------------------------------------------------------------------------- routing


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype | None = None):
    """(weights [T, k], expert ids [T, k]) from router logits [T, E], as the families' routers compute them:
    softmax over all experts in fp32 (or the logits' dtype if wider), the k largest, divided by their sum
    when ``renormalize``, cast to ``weights_dtype`` (default: the logits' dtype).

    Qwen3-MoE and OLMoE: ``renormalize=config.norm_topk_prob``, default dtype. Qwen3.5-MoE:
    ``renormalize=True``, default dtype. Mixtral: ``renormalize=True, weights_dtype=torch.float32``
    (its router keeps the fp32 weights); softmax over the top-k logits is the same arithmetic."""
    probs = torch.softmax(router_logits.to(torch.promote_types(router_logits.dtype, torch.float32)), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(weights_dtype or router_logits.dtype), ids


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _grouped_rows_kernel(
    a_ptr, a_rows_ptr, b_ptr, xa_ptr, lb_ptr, out_ptr, out_rows_ptr, act_ptr, scale_ptr, h_ptr, partial_ptr,
    tile_expert_ptr, tile_start_ptr, segment_end_ptr,
    N, K, R, up_offset, lora_scaling,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn,
    stride_xm, stride_xr, stride_le, stride_lr, stride_ln,
    stride_om, stride_actm, stride_pm,
    GATHER_A: tl.constexpr, HAS_LORA: tl.constexpr, SWIGLU: tl.constexpr, SWIGLU_BACKWARD: tl.constexpr,
    WRITE_ACT: tl.constexpr, ROW_SCALE: tl.constexpr, SCATTER_OUT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of acc = a[rows] @ b[e] (+ s * xa[rows] @ lb[e]) for the rows of one expert e.
    SWIGLU: b's columns n and n + up_offset give gate and up; both go to out (h), silu(gate) * up to act.
    SWIGLU_BACKWARD: acc is d act (unweighted) and h holds gate | up: out gets dgate | dup (times the row's
    weight, scale), partial[row, tile] the tile's share of <d act, act>, act (if WRITE_ACT) weight * act.
    Otherwise out = acc (times scale if ROW_SCALE), at row order[row] if SCATTER_OUT."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:  # the schedule has fewer tiles than the grid
        return
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(segment_end_ptr + expert)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    if GATHER_A:
        a_rows = tl.load(a_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
        b_mask = k_mask[:, None] & col_mask[None, :]
        b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=b_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SWIGLU:
            b_up = tl.load(b_base + ks[:, None] * stride_bk + (cols[None, :] + up_offset) * stride_bn,
                           mask=b_mask, other=0.0)  # fmt: skip
            if DOT_FP32:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
    if HAS_LORA:  # the rank-r term on the same rows: acc += s * xa[rows] @ lb[e]
        rs = tl.arange(0, BLOCK_R)
        r_mask = rs < R
        xa = tl.load(xa_ptr + rows[:, None] * stride_xm + rs[None, :] * stride_xr,
                     mask=row_mask[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
        l_base = lb_ptr + expert.to(tl.int64) * stride_le
        l_mask = r_mask[:, None] & col_mask[None, :]
        lb = tl.load(l_base + rs[:, None] * stride_lr + cols[None, :] * stride_ln, mask=l_mask, other=0.0)
        if DOT_FP32:
            xa = xa.to(tl.float32)
            lb = lb.to(tl.float32)
        acc += lora_scaling * tl.dot(xa, lb, input_precision=PRECISION)
        if SWIGLU:
            lb_up = tl.load(l_base + rs[:, None] * stride_lr + (cols[None, :] + up_offset) * stride_ln,
                            mask=l_mask, other=0.0)  # fmt: skip
            if DOT_FP32:
                lb_up = lb_up.to(tl.float32)
            acc_up += lora_scaling * tl.dot(xa, lb_up, input_precision=PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    if SWIGLU_BACKWARD:
        h_offsets = rows64[:, None] * stride_om + cols[None, :]
        gate = tl.load(h_ptr + h_offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + h_offsets + up_offset, mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        sig = 1.0 / (1.0 + tl.exp(-gate))
        silu = gate * sig
        tl.store(partial_ptr + rows64 * stride_pm + tl.program_id(1), tl.sum(acc * silu * up, axis=1), mask=row_mask)
        wdact = weight * acc
        dgate = wdact * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(out_ptr + h_offsets, dgate.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + h_offsets + up_offset, (wdact * silu).to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_ACT:
            wact = weight * silu * up
            tl.store(
                act_ptr + rows64[:, None] * stride_actm + cols[None, :], wact.to(act_ptr.dtype.element_ty), mask=mask
            )
    elif SWIGLU:
        out_offsets = rows64[:, None] * stride_om + cols[None, :]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + out_offsets + up_offset, acc_up.to(out_ptr.dtype.element_ty), mask=mask)
        act = acc / (1.0 + tl.exp(-acc)) * acc_up
        tl.store(act_ptr + rows64[:, None] * stride_actm + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)
    else:
        if ROW_SCALE:
            acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        if SCATTER_OUT:
            rows64 = tl.load(out_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_reduce_kernel(
    p_ptr, p_rows_ptr, q_ptr, q_rows_ptr, out_ptr, segment_end_ptr, counts_ptr,
    M, N, alpha,
    stride_pm, stride_pc, stride_qm, stride_qc, stride_oe, stride_om,
    GATHER_P: tl.constexpr, GATHER_Q: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[e, m, n] = alpha * sum over the rows of expert e of p[row, m] q[row, n] (zero for an expert without rows)."""
    expert = tl.program_id(0)
    end = tl.load(segment_end_ptr + expert)
    start = end - tl.load(counts_ptr + expert)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < end
        if GATHER_P:
            p_rows = tl.load(p_rows_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            p_rows = rows.to(tl.int64)
        if GATHER_Q:
            q_rows = tl.load(q_rows_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            q_rows = rows.to(tl.int64)
        p = tl.load(p_ptr + p_rows[None, :] * stride_pm + ms[:, None] * stride_pc,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
        q = tl.load(q_ptr + q_rows[:, None] * stride_qm + ns[None, :] * stride_qc,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # fmt: skip
        if DOT_FP32:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=PRECISION)
    out_offsets = expert.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :]
    tl.store(out_ptr + out_offsets, (alpha * acc).to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _swiglu_routed_backward_kernel(
    h_ptr, dact_ptr, w_ptr, dh_ptr, dw_ptr, wact_ptr, n_cols,
    WRITE_WACT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per row: dw = <dact, silu(gate) up>; dgate, dup = w dact silu'(gate) up, w dact silu(gate); wact = w act."""
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row).to(tl.float32)
    dot = tl.zeros((BLOCK,), tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(h_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dact = tl.load(dact_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-gate))
        silu = gate * sig
        dot += dact * silu * up
        wdact = w * dact
        dgate = wdact * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(dh_ptr + row * 2 * n_cols + cols, dgate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + row * 2 * n_cols + n_cols + cols, (wdact * silu).to(dh_ptr.dtype.element_ty), mask=mask)
        if WRITE_WACT:
            tl.store(wact_ptr + row * n_cols + cols, (w * silu * up).to(wact_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + row, tl.sum(dot, axis=0))


# ----------------------------------------------------------------------------- the grouped products


class _Plan:
    """The (token, slot) pairs sorted by expert, and the segment and tile tables of the grouped GEMMs."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, block_m: int):
        self.tokens, self.k = top_k_index.shape
        ids = top_k_index.reshape(-1)
        sorted_ids, order = torch.sort(ids, stable=True)
        # An id outside [0, E) would leave its row unwritten; checked on the device, without a host sync.
        torch._assert_async((sorted_ids[0] >= 0) & (sorted_ids[-1] < num_experts), "expert id outside [0, E)")
        self.order = order.to(torch.int32)  # row i of the sorted rows is (token, slot) pair order[i]
        self.token = (order // self.k).to(torch.int32)
        # Segment ends from the sorted ids (bincount would size its output from the data: a host sync).
        experts = torch.arange(num_experts, device=ids.device, dtype=sorted_ids.dtype)
        ends = torch.searchsorted(sorted_ids, experts, right=True)
        counts = ends - torch.searchsorted(sorted_ids, experts)
        self.counts, self.ends = counts.to(torch.int32), ends.to(torch.int32)
        self.num_experts = num_experts
        # Tile t covers rows [tile_start[t], +block_m) of expert tile_expert[t] (-1: no tile); no host sync.
        tiles = (counts + block_m - 1) // block_m
        tile_ends = torch.cumsum(tiles, 0)
        grid = (ids.numel() + block_m - 1) // block_m + num_experts
        t = torch.arange(grid, device=ids.device)
        expert = torch.searchsorted(tile_ends, t, right=True)
        e = expert.clamp(max=num_experts - 1)
        start = ends[e] - counts[e] + (t - (tile_ends[e] - tiles[e])) * block_m
        self.tile_expert = torch.where(expert < num_experts, expert, -1).to(torch.int32)
        self.tile_start = start.to(torch.int32)


def _blocks():
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the grouped GEMMs."""
    return (16, 32, 32, 4) if interpreted() else (64, 64, 64, 4)


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _dot_args(dtype: torch.dtype) -> dict:
    # The interpreter's dot mishandles bf16 operands; fp32 products on the GPU stay fp32 (no TF32).
    return {
        "DOT_FP32": interpreted() or dtype == torch.float32,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _rows_triton(
    plan, a, b, *, gather=False, lora=None, swiglu_out=False, swiglu_backward=None, scale=None, scatter=False, out_dtype
):
    """out[row] = a[row or token of row] @ b[e] (+ s * xa[row] @ lb[e]) over the sorted rows; b [E, K, N] (any strides),
    lora = (xa [S, r], lb [E, r, N], s). swiglu_out: N is 2I, returns (h [S, 2I], act [S, I]).
    swiglu_backward = (h, write_act): the product is d act [S, I] (N is I); returns (dh [S, 2I], dw [S] fp32,
    scale * act [S, I] or None), scale [S] being the routing weights. Otherwise scale [S]: rows times it;
    scatter: row i written at order[i] (token order)."""
    block_m, block_n, block_k, warps = _blocks()
    S, (_, K, N) = plan.order.numel(), b.shape
    n_out = N // 2 if swiglu_out else N
    out = new_empty((S, 2 * N if swiglu_backward else N), dtype=out_dtype, device=a.device)
    write_act = swiglu_out or (swiglu_backward is not None and swiglu_backward[1])
    act = new_empty((S, n_out), dtype=out_dtype, device=a.device) if write_act else out
    xa, lb, s = lora if lora is not None else (out, b, 0.0)
    rank = xa.shape[1] if lora is not None else 0
    block_n = min(block_n, _pow2_at_least_16(n_out))
    grid = (plan.tile_expert.numel(), triton.cdiv(n_out, block_n))
    h = swiglu_backward[0] if swiglu_backward else out
    partial = new_empty((S, grid[1]), dtype=torch.float32, device=a.device) if swiglu_backward else out
    _grouped_rows_kernel[grid](
        a, plan.token, b, xa, lb, out, plan.order, act, scale if scale is not None else out, h, partial,
        plan.tile_expert, plan.tile_start, plan.ends,
        n_out, K, rank, n_out, float(s),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        xa.stride(0), xa.stride(1), lb.stride(0), lb.stride(1), lb.stride(2),
        out.stride(0), act.stride(0), partial.stride(0),
        GATHER_A=gather, HAS_LORA=lora is not None, SWIGLU=swiglu_out, SWIGLU_BACKWARD=swiglu_backward is not None,
        WRITE_ACT=write_act, ROW_SCALE=scale is not None, SCATTER_OUT=scatter,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_pow2_at_least_16(rank), num_warps=warps,
        **_dot_args(a.dtype),
    )  # fmt: skip
    if swiglu_backward:
        return out, partial.sum(1), act if write_act else None
    return (out, act) if swiglu_out else out


def _reduce_triton(plan, p, q, *, gather_p=False, gather_q=False, alpha=1.0, out_dtype):
    """[E, M, N]: alpha * p_e^T q_e over each expert's rows (p [S or T, M], q [S or T, N], gathered by token)."""
    _, _, block_k, warps = _blocks()
    M, N = p.shape[1], q.shape[1]
    out = new_empty((plan.num_experts, M, N), dtype=out_dtype, device=p.device)
    block_m, block_n = min(64, _pow2_at_least_16(M)), min(64, _pow2_at_least_16(N))
    grid = (plan.num_experts, triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _segment_reduce_kernel[grid](
        p, plan.token, q, plan.token, out, plan.ends, plan.counts, M, N, float(alpha),
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        GATHER_P=gather_p, GATHER_Q=gather_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, **_dot_args(p.dtype),
    )  # fmt: skip
    return out


def _grouped_mm(a, b, plan):
    return F.grouped_mm(a, b, offs=plan.ends)


def _rows_torch(
    plan, a, b, *, gather=False, lora=None, swiglu_out=False, swiglu_backward=None, scale=None, scatter=False, out_dtype
):
    """``_rows_triton`` through torch's grouped_mm and separate ops."""
    if gather:
        a = a.index_select(0, plan.token)
    y = _grouped_mm(a, b, plan)
    if lora is not None:
        xa, lb, s = lora
        y.add_(_grouped_mm(xa, lb, plan), alpha=s)
    if swiglu_out:
        gate, up = y.chunk(2, dim=-1)
        return y.to(out_dtype), swiglu(gate, up).to(out_dtype)
    if swiglu_backward is not None:
        return _swiglu_backward(swiglu_backward[0], y.to(out_dtype), scale, swiglu_backward[1])
    if scale is not None:
        y = y * scale[:, None]
    if scatter:
        out = new_empty(y.shape, dtype=out_dtype, device=y.device)
        out[plan.order.long()] = y.to(out_dtype)
        return out
    return y.to(out_dtype)


def _swiglu_backward(h, dact, weights, write_act):
    """(dh [S, 2I], dw [S] fp32, weights * act or None) from h, the unweighted d act [S, I] and the row weights."""
    rows, inter = dact.shape
    dh = new_empty(h.shape, dtype=h.dtype, device=h.device)
    dw = new_empty((rows,), dtype=torch.float32, device=h.device)
    wact = new_empty(dact.shape, dtype=h.dtype, device=h.device) if write_act else dh
    if rows:
        block = min(1024, triton.next_power_of_2(inter))
        _swiglu_routed_backward_kernel[(rows,)](
            h, dact, weights, dh, dw, wact, inter, WRITE_WACT=write_act, BLOCK=block
        )
    return dh, dw, wact if write_act else None


def _reduce_torch(plan, p, q, *, gather_p=False, gather_q=False, alpha=1.0, out_dtype):
    if gather_p:
        p = p.index_select(0, plan.token)
    if gather_q:
        q = q.index_select(0, plan.token)
    out = F.grouped_mm(p.t(), q, offs=plan.ends)
    out = out.masked_fill((plan.counts == 0)[:, None, None], 0.0)  # an expert without rows: zero, never stale
    return (out * alpha).to(out_dtype) if alpha != 1.0 else out.to(out_dtype)


_EXECUTORS = {"torch": (_rows_torch, _reduce_torch), "triton": (_rows_triton, _reduce_triton)}


def _torch_fits(x: torch.Tensor, dtype: torch.dtype, sizes) -> bool:
    """Whether torch's grouped_mm takes these operands: 16-byte aligned rows, and on CUDA bf16 on SM80+."""
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if any((n * dtype.itemsize) % 16 for n in sizes):
        return False
    if x.device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


def _backend(backend: str, x, dtype, sizes) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "torch" if _torch_fits(x, dtype, sizes) else "triton"
    if backend == "torch" and not _torch_fits(x, dtype, sizes):
        raise ValueError(f"torch's grouped_mm does not take {dtype} on {x.device} with sizes {tuple(sizes)}")
    return backend


def _sum_slots(rows_in_token_order: torch.Tensor, plan, dtype: torch.dtype) -> torch.Tensor:
    """[T, H]: the k rows of each token summed in fp32."""
    hidden = rows_in_token_order.shape[1]
    return rows_in_token_order.view(plan.tokens, plan.k, hidden).sum(1, dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------------- the autograd node


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, gate_up, down, gu_a, gu_b, gu_s, down_a, down_b, down_s, backend):
        dtype = matmul_dtype(x)
        num_experts, two_i, hidden = gate_up.shape
        sizes = [hidden, two_i // 2] + [a.shape[1] for a in (gu_a, down_a) if a is not None]
        backend = _backend(backend, x, dtype, sizes)
        rows, _ = _EXECUTORS[backend]
        plan = _Plan(top_k_index, num_experts, _blocks()[0])
        x2 = x.reshape(-1, hidden).to(dtype)
        w_gu, w_d = gate_up.to(dtype), down.to(dtype)
        adapter_dtypes = tuple(None if t is None else t.dtype for t in (gu_a, gu_b, down_a, down_b))
        gu_a, gu_b, down_a, down_b = (_cast(t, dtype) for t in (gu_a, gu_b, down_a, down_b))
        w_rows = top_k_weights.reshape(-1)[plan.order.long()]

        xa_gu = aa_d = None
        if gu_a is not None:
            xa_gu = rows(plan, x2, gu_a.transpose(1, 2), gather=True, out_dtype=dtype)
        gu_lora = None if gu_a is None else (xa_gu, gu_b.transpose(1, 2), gu_s)
        h, act = rows(plan, x2, w_gu.transpose(1, 2), gather=True, lora=gu_lora, swiglu_out=True, out_dtype=dtype)
        if down_a is not None:
            aa_d = rows(plan, act, down_a.transpose(1, 2), out_dtype=dtype)
        d_lora = None if down_a is None else (aa_d, down_b.transpose(1, 2), down_s)
        y = rows(plan, act, w_d.transpose(1, 2), lora=d_lora, scale=w_rows, scatter=True, out_dtype=dtype)
        out = _sum_slots(y, plan, x.dtype)

        ctx.plan, ctx.backend, ctx.scalings = plan, backend, (gu_s, down_s)
        ctx.grad_dtypes = (x.dtype, top_k_weights.dtype, gate_up.dtype, down.dtype) + adapter_dtypes
        ctx.save_for_backward(x2, w_rows, h, xa_gu, aa_d, w_gu, w_d, gu_a, gu_b, down_a, down_b)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x2, w_rows, h, xa_gu, aa_d, w_gu, w_d, gu_a, gu_b, down_a, down_b = ctx.saved_tensors
        plan, (gu_s, down_s) = ctx.plan, ctx.scalings
        rows, reduce = _EXECUTORS[ctx.backend]
        x_dtype, w_dtype, gu_dtype, d_dtype, gu_a_dtype, gu_b_dtype, d_a_dtype, d_b_dtype = ctx.grad_dtypes
        need = ctx.needs_input_grad
        need_x, need_w, need_gu, need_d = need[0], need[2], need[3], need[4]
        need_gu_a, need_gu_b, need_d_a, need_d_b = need[5], need[6], need[8], need[9]
        dtype = h.dtype
        g = dout.reshape(-1, x2.shape[1]).to(dtype)
        dx = dweights = d_gu = d_d = d_gu_a = d_gu_b = d_d_a = d_d_b = None

        gb_d = None if down_a is None else rows(plan, g, down_b, gather=True, out_dtype=dtype)
        d_lora = None if down_a is None else (gb_d, down_a, down_s)
        write_wact = need_d or need_d_a
        dh, dw_rows, wact = rows(plan, g, w_d, gather=True, lora=d_lora, scale=w_rows, swiglu_backward=(h, write_wact),
                                 out_dtype=dtype)  # fmt: skip
        if need_w:
            dweights = new_empty((plan.tokens * plan.k,), dtype=torch.float32, device=h.device)
            dweights[plan.order.long()] = dw_rows
            dweights = dweights.view(plan.tokens, plan.k).to(w_dtype)
        if need_d_a:
            d_d_a = reduce(plan, gb_d, wact, alpha=down_s, out_dtype=d_a_dtype)
        if need_d_b:
            waa = (aa_d.float() * w_rows[:, None].float()).to(dtype)
            d_d_b = reduce(plan, g, waa, gather_p=True, alpha=down_s, out_dtype=d_b_dtype)
        if need_d:
            d_d = reduce(plan, g, wact, gather_p=True, out_dtype=d_dtype)

        gb_gu = None
        if gu_a is not None and (need_x or need_gu_a):
            gb_gu = rows(plan, dh, gu_b, out_dtype=dtype)
        if need_x:
            gu_lora = None if gu_a is None else (gb_gu, gu_a, gu_s)
            dxs = rows(plan, dh, w_gu, lora=gu_lora, scatter=True, out_dtype=dtype)
            dx = _sum_slots(dxs, plan, x_dtype).view(dout.shape)
        if need_gu_a:
            d_gu_a = reduce(plan, gb_gu, x2, gather_q=True, alpha=gu_s, out_dtype=gu_a_dtype)
        if need_gu_b:
            d_gu_b = reduce(plan, dh, xa_gu, alpha=gu_s, out_dtype=gu_b_dtype)
        if need_gu:
            d_gu = reduce(plan, dh, x2, gather_q=True, out_dtype=gu_dtype)
        return dx, None, dweights, d_gu, d_d, d_gu_a, d_gu_b, None, d_d_a, d_d_b, None, None


def _check(x, top_k_index, top_k_weights, gate_up, down, gate_up_lora, down_lora):
    num_experts, two_i, hidden = gate_up.shape
    if two_i % 2 or down.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"gate_up [E, 2I, H] and down [E, H, I] disagree: {tuple(gate_up.shape)}, {tuple(down.shape)}")
    if x.shape[-1] != hidden or top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2:
        raise ValueError(f"x [..., {hidden}], top_k_index and top_k_weights [T, k] expected, got "
                         f"{tuple(x.shape)}, {tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}")  # fmt: skip
    if top_k_index.shape[0] * hidden != x.numel():
        raise ValueError(f"{top_k_index.shape[0]} routed tokens for {x.numel() // hidden} tokens of x")
    for name, lora, (n_in, n_out) in (
        ("gate_up", gate_up_lora, (hidden, two_i)),
        ("down", down_lora, (two_i // 2, hidden)),
    ):
        if lora is None:
            continue
        a, b, _ = lora
        if (
            a.dim() != 3
            or a.shape[0] != num_experts
            or a.shape[2] != n_in
            or b.shape != (num_experts, n_out, a.shape[1])
        ):
            raise ValueError(f"{name} LoRA: A [E, r, {n_in}] and B [E, {n_out}, r] expected for E={num_experts}, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")  # fmt: skip


def moe_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    down_lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The experts' output [..., H] of x [..., H] routed to ``top_k_index`` [T, k] with ``top_k_weights`` [T, k]
    (T tokens of x), expert weights ``gate_up`` [E, 2I, H] and ``down`` [E, H, I], optional LoRA triples
    ``(A [E, r, in], B [E, out, r], scaling)`` on either projection; ``backend`` "auto", "torch" or "triton"
    (see the module docstring)."""
    _check(x, top_k_index, top_k_weights, gate_up, down, gate_up_lora, down_lora)
    gu_a, gu_b, gu_s = gate_up_lora if gate_up_lora is not None else (None, None, 0.0)
    down_a, down_b, down_s = down_lora if down_lora is not None else (None, None, 0.0)
    return _MoEExperts.apply(
        x, top_k_index, top_k_weights, gate_up, down, gu_a, gu_b, float(gu_s), down_a, down_b, float(down_s), backend
    )


def moe_experts_reference(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    down_lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The models' own loop over the experts that received tokens, with PEFT's arithmetic for the adapters
    (each expert's weight plus s * B[e] @ A[e] in the weight's dtype); ``backend`` is accepted and ignored."""
    _check(x, top_k_index, top_k_weights, gate_up, down, gate_up_lora, down_lora)
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    out = torch.zeros_like(x)
    for expert in torch.unique(top_k_index).tolist():
        token, slot = torch.nonzero(top_k_index == expert, as_tuple=True)
        w_gu, w_d = gate_up[expert], down[expert]
        if gate_up_lora is not None:
            a, b, s = gate_up_lora
            w_gu = w_gu + s * (b[expert].to(w_gu.dtype) @ a[expert].to(w_gu.dtype))
        if down_lora is not None:
            a, b, s = down_lora
            w_d = w_d + s * (b[expert].to(w_d.dtype) @ a[expert].to(w_d.dtype))
        gate, up = F.linear(x[token], w_gu).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_d) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out.view(shape)
