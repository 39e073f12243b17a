"""fusetune's Triton kernels, imported as ``fusetune_kernels``.

One module per op. Each holds the Triton forward and backward, the
``torch.autograd.Function`` that joins them, the public fast function, and a
plain-PyTorch ``*_reference`` with the same signature. Nothing here imports
from ``fusetune``: imports flow scripts -> fusetune -> fusetune_kernels.
"""
