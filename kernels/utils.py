"""Small helpers shared by the kernel modules."""

import os

import torch
import triton

# When set, every output buffer a kernel allocates starts as NaN (floats) or -1
# (integers), so a test can prove that the kernel wrote every element (tests switch it
# with fusetune.testing.set_poison).
_poison = os.environ.get("FUSETUNE_POISON", "0") == "1"


def new_empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, or a poisoned buffer while poisoning is on."""
    if not _poison:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def row_block(n_cols: int, max_block: int = 65536) -> int:
    """The power-of-two block that covers one row of ``n_cols`` elements."""
    block = triton.next_power_of_2(n_cols)
    if block > max_block:
        raise ValueError(f"row of {n_cols} elements exceeds the largest block ({max_block})")
    return block


def num_warps_for(block: int) -> int:
    return 4 if block < 2048 else 8 if block < 8192 else 16


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_out_dtype_mm_ok: dict[str, bool] = {}  # device type -> whether its torch.mm takes out_dtype


def matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, alpha: float = 1.0, add_to=None) -> torch.Tensor:
    """alpha * a @ b in ``out_dtype``, accumulated in fp32 straight from fp16/bf16 inputs where the device's
    matmul writes ``out_dtype`` itself (CUDA); elsewhere the product rounds once to the inputs' dtype first.
    With ``add_to`` (an ``out_dtype`` tensor): add_to += alpha * a @ b, in place."""
    device = a.device.type
    if a.dtype != out_dtype and _out_dtype_mm_ok.get(device, device == "cuda"):
        try:
            if add_to is not None:
                return torch.addmm(add_to, a, b, alpha=alpha, out_dtype=out_dtype, out=add_to)
            out = torch.mm(a, b, out_dtype=out_dtype)
            return out.mul_(alpha) if alpha != 1.0 else out
        except (RuntimeError, NotImplementedError, TypeError):
            _out_dtype_mm_ok[device] = False
    if add_to is not None:
        return add_to.addmm_(a, b, alpha=alpha) if a.dtype == out_dtype else add_to.add_(torch.mm(a, b), alpha=alpha)
    out = torch.mm(a, b).to(out_dtype)
    return out.mul_(alpha) if alpha != 1.0 else out
