"""A hand-written training loop over the batches, per backend: timed, then its host syncs, then profiled."""

import functools
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from fusetune.sequences import varlen
from fusetune.sequences.graphs import CudaGraphs, Reruns, StepGraphs

from . import BACKENDS, Setup
from .model import adamw, build, release, sync


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(model, optimizer, batch, device, step_graphs=None):
    """One step as TRL's trainer takes it: inputs to the device, forward with labels and without a KV
    cache (with one, transformers ignores the packing in its own masks), backward, update. No host
    sync inside: the loss is read after the step. With ``step_graphs``, graph replays where they apply."""
    batch = to_device(batch, device)
    out = step_graphs.run(model, batch) if step_graphs is not None else None
    loss = (out if out is not None else model(**batch, use_cache=False)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def timed_pass(model, optimizer, batches, device, step_graphs=None) -> list[dict]:
    """Per step: host wall and CPU time until enqueued, wall time until the device is done, the loss."""
    rows = []
    for batch in batches:
        sync(device)
        captures = step_graphs.captures if step_graphs is not None else 0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        loss = train_step(model, optimizer, batch, device, step_graphs)
        wall1, cpu1 = time.perf_counter(), time.process_time()
        sync(device)
        wall2 = time.perf_counter()
        rows.append(
            {
                "tokens": int(batch["input_ids"].numel()),
                "max_doc": int(batch["max_length_q"]),
                "host_ms": 1e3 * (wall1 - wall0),
                "host_cpu_ms": 1e3 * (cpu1 - cpu0),
                "step_ms": 1e3 * (wall2 - wall0),
                "loss": loss.item(),
                "captured": step_graphs is not None and step_graphs.captures > captures,
            }
        )
    return rows


def gpu_events(prof) -> list:
    return [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


def profiled_pass(model, optimizer, batches, device, top_ops: int, step_graphs=None) -> tuple[list[dict], list[dict]]:
    """Per step under torch.profiler: GPU activity and kernel count; and the host ops by self CPU time."""
    on_cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])) as prof:
        for i, batch in enumerate(batches):
            with record_function(f"fusetune_step_{i}"):
                train_step(model, optimizer, batch, device, step_graphs)
            sync(device)
    steps = sorted(
        (e for e in prof.events() if e.name.startswith("fusetune_step_") and e.device_type == DeviceType.CPU),
        key=lambda e: e.time_range.start,
    )
    gpu = gpu_events(prof)
    rows = []
    for i, step in enumerate(steps):
        start = step.time_range.start
        end = steps[i + 1].time_range.start if i + 1 < len(steps) else float("inf")
        mine = [e for e in gpu if start <= e.time_range.start < end]
        rows.append(
            {
                "host_ms_profiled": step.time_range.elapsed_us() / 1e3,
                "gpu_ms": sum(e.time_range.elapsed_us() for e in mine) / 1e3 if on_cuda else None,
                "gpu_kernels": sum(not e.name.startswith(("Memcpy", "Memset")) for e in mine) if on_cuda else None,
            }
        )
    averages = sorted(
        (a for a in prof.key_averages() if not a.key.startswith("fusetune_step_")),
        key=lambda a: a.self_cpu_time_total,
        reverse=True,
    )
    per_step = len(batches)
    ops = [
        {
            "op": a.key,
            "self_cpu_ms_per_step": a.self_cpu_time_total / 1e3 / per_step,
            "calls_per_step": a.count / per_step,
        }
        for a in averages[:top_ops]
    ]
    return rows, ops


def sync_points(step, device) -> list[dict]:
    """Where one step makes the host wait for the GPU (CUDA sync debug mode), innermost caller first.
    Waits made by this module's own lines (the batch copy, the wait after the step) are not counted."""
    if device.type != "cuda":
        return []
    found: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        if frames and frames[-1].filename == __file__:
            return
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:][::-1])
        found[where] = found.get(where, 0) + 1

    sync(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [{"where": k, "count": v} for k, v in found.items()]


def median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(measured: list[dict], device) -> dict:
    """Medians over the measured steps, tokens/s over their summed step time, and which side bounds them."""
    summary = {k: median(measured, k) for k in ("host_ms", "host_cpu_ms", "step_ms", "host_ms_profiled", "gpu_ms")}
    summary["gpu_kernels"] = median(measured, "gpu_kernels")
    summary["tokens_per_s"] = sum(r["tokens"] for r in measured) / (sum(r["step_ms"] for r in measured) / 1e3)
    if summary["gpu_ms"] is not None:
        summary["gpu_busy"] = summary["gpu_ms"] / summary["step_ms"]
        summary["bound"] = "GPU" if summary["gpu_ms"] >= summary["host_cpu_ms"] else "CPU"
    summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return summary


def profile_backend(setup: Setup, backend: str, batches: list[dict], device, dtype) -> dict:
    """One backend over ``batches``: timed, then its host syncs, then profiled; medians in ``summary``."""
    model, _, attn = build(setup, backend, device, dtype)
    optimizer = adamw(model)
    step_graphs = None
    if BACKENDS[backend][2]:  # without CUDA (smoke tests), the same padded path with reruns for replays
        recorder = CudaGraphs() if device.type == "cuda" else Reruns()
        params = [p for p in model.parameters() if p.requires_grad]
        step_graphs = StepGraphs(params, pad_token_id=0, recorder=recorder, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    varlen.calls.clear()
    timed = timed_pass(model, optimizer, batches, device, step_graphs)
    calls = dict(varlen.calls)
    syncs = sync_points(functools.partial(train_step, model, optimizer, batches[-1], device, step_graphs), device)
    # the warm-up steps run again unprofiled (their shapes are warm by now); only the measured ones are traced
    for batch in batches[: setup.warmup]:
        train_step(model, optimizer, batch, device, step_graphs)
    profiled, ops = profiled_pass(model, optimizer, batches[setup.warmup :], device, setup.top_ops, step_graphs)
    steps = [{**t, **p} for t, p in zip(timed, [{}] * setup.warmup + profiled, strict=True)]
    summary = summarize([s for s in steps[setup.warmup :] if not s["captured"]], device)
    summary["capture_steps"] = sum(s["captured"] for s in steps[setup.warmup :])
    result = {
        "attn_implementation": attn,
        "attention_calls_per_step": {k: v / len(batches) for k, v in calls.items()},
        "graphs": step_graphs.stats() if step_graphs is not None else None,
        "summary": summary,
        "steps": steps,
        "top_host_ops": ops,
        "sync_points": syncs,
    }
    del model, optimizer
    release(device)
    return result
