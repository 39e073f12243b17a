"""Dequantization of bitsandbytes NF4 weights (4-bit NormalFloat, blockwise absmax).

Element k of the flattened [out, in] weight is a 4-bit index into a 16-value table ``code``;
byte k // 2 of ``data`` holds element k in its high nibble when k is even, its low nibble when
odd (an odd total leaves the last low nibble as padding). Every ``blocksize`` elements share
one fp32 scale (the last block may be short)::

    W[k] = code[q[k]] * absmax[k // blocksize]                       (fp32, one rounding to dtype)

With double quantization (bitsandbytes' ``compress_statistics``) absmax is itself uint8,
blockwise quantized with a 256-value table ``code2`` and fp32 scales every ``blocksize2``
absmax values, around a mean ``offset``, and is resolved inside the same kernel::

    absmax[j] = code2[absmax_u8[j]] * absmax2[j // blocksize2] + offset   (fp32 mul, then add)

Each step rounds like bitsandbytes (fp32 products, no fused multiply-add, round to nearest even),
so the output is meant to equal ``bitsandbytes.functional.dequantize_4bit`` bit for bit (the
CPU interpreter truncates to bf16 instead, one rounding apart). Nothing is saved (no autograd: the weight is frozen).
Memory traffic per element: 0.5 byte of codes read, 2 (bf16/fp16) or 4 (fp32) bytes written,
plus 1 or 4 bytes of scale read per block; the write dominates. One program handles whole
quantization blocks (8192 elements by default) as a [blocks, blocksize / 2] tile of bytes, split
into nibbles and interleaved into contiguous rows: coalesced, vectorizable loads and stores.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusetune_kernels.utils import new_empty

# Elements one program dequantizes (rounded up to one quantization block).
ELEMS_PER_PROGRAM = 8192
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """One NF4-quantized [out_features, in_features] weight, as plain tensors on one device."""

    data: torch.Tensor  # uint8 [ceil(n / 2)], two codes a byte, high nibble first
    absmax: torch.Tensor  # fp32 [ceil(n / blocksize)], or uint8 when double-quantized
    blocksize: int
    code: torch.Tensor  # fp32 [16]
    shape: tuple[int, int]  # (out_features, in_features)
    dtype: torch.dtype  # what bitsandbytes dequantizes to
    absmax2: torch.Tensor | None = None  # fp32 [ceil(n_blocks / blocksize2)]
    code2: torch.Tensor | None = None  # fp32 [256]
    blocksize2: int = 0
    offset: torch.Tensor | None = None  # fp32 [1], added after the second dequantization

    def __post_init__(self):
        n = self.numel
        if len(self.shape) != 2:
            raise ValueError(f"NF4Weight needs a 2-D shape, got {self.shape}")
        if self.blocksize < 2 or self.blocksize & (self.blocksize - 1):
            raise ValueError(f"blocksize must be a power of two >= 2, got {self.blocksize}")
        if self.data.dtype != torch.uint8 or self.data.numel() != (n + 1) // 2:
            raise ValueError(f"data must hold {(n + 1) // 2} uint8, got {self.data.numel()} {self.data.dtype}")
        if self.absmax.numel() != triton.cdiv(n, self.blocksize) or self.code.numel() != 16:
            raise ValueError("absmax or code does not match the shape and blocksize")
        if self.nested:
            if self.absmax2 is None or self.code2 is None or self.offset is None or self.blocksize2 < 1:
                raise ValueError("uint8 absmax needs absmax2, code2, blocksize2 and offset")
            if self.code2.numel() != 256 or self.absmax2.numel() != triton.cdiv(self.absmax.numel(), self.blocksize2):
                raise ValueError("absmax2 or code2 does not match the absmax and blocksize2")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 or uint8, got {self.absmax.dtype}")

    @property
    def nested(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @classmethod
    def from_bnb(cls, param) -> "NF4Weight":
        """Read a quantized ``bitsandbytes.nn.Params4bit``; ValueError for anything but plain NF4."""
        qs = getattr(param, "quant_state", None)
        if qs is None:
            raise ValueError("not a quantized bitsandbytes Params4bit (no quant_state)")
        if qs.quant_type != "nf4":
            raise ValueError(f"only nf4 is supported, got quant_type={qs.quant_type!r}")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("weight is in bitsandbytes' repacked CPU (AVX512) layout, not the NF4 byte layout")
        if len(qs.shape) != 2:
            raise ValueError(f"only 2-D weights are supported, got shape {tuple(qs.shape)}")
        data = param.data.contiguous().view(torch.uint8).reshape(-1)
        nested = {}
        if qs.state2 is not None:
            if qs.state2.dtype != torch.float32:
                raise ValueError(f"nested absmax must dequantize to float32, got {qs.state2.dtype}")
            nested = dict(
                absmax2=qs.state2.absmax.float(),
                code2=qs.state2.code.float(),
                blocksize2=int(qs.state2.blocksize),
                offset=torch.as_tensor(qs.offset, dtype=torch.float32, device=data.device).reshape(1),
            )
        return cls(
            data=data,
            absmax=qs.absmax,
            blocksize=int(qs.blocksize),
            code=qs.code.float(),
            shape=(int(qs.shape[0]), int(qs.shape[1])),
            dtype=qs.dtype,
            **nested,
        )


@triton.jit
def block_scales(
    absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, mask, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr
):
    """The fp32 scale of each quantization block in ``blocks``, the nested absmax resolved (mul, then add)."""
    if NESTED:
        q = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blocks, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequantize_nf4_kernel(
    data_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    out_ptr,
    n_elements,
    n_blocks,
    NESTED: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    # int64 block indices: every offset below is 64-bit.
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    block_mask = blocks < n_blocks
    scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, block_mask, NESTED, BLOCKSIZE2)

    HALF: tl.constexpr = BLOCKSIZE // 2
    byte = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]
    packed = tl.load(data_ptr + byte, mask=byte < (n_elements + 1) // 2, other=0).to(tl.int32)
    # High nibble first: interleaving gives the elements of each block in order.
    values = tl.interleave(tl.load(code_ptr + (packed >> 4)), tl.load(code_ptr + (packed & 15)))
    values = values * scale[:, None]
    elem = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, values.to(out_ptr.dtype.element_ty), mask=elem < n_elements)


def _output(weight: NF4Weight, out: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
    if out is None:
        dtype = weight.dtype if dtype is None else dtype
        return new_empty(weight.shape, dtype=dtype, device=weight.device)
    if tuple(out.shape) != weight.shape or (dtype is not None and out.dtype != dtype):
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, expected {weight.shape} {dtype or out.dtype}")
    if not out.is_contiguous() or out.device != weight.device:
        raise ValueError("out must be contiguous and on the weight's device")
    return out


def dequantize_nf4(
    weight: NF4Weight, out: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The [out, in] weight in ``dtype`` (default ``weight.dtype``, or ``out``'s), written into ``out`` if given."""
    out = _output(weight, out, dtype)
    if out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dequantize_nf4 writes float32/bfloat16/float16, not {out.dtype}")
    n = weight.numel
    n_blocks = weight.absmax.numel()
    per_program = triton.next_power_of_2(max(1, ELEMS_PER_PROGRAM // weight.blocksize))
    dummy = weight.code  # stands in for the unused nested pointers
    if n > 0:
        _dequantize_nf4_kernel[(triton.cdiv(n_blocks, per_program),)](
            weight.data,
            weight.absmax,
            weight.code,
            weight.absmax2 if weight.nested else dummy,
            weight.code2 if weight.nested else dummy,
            weight.offset if weight.nested else dummy,
            out,
            n,
            n_blocks,
            NESTED=weight.nested,
            BLOCKSIZE=weight.blocksize,
            BLOCKSIZE2=weight.blocksize2 if weight.nested else 1,
            BLOCKS_PER_PROGRAM=per_program,
            num_warps=8 if per_program * weight.blocksize >= 4096 else 4,
            enable_fp_fusion=False,  # round like bitsandbytes: mul, then add
        )
    return out


def dequantize_nf4_reference(
    weight: NF4Weight, out: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Plain PyTorch twin of ``dequantize_nf4`` (any floating ``dtype``, float64 included)."""
    out = _output(weight, out, dtype)
    n = weight.numel
    absmax = weight.absmax
    if weight.nested:
        scale2 = weight.absmax2.repeat_interleave(weight.blocksize2)[: absmax.numel()]
        absmax = weight.code2[absmax.long()] * scale2 + weight.offset
    q = torch.stack([weight.data >> 4, weight.data & 15], dim=1).reshape(-1)[:n]
    values = weight.code[q.long()] * absmax.repeat_interleave(weight.blocksize)[:n]
    return out.copy_(values.view(weight.shape))
