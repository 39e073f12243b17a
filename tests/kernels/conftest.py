"""Shared fixtures for kernel parity tests.

Kernels run on CUDA when there is one, otherwise on the Triton CPU interpreter
(TRITON_INTERPRET=1, set by the test command). Outputs are always poisoned.
"""

import os
import zlib

import pytest
import torch

from fusetune import testing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ||a - b|| / ||b|| against a float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def poison_outputs():
    testing.set_poison(True)
    yield
    testing.set_poison(False)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    # A different draw for every test, the same in every process (str hashes are salted per process; crc32 is not).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def needs_triton_backend():
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1: Triton kernels cannot run")


@pytest.fixture
def small_blocks(monkeypatch):
    """Many vocabulary blocks per row (and a ragged last one), even for a small vocabulary."""
    from fusetune_kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "MAX_BLOCK", 256)


def record_allocations(monkeypatch, module) -> list:
    """The shapes of the buffers ``module`` allocates through ``new_empty`` from now on, in order."""
    shapes = []
    real_new_empty = module.new_empty

    def spy(shape, *, dtype, device):
        shapes.append(tuple(shape))
        return real_new_empty(shape, dtype=dtype, device=device)

    monkeypatch.setattr(module, "new_empty", spy)
    return shapes
