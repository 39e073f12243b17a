"""Is a padding-free LoRA step GPU-bound? Host time against GPU time, per attention backend.

The step profiler that ``scripts/profile_step.py`` runs; a measurement of fusetune itself, not part of
the installed library. The model is built as ``FastModel`` builds it (``model.build``): a Llama from
``fusetune:archs/llama3_1b`` with random weights (``Setup.tiny``: the embedded tiny Llama, for a CPU
smoke test), fusetune's kernels, LoRA from ``FastModel.get_peft_model`` and fusetune's own gradient
checkpointing where ``Setup.gradient_checkpointing`` asks for it. It trains on padding-free batches made
by TRL's own collator: ``docs`` documents of new random lengths every step (so every step has a new
shape), the same batches for every backend. Each backend runs twice over the batches (``steps``):

- unprofiled: per step, the wall time of the host thread until everything is enqueued (``host_ms``),
  the CPU time the process used meanwhile (``host_cpu_ms``: all threads, since autograd runs the
  backward of CUDA tensors on its own thread), and the wall time until the device is done (``step_ms``);
- under torch.profiler: per step, the summed duration of GPU activity (``gpu_ms``: kernels, copies),
  the number of GPU kernels, and the host ops that cost the most CPU.

Medians are over the steps after ``warmup``. A step whose host CPU time exceeds its GPU time leaves the
GPU waiting on the CPU. ``varlen_peft_lora`` is ``varlen`` with PEFT's own LoRA forward instead of the
fused LoRA node, to show what the fusion saves; ``varlen_graphs`` is ``varlen`` with the forward and
backward replayed as CUDA graphs (``fusetune.sequences.graphs``; a step that meets a new bucket captures it, and
the table counts those steps). ``trainer`` times the same documents through ``FastSFTTrainer.train()``
(step ends read on the GPU's own timeline). ``steps.sync_points`` lists where a step makes the host wait.

``report.profile_steps(setup, backends, trainer_variants)`` runs it all and returns the report;
``report.write_report`` writes ``profile.json`` and ``profile.md``. This module imports nothing heavy, so
the command line can check its arguments before torch loads.
"""

from dataclasses import dataclass

# name -> (enable_varlen_attention backend or None for transformers' own, fused LoRA node, CUDA graphs)
BACKENDS = {
    "sdpa": (None, True, False),
    "varlen": ("auto", True, False),
    "varlen_peft_lora": ("auto", False, False),
    "varlen_graphs": ("auto", True, True),
    "masked": ("masked", True, False),
}
# name -> FastSFTConfig settings, each stated whatever the defaults are. *_async: batches copied to
# the GPU without a host wait. trl: TRL's own compute_loss and HF's NaN filter (host reads every step).
TRAINER_VARIANTS = {
    f"{name}{suffix}": {**settings, "accelerator_config": {"non_blocking": bool(suffix)}}
    for name, settings in {
        "fused": {"cuda_graphs": False, "fused_loss": True},
        "graphs": {"cuda_graphs": True, "fused_loss": True},
        "trl": {"cuda_graphs": False, "fused_loss": False, "logging_nan_inf_filter": True},
    }.items()
    for suffix in ("", "_async")
}
KERNELS = ("none", "auto", "triton", "reference")  # none: the model's own modules, unpatched
CHECKPOINTING = (False, True, "unsloth", "offload", "smart")  # FastModel.get_peft_model's use_gradient_checkpointing
TINY, FULL = "fusetune:tiny_llama", "fusetune:archs/llama3_1b"


@dataclass
class Setup:
    """What is profiled, the same for every backend and trainer variant."""

    tiny: bool = False  # the embedded tiny Llama and short documents (smoke test)
    steps: int = 20  # measured steps per backend
    warmup: int = 5  # steps run before the measured ones
    docs: int = 8  # documents per step
    min_len: int | None = None  # shortest document (default 64; tiny: 8)
    max_len: int | None = None  # longest document (default 1024; tiny: 64)
    kernels: str = "none"  # one of KERNELS
    lora_r: int = 16
    gradient_checkpointing: bool | str = False  # one of CHECKPOINTING: fusetune's own checkpointing
    seed: int = 0
    top_ops: int = 12  # host ops listed per backend, by self CPU time

    def __post_init__(self):
        self.min_len = self.min_len or (8 if self.tiny else 64)
        self.max_len = self.max_len or (64 if self.tiny else 1024)

    @property
    def model(self) -> str:
        return TINY if self.tiny else FULL
