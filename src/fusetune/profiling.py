"""Is a padding-free LoRA step GPU-bound? Host time against GPU time, per attention backend.

A Llama from ``fusetune:archs/llama3_1b`` with random weights (``Setup.tiny``: the embedded tiny Llama,
for a CPU smoke test), with LoRA, trains on padding-free batches made by TRL's own collator: ``docs``
documents of new random lengths every step (so every step has a new shape), the same batches for every
backend. Each backend runs twice over the batches (``profile_backend``):

- unprofiled (``timed_pass``): per step, the wall time of the host thread until everything is enqueued
  (``host_ms``), the CPU time the process used meanwhile (``host_cpu_ms``: all threads, since
  autograd runs the backward of CUDA tensors on its own thread), and the wall time until the
  device is done (``step_ms``);
- under torch.profiler (``profiled_pass``): per step, the summed duration of GPU activity (``gpu_ms``:
  kernels, copies), the number of GPU kernels, and the host ops that cost the most CPU.

Medians are over the steps after ``warmup``. A step whose host CPU time exceeds its GPU time
leaves the GPU waiting on the CPU. ``varlen_peft_lora`` is ``varlen`` with PEFT's own LoRA
forward instead of the fused LoRA node (``apply_kernels(..., lora=False)``), to show what the fusion
saves; ``varlen_graphs`` is ``varlen`` with the forward and backward replayed as CUDA graphs
(``fusetune.graphs``; a step that meets a new bucket captures it, and the table counts those steps).
``profile_trainer`` times the same documents through ``FastSFTTrainer.train()`` (``StepClock``: step
ends on the GPU's own timeline). ``sync_points`` lists where a step makes the host wait for the GPU.

``profile_steps(setup, backends, trainer_variants)`` runs it all and returns the report; ``write_report``
writes ``profile.json`` and ``profile.md``. ``scripts/profile_step.py`` is the command line over it.
"""

import functools
import json
import logging
import platform
import statistics
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import TrainerCallback
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from . import varlen
from .graphs import CudaGraphs, Reruns, StepGraphs
from .loading import add_lora, load_config, load_model, load_tokenizer
from .patching import apply_kernels, remove_kernels
from .trainer import FastSFTConfig, FastSFTTrainer

log = logging.getLogger(__name__)
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
GPU_BOUND_BUSY = 0.9  # a trainer step is GPU-bound when the GPU is busy for this share of it
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
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
    kernels: str = "none"  # none | auto | triton | reference
    lora_r: int = 16
    gradient_checkpointing: bool = False
    seed: int = 0
    top_ops: int = 12  # host ops listed per backend, by self CPU time

    def __post_init__(self):
        self.min_len = self.min_len or (8 if self.tiny else 64)
        self.max_len = self.max_len or (64 if self.tiny else 1024)

    @property
    def model(self) -> str:
        return TINY if self.tiny else FULL


def make_documents(n: int, docs: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[dict]]:
    """``n`` steps of ``docs`` tokenized documents each, with new random lengths every step."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n):
        lengths = torch.randint(min_len, max_len + 1, (docs,), generator=g).tolist()
        steps.append([{"input_ids": torch.randint(0, vocab, (n_tok,), generator=g).tolist()} for n_tok in lengths])
    return steps


def make_batches(steps: list[list[dict]]) -> list[dict]:
    """Padding-free batches from TRL's own collator (position_ids, cu_seq_lens, max_length)."""
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return [collate(examples) for examples in steps]


def build(setup: Setup, backend: str, device: torch.device, dtype: torch.dtype):
    """(model with LoRA, AdamW, attention implementation) for ``backend``."""
    torch.manual_seed(setup.seed)
    attention, fused_lora, _ = BACKENDS[backend]
    with device:  # initialise the random weights where they will live
        model = load_model(setup.model, dtype, random_init=True)
    model.to(device)
    if setup.kernels != "none":
        apply_kernels(model, setup.kernels, lora=fused_lora)  # lora=False: PEFT's own LoRA forward
    model = add_lora(
        model,
        r=setup.lora_r,
        alpha=2 * setup.lora_r,
        dropout=0.0,
        target_modules=LORA_TARGETS,
        gradient_checkpointing=setup.gradient_checkpointing,
    )
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if attention is None:
        model.get_base_model().set_attn_implementation(backend)
        attn = backend
    else:
        attn = varlen.enable_varlen_attention(model, attention)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, attn


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pass(model, optimizer, batches, device, step_graphs=None) -> list[dict]:
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


def profiled_pass(model, optimizer, batches, device, top_ops: int, step_graphs=None) -> tuple[list[dict], list[dict]]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i, batch in enumerate(batches):
            with record_function(f"fusetune_step_{i}"):
                train_step(model, optimizer, batch, device, step_graphs)
            sync(device)
    events = prof.events()
    steps = sorted(
        (e for e in events if e.name.startswith("fusetune_step_") and e.device_type == DeviceType.CPU),
        key=lambda e: e.time_range.start,
    )
    gpu = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    rows = []
    for i, step in enumerate(steps):
        start = step.time_range.start
        end = steps[i + 1].time_range.start if i + 1 < len(steps) else float("inf")
        mine = [e for e in gpu if start <= e.time_range.start < end]
        rows.append(
            {
                "host_ms_profiled": step.time_range.elapsed_us() / 1e3,
                "gpu_ms": sum(e.time_range.elapsed_us() for e in mine) / 1e3 if device.type == "cuda" else None,
                "gpu_kernels": sum(not e.name.startswith(("Memcpy", "Memset")) for e in mine)
                if device.type == "cuda"
                else None,
            }
        )
    averages = sorted(
        (a for a in prof.key_averages() if not a.key.startswith("fusetune_step_")),
        key=lambda a: a.self_cpu_time_total,
        reverse=True,
    )
    ops = [
        {
            "op": a.key,
            "self_cpu_ms_per_step": a.self_cpu_time_total / 1e3 / len(batches),
            "calls_per_step": a.count / len(batches),
        }
        for a in averages[:top_ops]
    ]
    return rows, ops


def sync_points(step, device) -> list[dict]:
    """Where one step makes the host wait for the GPU (CUDA sync debug mode), innermost caller first."""
    if device.type != "cuda":
        return []
    found: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:][::-1])
        found[where] = found.get(where, 0) + 1

    sync(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            sync(device)  # our own, below: not counted
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [{"where": k, "count": v} for k, v in found.items() if Path(__file__).name not in k.split(" <- ")[0]]


def median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def profile_backend(setup: Setup, backend: str, batches: list[dict], device, dtype) -> dict:
    """One backend over ``batches``: timed, then its host syncs, then profiled; medians in ``summary``."""
    model, optimizer, attn = build(setup, backend, device, dtype)
    step_graphs = None
    if BACKENDS[backend][2]:  # without CUDA (smoke tests), the same padded path with reruns for replays
        recorder = CudaGraphs() if device.type == "cuda" else Reruns()
        params = [p for p in model.parameters() if p.requires_grad]
        step_graphs = StepGraphs(params, pad_token_id=0, recorder=recorder, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    varlen.reset_calls()
    timed = timed_pass(model, optimizer, batches, device, step_graphs)
    calls = dict(varlen.calls)
    step = functools.partial(train_step, model, optimizer, batches[-1], device, step_graphs)
    syncs = sync_points(step, device)
    # the warm-up steps run again unprofiled (their shapes are warm by now); only the measured ones are traced
    for batch in batches[: setup.warmup]:
        train_step(model, optimizer, batch, device, step_graphs)
    profiled, ops = profiled_pass(model, optimizer, batches[setup.warmup :], device, setup.top_ops, step_graphs)
    steps = [{**t, **p} for t, p in zip(timed, [{}] * setup.warmup + profiled, strict=True)]
    measured = [s for s in steps[setup.warmup :] if not s["captured"]]
    summary = {k: median(measured, k) for k in ("host_ms", "host_cpu_ms", "step_ms", "host_ms_profiled", "gpu_ms")}
    summary["gpu_kernels"] = median(measured, "gpu_kernels")
    summary["tokens_per_s"] = sum(r["tokens"] for r in measured) / (sum(r["step_ms"] for r in measured) / 1e3)
    if summary["gpu_ms"] is not None:
        summary["gpu_busy"] = summary["gpu_ms"] / summary["step_ms"]
        summary["bound"] = "GPU" if summary["gpu_ms"] >= summary["host_cpu_ms"] else "CPU"
    summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
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
    remove_kernels()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


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
    model, _, _ = build(setup, "sdpa", device, dtype)  # the trainer switches it to varlen attention
    dataset = Dataset.from_list([doc for step in documents for doc in step])
    n_steps = len(documents)
    config = FastSFTConfig(
        output_dir="/tmp/fusetune_profile_trainer",
        per_device_train_batch_size=setup.docs,
        max_steps=n_steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=n_steps,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=setup.gradient_checkpointing,
        kernels=setup.kernels if setup.kernels != "none" else "auto",
        seed=setup.seed,
        **TRAINER_VARIANTS[variant],
    )
    tokenizer = load_tokenizer("fusetune:tiny_llama")  # the documents are token ids already; it gives pad/eos
    trainer = FastSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    clock = StepClock(trainer)
    trainer.add_callback(clock)
    varlen.reset_calls()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    calls = dict(varlen.calls)
    marks = clock.marks[setup.warmup :]
    pairs = list(zip(marks, marks[1:], strict=False))
    replays = [(a, b) for a, b in pairs if b[2] == a[2]]  # no capture in between
    step_ms = [interval_ms(a, b) for a, b in replays]
    cpu_ms = [1e3 * (b[1] - a[1]) for a, b in replays]
    summary = {"step_ms": statistics.median(step_ms), "host_cpu_ms": statistics.median(cpu_ms)}
    summary["capture_steps"] = len(pairs) - len(replays)
    graphs = trainer.step_graphs.stats() if trainer.step_graphs is not None else None
    summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    # GPU time: a second run of the same length under the profiler, counting the steps after warm-up.
    if device.type == "cuda":
        schedule = torch.profiler.schedule(wait=0, warmup=setup.warmup, active=setup.steps - 1, repeat=1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule) as prof:
            clock.profiler = prof
            trainer.train()
        clock.profiler = None
        gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        summary["gpu_ms"] = sum(e.time_range.elapsed_us() for e in gpu) / 1e3 / (setup.steps - 1)
        summary["gpu_busy"] = summary["gpu_ms"] / summary["step_ms"]
        # the trainer's CPU time counts every thread and the spinning in its syncs: judge by the GPU instead
        summary["bound"] = "GPU" if summary["gpu_busy"] >= GPU_BOUND_BUSY else "CPU"
    tokens_per_step = sum(len(d["input_ids"]) for step in documents for d in step) / n_steps
    summary["tokens_per_s"] = tokens_per_step / (summary["step_ms"] / 1e3)
    first_batch = next(iter(trainer.get_train_dataloader()))
    syncs = sync_points(functools.partial(trainer.training_step, model, first_batch), device)
    result = {
        "attn_implementation": model.get_base_model().config._attn_implementation,
        "attention_calls_per_step": {k: v / n_steps for k, v in calls.items()},
        "graphs": graphs,
        "summary": summary,
        "step_ms_all": [interval_ms(a, b) for a, b in pairs],
        "sync_points": syncs,
        "log_history": trainer.state.log_history,
    }
    del trainer, model
    remove_kernels()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    lines = [
        f"# Padding-free step profile: {cfg['model']} + LoRA r={cfg['lora_r']}, {env['device']}",
        "",
        f"{cfg['docs']} documents of {cfg['min_len']}-{cfg['max_len']} tokens per step (new lengths every step), "
        f"{cfg['steps']} measured steps after {cfg['warmup']} warm-up, {cfg['dtype']}, kernels={cfg['kernels']}. "
        f"torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}. Medians per step.",
        "",
        "| backend | attn_implementation | host ms | host CPU ms | GPU ms | step ms | GPU busy | bound "
        "| GPU kernels | tokens/s | vs first | peak GiB | attention calls/step | capture steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    baseline = next(iter(report["backends"].values()))["summary"]["tokens_per_s"] if report["backends"] else None
    for name, r in report["backends"].items():
        s = r["summary"]
        calls = ", ".join(f"{k} {v:g}" for k, v in sorted(r["attention_calls_per_step"].items())) or "-"
        lines.append(
            f"| {name} | {r['attn_implementation']} | {fmt(s['host_ms'])} | {fmt(s['host_cpu_ms'])} | "
            f"{fmt(s['gpu_ms'])} | {fmt(s['step_ms'])} | {fmt(s.get('gpu_busy'), '.0%')} | {s.get('bound', '-')} | "
            f"{fmt(s['gpu_kernels'], '.0f')} | {fmt(s['tokens_per_s'], '.0f')} | "
            f"{fmt(s['tokens_per_s'] / baseline, '.2f')}x | {fmt(s['peak_memory_gib'])} | {calls} | "
            f"{s.get('capture_steps', 0)} |"
        )
    lines += [
        "",
        "host ms: wall time of the host thread until the step is enqueued; host CPU ms: CPU time the process used "
        "meanwhile (all threads: autograd runs the backward on its own); GPU ms: summed GPU activity (profiled run); "
        "step ms: wall time until the device is done; bound: CPU where host CPU ms exceeds GPU ms; "
        "capture steps: measured steps that captured a new bucket's graphs, left out of the medians.",
    ]
    for name, r in [*report["backends"].items(), *(report.get("trainer") or {}).items()]:
        if r.get("graphs"):
            g = r["graphs"]
            lines.append(
                f"- {name}: {g['buckets']} buckets captured in {g['capture_seconds']:.1f} s "
                f"({g['cold_retries']} cold captures retried), {g['replays']} replays ({g['loose_replays']} in a "
                f"bucket wider than the batch's own), {g['padding']:.1%} of the replayed tokens were padding"
                f"{'; disabled: ' + g['disabled'] if g['disabled'] else ''}"
            )
    if report.get("loss_agreement"):
        lines += ["", f"Losses on the same batches: {report['loss_agreement']}"]
    for name, r in report["backends"].items():
        lines += [
            "",
            f"## {name}: host ops by self CPU time",
            "",
            "| op | self CPU ms/step | calls/step |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{o['op']}` | {o['self_cpu_ms_per_step']:.3f} | {o['calls_per_step']:g} |" for o in r["top_host_ops"]
        ]
    trainers = report.get("trainer") or {}
    if trainers:
        lines += [
            "",
            "## FastSFTTrainer.train() on the same documents",
            "",
            "Step: median interval between optimizer-step ends, on the GPU's timeline (CUDA events), the "
            "trainer's own host syncs included; host CPU: CPU time of the process per step (all threads: "
            "collation, logging, and spinning in syncs included); GPU: GPU activity per step in a second, "
            "profiled run; bound: GPU where the GPU is busy for 90% of the step or more. fused: eager steps; "
            "graphs: CUDA graphs; *_async: batches copied with non_blocking=True; trl: TRL's own compute_loss "
            "and HF's NaN filter on the same patched model (host reads every step).",
            "",
            "| variant | attn_implementation | host CPU ms | GPU ms | step ms | GPU busy | bound | tokens/s "
            "| peak GiB | capture steps |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, trainer in trainers.items():
            s = trainer["summary"]
            lines.append(
                f"| {variant} | {trainer['attn_implementation']} | {fmt(s['host_cpu_ms'])} | {fmt(s.get('gpu_ms'))} | "
                f"{fmt(s['step_ms'])} | {fmt(s.get('gpu_busy'), '.0%')} | {s.get('bound', '-')} | "
                f"{fmt(s['tokens_per_s'], '.0f')} | {fmt(s['peak_memory_gib'])} | {s.get('capture_steps', 0)} |"
            )
    sources = [(name, r["sync_points"]) for name, r in report["backends"].items()]
    sources += [(f"trainer {variant}", t["sync_points"]) for variant, t in trainers.items()]
    if any(points for _, points in sources):
        lines += ["", "## Host syncs in one step (CUDA sync debug mode; innermost caller first)", ""]
        lines += ["| run | where | times |", "|---|---|---|"]
        lines += [f"| {name} | `{p['where']}` | {p['count']} |" for name, points in sources for p in points]
    return "\n".join(lines) + "\n"


def loss_agreement(backends: dict) -> str | None:
    names = list(backends)
    if len(names) < 2:
        return None
    first = [s["loss"] for s in backends[names[0]]["steps"]]
    parts = []
    for other in names[1:]:
        losses = [s["loss"] for s in backends[other]["steps"]]
        diff = max(abs(a - b) / abs(a) for a, b in zip(first, losses, strict=True))
        parts.append(
            f"{other} vs {names[0]}: step 1 {losses[0]:.4f} vs {first[0]:.4f}, max relative difference {diff:.1e}"
        )
    return "; ".join(parts)


def environment(device: torch.device) -> dict:
    import transformers
    import trl

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "varlen_kernel": varlen.varlen_attn is not None,
    }


def profile_steps(setup: Setup, backends: list[str], trainer_variants: list[str] = (), say=log.info) -> dict:
    """Every backend (``BACKENDS``) and trainer variant (``TRAINER_VARIANTS``) on the same documents: the
    report that ``markdown`` renders. ``say`` gets a line as each one starts and ends."""
    unknown = sorted(set(backends) - set(BACKENDS)) + sorted(set(trainer_variants) - set(TRAINER_VARIANTS))
    if unknown:
        raise ValueError(f"unknown backends or trainer variants {unknown}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = load_config(setup.model).vocab_size
    documents = make_documents(setup.warmup + setup.steps, setup.docs, setup.min_len, setup.max_len, vocab, setup.seed)
    batches = make_batches(documents)
    config = {**asdict(setup), "backends": list(backends), "trainer": list(trainer_variants)}
    report = {
        "config": {**config, "model": setup.model, "dtype": str(dtype).removeprefix("torch.")},
        "environment": environment(device),
        "backends": {},
    }
    for backend in backends:
        say(f"profiling {backend} ...")
        report["backends"][backend] = profile_backend(setup, backend, batches, device, dtype)
        s = report["backends"][backend]["summary"]
        say(f"  host {fmt(s['host_ms'])} ms, GPU {fmt(s['gpu_ms'])} ms, step {fmt(s['step_ms'])} ms")
    report["loss_agreement"] = loss_agreement(report["backends"])
    report["trainer"] = {}
    for variant in trainer_variants:
        say(f"profiling the trainer ({variant}) ...")
        report["trainer"][variant] = profile_trainer(setup, documents, device, dtype, variant)
        s = report["trainer"][variant]["summary"]
        say(
            f"  trainer {variant}: host CPU {fmt(s['host_cpu_ms'])} ms, GPU {fmt(s.get('gpu_ms'))} ms, "
            f"step {fmt(s['step_ms'])} ms"
        )
    return report


def write_report(report: dict, out) -> str:
    """``profile.json`` and ``profile.md`` into the folder ``out``; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "profile.md").write_text(table)
    return table
