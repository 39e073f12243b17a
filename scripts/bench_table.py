"""Turn the op benchmark JSON (pytest --benchmark-json) into a markdown table, speedups against the reference."""

import argparse
import json
from collections import defaultdict


def table(path: str) -> str:
    runs = [b["extra_info"] for b in json.load(open(path))["benchmarks"]]
    by_op = defaultdict(dict)
    for r in runs:
        by_op[r["op"]][r["impl"]] = r
    first = runs[0]
    lines = [
        f"Ceilings measured in the same run: copy {first['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {first['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s.",
        "",
        "| op | fusetune ms | reference ms | liger ms | vs reference | vs liger | fusetune kernel ms "
        "| fusetune of ceiling | peak extra GiB (fusetune / reference / liger) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for op, impls in by_op.items():
        ms = {k: v["cuda_median_ms"] for k, v in impls.items()}
        ours = impls["fusetune"]
        ceiling = ours.get("bandwidth_fraction") or ours.get("matmul_fraction")
        kind = "of copy BW" if "bandwidth_fraction" in ours else "of matmul peak"
        mem = " / ".join(
            f"{impls[k]['peak_extra_gib']:.2f}" if k in impls else "-" for k in ("fusetune", "reference", "liger")
        )
        lines.append(
            f"| {op} | {ms['fusetune']:.3f} | {ms.get('reference', float('nan')):.3f} | "
            f"{ms.get('liger', float('nan')):.3f} | {ms['reference'] / ms['fusetune']:.2f}x | "
            + (f"{ms['liger'] / ms['fusetune']:.2f}x" if "liger" in ms else "-")
            + f" | {ours['kernel_ms']:.3f} | {ceiling:.0%} {kind} | {mem} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", help="the file of `pytest --benchmark-json` over tests/bench")
    print(table(parser.parse_args().json))
