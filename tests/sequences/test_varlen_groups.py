"""The masked path of varlen attention: documents in padded groups, at the cost of the documents alone.

Outside the CUDA varlen kernel, ``fusetune_masked`` gathers a packed row's documents into padded
[documents, longest] groups and runs causal SDPA on each. Checked here: outputs and gradients against
each document attended alone (float64) and against the block-diagonal mask over the whole row (the
path it replaces, still used inside CUDA graph captures); the size of the attention problems it
builds (score elements, and the largest tensor of forward and backward), which are counted, not
timed; and short training runs whose losses match both references.
"""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fusetune import testing
from fusetune.sequences import varlen

FP32_TOL = 1e-5
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Attention(torch.nn.Module):
    """What transformers' attention modules expose to an attention function."""

    def __init__(self, heads, kv_heads, training=False):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = heads // kv_heads
        self.train(training)


def rel(a, b) -> float:
    """||a - b|| / ||b||, or absolute where ||b|| < 1 (one-token documents get exactly no query gradient)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1.0)).item()


def random_lengths(seed, count, longest, ones=0):
    """``count`` document lengths in [1, longest], with ``ones`` extra one-token documents spread among them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (count,), generator=g).tolist() + [1] * ones
    return [lengths[i] for i in torch.randperm(len(lengths), generator=g).tolist()]


def layout_kwargs(rows, layout, device="cpu"):
    """The kwargs transformers hands an attention function for ``rows`` (lists of document lengths)."""
    if layout == "cu_seq_lens":
        assert len(rows) == 1, "TRL's collator gives one row"
        lengths = rows[0]
        cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    positions = [torch.cat([torch.arange(n) for n in lengths]) for lengths in rows]
    return {"position_ids": torch.stack(positions).to(device)}


def qkv(rows, heads, kv_heads, dim, device="cpu", dtype=torch.float32, seed=0):
    """Leaf q, k, v of [rows, heads, tokens, dim], laid out as transformers makes them (a transposed [b, s, h, d])."""
    g = torch.Generator().manual_seed(seed)
    s = sum(rows[0])
    assert all(sum(r) == s for r in rows)
    return tuple(
        torch.randn(len(rows), s, h, dim, generator=g).to(device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    )


def each_document_alone(q, k, v, rows, scaling, window=None, softcap=None):
    """Explicit math, one document at a time, in float64. [b, h, s, d] -> [b, s, h, d]."""
    q, k, v = (t.double() for t in (q, k, v))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = []
    for row, lengths in enumerate(rows):
        pieces, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            scores = q[row, :, sl] @ k[row, :, sl].transpose(-1, -2) * scaling
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            i = torch.arange(n, device=q.device)
            allowed = i[:, None] >= i[None, :]
            if window is not None:
                allowed &= i[:, None] - i[None, :] < window
            pieces.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v[row, :, sl])
            start += n
        out.append(torch.cat(pieces, dim=1).transpose(0, 1))
    return torch.stack(out)


def block_diagonal(q, k, v, rows, layout, scaling, window=None, softcap=None):
    """The path this one replaces: one block-diagonal mask over each whole row, through SDPA or explicit math."""
    kwargs = layout_kwargs(rows, layout, q.device)
    source = varlen._layout_source(kwargs)
    b, _, s, _ = q.shape
    mask = varlen._block_diagonal_mask(varlen._document_ids(source, b, s, q.device), window)
    return varlen._masked(q, k, v, mask, scaling, 0.0, softcap, False)


def attend(q, k, v, rows, layout, scaling, window=None, softcap=None, dropout=0.0, training=False):
    """The masked path, as transformers calls it."""
    out, weights = varlen.masked_attention_forward(
        Attention(q.shape[1], k.shape[1], training),
        q,
        k,
        v,
        None,
        scaling=scaling,
        dropout=dropout,
        sliding_window=window,
        softcap=softcap,
        **layout_kwargs(rows, layout, q.device),
    )
    assert weights is None
    return out


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    return torch.autograd.grad(out, inputs, grad.to(out.dtype))


@pytest.fixture(autouse=True)
def fresh():
    testing.reset_attention_calls()


# ------------------------------------------------------------------ the same answer


MIXED = random_lengths(0, 24, 40, ones=6)  # lengths 1..40 and six one-token documents
LONG_AND_SHORT = random_lengths(1, 30, 9, ones=3)[:15] + [150] + random_lengths(2, 15, 9)  # groups apart
CASES = {  # name: (rows, heads, kv_heads, window, softcap, scaling)
    "plain": ([MIXED], 4, 4, None, None, None),
    "gqa": ([MIXED], 6, 2, None, None, 0.3),
    "mqa-long-and-short": ([LONG_AND_SHORT], 8, 1, None, None, None),
    "window-shorter-than-some-groups": ([LONG_AND_SHORT], 6, 2, 12, None, None),
    "window-shorter-than-all": ([MIXED], 6, 2, 3, None, 0.2),
    "softcap": ([MIXED], 4, 2, None, 20.0, None),
    "softcap-window-gqa": ([LONG_AND_SHORT], 6, 2, 12, 30.0, 0.25),
    "only-one-token-documents": ([[1] * 23], 6, 2, None, None, None),
    "one-document": ([[37]], 6, 2, 9, None, None),
}
TWO_ROWS = [[5, 1, 12, 1, 9], [1, 1, 26]]  # two rows of 28: documents never cross a row


@pytest.mark.parametrize("layout", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_each_document_alone_and_the_block_diagonal_mask(case, layout):
    rows, heads, kv_heads, window, softcap, scaling = CASES[case]
    dim = 16
    scaling = scaling if scaling is not None else dim**-0.5
    q, k, v = qkv(rows, heads, kv_heads, dim)
    out = attend(q, k, v, rows, layout, scaling, window, softcap)
    assert out.shape == (len(rows), sum(rows[0]), heads, dim) and varlen.calls == {"masked": 1}
    got = grads(out, (q, k, v))

    alone = each_document_alone(q, k, v, rows, scaling, window, softcap)
    assert rel(out, alone) <= FP32_TOL
    for name, a, b in zip("qkv", got, grads(alone, (q, k, v)), strict=True):
        assert rel(a, b) <= FP32_TOL, f"grad {name}"

    before = block_diagonal(q, k, v, rows, layout, scaling, window, softcap)
    assert rel(out, before) <= FP32_TOL
    for name, a, b in zip("qkv", got, grads(before, (q, k, v)), strict=True):
        assert rel(a, b) <= FP32_TOL, f"grad {name} against the block-diagonal mask"


def test_rows_of_a_batch_are_separate():
    q, k, v = qkv(TWO_ROWS, 6, 2, 16)
    out = attend(q, k, v, TWO_ROWS, "position_ids", 0.25, window=4)
    alone = each_document_alone(q, k, v, TWO_ROWS, 0.25, window=4)
    assert rel(out, alone) <= FP32_TOL
    for a, b in zip(grads(out, (q, k, v)), grads(alone, (q, k, v)), strict=True):
        assert rel(a, b) <= FP32_TOL


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_half_precision(dtype, tol):
    rows = [LONG_AND_SHORT]
    q, k, v = qkv(rows, 6, 2, 16, dtype=dtype)
    out = attend(q, k, v, rows, "cu_seq_lens", 0.25, window=12)
    assert out.dtype == dtype
    alone = each_document_alone(q, k, v, rows, 0.25, window=12)
    assert rel(out, alone) <= tol
    for a, b in zip(grads(out, (q, k, v)), grads(alone, (q, k, v)), strict=True):
        assert a.dtype == dtype and rel(a, b) <= tol


def test_under_autocast():
    """With fp32 weights under autocast, RoPE leaves q and k in fp32 and v in bf16: SDPA computes in bf16."""
    rows = [MIXED]
    q, k, _ = qkv(rows, 6, 2, 16)
    v = qkv(rows, 6, 2, 16, seed=1)[2].detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, rows, "position_ids", 0.25)
    assert out.dtype == torch.bfloat16
    assert rel(out, each_document_alone(q, k, v, rows, 0.25)) <= 2e-2


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_dropout_stays_inside_each_document(softcap):
    rows = [LONG_AND_SHORT]
    q, k, v = qkv(rows, 6, 2, 16)
    torch.manual_seed(0)
    out = attend(q, k, v, rows, "position_ids", 0.25, softcap=softcap, dropout=0.5, training=True)
    plain = attend(q, k, v, rows, "position_ids", 0.25, softcap=softcap)
    assert torch.isfinite(out).all() and rel(out, plain) > 0.1  # dropout is applied
    start = sum(LONG_AND_SHORT[:15])  # the long document
    dq, dk, dv = torch.autograd.grad(out[:, start : start + 150].sum(), (q, k, v))
    for g in (dq, dk, dv):
        touched = g.abs().sum(dim=(0, 1, 3))
        assert touched[:start].max() == 0 and touched[start + 150 :].max() == 0
        assert touched[start : start + 150].sum() > 0


def test_the_layout_is_built_once_per_batch_and_shared_by_windowed_and_full_layers(monkeypatch):
    built = []
    original = varlen._document_mask
    monkeypatch.setattr(varlen, "_document_mask", lambda *a: built.append(1) or original(*a))
    rows = [LONG_AND_SHORT]
    q, k, v = qkv(rows, 6, 2, 16)
    kwargs = layout_kwargs(rows, "position_ids")
    for window in (None, 12, None, 12):  # as Gemma 2 alternates global and sliding-window layers
        varlen.masked_attention_forward(Attention(6, 2), q, k, v, None, scaling=0.25, sliding_window=window, **kwargs)
    assert len(built) == 1
    kwargs["position_ids"].add_(0)  # changed in place (a graph's static batch): a new layout
    varlen.masked_attention_forward(Attention(6, 2), q, k, v, None, scaling=0.25, **kwargs)
    assert len(built) == 2


# ------------------------------------------------------------------ the cost


def padded_elements(lengths):
    """Score elements (query x key pairs, per head) of the padded groups the masked path builds for one row."""
    docs = varlen._document_mask(layout_kwargs([lengths], "position_ids")["position_ids"], 1, sum(lengths), "cpu")
    assert sum(n * longest for n, longest in docs.groups) == docs.gather.numel()
    return sum(n * longest * longest for n, longest in docs.groups), len(docs.groups)


def best_grouping_cost(lengths):
    """The same objective as ``_group_lengths``, by dynamic programming over every contiguous range."""
    distinct = sorted(set(lengths))
    best = [0] + [math.inf] * len(distinct)
    for j in range(1, len(distinct) + 1):
        for i in range(j):
            count = sum(1 for n in lengths if distinct[i] <= n <= distinct[j - 1])
            best[j] = min(best[j], best[i] + count * distinct[j - 1] ** 2 + varlen.CALL_COST)
    return best[-1]


@pytest.mark.parametrize("seed", range(6))
def test_grouping_is_optimal_for_its_cost_model(seed):
    """The look-back cut-off of ``_group_lengths`` loses nothing against the full search."""
    g = torch.Generator().manual_seed(seed)
    longest = [8, 40, 90, 300, 700, 2000][seed]
    lengths = torch.randint(1, longest + 1, (60,), generator=g).tolist() + [longest]
    ranges = varlen._group_lengths(lengths)
    assert ranges[0][0] == min(lengths) and ranges[-1][1] == max(lengths)
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    counts = [sum(1 for n in lengths if lo <= n <= hi) for lo, hi in ranges]
    cost = sum(count * hi * hi + varlen.CALL_COST for count, (_, hi) in zip(counts, ranges, strict=True))
    assert sum(counts) == len(lengths)
    assert cost == best_grouping_cost(lengths)


@pytest.mark.parametrize(
    "name,lengths",
    [
        ("tiny documents", [1] * 300 + random_lengths(3, 200, 16)),
        ("chat-like", random_lengths(4, 120, 200, ones=5)),
        ("one long, many short", [2048] + random_lengths(5, 60, 40)),
        ("every length once", list(range(1, 400))),
        ("one document", [4096]),
    ],
)
def test_padded_attention_is_bounded_by_the_documents_not_the_row(name, lengths):
    """At most 4 x sum(len^2) score elements, plus one call's worth per octave of lengths (what grouping
    by powers of two would cost), where the block-diagonal mask over the row costs row^2."""
    elements, groups = padded_elements(lengths)
    squares = sum(n * n for n in lengths)
    octaves = max(lengths).bit_length()
    assert elements + groups * varlen.CALL_COST <= 4 * squares + octaves * varlen.CALL_COST, name
    assert elements <= sum(lengths) ** 2


def test_one_long_document_among_short_ones_is_not_padded_to_the_long_one():
    short = random_lengths(5, 60, 40)
    elements, groups = padded_elements([2048] + short)
    squares = 2048**2 + sum(n * n for n in short)
    assert elements <= 1.05 * squares and groups <= 8  # padding all 61 to 2048 would be 61x


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op makes, and the score elements of every SDPA call (per head)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.scores = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
            q, k = args[0], args[1]
            self.scores += q.shape[0] * q.shape[-2] * k.shape[-2]
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_no_tensor_of_forward_or_backward_grows_with_the_square_of_the_row(softcap):
    """A 4,096-token row of 481 documents: the masked path's forward and backward make no tensor near
    row^2 elements, and hand SDPA about sum(len^2) score elements; the block-diagonal mask makes row^2."""
    lengths = random_lengths(6, 470, 16, ones=10)
    lengths.append(4096 - sum(lengths))
    assert lengths[-1] > 0
    s, heads, dim = 4096, 6, 16
    q, k, v = qkv([lengths], heads, 2, dim)
    squares = sum(n * n for n in lengths)
    with LargestTensor() as seen:
        out = attend(q, k, v, [lengths], "position_ids", 0.25, softcap=softcap)
        grads(out, (q, k, v))
    linear = s * heads * dim
    quadratic_in_documents = heads * 4 * squares if softcap is not None else 0  # explicit math holds scores
    assert seen.largest <= 4 * linear + quadratic_in_documents < s * s / 4
    if softcap is None:
        assert 0 < seen.scores <= 4 * squares + max(lengths).bit_length() * varlen.CALL_COST
    with LargestTensor() as before:  # the measure tells the two apart
        block_diagonal(q, k, v, [lengths], "position_ids", 0.25, softcap=softcap)
    assert before.largest >= s * s


# ------------------------------------------------------------------ whole models, trained


def per_document_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A reference implementation for models: each document through plain causal SDPA, one at a time."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    source = varlen._layout_source(kwargs)
    if attention_mask is not None or source is None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    reference_calls["test_per_document"] += 1
    b, _, s, _ = query.shape
    starts = varlen._document_starts(source, b, s).tolist() + [b * s]
    flat = [x.transpose(1, 2).reshape(b * s, x.shape[1], x.shape[3]) for x in (query, key, value)]
    outs = []
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        q, k, v = (x[start:end].transpose(0, 1)[None] for x in flat)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs).view(b, s, query.shape[1], -1), None


def block_diagonal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The masked path as it was: one block-diagonal mask over the whole row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    source = varlen._layout_source(kwargs)
    if attention_mask is not None or source is None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    reference_calls["test_block_diagonal"] += 1
    b, _, s, _ = query.shape
    mask = varlen._block_diagonal_mask(varlen._document_ids(source, b, s, query.device), kwargs.get("sliding_window"))
    return varlen._masked(query, key, value, mask, scaling, 0.0, None, False), None


REFERENCES = {"test_per_document": per_document_attention, "test_block_diagonal": block_diagonal_attention}
reference_calls = Counter()


def train_packed(tmp_path, tokenizer, attention: str, steps=3):
    """Losses and gradient norms of a few packed steps of the tiny Llama on CPU, through ``attention``."""
    from datasets import Dataset
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from fusetune.loading import load_model
    from fusetune.patching import remove_kernels
    from fusetune.training.trainer import FastSFTConfig, FastSFTTrainer

    # documents of 6 to 110 tokens (a character tokenizer), so a packed batch makes several groups
    rows = [{"prompt": f"Q{i}: " + "ab" * (i * 7 % 41), "completion": " A" + "z" * (i % 23 + 1)} for i in range(64)]
    torch.manual_seed(0)
    model = load_model("fusetune:tiny_llama", torch.float32, random_init=True)
    args = FastSFTConfig(
        output_dir=str(tmp_path / attention),
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_steps=steps,
        logging_steps=1,
        seed=0,
        packing=True,
        max_length=128,
        learning_rate=3e-3,
    )
    try:
        trainer = FastSFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )
        assert model.config._attn_implementation == varlen.MASKED
        if attention in REFERENCES:
            AttentionInterface.register(attention, REFERENCES[attention])
            AttentionMaskInterface.register(attention, varlen.varlen_mask)
            model.set_attn_implementation(attention)
        trainer.train()
    finally:
        remove_kernels()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == steps
    return [log["loss"] for log in logs], [log["grad_norm"] for log in logs]


def test_packed_training_gives_the_losses_of_both_references(tmp_path, tiny_tokenizer):
    """The tiny Llama trained a few packed steps: the same losses and gradient norms through the masked
    path as through each document alone and through the block-diagonal mask it replaces."""
    losses, norms = train_packed(tmp_path, tiny_tokenizer, varlen.MASKED)
    assert varlen.calls["masked"] > 0 and not varlen.calls["sdpa"]
    for reference in REFERENCES:
        testing.reset_attention_calls()
        ref_losses, ref_norms = train_packed(tmp_path, tiny_tokenizer, reference)
        assert reference_calls[reference] > 0 and not varlen.calls, "the reference did not run"
        for a, b in zip(losses + norms, ref_losses + ref_norms, strict=True):
            assert abs(a - b) <= FP32_TOL * abs(b), (reference, losses, ref_losses, norms, ref_norms)


# ------------------------------------------------------------------ CUDA (the fallback where the kernel cannot serve)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", ["gqa", "window-shorter-than-some-groups", "softcap-window-gqa"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_masked_path(case, dtype, tol):
    rows, heads, kv_heads, window, softcap, scaling = CASES[case]
    scaling = scaling if scaling is not None else 0.25
    q, k, v = qkv(rows, heads, kv_heads, 16, "cuda", dtype)
    out = attend(q, k, v, rows, "cu_seq_lens", scaling, window, softcap)
    alone = each_document_alone(q, k, v, rows, scaling, window, softcap)
    assert rel(out, alone) <= tol
    for a, b in zip(grads(out, (q, k, v)), grads(alone, (q, k, v)), strict=True):
        assert rel(a, b) <= tol


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture_uses_the_block_diagonal_mask_and_replays_other_layouts():
    """Inside a capture the layout cannot be read on the host: the graph computes it from the batch it replays."""
    first, second = [[5, 1, 30, 12], [1, 20, 20, 7]]
    q, k, v = (t.detach() for t in qkv([first], 6, 2, 16, "cuda"))
    kwargs = layout_kwargs([first], "cu_seq_lens", "cuda")
    kwargs["max_length_q"] = kwargs["max_length_k"] = 32

    def forward():
        varlen.forget_layouts(kwargs["cu_seq_lens_q"])
        return varlen.masked_attention_forward(Attention(6, 2), q, k, v, None, scaling=0.25, sliding_window=9, **kwargs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()  # warm-up, eager
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = forward()
    for lengths, seed in ((first, 0), (second, 3)):
        for static, new in zip((q, k, v), qkv([lengths], 6, 2, 16, "cuda", seed=seed), strict=True):
            static.copy_(new)
        kwargs["cu_seq_lens_q"].copy_(layout_kwargs([lengths], "cu_seq_lens", "cuda")["cu_seq_lens_q"])
        graph.replay()
        assert rel(out, each_document_alone(q, k, v, [lengths], 0.25, window=9)) <= 1e-4
