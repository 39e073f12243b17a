"""Several processes: torchrun or accelerate launch starts them, the HF Trainer (through accelerate) wraps
the model. fusetune has no distributed layer of its own; this module only chooses and checks.

- ``distributed=none``: one process. Launched as several, it is an error (nothing trains twice by accident).
- ``distributed=ddp``: accelerate's DistributedDataParallel, which the Trainer uses whenever it runs under
  torchrun. Each rank trains its own part of every global batch; gradients are averaged.
- ``distributed=fsdp``: accelerate's FSDP2 (``fully_shard``) over each decoder layer, parameters resharded
  after the forward. CUDA only: accelerate trains CPU processes with DDP whatever the config says.

All ranks share one run folder. Under torchrun the default folder name is the launch's run id (every rank
computes the same one; a timestamp could differ by a second between ranks). Only rank 0 writes the record
(status, metrics, summary, the saved model through ``trainer.save_model``), the report and W&B.
"""

import os

from ..errors import FusetuneError
from ..modules import base_model

MODES = ("none", "ddp", "fsdp")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank: RANK (global, as torchrun sets it), else LOCAL_RANK, else 0."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            return int(value)
    return 0


def is_rank_zero() -> bool:
    return rank() == 0


def run_id(default: str) -> str:
    """The name of a run folder that every rank of one launch agrees on (torchrun's run id), else ``default``."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun-{launch}" if launch and world_size() > 1 else default


def check(mode: str, on_gpu: bool, quantized: bool) -> None:
    """Refuse what would run otherwise than asked, with one line."""
    processes = world_size()
    if mode not in MODES:
        raise FusetuneError(f"distributed: expected one of {', '.join(MODES)}, got '{mode}'")
    if mode == "none" and processes > 1:
        raise FusetuneError(
            f"distributed=none, but {processes} processes were launched: set distributed=ddp or distributed=fsdp"
        )
    if mode == "fsdp" and not on_gpu:
        raise FusetuneError(
            "distributed=fsdp needs CUDA: accelerate trains CPU processes with DDP; use distributed=ddp"
        )
    if mode == "fsdp" and quantized:
        raise FusetuneError("distributed=fsdp with a 4-bit base is not supported: use distributed=ddp for QLoRA")


LAUNCHERS = (
    "torchrun --nproc_per_node=N train.py ..., or accelerate launch --num_processes N train.py ... "
    "(--multi_cpu on a host without CUDA)"
)


def single_process(mode: str) -> str | None:
    """Why ``mode`` (ddp or fsdp) launched as a single process is most likely a mistake in the launch, or None."""
    if mode == "none" or world_size() > 1:
        return None
    return (
        f"distributed={mode}, but only 1 process was launched: start it with {LAUNCHERS}; "
        "allow_single_process=true trains in one process anyway"
    )


def trainer_options(mode: str, model) -> dict:
    """The FastSFTConfig values that select the strategy (empty for none and ddp: the Trainer's default)."""
    if mode != "fsdp":
        return {}
    layers = sorted(getattr(base_model(model), "_no_split_modules", None) or [])
    if not layers:
        raise FusetuneError(f"distributed=fsdp: {type(base_model(model)).__name__} names no decoder layer to shard")
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": layers, "reshard_after_forward": True},
    }
