"""The command line, and the run it starts: every scenario x variant in its own job, one row each."""

import argparse
import os
import signal
import sys
from pathlib import Path

import bench

from . import docs, dpo, fixed, max_context
from .folders import prepare_folder
from .report import append, merge, out_paths, readme_table, summary
from .rows import base_row
from .runner import Runner, availability, log, split_list
from .scenarios import FUSETUNE_CHECKPOINTING, SCENARIOS, TINY_SCENARIOS, VARIANTS

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"fixed": fixed.run, "docs": docs.run, "max_context": max_context.run, "dpo": dpo.run}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=bench.__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    run_options(p)
    fusetune_and_s5_options(p)
    p.add_argument("--profile", default="", help="variants whose log gets a kernel table of two profiled steps")
    p.add_argument("--render", nargs="+", default=None, metavar="JSONL", help="merge .jsonl files into --out")
    p.add_argument("--readme-table", default=None, metavar="PATH", help="print the README table (file or folder)")
    return p


def run_options(p) -> None:
    """What runs, where it writes, and how long it may take."""
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma or space separated, of: {', '.join(VARIANTS)}"
    )
    p.add_argument("--scenarios", default="all", help=f"comma or space separated, of: {', '.join(SCENARIOS)} (or all)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: per scenario, 10 for S1-S3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps before them (default: per scenario)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for <date>-<gpu>-peers.jsonl/.md")
    p.add_argument("--scratch", default="/tmp/fusetune-bench", help="model folders, logs (reused when present)")
    p.add_argument("--timeout", type=float, default=480, help="seconds per subprocess")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run; later runs are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: the embedded tiny Llama, fp32, S1 and S4")
    p.add_argument("--unsloth-site", default=os.environ.get("UNSLOTH_SITE"), help="put first on unsloth's path")
    p.add_argument(
        "--qlora-source",
        choices=["nf4", "bf16"],
        default="nf4",
        help="4-bit scenarios load a folder saved pre-quantized (nf4) or quantize the bf16 one on load",
    )
    p.add_argument("--s4-mode", choices=["auto", "padded"], default="auto", help="auto: padding-free where supported")
    p.add_argument("--alt-steps", type=int, default=5, help="S3: steps timed again with adamw_8bit (0: off)")
    p.add_argument("--no-autocast", action="store_true", help="no bf16 autocast around the forward")


def fusetune_and_s5_options(p) -> None:
    """How each variant trains (checkpointing, FP8, graphs, a memory cap), and S5's probes."""
    p.add_argument(
        "--fusetune-checkpointing",
        choices=list(FUSETUNE_CHECKPOINTING),
        default="offload",
        help='fusetune variants: use_gradient_checkpointing="unsloth" (offload, as the seeds), True (plain) or '
        '"smart" (its budget: --memory-gib, else the free memory)',
    )
    p.add_argument("--fusetune-fp8", action="store_true", help="fusetune variants: the frozen base GEMMs in FP8")
    p.add_argument(
        "--peer-checkpointing",
        choices=["shipped", "off"],
        default="shipped",
        help="hf, liger, unsloth: checkpointing as each ships it, or none (fastest, where it fits)",
    )
    p.add_argument("--memory-gib", type=float, default=None, help="cap every variant's allocator at this many GiB")
    p.add_argument(
        "--fusetune-graphs",
        choices=["on", "off"],
        default="on",
        help="fusetune variants, padding-free rows (S4): CUDA graphs as FastSFTTrainer runs them (on) or eager steps",
    )
    p.add_argument("--s5-min", type=int, default=8192)
    p.add_argument("--s5-max", type=int, default=262144)
    p.add_argument("--s5-probes", type=int, default=6, help="S5: most probes per variant")
    p.add_argument("--s5-granularity", type=int, default=4096)
    p.add_argument("--s5-resolution", type=float, default=0.1, help="S5: stop when the bracket is this narrow")
    p.add_argument("--s5-probe-timeout", type=float, default=None, help="S5: seconds per probe (default --timeout)")
    p.add_argument(
        "--s5-memory-gib",
        type=float,
        default=None,
        help="S5: cap each probe's GPU memory (torch's per-process fraction), e.g. 24 for a 24 GiB card",
    )
    p.add_argument(
        "--s5-together",
        action="store_true",
        help="S5: probe all variants at once (needs --s5-memory-gib; their one-step times then overlap)",
    )


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    args.variants = split_list(args.variants)
    args.profile = split_list(args.profile)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    table = TINY_SCENARIOS if args.tiny else SCENARIOS
    args.scenarios = list(table) if args.scenarios.strip() == "all" else split_list(args.scenarios)
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    args.s5_probe_timeout = args.s5_probe_timeout or args.timeout
    if args.s5_together and not args.s5_memory_gib:
        p.error("--s5-together needs --s5-memory-gib: without a cap, probes that share a GPU share its memory")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.readme_table:
        print(readme_table(Path(args.readme_table)), end="")
        return None
    if args.render:
        return merge(args.render, Path(args.out))
    return orchestrate(args)


def orchestrate(args) -> Path:
    """Every scenario x variant, in order; each row appended (and the table re-rendered) as it finishes."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still ends its subprocess (finally)
    runner = Runner(args)
    gpu = {"cuda": False, "name": "cpu"} if args.tiny else measure_gpu(runner)
    out = out_paths(args, gpu)
    table = TINY_SCENARIOS if args.tiny else SCENARIOS
    for scenario in args.scenarios:
        sc = table.get(scenario)
        if sc is None:
            reason = f"--tiny runs {', '.join(TINY_SCENARIOS)} only" if args.tiny else "unknown scenario"
            for variant in args.variants:
                append(*out, {"scenario": scenario, "variant": variant, "status": "skipped", "reason": reason})
        elif sc.get("quant") and not gpu["cuda"]:
            for variant in args.variants:
                row = {**base_row(scenario, variant, sc, gpu, args), "status": "skipped", "reason": "4-bit needs CUDA"}
                append(*out, row)
        else:
            run_scenario(runner, scenario, sc, gpu, args, out)
    md = out[1]
    print(md.read_text() if md.exists() else "no rows")
    return out[0]


def measure_gpu(runner) -> dict:
    """The GPU's name, memory and bf16 matmul peak, measured in a job of its own."""
    log("measuring the GPU's bf16 matmul peak ...")
    gpu = runner.call("gpu-info", {}, "gpu-info", timeout=300)
    if gpu.get("status") == "failed":
        raise SystemExit(f"bench: cannot query the GPU: {gpu['reason']}")
    for key in ("wall_s", "log"):
        gpu.pop(key, None)
    if not gpu["cuda"]:
        raise SystemExit("bench: no CUDA device; --tiny is the CPU smoke mode")
    log(f"{gpu['name']}: {gpu['total_gib']:.0f} GiB, bf16 matmul {gpu['peak_tflops']:.0f} TFLOP/s")
    return gpu


def run_scenario(runner, scenario: str, sc: dict, gpu: dict, args, out: tuple[Path, Path]) -> None:
    """One scenario's variants, each through its kind's module; the model folder is built before the first
    variant that can run."""
    folder, source, setup = None, "bf16", {}
    together = {}  # S5 with --s5-together: each variant's probes, started at once
    for variant in args.variants:
        row = base_row(scenario, variant, sc, gpu, args)
        reason = availability(variant, sc, gpu, args)
        if reason:
            append(*out, {**row, "status": "skipped", "reason": reason})
            log(f"{scenario} {variant}: skipped ({reason})")
            continue
        if folder is None:
            folder, source, setup = prepare_folder(runner, sc, gpu, args)
            if folder is None:
                info = next(iter(setup.values()))
                why = f"preparing the model folder: {info.get('reason')}"
                for v in args.variants[args.variants.index(variant) :]:
                    append(*out, {**base_row(scenario, v, sc, gpu, args), "status": info["status"], "reason": why})
                break
        row["setup"] = {"source": source, **setup}
        log(f"{scenario} {variant} ...")
        if sc["kind"] == "max_context" and args.s5_together:
            if not together:
                together = max_context.start_together(runner, scenario, sc, folder, source, gpu, args)
            result = together[variant].result()
        else:
            result = KINDS[sc["kind"]](runner, scenario, variant, sc, folder, source, gpu, args)
        row.update(result)
        append(*out, row)
        log(f"{scenario} {variant}: {summary(row)}")
