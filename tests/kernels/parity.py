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


def assert_unused_output_recompute(node, x: torch.Tensor, params: list, grad: torch.Tensor) -> None:
    """``node(x, compute_output=...)`` under non-reentrant checkpointing, its recompute told that the output
    is unused, gives the gradients of the plain node bit for bit; the unused output is all NaN."""
    from torch.utils.checkpoint import checkpoint

    def grads(checkpointed: bool):
        x_ = x.detach().clone().requires_grad_()
        for p in params:
            p.grad = None
        if checkpointed:
            calls = []

            def run(inp):
                calls.append(1)
                return node(inp, compute_output=len(calls) == 1)  # the recompute's output is thrown away

            out = checkpoint(run, x_, use_reentrant=False)
        else:
            out = node(x_)
        out.backward(grad.to(out.dtype))
        return out.detach(), [x_.grad, *(p.grad for p in params)]

    (out, got), (ref_out, expected) = grads(True), grads(False)
    assert torch.equal(out, ref_out)
    for i, (g, g_ref) in enumerate(zip(got, expected, strict=True)):
        assert g is not None and torch.isfinite(g).all() and torch.equal(g, g_ref), f"gradient {i} differs"
    unused = node(x.detach(), compute_output=False)
    assert unused.shape == ref_out.shape and unused.dtype == ref_out.dtype and unused.isnan().all()
