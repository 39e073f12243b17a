"""The same documents through ``FastSFTTrainer.train()``, step times read off the GPU's own timeline."""

import functools
import statistics
import time

import torch
from datasets import Dataset
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from fusetune import FastSFTConfig, FastSFTTrainer
from fusetune.sequences import varlen

from . import TRAINER_VARIANTS, Setup
from .model import build, release
from .steps import gpu_events, sync_points

GPU_BOUND_BUSY = 0.9  # a trainer step is GPU-bound when the GPU is busy for this share of it


class StepClock(TrainerCallback):
    """At the end of every optimizer step: the host's wall and CPU time, the graphs captured so far,
    and (on CUDA) an event on the stream, so step times can be read off the GPU's own timeline. With
    non-blocking copies the host runs ahead of the GPU, and its own step-end times say nothing of the
    GPU's pace. No syncs are added: the trainer's own stay."""

    def __init__(self, trainer=None):
        self.marks = []
        self.profiler = None
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        graphs = self.trainer.step_graphs if self.trainer is not None else None
        event = None
        if torch.cuda.is_available() and not args.use_cpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        captures = graphs.captures if graphs is not None else 0
        self.marks.append((time.perf_counter(), time.process_time(), captures, event))
        if self.profiler is not None:
            self.profiler.step()


def interval_ms(a, b) -> float:
    """From one step-end mark to the next: on the GPU's timeline where there are events, else the host's."""
    if a[3] is not None:
        b[3].synchronize()
        return a[3].elapsed_time(b[3])
    return 1e3 * (b[0] - a[0])


def trainer_config(setup: Setup, n_steps: int, variant: str) -> FastSFTConfig:
    """As the app configures the trainer: checkpointing on where the model has fusetune's, non-reentrant."""
    checkpointing = bool(setup.gradient_checkpointing)
    return FastSFTConfig(
        output_dir="/tmp/fusetune_profile_trainer",
        per_device_train_batch_size=setup.docs,
        max_steps=n_steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=n_steps,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        kernels=setup.kernels if setup.kernels != "none" else "auto",
        seed=setup.seed,
        **TRAINER_VARIANTS[variant],
    )


def gpu_time(trainer, clock: StepClock, setup: Setup, summary: dict) -> None:
    """GPU time per step into ``summary``: a second run of the same length under the profiler, counting
    the steps after warm-up. The trainer's CPU time counts every thread and the spinning in its syncs,
    so the step's bound is judged by how busy the GPU is instead."""
    schedule = torch.profiler.schedule(wait=0, warmup=setup.warmup, active=setup.steps - 1, repeat=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule) as prof:
        clock.profiler = prof
        trainer.train()
    clock.profiler = None
    summary["gpu_ms"] = sum(e.time_range.elapsed_us() for e in gpu_events(prof)) / 1e3 / (setup.steps - 1)
    summary["gpu_busy"] = summary["gpu_ms"] / summary["step_ms"]
    summary["bound"] = "GPU" if summary["gpu_busy"] >= GPU_BOUND_BUSY else "CPU"


def profile_trainer(setup: Setup, documents: list[list[dict]], device, dtype, variant: str) -> dict:
    """The same documents through FastSFTTrainer.train(): TRL's padding-free collator, the HF Trainer
    loop, varlen attention. Step time is the median interval between step ends.

    ``fused``: FastSFTTrainer with eager steps (loss and metric sums from one fused pass, read at log time).
    ``graphs``: the same, with its steps replayed as CUDA graphs (``cuda_graphs=True``); steps that capture a new
    bucket are left out of the medians and counted.
    ``fused_async``, ``graphs_async``: the same, with batches copied to the GPU without waiting for it
    (accelerate's ``non_blocking``, from pinned memory), so the host can run a step ahead.
    ``trl``: TRL's own compute_loss on the same patched model (metrics read on the host every step)
    and HF's default logging_nan_inf_filter (the loss read every step).
    """
    model, tokenizer, _ = build(setup, "sdpa", device, dtype)  # the trainer switches it to varlen attention
    dataset = Dataset.from_list([doc for step in documents for doc in step])
    n_steps = len(documents)
    trainer = FastSFTTrainer(
        model=model, args=trainer_config(setup, n_steps, variant), train_dataset=dataset, processing_class=tokenizer
    )
    clock = StepClock(trainer)
    trainer.add_callback(clock)
    varlen.calls.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    calls = dict(varlen.calls)
    marks = clock.marks[setup.warmup :]
    pairs = list(zip(marks, marks[1:], strict=False))
    replays = [(a, b) for a, b in pairs if b[2] == a[2]]  # no capture in between
    summary = {
        "step_ms": statistics.median(interval_ms(a, b) for a, b in replays),
        "host_cpu_ms": statistics.median(1e3 * (b[1] - a[1]) for a, b in replays),
        "capture_steps": len(pairs) - len(replays),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    graphs = trainer.step_graphs.stats() if trainer.step_graphs is not None else None
    if device.type == "cuda":
        gpu_time(trainer, clock, setup, summary)
    tokens_per_step = sum(len(d["input_ids"]) for step in documents for d in step) / n_steps
    summary["tokens_per_s"] = tokens_per_step / (summary["step_ms"] / 1e3)
    first_batch = next(iter(trainer.get_train_dataloader()))
    result = {
        "attn_implementation": model.get_base_model().config._attn_implementation,
        "attention_calls_per_step": {k: v / n_steps for k, v in calls.items()},
        "graphs": graphs,
        "summary": summary,
        "step_ms_all": [interval_ms(a, b) for a, b in pairs],
        "sync_points": sync_points(functools.partial(trainer.training_step, model, first_batch), device),
        "log_history": trainer.state.log_history,
    }
    del trainer, model
    release(device)
    return result
