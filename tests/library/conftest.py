"""Library tests (the patch table, the patched forwards): outputs poisoned as in the kernel tests."""

from ..kernels.conftest import fresh_seed, poison_outputs  # noqa: F401  (autouse fixtures, shared)
