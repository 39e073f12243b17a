"""Parity of the fused gated activations (SwiGLU, GeGLU) with their float64 references."""

import pytest
import torch

from fusetune_kernels.glu import _as_rows, geglu, geglu_reference, swiglu, swiglu_reference

from .conftest import DEVICE, needs_triton_backend
from .parity import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name -> (fast, reference, keyword arguments)
OPS = {
    "swiglu": (swiglu, swiglu_reference, {}),
    "geglu_erf": (geglu, geglu_reference, {"approximate": "none"}),
    "geglu_tanh": (geglu, geglu_reference, {"approximate": "tanh"}),
}

# [.., intermediate]: sizes not powers of two, odd token counts, several leading dims.
# The interpreter (numpy) warns when exp(-gate) or gate * gate reach inf, which the kernels expect.
OVERFLOW_IS_EXPECTED = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

SHAPES = [(7, 1000), (2, 37, 72), (3, 5, 1376), (1, 1, 1), (2, 3, 1, 2500)]


def check_parity(op: str, gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor | None = None):
    """Output, dgate and dup of the kernel against the reference on float64 copies of the same inputs."""
    needs_triton_backend()
    fast, reference, kwargs = OPS[op]
    dtype = gate.dtype
    gate = gate.detach().requires_grad_(True)
    up = up.detach().requires_grad_(True)
    gate64 = gate.detach().double().requires_grad_(True)
    up64 = up.detach().double().requires_grad_(True)

    out = fast(gate, up, **kwargs)
    ref = reference(gate64, up64, **kwargs)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"{op} out")

    if dout is None:
        dout = torch.randn(out.shape, dtype=dtype, device=out.device)
    out.backward(dout)
    ref.backward(dout.double())
    assert gate.grad.dtype == dtype and up.grad.dtype == dtype
    assert_close(gate.grad, gate64.grad, dtype, f"{op} dgate")
    assert_close(up.grad, up64.grad, dtype, f"{op} dup")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_parity(op, shape, dtype):
    gate = torch.randn(shape, dtype=dtype, device=DEVICE) * 2
    up = torch.randn(shape, dtype=dtype, device=DEVICE)
    check_parity(op, gate, up)


@OVERFLOW_IS_EXPECTED
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_extreme_inputs(op, dtype):
    # |gate| up to 50: exp(-gate) and the tanh argument (~ 0.036 gate^3) leave the fp16 range
    # and exp(2 z) leaves even the fp32 range; nothing may overflow into inf/NaN.
    gate = (torch.rand(5, 333, device=DEVICE) * 100 - 50).to(dtype)
    gate[0, :8] = torch.tensor([-50.0, -30.0, -20.0, -9.0, 9.0, 20.0, 30.0, 50.0])
    up = torch.randn(5, 333, dtype=dtype, device=DEVICE)
    check_parity(op, gate, up)


@OVERFLOW_IS_EXPECTED
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_saturated_inputs(op, dtype):
    # Far in the tails the activation is exactly 0 or gate, its slope 0 or 1.
    magnitudes = [100.0, 1000.0] + ([1e30] if dtype == torch.float32 else [])
    values = torch.tensor([s * m for m in magnitudes for s in (-1.0, 1.0)])
    gate = values[torch.randint(len(values), (3, 129))].to(dtype=dtype, device=DEVICE)
    up = torch.randn(3, 129, dtype=dtype, device=DEVICE)
    check_parity(op, gate, up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_fused_gate_up_halves(op, dtype):
    # gate and up as the two halves of one fused projection: strided rows, read in place.
    fused = torch.randn(2, 9, 2 * 520, dtype=dtype, device=DEVICE)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    assert _as_rows(gate).data_ptr() == gate.data_ptr() and _as_rows(gate).stride(0) == 2 * 520
    check_parity(op, gate, up)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_layouts(op):
    dtype = torch.bfloat16
    # Leading dims that cannot collapse into one row stride, a transposed up, a transposed dout.
    gate = torch.randn(3, 11, 200, dtype=dtype, device=DEVICE)[:, :7, :]
    up = torch.randn(7, 3, 200, dtype=dtype, device=DEVICE).transpose(0, 1)
    dout = torch.randn(7, 3, 200, dtype=dtype, device=DEVICE).transpose(0, 1)
    assert not gate.is_contiguous() and not up.is_contiguous() and not dout.is_contiguous()
    check_parity(op, gate, up, dout)
    # Column-strided inputs take the copy path.
    gate = torch.randn(4, 300, 2, dtype=dtype, device=DEVICE)[..., 0]
    up = torch.randn(4, 300, dtype=dtype, device=DEVICE)
    check_parity(op, gate, up)


@pytest.mark.parametrize("op", OPS)
def test_grad_of_one_input(op):
    needs_triton_backend()
    fast, reference, kwargs = OPS[op]
    gate = torch.randn(5, 96, device=DEVICE, requires_grad=True)
    up = torch.randn(5, 96, device=DEVICE)
    dout = torch.randn(5, 96, device=DEVICE)
    (dgate,) = torch.autograd.grad(fast(gate, up, **kwargs), gate, dout)
    (dgate_ref,) = torch.autograd.grad(reference(gate, up, **kwargs), gate, dout)
    assert_close(dgate, dgate_ref, torch.float32, f"{op} dgate")


@pytest.mark.parametrize("op", OPS)
def test_empty(op):
    needs_triton_backend()
    fast, _, kwargs = OPS[op]
    gate = torch.randn(0, 72, device=DEVICE, requires_grad=True)
    up = torch.randn(0, 72, device=DEVICE, requires_grad=True)
    out = fast(gate, up, **kwargs)
    out.sum().backward()
    assert out.shape == (0, 72) and gate.grad.shape == (0, 72) and up.grad.shape == (0, 72)


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="same dtype"):
        swiglu(x, x.half())
    with pytest.raises(ValueError, match="unsupported dtype"):
        swiglu(x.double(), x.double())
    with pytest.raises(ValueError, match="approximate"):
        geglu(x, x, approximate="sigmoid")
    with pytest.raises(ValueError, match="approximate"):
        geglu_reference(x, x, approximate="erf")


# The references define the same function as the Hugging Face models we patch.


@pytest.mark.parametrize(
    "name, reference, kwargs",
    [
        ("silu", swiglu_reference, {}),
        ("gelu", geglu_reference, {"approximate": "none"}),
        ("gelu_pytorch_tanh", geglu_reference, {"approximate": "tanh"}),
        # HF's pure-Python formulas (erf and tanh written out) as an independent definition.
        ("gelu_python", geglu_reference, {"approximate": "none"}),
        ("gelu_python_tanh", geglu_reference, {"approximate": "tanh"}),
    ],
)
def test_reference_matches_hf_activation(name, reference, kwargs):
    from transformers.activations import ACT2FN

    gate = torch.randn(6, 50, dtype=torch.float64) * 4
    up = torch.randn(6, 50, dtype=torch.float64)
    torch.testing.assert_close(reference(gate, up, **kwargs), ACT2FN[name](gate) * up, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "model, hidden_act",
    [("llama", "silu"), ("llama", "gelu"), ("gemma", "gelu_pytorch_tanh"), ("gemma", "gelu")],
)
def test_reference_matches_hf_mlp(model, hidden_act):
    from transformers.activations import ACT2FN

    if model == "llama":
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaMLP as MLP
    else:
        from transformers import GemmaConfig as Config
        from transformers.models.gemma.modeling_gemma import GemmaMLP as MLP

    config = Config(hidden_size=32, intermediate_size=72, hidden_act=hidden_act)
    mlp = MLP(config).double()
    # Newer transformers turn Gemma's legacy "gelu" into "gelu_pytorch_tanh": follow what the MLP uses.
    used = {type(ACT2FN[name]): name for name in ("silu", "gelu", "gelu_pytorch_tanh")}[type(mlp.act_fn)]
    x = torch.randn(2, 5, 32, dtype=torch.float64) * 3
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    if used == "silu":
        inner = swiglu_reference(gate, up)
    else:
        inner = geglu_reference(gate, up, approximate="tanh" if used == "gelu_pytorch_tanh" else "none")
    torch.testing.assert_close(mlp.down_proj(inner), mlp(x), rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", OPS)
def test_large_bf16(op):
    # A Llama-3-8B MLP over 8192 tokens.
    gate = torch.randn(8192, 14336, dtype=torch.bfloat16, device="cuda") * 2
    up = torch.randn(8192, 14336, dtype=torch.bfloat16, device="cuda")
    check_parity(op, gate, up)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", OPS)
def test_gpu_intermediate_5504(op):
    gate = torch.randn(3, 333, 5504, dtype=torch.float16, device="cuda") * 2
    up = torch.randn(3, 333, 5504, dtype=torch.float16, device="cuda")
    check_parity(op, gate, up)
