"""Every backend and trainer variant on the same documents (``profile_steps``), and the report as markdown."""

import json
import logging
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from fusetune.loading import load_config
from fusetune.sequences import varlen

from . import BACKENDS, TRAINER_VARIANTS, Setup
from .model import make_batches, make_documents
from .steps import profile_backend
from .trainer import GPU_BOUND_BUSY, profile_trainer

log = logging.getLogger(__name__)


def fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def backend_table(report: dict) -> list[str]:
    env, cfg = report["environment"], report["config"]
    lines = [
        f"# Padding-free step profile: {cfg['model']} + LoRA r={cfg['lora_r']}, {env['device']}",
        "",
        f"{cfg['docs']} documents of {cfg['min_len']}-{cfg['max_len']} tokens per step (new lengths every step), "
        f"{cfg['steps']} measured steps after {cfg['warmup']} warm-up, {cfg['dtype']}, kernels={cfg['kernels']}, "
        f"gradient checkpointing={cfg['gradient_checkpointing']}. "
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
    return lines + [
        "",
        "host ms: wall time of the host thread until the step is enqueued; host CPU ms: CPU time the process used "
        "meanwhile (all threads: autograd runs the backward on its own); GPU ms: summed GPU activity (profiled run); "
        "step ms: wall time until the device is done; bound: CPU where host CPU ms exceeds GPU ms; "
        "capture steps: measured steps that captured a new bucket's graphs, left out of the medians.",
    ]


def graph_lines(report: dict) -> list[str]:
    lines = []
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
    return lines


def host_op_tables(report: dict) -> list[str]:
    lines = []
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
    return lines


def trainer_table(trainers: dict) -> list[str]:
    if not trainers:
        return []
    lines = [
        "",
        "## FastSFTTrainer.train() on the same documents",
        "",
        "Step: median interval between optimizer-step ends, on the GPU's timeline (CUDA events), the "
        "trainer's own host syncs included; host CPU: CPU time of the process per step (all threads: "
        "collation, logging, and spinning in syncs included); GPU: GPU activity per step in a second, "
        f"profiled run; bound: GPU where the GPU is busy for {GPU_BOUND_BUSY:.0%} of the step or more. fused: eager "
        "steps; graphs: CUDA graphs; *_async: batches copied with non_blocking=True; trl: TRL's own compute_loss "
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
    return lines


def sync_table(report: dict) -> list[str]:
    sources = [(name, r["sync_points"]) for name, r in report["backends"].items()]
    sources += [(f"trainer {variant}", t["sync_points"]) for variant, t in (report.get("trainer") or {}).items()]
    if not any(points for _, points in sources):
        return []
    lines = ["", "## Host syncs in one step (CUDA sync debug mode; innermost caller first)", ""]
    lines += ["| run | where | times |", "|---|---|---|"]
    return lines + [f"| {name} | `{p['where']}` | {p['count']} |" for name, points in sources for p in points]


def markdown(report: dict) -> str:
    """The report as tables: backends, graphs and losses, host ops, trainer variants, host syncs."""
    trainers = report.get("trainer") or {}
    lines = [*backend_table(report), *graph_lines(report), *host_op_tables(report), *trainer_table(trainers)]
    return "\n".join(lines + sync_table(report)) + "\n"


def loss_agreement(backends: dict) -> str | None:
    """Each backend's losses against the first's, on the same batches."""
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
