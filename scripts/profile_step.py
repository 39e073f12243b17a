"""Is a padding-free LoRA step GPU-bound? Host time against GPU time, per attention backend.

The command line over ``step_profiler`` (its docstring says what is measured and how): every backend in
``--backends`` and trainer variant in ``--trainer`` on the same documents, then ``profile.json`` and
``profile.md`` in ``--out``.

    python scripts/profile_step.py --out outputs/profile                      # sdpa vs varlen
    python scripts/profile_step.py --out /tmp/profile --tiny --steps 3 --warmup 1  # CPU smoke test
"""

import argparse
import functools
import logging
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # runpy.run_path does not put scripts/ there
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profiler import BACKENDS, CHECKPOINTING, KERNELS, TRAINER_VARIANTS, Setup  # noqa: E402

MODES = {str(mode).lower(): mode for mode in CHECKPOINTING}  # "true" -> True, "offload" -> "offload", ...


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for profile.json and profile.md")
    p.add_argument("--tiny", action="store_true", help="the embedded tiny Llama and short documents (smoke test)")
    p.add_argument("--backends", default="sdpa,varlen", help=f"comma-separated, of: {', '.join(BACKENDS)}")
    p.add_argument("--steps", type=int, default=20, help="measured steps per backend")
    p.add_argument("--warmup", type=int, default=5, help="steps run before the measured ones")
    p.add_argument("--docs", type=int, default=8, help="documents per step")
    p.add_argument("--min-len", type=int, default=None, help="shortest document (default 64; tiny: 8)")
    p.add_argument("--max-len", type=int, default=None, help="longest document (default 1024; tiny: 64)")
    p.add_argument("--kernels", default="none", choices=KERNELS)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument(
        "--gradient-checkpointing",
        nargs="?",
        const="true",
        default="false",
        choices=list(MODES),
        help="fusetune's checkpointing, as FastModel.get_peft_model's use_gradient_checkpointing (bare flag: true)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-ops", type=int, default=12, help="host ops listed per backend, by self CPU time")
    p.add_argument(
        "--trainer",
        default="",
        help="also time the same documents through FastSFTTrainer.train(), comma-separated variants: "
        "fused (fused loss, eager steps), graphs (fused loss, CUDA graphs), *_async (the same, batches copied "
        "to the GPU with non_blocking=True), trl (TRL's own compute_loss and HF's NaN filter: host reads every step)",
    )
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.trainer = [t.strip() for t in args.trainer.split(",") if t.strip()]
    if set(args.trainer) - set(TRAINER_VARIANTS):
        p.error(f"unknown trainer variants {args.trainer}; choose from {', '.join(TRAINER_VARIANTS)}")
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        p.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    args.gradient_checkpointing = MODES[args.gradient_checkpointing]
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    from step_profiler.report import profile_steps, write_report  # torch and the library load after the arguments

    setup = Setup(
        tiny=args.tiny,
        steps=args.steps,
        warmup=args.warmup,
        docs=args.docs,
        min_len=args.min_len,
        max_len=args.max_len,
        kernels=args.kernels,
        lora_r=args.lora_r,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        top_ops=args.top_ops,
    )
    report = profile_steps(setup, args.backends, args.trainer, say=functools.partial(print, flush=True))
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
