"""Kernel backends: which fusetune ops replace which parts of a model family."""

import logging

import torch

from .errors import FusetuneError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "triton", "reference")


def resolve_backend(name: str) -> str:
    """``auto`` becomes ``triton`` on CUDA and ``reference`` elsewhere, and says so."""
    if name not in BACKENDS:
        raise FusetuneError(f"kernels: unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    chosen = "triton" if torch.cuda.is_available() else "reference"
    log.info("kernels=auto chose %s (%s)", chosen, "CUDA available" if chosen == "triton" else "no CUDA")
    return chosen


def apply_kernels(model, backend: str) -> str:
    """Patch ``model`` for ``backend``; returns the backend actually used."""
    backend = resolve_backend(backend)
    if backend == "triton":
        raise FusetuneError("kernels=triton: no Triton kernels yet; use kernels=reference")
    return backend
