"""What the parent knows of a (scenario, variant) before it runs: the row it starts from, and the spec its job
subprocess reads (everything the job needs of the model's shapes and the library's rules, worked out here)."""

import datetime

from .scenarios import DPO_LOSS_TYPE, LORA, VARIANT_CHECKPOINTING, document_lengths
from .shapes import dpo_flops, library, lora_targets, matmul_params, routed_experts, scenario_config, useful_flops


def fp8_note(args) -> str:
    return "; base GEMMs in FP8 (fp8_base=True)" if args.fusetune_fp8 else ""


def checkpointing(variant: str, args) -> str:
    """How ``variant`` checkpoints in this run, in words, for the row and the table's note."""
    if variant.startswith("fusetune"):
        if args.fusetune_checkpointing == "plain":
            return "use_gradient_checkpointing=True (plain, fusetune's)" + fp8_note(args)
        if args.fusetune_checkpointing == "smart":
            budget = f"memory_budget={args.memory_gib:g}" if args.memory_gib else "the free memory as budget"
            return f'use_gradient_checkpointing="smart" ({budget}; the rest offloaded)' + fp8_note(args)
        return VARIANT_CHECKPOINTING[variant] + fp8_note(args)
    elif args.peer_checkpointing == "off":
        return "none (use_gradient_checkpointing=False)"
    return VARIANT_CHECKPOINTING[variant]


def base_row(scenario: str, variant: str, sc: dict, gpu: dict, args) -> dict:
    cfg = scenario_config(sc)
    return {
        "scenario": scenario,
        "variant": variant,
        "status": None,
        "reason": None,
        "model": sc["arch"],
        "quant": sc.get("quant") or ("fp32" if args.tiny else "bf16"),
        "batch": sc.get("batch"),
        "docs_per_step": sc.get("docs"),
        "seq": sc.get("seq"),
        "layers": cfg["num_hidden_layers"],
        "lora": {**LORA, "targets": lora_targets(cfg), "experts": routed_experts(cfg)},
        "optimizer": "torch AdamW (fused)" if gpu["cuda"] else "torch AdamW",
        "gradient_checkpointing": checkpointing(variant, args),
        "memory_cap_gib": args.memory_gib,
        "autocast": bool(gpu["cuda"] and not args.no_autocast),
        "matmul_params": matmul_params(cfg),
        "flops_convention": "4N per token (N: all matmul params incl. lm_head, excl. embeddings) "
        "+ 6*layers*heads*head_dim*(L+1) per token of an L-token document (a sliding-window layer: the keys in "
        "its window; a linear-attention layer: none); recompute not counted"
        + ("; DPO: x1.5 for the reference's forward over the same tokens" if sc["kind"] == "dpo" else ""),
        **({"dpo": dpo_setup(sc)} if sc["kind"] == "dpo" else {}),
        "gpu": gpu["name"],
        "peak_tflops": gpu.get("peak_tflops"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S"),
    }


def dpo_setup(sc: dict) -> dict:
    """What a DPO row trains on, beside batch (pairs a step) and seq (each chosen or rejected sequence)."""
    return {
        "pairs_per_step": sc["batch"],
        "prompt_tokens": sc["prompt"],
        "completion_tokens": sc["seq"] - sc["prompt"],
        "beta": sc["beta"],
        "loss_type": DPO_LOSS_TYPE,
        "reference": "the policy with its LoRA adapters disabled",
        "tokens_counted": "chosen + rejected tokens of the policy's forward (the reference's forward not counted)",
    }


def worker_spec(
    scenario, variant, sc, folder, source, gpu, args, *, seq=None, mode=None, warmup_and_steps=None
) -> dict:
    """The job of one variant on one scenario: ``seq`` a probe's length, and its ``warmup_and_steps``."""
    sc = dict(sc, seq=seq) if seq else sc
    warmup, timed = warmup_and_steps or (
        args.warmup if args.warmup is not None else sc["warmup"],
        args.steps if args.steps is not None else sc["steps"],
    )
    lengths = document_lengths(sc, args.seed, warmup + timed)
    cfg = scenario_config(sc)
    widest = max(sum(d) if mode == "padding_free" else max(d) for d in lengths)
    return {
        "variant": variant,
        "scenario": {**sc, "name": scenario},
        "folder": str(folder),
        "source": source,
        "lengths": lengths,  # each step's documents, and the useful FLOPs of each step
        "step_flops": [(dpo_flops if sc["kind"] == "dpo" else useful_flops)(cfg, d) for d in lengths],
        "targets": lora_targets(cfg),
        "routed_experts": routed_experts(cfg),
        "expert_parameters": list(library().modules.EXPERT_PARAMETERS),
        "mode": mode or "fixed",
        "warmup": warmup,
        "steps": timed,
        "alt_steps": args.alt_steps,
        "seed": args.seed,
        "cuda": gpu["cuda"],
        "autocast": not args.no_autocast,
        "peak_tflops": gpu.get("peak_tflops"),
        "max_seq_length": max(widest, 2048 if gpu["cuda"] else 0),
        "profile": variant in args.profile,
        "fusetune_checkpointing": args.fusetune_checkpointing,
        "fusetune_fp8": args.fusetune_fp8,
        "peer_checkpointing": args.peer_checkpointing,
        "memory_cap_gib": args.memory_gib,
        "fusetune_graphs": args.fusetune_graphs == "on",
    }
