"""Scenarios of kind ``docs`` (S4): variable-length documents, padding-free where the variant can (a variant
whose padding-free step crashes runs padded rows instead, and says so), with the row's mode in words."""

from .rows import worker_spec
from .runner import log
from .scenarios import PADDING_FREE


def run(runner, scenario, variant, sc, folder, source, gpu, args) -> dict:
    mode = "padded" if args.s4_mode == "padded" else "padding_free"
    spec = worker_spec(scenario, variant, sc, folder, source, gpu, args, mode=mode)
    result = runner.call("worker", spec, f"{scenario}-{variant}", variant)
    crashed = result["status"] == "failed" and not (result.get("oom") or result.get("timeout"))
    if mode == "padding_free" and crashed:
        log(f"{scenario} {variant}: padding-free failed ({result['reason']}); padded instead")
        spec = worker_spec(scenario, variant, sc, folder, source, gpu, args, mode="padded")
        failed = result
        result = runner.call("worker", spec, f"{scenario}-{variant}-padded", variant)
        result["padding_free_failure"] = failed["reason"]
    if result["status"] == "ok":
        result["mode_detail"] = mode_detail(variant, result)
    return result


def mode_detail(variant: str, result: dict) -> str:
    """The row's attention path, its CUDA graphs' counts and the padded fallback, in words."""
    detail = PADDING_FREE[variant] if result["mode"] == "padding_free" else "padded rows"
    if result.get("graphs"):
        g = result["graphs"]
        detail += (
            f"; CUDA graphs: {g['captures']} captures ({g['capture_seconds']:.1f} s), {g['replays']} "
            f"replays ({g['loose_replays']} in a wider bucket), {g['padding']:.0%} padding, measured steps "
            f"{result['measured_paths']}; median step's tok/s {result['median_over_whole']:.2f}x the run's"
        )
    if result.get("padding_free_failure"):
        detail += f" (padding-free failed: {result['padding_free_failure']})"
    return detail
