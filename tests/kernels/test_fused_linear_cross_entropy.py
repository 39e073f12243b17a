import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from fusetune_kernels.fused_linear_cross_entropy import (
    CHUNK_BYTES_TRAINED_WEIGHT,
    default_chunk_size,
    find_kept_rows,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

from .conftest import DEVICE, TOLERANCE, needs_triton_backend
from .parity import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100
REDUCTIONS = [("mean", None), ("sum", None), ("none", None), ("mean", 23), ("sum", "tensor")]
REDUCTION_IDS = ["mean", "sum", "none", "items_int", "items_tensor"]


def num_items(spec):
    return torch.tensor(31, device=DEVICE) if spec == "tensor" else spec


def make_case(leading, hidden_size, vocab, dtype, bias=True, ignore_every=3):
    hidden = torch.randn(*leading, hidden_size, device=DEVICE).to(dtype)
    # Logits of order 1-3, like a trained lm_head.
    weight = (2.0 * torch.randn(vocab, hidden_size, device=DEVICE) / hidden_size**0.5).to(dtype)
    b = (0.5 * torch.randn(vocab, device=DEVICE)).to(dtype) if bias else None
    labels = torch.randint(0, vocab, leading, device=DEVICE)
    if ignore_every:
        labels.view(-1)[::ignore_every] = IGNORE
    return hidden, weight, b, labels


def aim_some_labels_at_argmax(hidden, weight, bias, labels, logit_scale=1.0):
    # Random labels are almost never the argmax; make every other row's label the argmax so
    # is_top1 has both values to get right.
    with torch.no_grad():
        logits = fused_linear_cross_entropy_reference_logits(hidden, weight, bias, logit_scale)
        flat, top = labels.view(-1), logits.argmax(-1).view(-1)
        flat[1::2] = torch.where(flat[1::2] == IGNORE, flat[1::2], top[1::2])


def fused_linear_cross_entropy_reference_logits(hidden, weight, bias, logit_scale):
    logits = F.linear(hidden, weight, bias)
    return logits * logit_scale if logit_scale != 1.0 else logits


def check_parity(hidden, weight, bias, labels, train=(True, True, True), grad=None, **options):
    """Loss, stats and every gradient against the float64 reference."""
    dtype = hidden.dtype
    train_h, train_w, train_b = train
    h = hidden.detach().requires_grad_(train_h)
    w = weight.detach().requires_grad_(train_w)
    b = None if bias is None else bias.detach().requires_grad_(train_b)
    loss, entropy, is_top1 = fused_linear_cross_entropy(h, w, labels, b, IGNORE, return_stats=True, **options)

    h64 = hidden.detach().double().requires_grad_(train_h)
    w64 = weight.detach().double().requires_grad_(train_w)
    b64 = None if bias is None else bias.detach().double().requires_grad_(train_b)
    ref, ref_entropy, _ = fused_linear_cross_entropy_reference(
        h64, w64, labels, b64, IGNORE, return_stats=True, **options
    )
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    # The input-dtype logits round once more than the float64 reference: tolerance of the dtype.
    assert_close(loss, ref, dtype, "loss")
    assert_close(entropy, ref_entropy, dtype, "entropy")
    check_top1(is_top1, h, w, b, labels, options.get("logit_scale", 1.0), options.get("softcap"))

    if not (train_h or train_w or (b is not None and train_b)):
        return
    if grad is None:
        grad = torch.randn_like(loss)
    loss.backward(grad)
    ref.backward(grad.double())
    for name, fast, slow, trained in [
        ("dhidden", h, h64, train_h),
        ("dweight", w, w64, train_w),
        ("dbias", b, b64, train_b),
    ]:
        if fast is None:
            continue
        if not trained:
            assert fast.grad is None, f"{name} computed for a frozen input"
            continue
        assert fast.grad.dtype == fast.dtype
        assert_close(fast.grad, slow.grad, dtype, name)


def check_top1(is_top1, hidden, weight, bias, labels, logit_scale, softcap):
    """is_top1 against argmax of the full logits in the input dtype; a disagreement is only
    allowed where the label's logit ties the max within the input dtype's rounding."""
    _, _, ref_top1 = fused_linear_cross_entropy_reference(
        hidden.detach(),
        weight.detach(),
        labels,
        None if bias is None else bias.detach(),
        IGNORE,
        softcap=softcap,
        logit_scale=logit_scale,
        return_stats=True,
    )
    assert is_top1.dtype == torch.bool and is_top1.shape == labels.shape
    assert not is_top1[labels == IGNORE].any()
    differ = is_top1 != ref_top1
    if differ.any():
        logits = fused_linear_cross_entropy_reference_logits(hidden, weight, bias, logit_scale).float()
        label_col = labels.clamp_min(0).unsqueeze(-1)
        label_logit = logits.gather(-1, label_col).squeeze(-1)
        best_other = logits.scatter(-1, label_col, float("-inf")).max(-1).values
        allowed = 4 * torch.finfo(hidden.dtype).eps * logits.abs().max(-1).values
        near_tie = (label_logit - best_other).abs() <= allowed
        assert near_tie[differ].all(), f"is_top1 differs on {differ.sum().item()} rows"
    assert ref_top1.any() and not ref_top1.all()


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("reduction,items", REDUCTIONS, ids=REDUCTION_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(dtype, reduction, items, softcap, small_blocks):
    # Several chunks (chunk_size 16 over 26 kept rows), bias, non-power-of-two sizes.
    needs_triton_backend()
    hidden, weight, bias, labels = make_case((2, 19), 72, 1000, dtype)
    aim_some_labels_at_argmax(hidden, weight, bias, labels)
    check_parity(
        hidden,
        weight,
        bias,
        labels,
        reduction=reduction,
        num_items_in_batch=num_items(items),
        softcap=softcap,
        chunk_size=16,
    )


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logit_scale_no_bias(dtype, softcap, small_blocks):
    needs_triton_backend()
    hidden, weight, _, labels = make_case((37,), 100, 1000, dtype, bias=False)
    aim_some_labels_at_argmax(hidden, weight, None, labels, logit_scale=0.625)
    check_parity(hidden, weight, None, labels, softcap=softcap, logit_scale=0.625, chunk_size=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_vocab_default_chunk(dtype):
    # V = 32003 with the default chunk (one chunk here: dW goes straight to the weight dtype).
    needs_triton_backend()
    hidden, weight, bias, labels = make_case((9,), 72, 32003, dtype)
    aim_some_labels_at_argmax(hidden, weight, bias, labels)
    check_parity(hidden, weight, bias, labels, reduction="sum")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "train",
    [(True, False, False), (False, True, True), (True, True, False)],
    ids=["lora_frozen_head", "frozen_hidden", "frozen_bias"],
)
def test_frozen_inputs(train, reduction, small_blocks):
    # A frozen lm_head gets no dW (weight.grad stays None); "none" with a frozen head scales
    # dhidden per token in backward, with a trained head it recomputes in backward.
    needs_triton_backend()
    hidden, weight, bias, labels = make_case((23,), 72, 1000, torch.bfloat16)
    aim_some_labels_at_argmax(hidden, weight, bias, labels)
    check_parity(hidden, weight, bias, labels, train=train, reduction=reduction, chunk_size=8)


def low_rank_reference(hidden, weight, bias, lora_in, lora_b, labels, reduction, items):
    """Plain float64 PyTorch: the full logits with the low-rank term, then F.cross_entropy."""
    logits = F.linear(hidden, weight, bias) + lora_in @ lora_b.t()
    per_token = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="none")
    if reduction == "none":
        return per_token.view(labels.shape)
    total = per_token.sum()
    if reduction == "sum" and items is None:
        return total
    return total / (items if items is not None else (labels != IGNORE).sum())


@pytest.mark.parametrize(
    "trains",
    # which of hidden, weight, bias, lora_in, lora_b train
    [(True, False, False, True, True), (True, True, True, True, True), (True, False, False, True, False)],
    ids=["frozen_head", "trained_head", "frozen_lora_b"],
)
@pytest.mark.parametrize(
    "reduction,items", [("mean", None), ("none", None), ("sum", 23)], ids=["mean", "none", "items"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_rank_term(dtype, reduction, items, trains, small_blocks):
    # logits + lora_in @ lora_b.T (LoRA on the head): loss, stats and the gradients of all five inputs against
    # plain PyTorch in float64, over several chunks; "none" with a trained head or lora_b recomputes in backward,
    # else scales the per-row gradients (dhidden, dlora_in) there.
    needs_triton_backend()
    hidden, weight, bias, labels = make_case((3, 11), 72, 1000, dtype)
    rank = 5
    lora_in = torch.randn(3, 11, rank, device=DEVICE).to(dtype)
    lora_b = (torch.randn(1000, rank, device=DEVICE) / rank**0.5).to(dtype)
    inputs = [hidden, weight, bias, lora_in, lora_b]
    fast = [t.detach().clone().requires_grad_(on) for t, on in zip(inputs, trains, strict=True)]
    slow = [t.detach().double().requires_grad_(on) for t, on in zip(inputs, trains, strict=True)]
    h, w, b, u, lb = fast
    loss, entropy, _ = fused_linear_cross_entropy(
        h, w, labels, b, IGNORE, reduction, items, chunk_size=8, return_stats=True, lora_in=u, lora_b=lb
    )
    h64, w64, b64, u64, lb64 = slow
    ref = low_rank_reference(h64, w64, b64, u64, lb64, labels, reduction, items)
    assert_close(loss, ref, dtype, "loss")
    _, ref_entropy, _ = fused_linear_cross_entropy_reference(
        h64, w64, labels, b64, IGNORE, reduction, items, return_stats=True, lora_in=u64, lora_b=lb64
    )
    assert_close(entropy, ref_entropy, dtype, "entropy")
    grad = torch.randn_like(loss)
    loss.backward(grad)
    ref.backward(grad.double())
    for name, f, s, on in zip(["dhidden", "dweight", "dbias", "dlora_in", "dlora_b"], fast, slow, trains, strict=True):
        if not on:
            assert f.grad is None, f"{name} computed for a frozen input"
            continue
        assert f.grad.dtype == dtype
        assert_close(f.grad, s.grad, dtype, name)


def test_low_rank_term_reference_and_bad_inputs():
    hidden, weight, _, labels = make_case((2, 6), 16, 50, torch.float64, bias=False)
    lora_in, lora_b = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    ref = fused_linear_cross_entropy_reference(hidden, weight, labels, lora_in=lora_in, lora_b=lora_b)
    expected = low_rank_reference(hidden, weight, None, lora_in, lora_b, labels, "mean", None)
    torch.testing.assert_close(ref, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="both or neither"):
        fused_linear_cross_entropy(hidden, weight, labels, lora_in=lora_in)
    with pytest.raises(ValueError, match="lora_b"):
        fused_linear_cross_entropy(hidden, weight, labels, lora_in=lora_in, lora_b=lora_b[:, :2])
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(hidden, weight, labels, lora_in=lora_in.float(), lora_b=lora_b.float())


def test_top1_ties_pick_first_index(small_blocks):
    # torch.argmax returns the first of tied maxima: tied columns across blocks (100, 700) and
    # within a block (300, 301).
    needs_triton_backend()
    weight = 0.1 * torch.randn(1000, 16, device=DEVICE)
    u, v = torch.randn(2, 16, device=DEVICE)
    weight[100] = weight[700] = u
    weight[300] = weight[301] = v
    hidden = torch.stack([u, u, v, v]) * 4
    labels = torch.tensor([100, 700, 300, 301], device=DEVICE)
    _, _, is_top1 = fused_linear_cross_entropy(hidden, weight, labels, return_stats=True)
    _, _, ref_top1 = fused_linear_cross_entropy_reference(hidden, weight, labels, return_stats=True)
    expected = torch.tensor([True, False, True, False], device=DEVICE)
    assert torch.equal(ref_top1, expected) and torch.equal(is_top1, expected)


@pytest.mark.parametrize("reduction,items", REDUCTIONS, ids=REDUCTION_IDS)
def test_all_ignored(reduction, items):
    needs_triton_backend()
    hidden, weight, bias, labels = make_case((6,), 40, 300, torch.float32)
    labels.fill_(IGNORE)
    h, w, b = (t.requires_grad_() for t in (hidden, weight, bias))
    loss, entropy, is_top1 = fused_linear_cross_entropy(
        h, w, labels, b, reduction=reduction, num_items_in_batch=num_items(items), return_stats=True
    )
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    assert torch.equal(entropy, torch.zeros_like(entropy)) and not is_top1.any()
    loss.backward(torch.randn_like(loss))
    for t in (h, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_no_ignored_rows_and_no_stats():
    needs_triton_backend()
    hidden, weight, bias, labels = make_case((2, 5), 64, 500, torch.float32, ignore_every=0)
    h = hidden.requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels, bias, chunk_size=3)
    ref = fused_linear_cross_entropy_reference(hidden.detach().double(), weight.double(), labels, bias.double())
    assert_close(loss, ref, torch.float32, "loss")
    loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    fused_linear_cross_entropy_reference(h64, weight.double(), labels, bias.double()).backward()
    assert_close(h.grad, h64.grad, torch.float32, "dhidden")


@pytest.mark.parametrize("ignore_every", [3, 0], ids=["some-ignored", "none-ignored"])
def test_kept_rows_found_by_the_caller(ignore_every):
    """Rows found early by find_kept_rows give exactly what the call finds itself."""
    needs_triton_backend()
    hidden, weight, bias, labels = make_case((3, 7), 32, 250, torch.float32, ignore_every=ignore_every)
    kept = find_kept_rows(labels)
    assert torch.equal(kept, (labels.view(-1) != IGNORE).nonzero().squeeze(1))
    results = []
    for rows in (None, kept):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss, entropy, is_top1 = fused_linear_cross_entropy(
            h, w, labels, bias, reduction="sum", return_stats=True, chunk_size=5, kept_rows=rows
        )
        loss.backward()
        results.append((loss, entropy, is_top1, h.grad, w.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="kept_rows"):
        fused_linear_cross_entropy(hidden, weight, labels, kept_rows=kept.int())


def test_no_grad_and_single_backward():
    needs_triton_backend()
    hidden, weight, _, labels = make_case((7,), 32, 200, torch.float32, bias=False)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels)
    assert not loss.requires_grad
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_reference_matches_hf_lm_head_and_loss():
    # nn.Linear lm_head + HF's ForCausalLMLoss (which shifts inside) = our reference on shifted labels.
    hidden, weight, _, labels = make_case((2, 12), 48, 300, torch.float32, bias=False)
    head = torch.nn.Linear(48, 300, bias=False, device=DEVICE)
    head.weight.data.copy_(weight)
    for items in (None, 9):
        hf = ForCausalLMLoss(head(hidden), labels, vocab_size=300, num_items_in_batch=items)
        shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
        ours = fused_linear_cross_entropy_reference(hidden, weight, shifted, num_items_in_batch=items)
        torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)


def test_default_chunk_size():
    assert default_chunk_size(128256, 2) == 1024
    assert default_chunk_size(256000, 2) == 512
    assert default_chunk_size(10**7, 4) == 128
    assert default_chunk_size(128256, 2, weight_trains=True) == 4096


def test_bad_inputs():
    hidden, weight, bias, labels = make_case((4,), 8, 10, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cross_entropy(hidden, weight, labels, bias[:5])
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(hidden.double(), weight, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="max")


# ---------------------------------------------------------------- large shapes, CUDA only


def chunked_reference(hidden, weight, labels, chunk=512):
    """Mean loss, dhidden and dweight in float64, a token chunk at a time."""
    n_valid = (labels != IGNORE).sum().clamp_min(1).double()
    w64 = weight.double().requires_grad_()
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    dh = torch.empty(hidden.shape, dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h64 = hidden[start : start + chunk].double().requires_grad_()
        part = fused_linear_cross_entropy_reference(h64, w64, labels[start : start + chunk], reduction="sum") / n_valid
        part.backward()
        loss += part.detach()
        dh[start : start + chunk] = h64.grad
    return loss, dh, w64.grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vocab", [128256, 151936, 256000])
def test_large_cuda_parity_and_memory(vocab):
    n_tokens, hidden_size, dtype = 8192, 4096, torch.bfloat16
    hidden, weight, _, labels = make_case((n_tokens,), hidden_size, vocab, dtype, bias=False, ignore_every=4)
    logits_bytes = n_tokens * vocab * 2
    weight_bytes = vocab * hidden_size * 2

    for train_weight in (False, True):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_(train_weight)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fused_linear_cross_entropy(h, w, labels)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        # Frozen head: chunk buffer + gathered hidden + dhidden, far below the bf16 logits alone.
        # Trained head: plus the fp32 dW accumulator, dW itself and a larger (1 GiB) chunk buffer.
        budget = logits_bytes // 4 + (3 * weight_bytes + CHUNK_BYTES_TRAINED_WEIGHT if train_weight else 0)
        assert peak < budget, f"peak extra memory {peak / 2**30:.2f} GiB >= {budget / 2**30:.2f} GiB"
        if not train_weight:
            assert w.grad is None

    ref_loss, ref_dh, ref_dw = chunked_reference(hidden, weight, labels)
    tol = TOLERANCE[dtype]
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= tol
    assert_close(h.grad, ref_dh, dtype, "dhidden", tol)
    assert_close(w.grad, ref_dw, dtype, "dweight", tol)
