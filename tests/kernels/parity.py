"""Assertions for kernel parity: relative error against a float64 reference."""

import torch

from .conftest import TOLERANCE


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str, tol: float | None = None):
    """Fail on any NaN/inf, on a shape mismatch, or on relative error above the dtype's tolerance."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: {(~torch.isfinite(out)).sum().item()} non-finite elements"
    err = rel_err(out, ref)
    limit = TOLERANCE[dtype] if tol is None else tol
    assert err <= limit, f"{name}: relative error {err:.3e} > {limit:.0e} ({dtype})"
