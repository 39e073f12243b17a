"""The results: rows appended to ``<date>-<gpu>-peers.jsonl`` as each finishes, the markdown table beside it
(ratios against the best peer of hf, liger and unsloth), merged calls (``--render``) and the README's table
(``--readme-table``)."""

import datetime
import json
import re
from pathlib import Path

from .scenarios import PEERS, SCENARIOS, VARIANTS


def out_paths(args, gpu: dict) -> tuple[Path, Path]:
    out = Path(args.out)
    if out.suffix == ".jsonl":
        return out, out.with_suffix(".md")
    slug = gpu_slug(gpu["name"])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{date}-{slug}-peers.jsonl", out / f"{date}-{slug}-peers.md"


def gpu_slug(name: str) -> str:
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in ("nvidia", "tesla", "geforce")]
    return words[0] if words else "gpu"


def summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('reason')}"
    if row.get("max_context") is not None:
        return f"max context {row['max_context']} (first failure {row.get('first_failure')})"
    return (
        f"{row['tok_s']:.0f} tok/s, step {row['step_ms']:.1f} ms, peak {fmt(row.get('peak_gib'))} GiB, "
        f"loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}, {row.get('wall_s', 0):.0f} s"
    )


def append(jsonl: Path, md: Path, row: dict) -> None:
    with open(jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")
    md.write_text(render(read_rows([jsonl])))


def read_rows(paths) -> list[dict]:
    """Rows of one or more .jsonl files; the last row of each (scenario, variant) wins, in a stable order."""
    latest = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                latest[(row["scenario"], row["variant"])] = row
    order = {name: i for i, name in enumerate(SCENARIOS)}
    return sorted(
        latest.values(),
        key=lambda r: (order.get(r["scenario"], 99), r["scenario"], VARIANTS.index(r["variant"])),
    )


def fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def best_peer(rows: list[dict], key: str, higher: bool) -> dict | None:
    peers = [r for r in rows if r["variant"] in PEERS and r["status"] == "ok" and r.get(key)]
    return (max if higher else min)(peers, key=lambda r: r[key]) if peers else None


def render(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    first = ok[0] if ok else (rows[0] if rows else {})
    lines = ["# fusetune against its peers: LoRA / QLoRA training steps", ""]
    if first:
        lines += [
            f"{first.get('gpu')}, {first.get('date')}; bf16 matmul peak measured in the run: "
            f"{fmt(first.get('peak_tflops'), '.0f')} TFLOP/s. Versions: "
            + ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items())
            + ".",
            "",
        ]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    for scenario in scenarios:
        group = [r for r in rows if r["scenario"] == scenario]
        lines += [f"## {scenario}: {describe(group[0])}", ""]
        if any(r.get("max_context") is not None for r in group) or scenario == "S5":
            lines += max_context_table(group)
        else:
            lines += step_table(group)
        notes = [f"- {r['variant']}: {r['status']}: {r['reason']}" for r in group if r["status"] != "ok"]
        notes += [f"- {r['variant']}: {r['mode_detail']}" for r in group if r.get("mode_detail")]
        notes += [
            f"- {r['variant']}: load-time self-check of its patched ops {r['self_check_s']:.2f} s "
            f"(of {fmt(r.get('load_s'), '.1f')} s loading)"
            for r in group
            if r.get("self_check_s") is not None
        ]
        lines += ["", *notes, ""] if notes else [""]
    lines += [
        "tok/s: tokens per step over the median step (S4: real tokens over the summed step time; DPO: the chosen "
        "and rejected tokens of the policy's forward, the reference's forward over them counted in the FLOPs only); "
        "x best peer: "
        "against the best of hf, liger and unsloth in the scenario (tok/s: the fastest; memory: the smallest peak); "
        "peak: torch.cuda.max_memory_allocated from the start of timing (load: from process start); MFU: useful "
        "FLOPs (4N per token + attention; see flops_convention in the JSON) over the measured matmul peak. "
        "Every variant: LoRA r=16, alpha=16 on q,k,v,o,gate,up,down (Phi-3: qkv,o,gate_up,down; routed experts: "
        "q,k,v,o and every expert's gate_up and down), bf16 autocast "
        "and fused AdamW on CUDA "
        "(fp32 on the CPU), the same batches, a plain loop. Gradient checkpointing: "
        + "; ".join(sorted({f"{r['variant']}: {r.get('gradient_checkpointing')}" for r in rows}))
        + ".",
    ]
    versions = {r["variant"]: r.get("versions") for r in ok if r.get("versions")}
    base = first.get("versions") or {}
    diffs = {v: {k: x for k, x in ver.items() if base.get(k) != x} for v, ver in versions.items()}
    lines += [f"- {v} differs in: {', '.join(f'{k} {x}' for k, x in d.items())}" for v, d in diffs.items() if d]
    return "\n".join(lines) + "\n"


def describe(row: dict) -> str:
    if not row.get("model"):
        return row["scenario"]
    quant = "QLoRA NF4" if row.get("quant") == "nf4" else (row.get("quant") or "")
    if row.get("dpo"):
        return f"{row.get('model')} {quant}, DPO: {row.get('batch')} pairs x 2 x {row.get('seq')}"
    if row.get("docs_per_step") or row.get("mode") in ("padded", "padding_free"):
        return f"{row.get('model')} {quant}, {row.get('docs_per_step') or 'variable-length'} documents a step"
    if row["scenario"] == "S5":
        cap = f" in {row['memory_cap_gib']:g} GiB" if row.get("memory_cap_gib") else ""
        return f"{row.get('model')} {quant}, longest batch-1 context that trains a step{cap}"
    return f"{row.get('model')} {quant}, {row.get('batch')} x {row.get('seq')}"


def step_table(group: list[dict]) -> list[str]:
    fast, lean = best_peer(group, "tok_s", True), best_peer(group, "peak_gib", False)
    lines = [
        "| variant | status | mode | tok/s | speed x best peer | step ms | MFU | peak GiB | peak x best peer | "
        "peak incl. load GiB | loss first | loss last |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in group:
        ok = r["status"] == "ok"
        speed = f"{r['tok_s'] / fast['tok_s']:.2f}x" if ok and fast else "-"
        memory = f"{r['peak_gib'] / lean['peak_gib']:.2f}x" if ok and lean and r.get("peak_gib") else "-"
        mode = r.get("mode") if r.get("mode") in ("padded", "padding_free") else ""
        alt = r.get("alt_optim") or {}
        extra = f" (adamw_8bit: {alt['tok_s']:,.0f})" if alt.get("status") == "ok" else ""
        lines.append(
            f"| {r['variant']} | {r['status']} | {mode} | {fmt(r.get('tok_s'), ',.0f')}{extra} | {speed} | "
            f"{fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_gib'))} | {memory} | "
            f"{fmt(r.get('peak_load_gib'))} | {fmt(r.get('loss_first'), '.4f')} | {fmt(r.get('loss_last'), '.4f')} |"
        )
    return lines


def max_context_table(group: list[dict]) -> list[str]:
    best = best_peer(group, "max_context", True)
    lines = [
        "| variant | status | max context | x best peer | first failure | peak GiB at max | probes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in group:
        ok = r["status"] == "ok" and r.get("max_context") is not None
        ratio = f"{r['max_context'] / best['max_context']:.2f}x" if ok and best else "-"
        top = " (the top probed)" if r.get("at_limit") else ""
        probes = ", ".join(f"{p['seq']} {p['status']}" for p in r.get("probes") or [])
        lines.append(
            f"| {r['variant']} | {r['status']} | {fmt(r.get('max_context'), ',')}{top} | {ratio} | "
            f"{fmt(r.get('first_failure'), ',')} | {fmt(r.get('peak_gib'))} | {probes} |"
        )
    together = sorted({r["variant"] for r in group if r.get("concurrent_with")})
    if together:
        cap = next(r.get("memory_cap_gib") for r in group if r.get("concurrent_with"))
        lines.append(
            f"\n{', '.join(together)}: probed at once on one GPU (`--s5-together`), each process capped at {cap:g} GiB."
        )
    return lines


def newest_peers_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.rglob("*-peers.jsonl"), key=lambda p: (p.name, p.stat().st_mtime))
    if not found:
        raise SystemExit(f"bench: no *-peers.jsonl under {path}")
    return found[-1]


def readme_table(path: Path) -> str:
    """The README's performance table: one line per scenario, fusetune (Triton) against each peer."""
    source = newest_peers_file(path)
    rows = read_rows([source])
    first = next((r for r in rows if r["status"] == "ok"), rows[0])
    lines = [
        f"Measured on {first.get('gpu')} ({first.get('date')}, `{source.name}`): tokens/s and peak GiB per "
        "training step, LoRA r=16 on every projection; the ratio is fusetune (Triton) against the best peer.",
        "",
        "| scenario | hf | liger | unsloth | fusetune | vs best peer (speed, memory) |",
        "|---|---|---|---|---|---|",
    ]
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        group = {r["variant"]: r for r in rows if r["scenario"] == scenario}
        ours = group.get("fusetune_triton") or group.get("fusetune_reference") or {}
        any_row = next(iter(group.values()))

        def cell(r):
            if not r or r["status"] != "ok":
                return "-" if not r else r["status"]
            if r.get("max_context") is not None:
                return f"{r['max_context']:,} tokens"
            return f"{r['tok_s']:,.0f} tok/s, {fmt(r.get('peak_gib'), '.1f')} GiB"

        if any_row.get("max_context") is not None or scenario == "S5":
            best = best_peer(list(group.values()), "max_context", True)
            ok = ours.get("status") == "ok" and best and ours.get("max_context")
            ratio = f"{ours['max_context'] / best['max_context']:.2f}x context" if ok else "-"
        else:
            fast = best_peer(list(group.values()), "tok_s", True)
            lean = best_peer(list(group.values()), "peak_gib", False)
            ok = ours.get("status") == "ok"
            ratio = (
                f"{ours['tok_s'] / fast['tok_s']:.2f}x, {ours['peak_gib'] / lean['peak_gib']:.2f}x"
                if ok and fast and lean and ours.get("peak_gib")
                else "-"
            )
        cells = " | ".join(cell(group.get(v)) for v in PEERS)
        lines.append(f"| {scenario}: {describe(any_row)} | {cells} | {cell(ours)} | {ratio} |")
    return "\n".join(lines) + "\n"


def merge(paths, out: Path) -> Path:
    """``--render``: the rows of ``paths`` (the last of each scenario and variant) in one .jsonl under ``out``,
    with its table; the table is printed."""
    rows = read_rows(paths)
    first = next((r for r in rows if r.get("gpu")), {"gpu": "gpu"})
    if out.suffix != ".jsonl":
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"{first.get('date', 'undated')}-{gpu_slug(first['gpu'])}-peers.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out.with_suffix(".md").write_text(render(rows))
    print(out.with_suffix(".md").read_text(), end="")
    return out
