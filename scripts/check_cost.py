"""What the load-time self-check adds to loading a model, on this machine.

For each architecture: the seconds ``choose_backend`` spends deriving the family's row and checking
its ops, (1) cold: fresh Triton and verdict caches, (2) warm Triton cache, fresh verdicts, (3) every
verdict cached, (4) every verdict cached but a fresh Triton cache; beside (1) and (4), the seconds to
build the full-size model with random weights and to run its first forward and backward (1 x 512
tokens, the patched ops compiling there what the check has not). What the check adds to a run's
start is (1)'s check and first step less (4)'s first step. Each case runs in a fresh subprocess.
Writes JSON lines to stdout.

    python scripts/check_cost.py --archs llama3_1b qwen3_5_2b --backend triton --dtype bfloat16
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ROOT / "src" / "fusetune" / "assets" / "archs"


def measure(arch: str, backend: str, dtype_name: str, check_dtype_name: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fusetune import patching

    config = AutoConfig.from_pretrained(ARCHS / arch)
    dtype, check_dtype = getattr(torch, dtype_name), getattr(torch, check_dtype_name)
    cuda = torch.cuda.is_available()
    if cuda:  # CUDA's start-up is paid by loading the model anyway, not by the check
        torch.zeros(1, device="cuda").add_(1).item()
    started = time.perf_counter()
    chosen = patching.choose_backend(backend, config, on_cuda=cuda, dtype=check_dtype)
    accepted, rejected = patching.check_family(config, chosen, "cuda" if cuda else "cpu", check_dtype)
    check = time.perf_counter() - started
    row = {
        "arch": arch,
        "model_type": config.model_type,
        "backend": chosen,
        "dtype": dtype_name,
        "check_dtype": check_dtype_name,
    }
    row["check_s"] = round(check, 3)
    row |= {"patched": sorted(accepted), "unpatched": rejected}
    if os.environ.get("CHECK_COST_LOAD") == "1":
        started = time.perf_counter()
        with torch.device("cuda" if cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if cuda:
            torch.cuda.synchronize()
        row["build_model_s"] = round(time.perf_counter() - started, 3)
        patching.patch_family(config, chosen, device=model.device, dtype=check_dtype)
        ids = torch.randint(0, config.vocab_size, (1, 512), device=model.device)
        started = time.perf_counter()
        model.train()(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if cuda:
            torch.cuda.synchronize()
        row["first_step_s"] = round(time.perf_counter() - started, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["llama3_1b"], help="folders of src/fusetune/assets/archs")
    parser.add_argument("--backend", default="triton", help="triton (default) or reference")
    parser.add_argument("--dtype", default="bfloat16", help="the dtype the model trains in (default bfloat16)")
    parser.add_argument("--check-dtype", help="check in this dtype instead (float32: as before the half check)")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    inner_args = ["--backend", args.backend, "--dtype", args.dtype, "--check-dtype", args.check_dtype or args.dtype]
    if args.inner:
        print(json.dumps(measure(args.inner, args.backend, args.dtype, args.check_dtype or args.dtype)), flush=True)
        return
    for arch in args.archs:
        triton_cache, verdicts = tempfile.mkdtemp(), tempfile.mkdtemp()
        for case, fresh_triton, fresh_verdicts, load in (
            ("cold", True, True, True),
            ("warm_triton", False, True, False),
            ("cached", False, False, False),
            ("cached_cold_triton", True, False, True),
        ):
            env = dict(os.environ, TRITON_CACHE_DIR=triton_cache if not fresh_triton else tempfile.mkdtemp())
            env["FUSETUNE_CACHE_DIR"] = tempfile.mkdtemp() if fresh_verdicts else verdicts
            env["CHECK_COST_LOAD"] = "1" if load else "0"
            if case == "warm_triton":  # fill the Triton cache this case reuses
                subprocess.run(
                    [sys.executable, __file__, "--inner", arch, *inner_args],
                    env=dict(env, FUSETUNE_CACHE_DIR=verdicts),
                    capture_output=True,
                    check=False,
                )
            out = subprocess.run(
                [sys.executable, __file__, "--inner", arch, *inner_args],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"arch": arch, "error": out.stderr[-800:]}
            print(json.dumps({"case": case, **row}), flush=True)


if __name__ == "__main__":
    main()
