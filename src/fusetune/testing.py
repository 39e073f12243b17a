"""The seams tests use, in one place: switches and resets that only a test needs.

Production modules keep the state they read (a flag, a counter) and nothing that exists only to change it from
outside; where a test must change it, the function is here and touches the module's state itself. Nothing in
src/ or kernels/ imports this module (tests/test_layers.py holds that), so a seam cannot become part of a run.
"""

import fusetune_kernels.offloaded_checkpoint as _offloaded
import fusetune_kernels.utils as _kernel_utils

from .sequences import varlen as _varlen
from .sequences.buckets import Bucket, StaticBatch, bucket_for


def set_poison(enabled: bool) -> None:
    """Every output buffer a kernel allocates (``new_empty``) starts as NaN (floats) or -1 (integers) while on, so a
    test can prove that the kernel wrote every element. ``FUSETUNE_POISON=1`` turns it on for a whole process."""
    _kernel_utils._poison = enabled


def set_cpu_simulation(enabled: bool) -> None:
    """CPU tensors take the offloaded-checkpoint path while on, "offloaded" to a separate CPU copy synchronously, so
    the offload, fetch and prefetch logic runs without a GPU."""
    _offloaded._simulate_on_cpu = enabled


def reset_offload_stats() -> None:
    """The offloaded checkpoint's counts (offloaded, fetched, prefetched) back to zero."""
    for key in _offloaded.stats:
        _offloaded.stats[key] = 0


def reset_attention_calls() -> None:
    """The counts of attention calls by path (``varlen.calls``) back to zero."""
    _varlen.calls.clear()


def padded_batch(batch: dict, pad_token_id: int, bucket: Bucket | None = None) -> dict:
    """``batch`` padded to ``bucket`` (default: its own), as new tensors: what the CUDA graphs see. Run the model on
    it with ``static_shapes=True``, as the graphs do."""
    cu = batch["cu_seq_lens_q"]
    bucket = bucket or bucket_for(batch["input_ids"].shape[1], cu.numel() - 1, int(cu.diff().max()))
    static = StaticBatch(bucket, batch["input_ids"].device, pad_token_id, batch.get("seq_idx") is not None)
    static.fill(batch)
    return static.model_inputs()
