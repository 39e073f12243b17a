"""What each scenario trains, the variants that train it, and the setup every variant shares.

Pure data and the seeded document lengths: a job subprocess imports it, so it imports nothing of fusetune
(a peer's process never does: Unsloth must import first, and a peer must run without fusetune's patches)."""

import math
import random

PEERS = ("hf", "liger", "unsloth")
VARIANTS = (*PEERS, "fusetune_reference", "fusetune_triton")
# --fusetune-checkpointing: its choices, and what FastModel.get_peft_model's use_gradient_checkpointing gets
FUSETUNE_CHECKPOINTING = {"offload": "unsloth", "plain": True, "smart": "smart"}
LORA = {"r": 16, "alpha": 16, "dropout": 0.0}
LR = 1e-4
DPO_LOSS_TYPE = "sigmoid"  # TRL's DPO loss (-logsigmoid of beta times the log-ratio margin), in every DPO row
GIB = 2**30
# How each variant runs gradient checkpointing (as each ships it) and padding-free batches.
VARIANT_CHECKPOINTING = {
    "hf": "non-reentrant torch checkpointing (TRL's default)",
    "liger": "non-reentrant torch checkpointing (TRL's default)",
    "unsloth": 'use_gradient_checkpointing="unsloth" (offloaded)',
    "fusetune_reference": 'use_gradient_checkpointing="unsloth" (offloaded)',
    "fusetune_triton": 'use_gradient_checkpointing="unsloth" (offloaded)',
}
PADDING_FREE = {
    "hf": "SDPA with the per-document mask transformers builds from restarting position_ids",
    "liger": "SDPA with the per-document mask transformers builds from restarting position_ids",
    "unsloth": "Unsloth's packed path (packed_seq_lengths, as its padding-free collator adds)",
    "fusetune_reference": "fusetune_varlen attention (sequences.varlen.enable_varlen_attention, as its trainer does)",
    "fusetune_triton": "fusetune_varlen attention (sequences.varlen.enable_varlen_attention, as its trainer does)",
}

# name -> what it trains. kind: fixed (batch x seq), docs (variable-length documents), max_context (probes),
# dpo (preference pairs through each variant's DPO trainer).
SCENARIOS = {
    "S1": {"arch": "llama3_1b", "kind": "fixed", "batch": 8, "seq": 2048, "warmup": 3, "steps": 10},
    "S2": {"arch": "llama3_8b", "kind": "fixed", "batch": 4, "seq": 2048, "warmup": 3, "steps": 10},
    "S3": {
        "arch": "llama3_8b",
        "kind": "fixed",
        "batch": 4,
        "seq": 2048,
        "quant": "nf4",
        "alt_optim": "adamw_8bit",
        "warmup": 3,
        "steps": 10,
    },
    "S4": {
        "arch": "llama3_1b",
        "kind": "docs",
        "docs": 8,
        "mean": 600,
        "sigma": 0.8,
        "min_len": 16,
        "cap": 2048,
        "warmup": 6,
        "steps": 24,
    },
    "S5": {"arch": "llama3_8b", "kind": "max_context", "batch": 1, "quant": "nf4", "warmup": 0, "steps": 1},
    "long1b": {"arch": "llama3_1b", "kind": "fixed", "batch": 1, "seq": 65536, "warmup": 2, "steps": 5},
    "long8b": {"arch": "llama3_8b", "kind": "fixed", "batch": 1, "seq": 65536, "warmup": 1, "steps": 3},
    "S6": {"arch": "qwen3_5_2b", "kind": "fixed", "batch": 8, "seq": 2048, "warmup": 3, "steps": 10},
    "S7": {"arch": "gemma3_4b", "kind": "fixed", "batch": 8, "seq": 2048, "warmup": 3, "steps": 10},
    "S8": {"arch": "phi4_mini", "kind": "fixed", "batch": 8, "seq": 2048, "warmup": 3, "steps": 10},
    # Qwen3-30B-A3B's layer shapes at half its depth (24 of 48 layers: the bf16 weights of all 48, 61 GB, leave
    # too little of an 80 GB card for 4x2048 under the peers' checkpointing); LoRA on attention and the experts
    "S10": {
        "arch": "qwen3_moe_30b_a3b",
        "kind": "fixed",
        "batch": 4,
        "seq": 2048,
        "layers": 24,
        "warmup": 3,
        "steps": 10,
    },
    "S9": {
        "arch": "phi4_mini",
        "kind": "fixed",
        "batch": 8,
        "seq": 2048,
        "quant": "nf4",
        "alt_optim": "adamw_8bit",
        "warmup": 3,
        "steps": 10,
    },
    # DPO through each variant's trainer: ``batch`` preference pairs a step, each sequence (the shared prompt of
    # ``prompt`` tokens, then the chosen or the rejected completion) ``seq`` tokens long; loss_type sigmoid
    "D1": {
        "arch": "llama3_1b",
        "kind": "dpo",
        "batch": 4,
        "seq": 2048,
        "prompt": 512,
        "beta": 0.1,
        "warmup": 3,
        "steps": 10,
    },
    "D8": {
        "arch": "llama3_8b",
        "kind": "dpo",
        "batch": 4,
        "seq": 2048,
        "prompt": 512,
        "beta": 0.1,
        "warmup": 3,
        "steps": 10,
    },
}
# --tiny: the embedded tiny Llama on the CPU, fp32
TINY_SCENARIOS = {
    "S1": {"arch": "tiny", "kind": "fixed", "batch": 2, "seq": 64, "warmup": 1, "steps": 2},
    "S4": {
        "arch": "tiny",
        "kind": "docs",
        "docs": 4,
        "mean": 24,
        "sigma": 0.6,
        "min_len": 4,
        "cap": 64,
        "warmup": 1,
        "steps": 2,
    },
    # the new families' architectures at toy size (fusetune.tiny.shrunk); S9 is 4-bit, skipped on the CPU
    **{
        name: {**SCENARIOS[name], "shrink": True, "batch": 2, "seq": 64, "warmup": 1, "steps": 2}
        for name in ("S6", "S7", "S8", "S9", "S10")
    },
    # DPO on the tiny Llama (D8 has no tiny form: a shrunk Llama 3's vocabulary is smaller than its tokenizer's ids)
    "D1": {**SCENARIOS["D1"], "arch": "tiny", "seq": 64, "prompt": 16, "warmup": 1, "steps": 2},
}


def document_lengths(sc: dict, seed: int, n_steps: int) -> list[list[int]]:
    """Per step, the lengths of its documents: fixed rows, or seeded lognormal lengths (mean ~sc['mean']); DPO: its
    chosen and its rejected sequences, all that the policy's forward takes."""
    if sc["kind"] == "dpo":
        return [[sc["seq"]] * (2 * sc["batch"]) for _ in range(n_steps)]
    if sc["kind"] != "docs":
        return [[sc["seq"]] * sc["batch"] for _ in range(n_steps)]
    rng = random.Random(seed)
    mu = math.log(sc["mean"]) - sc["sigma"] ** 2 / 2
    return [
        [max(sc["min_len"], min(sc["cap"], round(rng.lognormvariate(mu, sc["sigma"])))) for _ in range(sc["docs"])]
        for _ in range(n_steps)
    ]
