import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from fusetune_kernels.rope import rope, rope_reference

from .conftest import DEVICE, needs_triton_backend
from .parity import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def packed_position_ids(batch, seq_len):
    """Each row packs documents of random lengths; positions restart at 0 for every document."""
    rows = []
    for _ in range(batch):
        positions = []
        while len(positions) < seq_len:
            doc_len = int(torch.randint(1, 9, ()))
            positions.extend(range(doc_len))
        rows.append(positions[:seq_len])
    return torch.tensor(rows, device=DEVICE)


def rotary_tables(head_dim, position_ids, dtype, scaling=None):
    """cos/sin exactly as the model builds them: LlamaRotaryEmbedding on the given position_ids."""
    config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=512,
        rope_parameters=scaling or {"rope_type": "default", "rope_theta": 10000.0},
    )
    rotary = LlamaRotaryEmbedding(config).to(DEVICE)
    # Positions far beyond the sequence length spread the angles over the whole range.
    return rotary(torch.empty(0, device=DEVICE, dtype=dtype), position_ids * 37)


def hf_layout(batch, seq_len, n_heads, head_dim, dtype):
    """q or k as Hugging Face attention hands them over: a [b, heads, seq, d] transposed view."""
    flat = torch.randn(batch, seq_len, n_heads * head_dim, device=DEVICE).to(dtype)
    return flat.view(batch, seq_len, n_heads, head_dim).transpose(1, 2)


def check_parity(q, k, cos, sin, unsqueeze_dim=1, dtype=None):
    """Kernel outputs and both input gradients against the float64 reference."""
    dtype = dtype or q.dtype
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    q_rot, k_rot = rope(q, k, cos, sin, unsqueeze_dim)
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    q_ref, k_ref = rope_reference(q64, k64, cos.double(), sin.double(), unsqueeze_dim)
    assert q_rot.dtype == q.dtype and k_rot.dtype == k.dtype
    assert_close(q_rot, q_ref, dtype, "q_rot")
    assert_close(k_rot, k_ref, dtype, "k_rot")

    dq_rot, dk_rot = torch.randn_like(q_rot), torch.randn_like(k_rot)
    torch.autograd.backward((q_rot, k_rot), (dq_rot, dk_rot))
    torch.autograd.backward((q_ref, k_ref), (dq_rot.double(), dk_rot.double()))
    assert_close(q.grad, q64.grad, dtype, "dq")
    assert_close(k.grad, k64.grad, dtype, "dk")
    assert q.grad.dtype == q.dtype and k.grad.dtype == k.dtype


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
@pytest.mark.parametrize(
    "batch,seq_len,n_q_heads,n_kv_heads,head_dim",
    [(2, 13, 4, 2, 64), (1, 7, 3, 3, 128), (3, 9, 6, 2, 80), (2, 5, 8, 1, 96)],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_packed(dtype, batch, seq_len, n_q_heads, n_kv_heads, head_dim, scaling):
    needs_triton_backend()
    position_ids = packed_position_ids(batch, seq_len)
    cos, sin = rotary_tables(head_dim, position_ids, dtype, scaling)
    q = hf_layout(batch, seq_len, n_q_heads, head_dim, dtype)
    k = hf_layout(batch, seq_len, n_kv_heads, head_dim, dtype)
    check_parity(q, k, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_tables_and_contiguous_inputs(dtype):
    # cos/sin with batch 1 broadcast over batch 3; q and k plainly contiguous.
    needs_triton_backend()
    position_ids = torch.arange(11, device=DEVICE)[None]
    cos, sin = rotary_tables(64, position_ids, dtype)
    q = torch.randn(3, 4, 11, 64, device=DEVICE).to(dtype)
    k = torch.randn(3, 2, 11, 64, device=DEVICE).to(dtype)
    check_parity(q, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_tables_beside_half_heads_give_half_outputs(dtype):
    """OLMo 2's rotary module keeps cos/sin in fp32 beside bf16 heads and casts the rotation back: the
    kernel computes with the fp32 tables and writes q's and k's own dtype."""
    needs_triton_backend()
    position_ids = packed_position_ids(2, 12)
    cos, sin = rotary_tables(64, position_ids, torch.float32, LLAMA3_SCALING)
    q = hf_layout(2, 12, 4, 64, dtype)
    k = hf_layout(2, 12, 2, 64, dtype)
    check_parity(q, k, cos, sin)
    q_ref, k_ref = rope_reference(q, k, cos, sin)
    assert q_ref.dtype == k_ref.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unsqueeze_dim_2(dtype):
    # [batch, seq, heads, head_dim] layout.
    needs_triton_backend()
    position_ids = packed_position_ids(2, 10)
    cos, sin = rotary_tables(80, position_ids, dtype, LLAMA3_SCALING)
    q = torch.randn(2, 10, 6, 80, device=DEVICE).to(dtype)
    k = torch.randn(2, 10, 3, 80, device=DEVICE).to(dtype)
    check_parity(q, k, cos, sin, unsqueeze_dim=2)


def test_odd_strides_and_layout_kept():
    # q is a strided slice with a non-unit last-dim stride; outputs keep the inputs' memory order.
    needs_triton_backend()
    position_ids = packed_position_ids(2, 6)
    cos, sin = rotary_tables(64, position_ids, torch.float32)
    q = torch.randn(2, 6, 4, 128, device=DEVICE)[..., ::2].transpose(1, 2)
    k = hf_layout(2, 6, 2, 64, torch.float32)
    check_parity(q, k, cos, sin)
    k_rot = rope(q, k, cos, sin)[1]
    assert k_rot.stride() == k.stride()


@pytest.mark.parametrize("frozen", ["k", "q"])
def test_gradient_for_one_input_only(frozen):
    # One of q/k needs no grad: the other's gradient is still right, the frozen one gets none.
    needs_triton_backend()
    position_ids = packed_position_ids(1, 9)
    cos, sin = rotary_tables(64, position_ids, torch.float32)
    inputs = {"q": hf_layout(1, 9, 4, 64, torch.float32), "k": hf_layout(1, 9, 2, 64, torch.float32)}
    trained = "q" if frozen == "k" else "k"
    inputs[trained].requires_grad_()
    outputs = dict(zip("qk", rope(inputs["q"], inputs["k"], cos, sin), strict=True))
    upstream = torch.randn_like(outputs[trained])
    (outputs[trained] * upstream).sum().backward()

    ref_inputs = {name: t.detach().double() for name, t in inputs.items()}
    ref_inputs[trained].requires_grad_()
    ref_rotated = rope_reference(ref_inputs["q"], ref_inputs["k"], cos.double(), sin.double())
    ref_outputs = dict(zip("qk", ref_rotated, strict=True))
    (ref_outputs[trained] * upstream.double()).sum().backward()
    assert_close(inputs[trained].grad, ref_inputs[trained].grad, torch.float32, f"d{trained}")
    assert inputs[frozen].grad is None and not outputs[frozen].requires_grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_reference_equals_hugging_face(dtype, unsqueeze_dim):
    # Bit for bit the function the model calls, forward and backward, llama3-scaled packed tables.
    position_ids = packed_position_ids(2, 12)
    cos, sin = rotary_tables(96, position_ids, dtype, LLAMA3_SCALING)
    q = hf_layout(2, 12, 4, 96, dtype)
    k = hf_layout(2, 12, 2, 96, dtype)
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    q_a, k_a = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_b, k_b = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    ours = rope_reference(q_a, k_a, cos, sin, unsqueeze_dim)
    theirs = apply_rotary_pos_emb(q_b, k_b, cos, sin, unsqueeze_dim)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    grads = [torch.randn_like(t) for t in ours]
    torch.autograd.backward(ours, grads)
    torch.autograd.backward(theirs, grads)
    assert torch.equal(q_a.grad, q_b.grad) and torch.equal(k_a.grad, k_b.grad)


def test_packed_tables_restart_per_document():
    # The tables themselves: a restarted document sees the same angles as a fresh one.
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]], device=DEVICE)
    cos, sin = rotary_tables(64, position_ids, torch.float32, LLAMA3_SCALING)
    assert torch.equal(cos[0, 4:7], cos[0, 0:3]) and torch.equal(sin[0, 7:9], sin[0, 0:2])
    assert not torch.equal(cos[0, 1], cos[0, 2])


def test_bad_inputs():
    q = torch.randn(2, 4, 5, 64, device=DEVICE)
    k = torch.randn(2, 2, 5, 64, device=DEVICE)
    cos = sin = torch.randn(2, 5, 64, device=DEVICE)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        rope(q, k, cos, sin, unsqueeze_dim=0)
    with pytest.raises(ValueError, match="differ in batch"):
        rope(q, k[:, :, :4], cos, sin)
    with pytest.raises(ValueError, match="cos/sin must be"):
        rope(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="cos/sin must be"):
        rope(q, k, torch.randn(3, 5, 64, device=DEVICE), torch.randn(3, 5, 64, device=DEVICE))
    with pytest.raises(ValueError, match="even"):
        rope(q[..., :63], k[..., :63], cos[..., :63], sin[..., :63])
    with pytest.raises(ValueError, match="4-D"):
        rope(q[0], k[0], cos, sin)
    with pytest.raises(ValueError, match="no gradient"):
        rope(q, k, cos.clone().requires_grad_(), sin)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_q_heads,n_kv_heads,head_dim", [(32, 8, 128), (64, 8, 128), (16, 8, 64)])
def test_parity_large(n_q_heads, n_kv_heads, head_dim):
    position_ids = packed_position_ids(4, 2048)
    cos, sin = rotary_tables(head_dim, position_ids, torch.bfloat16, LLAMA3_SCALING)
    q = hf_layout(4, 2048, n_q_heads, head_dim, torch.bfloat16)
    k = hf_layout(4, 2048, n_kv_heads, head_dim, torch.bfloat16)
    check_parity(q, k, cos, sin)
