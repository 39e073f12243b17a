"""A job subprocess (``bench.py --worker|--prepare|--gpu-info SPEC``): one job, its JSON result written where the
spec says. ``--worker`` builds, trains and times one variant; every failure becomes a row.

Imports nothing of fusetune at module level, nor does any module it imports: in the unsloth job Unsloth imports
first (it patches transformers, TRL and PEFT as they import), and the peers' jobs never import fusetune."""

import contextlib
import gc
import importlib.metadata
import json
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

from . import preference
from .scenarios import GIB
from .steps import make_batches, make_optimizer, profile_steps, step_graphs_for, timed_steps, warmup_record
from .variants import Unsupported, build_fusetune, build_hf, build_unsloth, self_check_seconds


def run_job(mode: str, spec_path: str) -> None:
    """Run one job and write its JSON result where the spec says."""
    spec = json.loads(Path(spec_path).read_text())
    if mode == "worker":
        result = {"versions": versions(), **run_worker(spec)}
    elif mode == "prepare":
        from .folders import prepare

        result = prepare(spec)
    else:
        result = gpu_info()
    Path(spec["result"]).write_text(json.dumps(result))


def run_worker(spec: dict) -> dict:
    """Build, train and time one variant; the result row (without the parent's fields)."""
    result = {"status": "failed", "reason": None}
    stage = "import"
    try:
        reason = import_peer(spec["variant"], dpo=spec["mode"] == "dpo")
        if reason:  # not installed, or a dependency missing: a skipped peer
            return {"status": "skipped", "reason": reason}
        import torch

        torch.manual_seed(spec["seed"])
        if spec["cuda"] and spec.get("memory_cap_gib"):  # a smaller GPU's memory: the allocator refuses beyond it
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_cap_gib"] * GIB / total), 0)
        stage = "load"
        model, params, vocab = load(spec, torch, result)
        dpo = None
        if spec["mode"] == "dpo":
            stage = "trainer"
            dpo = preference.prepare(model, vocab, spec, torch)
        stage = "steps"
        optimizer, batches, step_loss = train(model, params, vocab, spec, torch, result, dpo)
        if spec["cuda"] and spec.get("profile"):
            profile_steps(model, optimizer, batches[-2:], torch, spec["autocast"], step_loss)
        alt = spec["scenario"].get("alt_optim")
        if alt and spec.get("alt_steps"):
            optimizer.zero_grad(set_to_none=True)
            del optimizer  # its states make way for the other optimizer's
            gc.collect()
            torch.cuda.empty_cache()
            result["alt_optim"] = alt_optimizer(model, params, batches, alt, spec, result, torch)
    except Unsupported as error:
        result.update(status="skipped", reason=str(error))
    except Exception as error:  # every failure becomes a row
        failed(result, error, stage, spec["cuda"])
    finally:
        result["host_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return result


def import_peer(variant: str, dpo: bool = False) -> str | None:
    """Import a peer's package before anything else (Unsloth patches transformers, TRL and PEFT as they
    import; for DPO its ``PatchDPOTrainer()`` follows at once); None, or why it cannot be imported."""
    package = {"unsloth": "unsloth", "liger": "liger_kernel"}.get(variant)
    try:
        if variant == "unsloth":
            import unsloth

            if dpo:
                unsloth.PatchDPOTrainer()
        elif variant == "liger":
            import liger_kernel.transformers  # noqa: F401
    except Exception as error:
        return f"cannot import {package}: {type(error).__name__}: {error}"
    return None


def load(spec: dict, torch, result: dict) -> tuple:
    """The variant's model with LoRA, in training mode; its trainable parameters and vocabulary size."""
    variant, cuda = spec["variant"], spec["cuda"]
    dtype = torch.bfloat16 if cuda else torch.float32
    start = time.perf_counter()
    if variant in ("hf", "liger"):  # DPO: the trainer applies Liger's kernels (use_liger_kernel)
        model = build_hf(spec, torch, dtype, liger=variant == "liger" and spec["mode"] != "dpo")
    elif variant == "unsloth":
        model = build_unsloth(spec, torch, dtype)
    else:
        model = build_fusetune(spec, torch, dtype)
        result["self_check_s"] = self_check_seconds()
    model.train()  # from_pretrained leaves eval mode, where HF silently skips gradient checkpointing
    result["load_s"] = time.perf_counter() - start
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    result["attn_implementation"] = getattr(base.config, "_attn_implementation", None)
    if spec["routed_experts"]:  # transformers' default for 3-D experts is grouped_mm (5.x)
        result["experts_implementation"] = getattr(base.config, "_experts_implementation", None)
    if cuda:
        result["peak_load_gib"] = torch.cuda.max_memory_allocated() / GIB
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in params)
    return model, params, base.config.vocab_size


def train(model, params, vocab: int, spec: dict, torch, result: dict, dpo=None) -> tuple:
    """Train every batch, timed; the measures go into ``result``. ``dpo``: a DPO scenario's trainer and batches
    (``preference.prepare``). Returns the optimizer, the batches and the loss of a batch (None: the model's
    forward with labels)."""
    cuda, warmup = spec["cuda"], spec["warmup"]
    step_loss = None
    if dpo is not None:
        params = [p for p in model.parameters() if p.requires_grad]  # the policy's adapter, as the trainer left it
        result["trainable_params"] = sum(p.numel() for p in params)
        batches, lengths, mode, step_loss = dpo.batches, spec["lengths"], "dpo", preference.step_loss(dpo.trainer)
    else:
        batches, lengths, mode = make_batches(spec, torch, vocab)
    optimizer = make_optimizer("adamw_fused", params, torch, cuda)
    step_graphs = step_graphs_for(model, spec)
    every, losses, paths = timed_steps(
        model, optimizer, batches, warmup, torch, cuda, spec["autocast"], step_graphs, step_loss
    )
    times, measured = every[warmup:], lengths[warmup:]
    result.update(
        status="ok",
        mode=mode,
        step_ms=statistics.median(times),
        step_ms_all=times,
        losses=losses,
        loss_first=losses[0],
        loss_last=losses[-1],
        tokens_per_step=statistics.mean(sum(d) for d in measured),
        tokens_per_step_with_padding=statistics.mean(max(d) * len(d) if mode == "padded" else sum(d) for d in measured),
    )
    if spec["scenario"]["kind"] == "docs":  # variable shapes: totals, not medians
        result["tok_s"] = sum(sum(d) for d in measured) / (sum(times) / 1e3)
        # the median step's rate over the whole run's (the 1.3x target), and the warm-up steps' share
        result["tok_s_median_step"] = result["tokens_per_step"] / (result["step_ms"] / 1e3)
        result["median_over_whole"] = result["tok_s_median_step"] / result["tok_s"]
        result["tok_s_every_step"] = sum(sum(d) for d in lengths) / (sum(every) / 1e3)
        result.update(warmup_record(every, paths, warmup, step_graphs))
        flops_per_s = sum(spec["step_flops"][warmup:]) / (sum(times) / 1e3)
    else:
        result["tok_s"] = result["tokens_per_step"] / (result["step_ms"] / 1e3)
        flops_per_s = spec["step_flops"][warmup] / (result["step_ms"] / 1e3)
    result["useful_tflops"] = flops_per_s / 1e12
    result["mfu"] = flops_per_s / (spec["peak_tflops"] * 1e12) if spec.get("peak_tflops") else None
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        result["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    if dpo is not None:
        result.update(preference.row_record(dpo.trainer, dpo.ref_copy_removed))
    return optimizer, batches, step_loss


def failed(result: dict, error: Exception, stage: str, cuda: bool) -> None:
    """A failure's row: its stage, CUDA out of memory or the error's first line, and the traceback."""
    result["status"] = "failed"
    result["oom"] = is_oom(error)
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    result["reason"] = f"{stage}: " + ("CUDA out of memory" if result["oom"] else f"{type(error).__name__}: {first}")
    result["traceback"] = traceback.format_exc()[-4000:]
    if cuda and "torch" in sys.modules:
        result["peak_gib"] = sys.modules["torch"].cuda.max_memory_allocated() / GIB


def versions() -> dict:
    names = [
        "torch",
        "triton",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "bitsandbytes",
        "liger-kernel",
        "unsloth",
        "unsloth-zoo",
        "fusetune",
        "datasets",
    ]
    found = {"python": sys.version.split()[0]}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return "OutOfMemoryError" in text or "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


def alt_optimizer(model, params, batches, name, spec, result, torch) -> dict:
    """A few more steps with another optimizer on the same model; a failure here keeps the main numbers."""
    try:
        alt = make_optimizer(name, params, torch, spec["cuda"])
        warmup = 2
        subset = (batches * 2)[: warmup + spec["alt_steps"]]
        every, losses, _ = timed_steps(model, alt, subset, warmup, torch, spec["cuda"], spec["autocast"])
        times = every[warmup:]
    except Exception as error:
        status = "skipped" if isinstance(error, ImportError) else "failed"
        return {"name": name, "status": status, "reason": f"{type(error).__name__}: {str(error)[:300]}"}
    step_ms = statistics.median(times)
    return {
        "name": name,
        "status": "ok",
        "step_ms": step_ms,
        "tok_s": result["tokens_per_step"] / (step_ms / 1e3),
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "loss_last": losses[-1],
    }


def gpu_info() -> dict:
    """Device name and memory, and the bf16 matmul rate: median of 30 CUDA-event-timed 8192^3 products."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "name": "cpu"}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        a @ b
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    props = torch.cuda.get_device_properties(0)
    return {
        "cuda": True,
        "name": torch.cuda.get_device_name(0),
        "total_gib": props.total_memory / GIB,
        "peak_tflops": 2 * n**3 / (statistics.median(times) / 1e3) / 1e12,
        "torch_cuda": torch.version.cuda,
    }
