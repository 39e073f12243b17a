import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from fusetune_kernels.cross_entropy import cross_entropy, cross_entropy_reference

from .conftest import DEVICE, TOLERANCE, needs_triton_backend
from .parity import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100
# (reduction, num_items_in_batch): the last two are Hugging Face's gradient-accumulation form.
REDUCTIONS = [
    ("mean", None),
    ("sum", None),
    ("none", None),
    ("mean", 23),
    ("sum", "tensor"),
]
REDUCTION_IDS = ["mean", "sum", "none", "items_int", "items_tensor"]


def make_case(leading, vocab, dtype, ignore_every=3, spread=3.0):
    logits = (spread * torch.randn(*leading, vocab, device=DEVICE)).to(dtype)
    labels = torch.randint(0, vocab, leading, device=DEVICE)
    flat = labels.view(-1)
    flat[::ignore_every] = IGNORE
    return logits, labels


def num_items(spec):
    return torch.tensor(31, device=DEVICE) if spec == "tensor" else spec


def check_parity(logits, labels, reduction="mean", items=None, softcap=None, grad=None, tol=None):
    """Loss and dlogits against the float64 reference; returns the fast loss."""
    dtype = logits.dtype
    x = logits.detach().requires_grad_()
    out = cross_entropy(x, labels, IGNORE, reduction, items, softcap)
    x64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(x64, labels, IGNORE, reduction, items, softcap)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close(out, ref, torch.float32, "loss")  # fp32 math on exactly representable inputs
    if grad is None:
        grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, "dlogits", tol)
    return out


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("reduction,items", REDUCTIONS, ids=REDUCTION_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_small_vocab(dtype, reduction, items, softcap, small_blocks):
    needs_triton_backend()
    logits, labels = make_case((3, 13), 1000, dtype)
    check_parity(logits, labels, reduction, num_items(items), softcap)


@pytest.mark.parametrize("reduction,softcap", [("mean", 2.5), ("none", None)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_odd_vocab(dtype, reduction, softcap):
    needs_triton_backend()
    logits, labels = make_case((7,), 32003, dtype)
    check_parity(logits, labels, reduction, None, softcap)


@pytest.mark.parametrize("reduction,items", REDUCTIONS, ids=REDUCTION_IDS)
def test_all_ignored(reduction, items):
    needs_triton_backend()
    logits, labels = make_case((5,), 300, torch.float32)
    labels.fill_(IGNORE)
    x = logits.requires_grad_()
    out = cross_entropy(x, labels, IGNORE, reduction, num_items(items))
    ref = cross_entropy_reference(logits.detach(), labels, IGNORE, reduction, num_items(items))
    assert torch.equal(out.detach(), torch.zeros_like(out)) and torch.equal(ref, torch.zeros_like(ref))
    out.backward(torch.randn_like(out))
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_shifted_non_contiguous_view():
    # HF shifts with logits[:, :-1, :]: rows are not contiguous with each other.
    needs_triton_backend()
    full = torch.randn(2, 9, 500, device=DEVICE)
    labels = torch.randint(0, 500, (2, 8), device=DEVICE)
    labels[0, :3] = IGNORE
    logits = full[:, :-1, :]
    assert not logits.is_contiguous()
    check_parity(logits, labels, "mean")


def test_extreme_logits_stay_finite():
    # Large magnitudes, -inf entries (masked vocabulary), and a softcap far below the logits.
    needs_triton_backend()
    logits, labels = make_case((6,), 700, torch.float32, ignore_every=4, spread=2000.0)
    logits[:, 100:140] = float("-inf")
    labels[labels.ge(100) & labels.lt(140)] = 5
    # An fp32 lse of ~6000 carries an absolute error of ~|lse| * 2**-24, so exp(z - lse) is only
    # good to ~4e-4 relative here, for any fp32 implementation that stores the lse.
    check_parity(logits, labels, "mean", tol=5e-4)
    check_parity(logits.clamp_min(-1e4), labels, "sum", softcap=30.0)


def test_none_with_expanded_grad():
    # loss.sum().backward() hands a stride-0 grad to the "none" backward.
    needs_triton_backend()
    logits, labels = make_case((11,), 400, torch.float32)
    x = logits.requires_grad_()
    cross_entropy(x, labels, reduction="none").sum().backward()
    x64 = logits.detach().double().requires_grad_()
    cross_entropy_reference(x64, labels, reduction="sum").backward()
    assert_close(x.grad, x64.grad, torch.float32, "dlogits")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_torch(reduction):
    logits, labels = make_case((4, 9), 300, torch.bfloat16)
    ref = cross_entropy_reference(logits, labels, reduction=reduction)
    expected = F.cross_entropy(logits.float().view(-1, 300), labels.view(-1), reduction=reduction)
    torch.testing.assert_close(ref, expected.view_as(ref), rtol=0, atol=0)


@pytest.mark.parametrize("items", [None, 17], ids=["mean", "num_items"])
def test_reference_matches_hf_causal_lm_loss(items):
    # ForCausalLMLoss shifts inside; our op takes labels already shifted.
    logits = torch.randn(2, 10, 300).to(torch.bfloat16)
    labels = torch.randint(0, 300, (2, 10))
    labels[:, :4] = IGNORE
    hf = ForCausalLMLoss(logits, labels, vocab_size=300, num_items_in_batch=items)
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    ours = cross_entropy_reference(logits, shifted, num_items_in_batch=items)
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)


def test_bad_inputs():
    logits = torch.randn(4, 10)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        cross_entropy(logits, labels[:3])
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        cross_entropy(logits, labels, reduction="none", num_items_in_batch=4)
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(logits, labels, softcap=0.0)
    with pytest.raises(ValueError, match="integer labels"):
        cross_entropy(logits, labels.float())


# ---------------------------------------------------------------- large shapes, CUDA only


def chunked_reference_error(logits, labels, loss, dlogits, softcap, chunk=1024):
    """Relative errors of mean loss and dlogits against float64, a row chunk at a time."""
    n_valid = (labels != IGNORE).sum().clamp_min(1).double()
    ref_loss = torch.zeros((), dtype=torch.float64, device=logits.device)
    err2 = ref2 = 0.0
    for start in range(0, logits.shape[0], chunk):
        x = logits[start : start + chunk].double().requires_grad_()
        part = cross_entropy_reference(x, labels[start : start + chunk], reduction="sum", softcap=softcap)
        (part / n_valid).backward()
        ref_loss += part.detach() / n_valid
        assert torch.isfinite(dlogits[start : start + chunk]).all()
        err2 += (dlogits[start : start + chunk].double() - x.grad).norm().item() ** 2
        ref2 += x.grad.norm().item() ** 2
        del x, part
    return abs(loss.item() - ref_loss.item()) / ref_loss.item(), (err2 / ref2) ** 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("vocab", [128256, 151936, 256000])
def test_large_vocab_cuda(vocab, softcap):
    n_rows = 8192
    logits, labels = make_case((n_rows,), vocab, torch.bfloat16, ignore_every=5)
    x = logits.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = cross_entropy(x, labels, softcap=softcap)
    fwd_peak = torch.cuda.max_memory_allocated() - base
    loss.backward()
    bwd_peak = torch.cuda.max_memory_allocated() - base
    logits_bytes = logits.numel() * logits.element_size()
    assert fwd_peak < 1 << 20, f"forward allocated {fwd_peak} bytes: something of size N*V"
    assert bwd_peak < logits_bytes + (1 << 20), f"backward peak {bwd_peak} > dlogits {logits_bytes}"
    loss_err, grad_err = chunked_reference_error(logits.detach(), labels, loss, x.grad, softcap)
    assert loss_err <= 1e-5, f"loss relative error {loss_err:.2e}"
    assert grad_err <= TOLERANCE[torch.bfloat16], f"dlogits relative error {grad_err:.2e}"
