"""Scenarios of kind ``max_context`` (S5): the longest batch-1 context that trains one step, found by probes
(one job each) that bisect between ``--s5-min`` and ``--s5-max``; ``--s5-together`` probes every variant at
once, each capped at ``--s5-memory-gib``."""

import concurrent.futures
import math

from .rows import worker_spec
from .runner import availability, log


def next_probe(ok, bad, fits, capacity, top, gran, resolution) -> int | None:
    """The next length to probe, or None when the bracket (ok, bad] is narrow enough or ``top`` fits.

    ``fits``: (length, peak GiB) of the probes that fitted. Two of them give peak memory as a line in the
    length; where it meets ``capacity`` is the guess. Without a failure yet: the guess, but at least
    ``1 + 2 * resolution`` times the last fit (twice it before there is a line); with one: the guess
    if it falls well inside the bracket, else its geometric middle. Lengths are multiples of ``gran``."""
    if ok is None or ok >= top or (bad is not None and bad - ok <= max(gran, ok * resolution)):
        return None
    guess = None
    if len(fits) >= 2 and fits[-1][1] > fits[-2][1]:
        (l1, p1), (l2, p2) = fits[-2], fits[-1]
        guess = l2 + (capacity - p2) * (l2 - l1) / (p2 - p1)
    if bad is None:
        length = max(guess, ok * (1 + 2 * resolution)) if guess else 2 * ok
        return top if length >= top else max(ok + gran, int(length) // gran * gran)
    inside = guess is not None and ok * (1 + resolution) < guess < bad / (1 + resolution)
    length = int(guess if inside else math.sqrt(ok * bad)) // gran * gran
    length = min(max(length, ok + gran), bad - gran)
    return length if ok < length < bad else None


def run(runner, scenario, variant, sc, folder, source, gpu, args) -> dict:
    """S5: probe batch-1 lengths, one training step each in its own subprocess, from ``--s5-min`` up
    (next_probe picks each next length; capacity: the GPU's memory less 5%). A timed-out probe counts
    as a failure at that length, and is listed as such."""
    gran, top = args.s5_granularity, args.s5_max
    capacity = min(gpu.get("total_gib", 0), args.s5_memory_gib or math.inf) * 0.95
    probes, fits, ok, bad = [], [], None, None

    def probe(length: int) -> dict:
        spec = worker_spec(scenario, variant, sc, folder, source, gpu, args, seq=length, warmup_and_steps=(0, 1))
        spec.update(alt_steps=0, memory_cap_gib=args.s5_memory_gib)
        r = runner.call("worker", spec, f"{scenario}-{variant}-{length}", variant, timeout=args.s5_probe_timeout)
        status = "ok" if r["status"] == "ok" else ("oom" if r.get("oom") else r.get("reason") or r["status"])
        if r["status"] == "skipped":
            status = "skipped"
        entry = {"seq": length, "status": status, "peak_gib": r.get("peak_gib"), "step_s": None, "wall_s": r["wall_s"]}
        if r["status"] == "ok":
            entry["step_s"] = r["step_ms"] / 1e3
        probes.append(entry)
        log(f"  {variant} S5 probe {length}: {status}, peak {entry['peak_gib'] or 0:.1f} GiB, {r['wall_s']:.0f} s")
        return {**r, "probe_status": status}

    length = args.s5_min
    while len(probes) < args.s5_probes:
        r = probe(length)
        if r["probe_status"] == "ok":
            ok = length
            fits.append((length, r["peak_gib"]))
        elif r["probe_status"] == "skipped":  # out of --budget: report what is known
            break
        elif r["probe_status"] == "oom" or r.get("timeout"):
            bad = length
        else:
            return {"status": "failed", "reason": f"probe at {length}: {r['probe_status']}", "probes": probes}
        length = next_probe(ok, bad, fits, capacity, top, gran, args.s5_resolution)
        if length is None:
            break
    if ok is None:
        return {
            "status": "ok",
            "max_context": 0,
            "first_failure": bad,
            "memory_cap_gib": args.s5_memory_gib,
            "probes": probes,
        }
    best = next(p for p in probes if p["seq"] == ok)
    return {
        "status": "ok",
        "max_context": ok,
        "first_failure": bad,
        "memory_cap_gib": args.s5_memory_gib,
        "at_limit": ok >= top,
        "peak_gib": best["peak_gib"],
        "tokens_per_step": ok,
        "first_step_ms": best["step_s"] * 1e3,  # one step, compilation included: not a throughput
        "probes": probes,
        "wall_s": sum(p["wall_s"] for p in probes),
    }


def start_together(runner, scenario, sc, folder, source, gpu, args) -> dict:
    """S5 for every available variant at once, one thread each (``--s5-together``). Each probe caps its
    allocator at ``--s5-memory-gib``, so the lengths found are those of a GPU of that size; the one-step
    times overlap and are marked as such."""
    ready = [v for v in args.variants if availability(v, sc, gpu, args) is None]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(ready))

    def probe_alongside(variant: str) -> dict:
        result = run(runner, scenario, variant, sc, folder, source, gpu, args)
        return {**result, "concurrent_with": [v for v in ready if v != variant]}

    futures = {v: pool.submit(probe_alongside, v) for v in ready}
    pool.shutdown(wait=False)
    return futures
