"""Time the fused LoRA node's two product orders on a GPU, on the 8B's projection shapes.

    old: y = x W^T;  y += s * xa B^T          (the rank-r add re-reads and re-writes all of y)
    new: y = s * xa B^T;  y += x W^T          (the large GEMM accumulates onto y, beta=1)

and the same for the input gradient (dx = dy W + s * g A). Prints and writes JSON: the median of CUDA-event
timings per shape and order, and each order's relative error against float64.

    python scripts/lora_product_order.py --out results.json
"""

import argparse
import json
import statistics

import torch

# Llama-3.1-8B: (out, in) of q/o, k/v, gate/up, down
SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}


def median_ms(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def measure(name: str, out_f: int, in_f: int, tokens: int, rank: int, reps: int) -> dict:
    s, dt = 1.0, torch.bfloat16
    x = torch.randn(tokens, in_f, device="cuda", dtype=dt)
    w = (torch.randn(out_f, in_f, device="cuda") / in_f**0.5).to(dt)
    a = (torch.randn(rank, in_f, device="cuda") / in_f**0.5).to(dt)
    b = (torch.randn(out_f, rank, device="cuda") / rank**0.5).to(dt)
    dy = torch.randn(tokens, out_f, device="cuda", dtype=dt)
    xa, g = x @ a.t(), dy @ b
    orders = {
        "fwd_old": lambda: torch.mm(x, w.t()).addmm_(xa, b.t(), alpha=s),
        "fwd_new": lambda: xa.new_empty(tokens, out_f).addmm_(xa, b.t(), beta=0, alpha=s).addmm_(x, w.t()),
        "bwd_old": lambda: torch.mm(dy, w).addmm_(g, a, alpha=s),
        "bwd_new": lambda: g.new_empty(tokens, in_f).addmm_(g, a, beta=0, alpha=s).addmm_(dy, w),
    }
    refs = {
        "fwd": x.double() @ w.double().t() + s * xa.double() @ b.double().t(),
        "bwd": dy.double() @ w.double() + s * g.double() @ a.double(),
    }
    row = {"proj": name, "out": out_f, "in": in_f, "tokens": tokens, "rank": rank}
    for label, fn in orders.items():
        row[f"{label}_ms"] = round(median_ms(fn, reps), 4)
        row[f"{label}_rel_err"] = rel_err(fn(), refs[label[:3]])
    for kind in ("fwd", "bwd"):
        row[f"{kind}_saving"] = round(1 - row[f"{kind}_new_ms"] / row[f"{kind}_old_ms"], 4)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="rows of x (default: 8192)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (default: 16)")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per order (default: 50)")
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        rows.append(measure(name, out_f, in_f, args.tokens, args.rank, args.reps))
        print(json.dumps(rows[-1]))
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
