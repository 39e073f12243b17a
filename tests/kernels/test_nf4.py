"""NF4 dequantization, Triton and reference, against bitsandbytes' own dequantize_4bit, bit for bit."""

import copy

import pytest
import torch

from fusetune_kernels import nf4
from fusetune_kernels.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference
from fusetune_kernels.utils import interpreted

from .conftest import DEVICE, needs_triton_backend

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = {"triton": dequantize_nf4, "reference": dequantize_nf4_reference}
# (out, in), blocksize: one full program; an odd total with a short last block; 600 blocks of 32,
# so three second-level blocks of 256 absmax, the last one short.
CASES = [((64, 128), 64), ((67, 45), 128), ((96, 200), 32)]


def quantize(shape, dtype, blocksize=64, nested=True, storage=torch.uint8):
    """A fresh random weight quantized by bitsandbytes on the CPU, as a Params4bit."""
    w = torch.randn(shape).to(dtype)
    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4", quant_storage=storage
    )
    return bnb.nn.Params4bit(
        packed, quant_state=state, blocksize=blocksize, quant_type="nf4", quant_storage=storage, bnb_quantized=True
    )


def bnb_dequantize(param) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit of a CPU Params4bit.

    bitsandbytes 0.50's CPU kernel misplaces the absmax of some 2-D shapes (e.g. [40, 96] with
    blocksize 64), while the format itself is flat: dequantize every packed nibble as one row,
    then drop the padding nibble and reshape.
    """
    state = copy.copy(param.quant_state)
    shape = tuple(state.shape)
    state.shape = torch.Size([1, 2 * param.data.numel() * param.data.element_size()])
    return bnbf.dequantize_4bit(param.data, state).view(-1)[: shape[0] * shape[1]].view(shape)


def to_device(param):
    """A copy on the test device: Params4bit.to moves the shared quant_state in place."""
    return param if DEVICE == "cpu" else copy.deepcopy(param).to(DEVICE)


def assert_matches(out: torch.Tensor, truth: torch.Tensor, impl: str):
    assert out.shape == truth.shape and out.dtype == truth.dtype, f"{out.shape} {out.dtype}"
    out = out.cpu()
    half = out.dtype in (torch.bfloat16, torch.float16)
    if half and ((impl == "triton" and interpreted()) or DEVICE == "cuda"):
        # The interpreter truncates fp32 -> bf16 where GPUs round to nearest even, and one fp16 element of
        # 19,200 has been seen a rounding apart between CUDA and bitsandbytes' CPU kernel: allow one rounding.
        assert torch.isfinite(out).all(), "unwritten (poisoned) elements"
        err = (out.float() - truth.float()).abs()
        assert (err <= torch.finfo(out.dtype).eps * truth.float().abs()).all(), f"max error {err.max()}"
    else:
        assert torch.equal(out, truth), f"{(out != truth).sum()} of {out.numel()} elements differ"


def needs(impl):
    if impl == "triton":
        needs_triton_backend()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "fp32-absmax"])
@pytest.mark.parametrize("shape, blocksize", CASES, ids=[f"{o}x{i}-bs{b}" for (o, i), b in CASES])
def test_matches_bitsandbytes(impl, dtype, nested, shape, blocksize):
    needs(impl)
    param = quantize(shape, dtype, blocksize, nested)
    truth = bnb_dequantize(param)
    weight = NF4Weight.from_bnb(to_device(param))
    assert weight.shape == shape and weight.dtype == dtype and weight.nested == nested
    assert_matches(IMPLS[impl](weight), truth, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_other_than_the_weights(impl, dtype):
    needs(impl)
    param = quantize((40, 72), torch.float32, 64, nested=True)
    truth = bnb_dequantize(param).to(dtype)  # one rounding from the exact fp32 values
    assert_matches(IMPLS[impl](NF4Weight.from_bnb(to_device(param)), dtype=dtype), truth, impl)


def test_reference_dequantizes_to_float64_exactly():
    param = quantize((67, 45), torch.float32, 128)
    out = dequantize_nf4_reference(NF4Weight.from_bnb(to_device(param)), dtype=torch.float64)
    assert torch.equal(out.cpu(), bnb_dequantize(param).double())


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "fp32-absmax"])
def test_many_programs_and_a_ragged_tail(monkeypatch, nested):
    needs_triton_backend()
    monkeypatch.setattr(nf4, "ELEMS_PER_PROGRAM", 64)  # two blocks of 32 a program: 48 programs, the last half empty
    param = quantize((67, 45), torch.bfloat16, 32, nested)
    assert_matches(dequantize_nf4(NF4Weight.from_bnb(to_device(param))), bnb_dequantize(param), "triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_out_buffer(impl):
    needs(impl)
    param = quantize((96, 200), torch.float32, 64)
    weight = NF4Weight.from_bnb(to_device(param))
    out = torch.full((96, 200), float("nan"), dtype=torch.float16, device=DEVICE)
    result = IMPLS[impl](weight, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_matches(out, bnb_dequantize(param).half(), impl)
    with pytest.raises(ValueError, match="expected"):
        IMPLS[impl](weight, out=out, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expected"):
        IMPLS[impl](weight, out=out[:, :100])
    with pytest.raises(ValueError, match="contiguous"):
        IMPLS[impl](weight, out=torch.empty(200, 96, dtype=torch.float16, device=DEVICE).t())


@pytest.mark.parametrize("impl", IMPLS)
def test_linear4bit_and_bf16_storage(impl):
    needs(impl)
    layer = bnb.nn.Linear4bit(72, 40, bias=True, quant_type="nf4", compress_statistics=True).to("cpu")
    weight = NF4Weight.from_bnb(to_device(layer.weight))
    assert weight.shape == (40, 72) and weight.blocksize == 64 and weight.nested
    assert_matches(IMPLS[impl](weight), bnb_dequantize(layer.weight), impl)
    # bf16 storage (FSDP-style QLoRA): the same bytes, viewed as uint8.
    param = quantize((64, 96), torch.bfloat16, 64, storage=torch.bfloat16)
    assert param.data.dtype == torch.bfloat16
    assert_matches(IMPLS[impl](NF4Weight.from_bnb(to_device(param))), bnb_dequantize(param), impl)


def test_refuses_what_is_not_nf4():
    w = torch.randn(32, 64)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")
    fp4 = bnb.nn.Params4bit(packed, quant_state=state, blocksize=64, quant_type="fp4", bnb_quantized=True)
    with pytest.raises(ValueError, match="nf4"):
        NF4Weight.from_bnb(fp4)
    with pytest.raises(ValueError, match="quant_state"):
        NF4Weight.from_bnb(bnb.nn.Params4bit(w, quant_type="nf4"))  # not quantized yet
    param = quantize((32, 64), torch.float32)
    param.quant_state.packing_format_for_cpu = True  # what Linear4bit's CPU inference repacks to
    with pytest.raises(ValueError, match="layout"):
        NF4Weight.from_bnb(param)
