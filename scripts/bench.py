"""End-to-end LoRA/QLoRA training steps: fusetune against its peers, side by side, one subprocess each.

Variants (each in its own subprocess, so memory peaks and monkey-patches never leak between them):

- ``hf``: plain transformers + PEFT, SDPA attention, bitsandbytes for 4-bit; LoRA and gradient
  checkpointing set up the way TRL's SFTTrainer does (non-reentrant; LoRA weights cast to bf16 on a
  4-bit base);
- ``liger``: the ``hf`` model with Liger Kernel's patch for its family applied before LoRA
  (``_apply_liger_kernel_to_instance``: the family's own defaults, e.g. RoPE, RMSNorm, SwiGLU or GeGLU, with
  fused linear cross-entropy); a family Liger has no patch for is a skipped row;
- ``unsloth``: ``FastLanguageModel.from_pretrained`` + ``get_peft_model(use_gradient_checkpointing="unsloth")``,
  in a process that imports unsloth before transformers and sees ``--unsloth-site`` first on its path;
- ``fusetune_reference`` / ``fusetune_triton``: ``FastModel.from_pretrained(kernels=...)`` +
  ``FastModel.get_peft_model(use_gradient_checkpointing="unsloth")``.

Every variant trains the same model: real shapes (src/fusetune/assets/archs) with random weights, saved once
under ``--scratch`` with a tokenizer (Unsloth needs a local folder with one), the language model alone for a
multimodal architecture (Gemma 3 4B, Qwen3.5); LoRA r=16, alpha=16, dropout 0 on q,k,v,o,gate,up,down
(Phi-3: qkv, o, gate_up, down); bf16 under autocast (as the HF Trainer runs with ``bf16=True``); torch's fused
AdamW; ``model.train()``; the same seeded batches; and a plain loop (forward with labels, backward,
optimizer step, zero_grad). LoRA B starts at zero, so the first-step losses must agree across variants.

Scenarios (``--scenarios``, default all): S1 Llama-3.2-1B 8x2048; S2 Llama-3.1-8B 4x2048; S3 the 8B as QLoRA
(NF4, double quantization, bf16 compute) 4x2048, also timed with bitsandbytes' 8-bit AdamW; S4 the 1B on 8
documents a step of seeded lognormal lengths (mean ~600, cap 2048), 6 warm-up and 24 timed steps, padding-free
where the variant can; long1b / long8b 1x65,536; S5 the longest batch-1 context that trains one 8B QLoRA step,
found by probes (one subprocess each) between ``--s5-min`` and ``--s5-max``; ``--s5-memory-gib`` caps each
probe at a smaller card's memory, and then ``--s5-together`` probes all variants at once. New families, 8x2048
LoRA: S6 Qwen3.5-2B (three of four layers gated delta-net), S7 Gemma 3 4B (text), S8 Phi-4-mini; S9 Phi-4-mini
as QLoRA. S10: mixture of experts, Qwen3-30B-A3B's shapes at 24 of its 48 layers, 4x2048, LoRA on attention and
on every layer's 128 experts (PEFT ``target_parameters``; hf runs transformers' default experts_implementation,
grouped_mm in 5.x, recorded in the row). fusetune rows record ``self_check_s``, the load-time self-check of its
patched ops.

Measures: CUDA events around every step; ``step_ms`` the median of the measured steps after warm-up;
``tok_s`` tokens per step over the median step (S4: real tokens over the summed step time, since its
shapes vary; its rows also give ``tok_s_median_step`` and ``median_over_whole``, their ratio, and the
warm-up steps' times, ``step_paths`` and the graphs' counts); fusetune's padding-free steps replay CUDA
graphs as FastSFTTrainer's do (``--fusetune-graphs``), with autocast inside the forward as accelerate
puts it; ``peak_gib`` ``torch.cuda.max_memory_allocated`` after a reset at the start of timing
(``peak_load_gib``: from process start, model load included); ``mfu`` useful FLOPs over a bf16 matmul
peak measured once per run (8192^3 ``torch.mm``). Useful FLOPs, per token: 4N for a frozen base (2N
forward, 2N for the input gradients; N = the parameters of every matmul, lm_head included, the
embedding lookup excluded), plus attention: 6 * layers * heads * head_dim * (L + 1) per token of a
document of length L (causal QK^T and PV, forward and input gradients). Recomputation by gradient
checkpointing is not useful work and is not counted; LoRA's own matmuls are left out. A sliding-window
layer counts the keys its window reaches; a linear-attention layer counts its projections only.

Writes ``<out>/<date>-<gpu>-peers.jsonl`` (one row per scenario x variant, appended as each finishes)
and the markdown table beside it (re-rendered after every row), ratios against the best peer of hf,
liger and unsloth.

    python scripts/bench.py --scenarios S1,S4 --variants hf,liger,unsloth,fusetune_triton
    python scripts/bench.py --tiny --variants hf,fusetune_reference --out /tmp/bench   # CPU smoke test
    python scripts/bench.py --render a.jsonl b.jsonl --out bench/results                # merge calls
    python scripts/bench.py --readme-table bench/results                                # README table

``--tiny`` runs S1 and S4 on the embedded tiny Llama, and S6-S10 on their architectures shrunk to toy size
(``fusetune.tiny.shrunk``), on the CPU in fp32 (S9, 4-bit, is skipped there). liger and fusetune_triton
are reported as skipped there (Triton kernels: the CPU interpreter is far too slow for training steps,
and tests/kernels covers them); unsloth, where installed, runs its own CPU fallback.
"""

import argparse
import concurrent.futures
import contextlib
import datetime
import gc
import importlib.machinery
import importlib.metadata
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ROOT / "src" / "fusetune" / "assets" / "archs"
TINY = ROOT / "src" / "fusetune" / "assets" / "tiny_llama"
FORMAT = 1  # bump when a prepared scratch folder must be rebuilt
PEERS = ("hf", "liger", "unsloth")
FUSETUNE_CHECKPOINTING = {"offload": "unsloth", "plain": True, "smart": "smart"}
VARIANTS = (*PEERS, "fusetune_reference", "fusetune_triton")
# = fusetune.modules.PROJECTIONS (tested), not imported: the Unsloth process imports unsloth before fusetune
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION_TARGETS = TARGETS[:4]
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # transformers' routed-experts layout: [E, 2I, H] and [E, H, I]
# Families whose projections have other names: the same layers adapted (as conf/model/phi4_mini.yaml)
FAMILY_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
LORA = {"r": 16, "alpha": 16, "dropout": 0.0}
LR = 1e-4
GIB = 2**30
# How each variant runs gradient checkpointing (as each ships it) and padding-free batches.
CHECKPOINTING = {
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
    "fusetune_reference": "fusetune_varlen attention (fusetune.varlen.enable_varlen_attention, as its trainer does)",
    "fusetune_triton": "fusetune_varlen attention (fusetune.varlen.enable_varlen_attention, as its trainer does)",
}

# name -> what it trains. kind: fixed (batch x seq), docs (variable-length documents), max_context (probes).
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
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def split_list(value: str) -> list[str]:
    return [v for v in re.split(r"[,\s]+", value.strip()) if v]


# ---------------------------------------------------------------- model shapes and FLOPs (no torch needed)


def arch_config(arch: str, shrink: bool = False, layers: int | None = None) -> dict:
    """The language model's config.json (a composite config's text part); ``shrink``: at toy size; ``layers``:
    the first that many layers (a scenario whose full depth does not fit; ignored at toy size)."""
    folder = TINY if arch == "tiny" else ARCHS / arch
    cfg = json.loads((folder / "config.json").read_text())
    if shrink:
        from fusetune.tiny import shrunk  # the parent and prepare only: never before unsloth in its worker

        cfg = shrunk(cfg)
    cfg = cfg.get("text_config", cfg)
    if layers and not shrink:
        cfg = {
            **cfg,
            "num_hidden_layers": layers,
            "max_window_layers": min(layers, cfg.get("max_window_layers", layers)),
        }
        if cfg.get("layer_types"):
            cfg["layer_types"] = cfg["layer_types"][:layers]
    return cfg


def scenario_config(sc: dict) -> dict:
    return arch_config(sc["arch"], sc.get("shrink"), sc.get("layers"))


def layer_kinds(cfg: dict) -> list[str]:
    """Each layer's attention: full_attention, sliding_attention or linear_attention."""
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    every = cfg.get("sliding_window_pattern")  # Gemma 3's configs: every n-th layer global
    layers = cfg["num_hidden_layers"]
    if every:
        return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)]
    return ["full_attention"] * layers


def matmul_params(cfg: dict) -> int:
    """N: the parameters of every matmul a token goes through (attention or linear attention, MLP or router and
    top-k experts, lm_head); the embedding lookup is not one, nor are the linear-attention layers' depthwise
    convolutions."""
    d, mlp = cfg["hidden_size"], mlp_params(cfg)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or d // heads
    gate = 2 if cfg.get("attn_output_gate") else 1  # Qwen3.5: q_proj also gives a gate per head
    attention = d * heads * hd * gate + 2 * d * kv * hd + heads * hd * d
    total = 0
    for kind in layer_kinds(cfg):
        if kind == "linear_attention":  # gated delta-net: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj
            keys = cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
            values = cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
            total += d * (2 * keys + values) + 2 * d * values + 2 * d * cfg["linear_num_value_heads"]
        else:
            total += attention
        total += mlp
    return total + d * cfg["vocab_size"]


def mlp_params(cfg: dict) -> int:
    """A layer's MLP matmul parameters that a token goes through: the gated MLP, or for routed experts the
    router and the top-k experts it picks."""
    d = cfg["hidden_size"]
    experts = max(cfg.get(k) or 0 for k in ("num_experts", "num_local_experts"))
    if experts <= 1:
        return 3 * d * cfg["intermediate_size"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    return d * experts + cfg["num_experts_per_tok"] * 3 * d * inter


def attended(length: int, window: int | None) -> int:
    """Keys attended, summed over the queries of a causal document of ``length`` tokens."""
    if not window or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def useful_flops(cfg: dict, doc_lengths: list[int]) -> float:
    """4N per token (frozen base: forward and input gradients) plus causal attention, forward and backward."""
    n = matmul_params(cfg)
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    windows = {"full_attention": None, "sliding_attention": cfg.get("sliding_window")}
    kinds = [windows[k] for k in layer_kinds(cfg) if k in windows]
    return float(
        sum(4 * n * length + sum(12 * heads * hd * attended(length, w) for w in kinds) for length in doc_lengths)
    )


def routed_experts(cfg: dict) -> bool:
    return max(cfg.get(k) or 0 for k in ("num_experts", "num_local_experts")) > 1


def lora_targets(cfg: dict) -> list[str]:
    """The modules LoRA adapts: attention and MLP projections; with routed experts, attention only (the experts'
    3-D parameters are adapted as ``target_parameters``, see expert_parameters; the router stays frozen)."""
    if routed_experts(cfg):
        return ATTENTION_TARGETS
    return FAMILY_TARGETS.get(cfg.get("model_type"), TARGETS)


def expert_parameters(model) -> list[str]:
    """The dotted names of every routed-experts module's 3-D gate_up_proj and down_proj (PEFT target_parameters)."""
    return [
        f"{name}.{param}"
        for name, module in model.named_modules()
        for param in EXPERT_PARAMETERS
        if getattr(module._parameters.get(param), "ndim", 0) == 3
    ]


def document_lengths(sc: dict, seed: int, n_steps: int) -> list[list[int]]:
    """Per step, the lengths of its documents: fixed rows, or seeded lognormal lengths (mean ~sc['mean'])."""
    if sc["kind"] != "docs":
        return [[sc["seq"]] * sc["batch"] for _ in range(n_steps)]
    rng = random.Random(seed)
    mu = math.log(sc["mean"]) - sc["sigma"] ** 2 / 2
    return [
        [max(sc["min_len"], min(sc["cap"], round(rng.lognormvariate(mu, sc["sigma"])))) for _ in range(sc["docs"])]
        for _ in range(n_steps)
    ]


# ---------------------------------------------------------------- worker: one variant, one scenario, one process


def versions() -> dict:
    names = [
        "torch",
        "triton",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "bitsandbytes",
        "liger-kernel",
        "unsloth",
        "unsloth-zoo",
        "fusetune",
        "datasets",
    ]
    found = {"python": sys.version.split()[0]}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def make_batches(spec: dict, torch, vocab: int) -> tuple[list[dict], list[list[int]], str]:
    """The same seeded batches in every variant. Returns (batches on the CPU, document lengths, mode)."""
    sc = spec["scenario"]
    n = spec["warmup"] + spec["steps"]
    lengths = document_lengths(sc, spec["seed"], n)
    mode = spec["mode"]
    batches = []
    for step, docs in enumerate(lengths):
        g = torch.Generator().manual_seed(spec["seed"] * 1000 + step)
        ids = [torch.randint(0, vocab, (length,), generator=g) for length in docs]
        if mode == "fixed":
            input_ids = torch.stack(ids)
            batches.append({"input_ids": input_ids, "labels": input_ids.clone()})
        elif mode == "padded":
            width = max(docs)
            input_ids = torch.zeros(len(docs), width, dtype=torch.long)
            attention_mask = torch.zeros(len(docs), width, dtype=torch.long)
            labels = torch.full((len(docs), width), -100, dtype=torch.long)
            for row, t in enumerate(ids):
                input_ids[row, : len(t)], attention_mask[row, : len(t)], labels[row, : len(t)] = t, 1, t
            batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
        else:  # padding_free: what TRL's DataCollatorForLanguageModeling(padding_free=True) gives
            input_ids = torch.cat(ids)[None]
            position_ids = torch.cat([torch.arange(length) for length in docs])[None]
            labels = input_ids.clone()
            labels[position_ids == 0] = -100  # a document's first token is not predicted from the one before
            cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
            if spec["variant"] == "unsloth":  # what Unsloth's own padding-free collator adds
                batch = {"packed_seq_lengths": torch.tensor(docs, dtype=torch.int32)}
            else:
                batch = {
                    "cu_seq_lens_q": cu,
                    "cu_seq_lens_k": cu,
                    "max_length_q": max(docs),
                    "max_length_k": max(docs),
                    "seq_idx": torch.repeat_interleave(torch.arange(len(docs), dtype=torch.int32), torch.tensor(docs))[
                        None
                    ],
                }
            batches.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids, **batch})
    return batches, lengths, mode


def bnb_config(torch, dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def build_hf(spec: dict, torch, dtype, liger: bool = False):
    """transformers + PEFT set up as TRL's SFTTrainer does it (Liger's patch first, for ``liger``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if spec["cuda"]:
        kwargs["device_map"] = {"": 0}
    quantized = spec["scenario"].get("quant") == "nf4"
    if quantized and spec["source"] == "bf16":
        kwargs["quantization_config"] = bnb_config(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], **kwargs)
    if liger:
        apply_liger(model)
    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=spec["targets"],
        target_parameters=expert_parameters(model) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if spec.get("peer_checkpointing") != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if quantized:  # TRL keeps QLoRA adapters in bf16
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model


class Unsupported(Exception):
    """A peer that has nothing for this model: its row is skipped, with this reason."""


def apply_liger(model) -> None:
    """Liger Kernel's patch for the model's family, with its own defaults and fused linear cross-entropy."""
    import liger_kernel
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        version = getattr(liger_kernel, "__version__", None) or importlib.metadata.version("liger-kernel")
        raise Unsupported(f"liger-kernel {version} has no patch for model type '{model_type}'")
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=True)


def self_check_seconds() -> float | None:
    """Seconds fusetune spent checking its patched ops at load (the worker loads one model)."""
    from fusetune import patching

    return patching.check_seconds()


def build_unsloth(spec: dict, torch, dtype):
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=spec["folder"],
        max_seq_length=spec["max_seq_length"],
        dtype=dtype,
        load_in_4bit=spec["scenario"].get("quant") == "nf4",
        full_finetuning=False,
    )
    experts = {"target_parameters": expert_parameters(model)} if routed_experts(spec["arch_config"]) else {}
    if experts and "target_parameters" not in inspect.signature(FastLanguageModel.get_peft_model).parameters:
        raise Unsupported("Unsloth's get_peft_model takes no target_parameters (LoRA on the routed experts)")
    return FastLanguageModel.get_peft_model(
        model,
        **experts,
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=spec["targets"],
        bias="none",
        use_gradient_checkpointing=False if spec.get("peer_checkpointing") == "off" else "unsloth",
        random_state=spec["seed"],
    )


def build_fusetune(spec: dict, torch, dtype):
    from fusetune import FastModel

    kernels = spec["variant"].removeprefix("fusetune_")
    model, _ = FastModel.from_pretrained(
        spec["folder"],
        max_seq_length=spec["max_seq_length"],
        dtype=dtype,
        load_in_4bit=spec["scenario"].get("quant") == "nf4",
        kernels=kernels,
        device_map={"": 0} if spec["cuda"] else None,
        fp8_base=spec.get("fusetune_fp8", False),
    )
    model = FastModel.get_peft_model(
        model,
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=spec["targets"],
        target_parameters=expert_parameters(model),  # as the peers: every expert module, patched or not
        use_gradient_checkpointing=FUSETUNE_CHECKPOINTING[spec.get("fusetune_checkpointing", "offload")],
        random_state=spec["seed"],
        memory_budget=spec.get("memory_cap_gib") if spec.get("fusetune_checkpointing") == "smart" else None,
    )
    if spec["mode"] == "padding_free":
        from fusetune.varlen import enable_varlen_attention

        enable_varlen_attention(model)
    return model


def make_optimizer(name: str, params, torch, cuda: bool):
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=LR, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=cuda)


def timed_steps(model, optimizer, batches, warmup, torch, cuda, autocast, step_graphs=None):
    """Run every batch; return every step's time (ms, consecutive CUDA-event intervals from the first step's
    start; peak memory is reset before step ``warmup``), all losses, and each step's path: "eager", or with
    ``step_graphs`` (fusetune.graphs.StepGraphs, as FastSFTTrainer runs padding-free steps) "capture" or
    "replay" where the graphs took the batch."""
    device = "cuda" if cuda else "cpu"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and autocast) else contextlib.nullcontext()
    marks, losses, paths = [], [], []

    def mark():
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
        else:
            marks.append(time.perf_counter())

    def forward(**inputs):  # autocast inside the forward, as accelerate wraps it: graphs refuse one around them
        with amp:
            return model(**inputs)

    mark()
    for i, batch in enumerate(batches):
        if i == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        batch = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
        out = step_graphs.run(forward, batch) if step_graphs is not None else None
        paths.append(step_graphs.last_action if out is not None else "eager")
        if out is None:
            out = forward(**batch, use_cache=False)
        loss = out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
        del out, loss  # a live autograd graph would make the next capture fail
        mark()
    if cuda:
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)]
    else:
        times = [1e3 * (b - a) for a, b in zip(marks, marks[1:], strict=False)]
    return times, [float(x) for x in torch.stack(losses).cpu().tolist()], paths


def step_graphs_for(model, spec: dict):
    """fusetune's CUDA graphs for its padding-free rows, as FastSFTTrainer makes them (on the CPU: the same
    padded path with reruns for replays); None for other rows and variants, or with --fusetune-graphs off."""
    if not (spec["variant"].startswith("fusetune") and spec["mode"] == "padding_free" and spec.get("fusetune_graphs")):
        return None
    from fusetune.graphs import Reruns, StepGraphs

    params = [p for p in model.parameters() if p.requires_grad]
    device = "cuda" if spec["cuda"] else "cpu"
    return StepGraphs(params, pad_token_id=0, recorder=None if spec["cuda"] else Reruns(), device=device)


def warmup_record(times: list[float], paths: list[str], warmup: int, step_graphs) -> dict:
    """What a run's warm-up cost (the fields that check the capture plan against its cost model): every
    step's time and path, the steps at each path, and the graphs' counts."""
    counts = {path: paths[warmup:].count(path) for path in ("eager", "capture", "replay")}
    return {
        "warmup_step_ms": times[:warmup],
        "step_paths": paths,
        "measured_paths": counts,
        "graphs": step_graphs.stats() if step_graphs is not None else None,
    }


def profile_steps(model, optimizer, batches, torch, autocast) -> None:
    """Two more steps under torch.profiler; the CUDA kernels by total time go to this subprocess's log."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_steps(model, optimizer, batches, 0, torch, True, autocast)  # eager: the graphs would hide the kernels
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    print(f"== profile: {len(batches)} steps, kernels by self CUDA time\n{table}", flush=True)


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return "OutOfMemoryError" in text or "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


def run_worker(spec: dict) -> dict:
    """Build, train and time one variant; the result row (without the parent's fields)."""
    variant, cuda = spec["variant"], spec["cuda"]
    result = {"status": "failed", "reason": None}
    stage = "import"
    try:
        if variant == "unsloth":
            try:
                import unsloth  # noqa: F401  (first: it patches transformers, TRL and PEFT as they import)
            except Exception as error:  # not installed, or a dependency missing: a skipped peer
                return {"status": "skipped", "reason": f"cannot import unsloth: {type(error).__name__}: {error}"}
        if variant == "liger":
            try:
                import liger_kernel.transformers  # noqa: F401
            except Exception as error:
                return {"status": "skipped", "reason": f"cannot import liger_kernel: {type(error).__name__}: {error}"}
        import torch

        torch.manual_seed(spec["seed"])
        if cuda and spec.get("memory_cap_gib"):  # a smaller GPU's memory: the allocator refuses beyond it
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_cap_gib"] * GIB / total), 0)
        dtype = torch.bfloat16 if cuda else torch.float32
        stage = "load"
        start = time.perf_counter()
        if variant in ("hf", "liger"):
            model = build_hf(spec, torch, dtype, liger=variant == "liger")
        elif variant == "unsloth":
            model = build_unsloth(spec, torch, dtype)
        else:
            model = build_fusetune(spec, torch, dtype)
            result["self_check_s"] = self_check_seconds()
        model.train()  # from_pretrained leaves eval mode, where HF silently skips gradient checkpointing
        result["load_s"] = time.perf_counter() - start
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        result["attn_implementation"] = getattr(base.config, "_attn_implementation", None)
        if routed_experts(spec["arch_config"]):  # transformers' default for 3-D experts is grouped_mm (5.x)
            result["experts_implementation"] = getattr(base.config, "_experts_implementation", None)
        vocab = base.config.vocab_size
        if cuda:
            result["peak_load_gib"] = torch.cuda.max_memory_allocated() / GIB
        params = [p for p in model.parameters() if p.requires_grad]
        result["trainable_params"] = sum(p.numel() for p in params)
        batches, lengths, mode = make_batches(spec, torch, vocab)
        optimizer = make_optimizer("adamw_fused", params, torch, cuda)

        stage = "steps"
        step_graphs = step_graphs_for(model, spec)
        every, losses, paths = timed_steps(
            model, optimizer, batches, spec["warmup"], torch, cuda, spec["autocast"], step_graphs
        )
        times = every[spec["warmup"] :]
        measured = lengths[spec["warmup"] :]
        cfg = spec["arch_config"]
        result.update(
            status="ok",
            mode=mode,
            step_ms=statistics.median(times),
            step_ms_all=times,
            losses=losses,
            loss_first=losses[0],
            loss_last=losses[-1],
            tokens_per_step=statistics.mean(sum(d) for d in measured),
            tokens_per_step_with_padding=statistics.mean(
                max(d) * len(d) if mode == "padded" else sum(d) for d in measured
            ),
        )
        if spec["scenario"]["kind"] == "docs":  # variable shapes: totals, not medians
            result["tok_s"] = sum(sum(d) for d in measured) / (sum(times) / 1e3)
            # the median step's rate over the whole run's (the 1.3x target), and the warm-up steps' share
            result["tok_s_median_step"] = result["tokens_per_step"] / (result["step_ms"] / 1e3)
            result["median_over_whole"] = result["tok_s_median_step"] / result["tok_s"]
            result["tok_s_every_step"] = sum(sum(d) for d in lengths) / (sum(every) / 1e3)
            result.update(warmup_record(every, paths, spec["warmup"], step_graphs))
            flops_per_s = sum(useful_flops(cfg, d) for d in measured) / (sum(times) / 1e3)
        else:
            result["tok_s"] = result["tokens_per_step"] / (result["step_ms"] / 1e3)
            flops_per_s = useful_flops(cfg, measured[0]) / (result["step_ms"] / 1e3)
        result["useful_tflops"] = flops_per_s / 1e12
        result["mfu"] = flops_per_s / (spec["peak_tflops"] * 1e12) if spec.get("peak_tflops") else None
        if cuda:
            result["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            result["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        if cuda and spec.get("profile"):
            profile_steps(model, optimizer, batches[-2:], torch, spec["autocast"])
        alt = spec["scenario"].get("alt_optim")
        if alt and spec.get("alt_steps"):
            optimizer.zero_grad(set_to_none=True)
            del optimizer  # its states make way for the other optimizer's
            gc.collect()
            torch.cuda.empty_cache()
            result["alt_optim"] = alt_optimizer(model, params, batches, alt, spec, result, torch)
    except Unsupported as error:
        result.update(status="skipped", reason=str(error))
    except Exception as error:  # every failure becomes a row
        result["status"] = "failed"
        result["oom"] = is_oom(error)
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        result["reason"] = f"{stage}: " + (
            "CUDA out of memory" if result["oom"] else f"{type(error).__name__}: {first}"
        )
        result["traceback"] = traceback.format_exc()[-4000:]
        if cuda and "torch" in sys.modules:
            result["peak_gib"] = sys.modules["torch"].cuda.max_memory_allocated() / GIB
    finally:
        result["host_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return result


def alt_optimizer(model, params, batches, name, spec, result, torch) -> dict:
    """A few more steps with another optimizer on the same model; a failure here keeps the main numbers."""
    try:
        alt = make_optimizer(name, params, torch, spec["cuda"])
        warmup = 2
        subset = (batches * 2)[: warmup + spec["alt_steps"]]
        every, losses, _ = timed_steps(model, alt, subset, warmup, torch, spec["cuda"], spec["autocast"])
        times = every[warmup:]
    except Exception as error:
        status = "skipped" if isinstance(error, ImportError) else "failed"
        return {"name": name, "status": status, "reason": f"{type(error).__name__}: {str(error)[:300]}"}
    step_ms = statistics.median(times)
    return {
        "name": name,
        "status": "ok",
        "step_ms": step_ms,
        "tok_s": result["tokens_per_step"] / (step_ms / 1e3),
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "loss_last": losses[-1],
    }


# ---------------------------------------------------------------- scratch folders and the GPU's matmul peak


def write_llama3_tokenizer(folder: Path, cfg: dict) -> None:
    """A word-level tokenizer with exactly the config's vocabulary and Llama 3's special ids (no real text)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size, first_special = cfg["vocab_size"], 128000
    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, first_special)}}
    specials = {first_special + i: f"<|reserved_special_token_{i}|>" for i in range(vocab_size - first_special)}
    specials.update(
        {
            128000: "<|begin_of_text|>",
            128001: "<|end_of_text|>",
            128004: "<|finetune_right_pad_id|>",
            128009: "<|eot_id|>",
        }
    )
    vocab.update({token: i for i, token in specials.items()})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in specials.values()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token="<unk>",
        model_max_length=cfg.get("max_position_embeddings", 131072),
    )
    fast.save_pretrained(folder)


def write_word_tokenizer(folder: Path, cfg: dict) -> None:
    """A word-level tokenizer with exactly the config's vocabulary, its bos/eos/pad at the config's ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names, roles = {}, {}
    for role in ("bos", "eos", "pad"):
        token_id = cfg.get(f"{role}_token_id")
        token_id = token_id[0] if isinstance(token_id, list) else token_id
        if token_id is not None and token_id < cfg["vocab_size"]:
            roles[role] = names.setdefault(token_id, f"<{role}>")  # roles that share an id share its token
    vocab = {names.get(i, f"t{i}"): i for i in range(cfg["vocab_size"])}
    unk = roles.get("eos", "t0")
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in names.values()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **{f"{role}_token": token for role, token in roles.items()},
        unk_token=unk,
        model_max_length=cfg.get("max_position_embeddings", 131072),
    )
    fast.save_pretrained(folder)


def prepare(spec: dict) -> dict:
    """Write a model folder: random bf16 weights from a shipped config (or, with ``source``, the NF4 one)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec["folder"])
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    info = {}
    cuda = spec["cuda"]
    dtype = torch.bfloat16 if cuda else torch.float32
    start = time.perf_counter()
    if spec.get("quant") == "nf4":  # quantize the bf16 folder on load, then save the 4-bit weights
        model = AutoModelForCausalLM.from_pretrained(
            spec["source"], dtype=dtype, device_map={"": 0}, quantization_config=bnb_config(torch, dtype)
        )
        torch.cuda.synchronize()
        info["quantize_on_load_s"] = time.perf_counter() - start
        mid = time.perf_counter()
        model.save_pretrained(tmp, safe_serialization=True)
        info["save_s"] = time.perf_counter() - mid
        AutoTokenizer.from_pretrained(spec["source"]).save_pretrained(tmp)
    else:
        cfg = arch_config(spec["arch"], spec.get("shrink"), spec.get("layers"))  # a multimodal arch: its LM
        config = AutoConfig.for_model(**cfg)
        torch.manual_seed(spec["seed"])
        with torch.device("cuda" if cuda else "cpu"):  # initialise the random weights on the GPU: fast
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if cuda:
            torch.cuda.synchronize()
        info["build_s"] = time.perf_counter() - start
        mid = time.perf_counter()
        model.save_pretrained(tmp, safe_serialization=True)
        info["save_s"] = time.perf_counter() - mid
        if spec["arch"] == "tiny":
            AutoTokenizer.from_pretrained(TINY).save_pretrained(tmp)
        elif cfg.get("model_type") == "llama":
            write_llama3_tokenizer(tmp, cfg)
        else:
            write_word_tokenizer(tmp, cfg)
    info["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    info["total_s"] = time.perf_counter() - start
    (tmp / "bench_source.json").write_text(json.dumps({**marker(spec), "info": info}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return info


def marker(spec: dict) -> dict:
    return {k: spec.get(k) for k in ("format", "arch", "seed", "cuda", "quant", "shrink", "layers")}


def gpu_info() -> dict:
    """Device name and memory, and the bf16 matmul rate: median of 30 CUDA-event-timed 8192^3 products."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "name": "cpu"}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        a @ b
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    props = torch.cuda.get_device_properties(0)
    return {
        "cuda": True,
        "name": torch.cuda.get_device_name(0),
        "total_gib": props.total_memory / GIB,
        "peak_tflops": 2 * n**3 / (statistics.median(times) / 1e3) / 1e12,
        "torch_cuda": torch.version.cuda,
    }


# ---------------------------------------------------------------- parent: subprocesses, probes, rows


class Runner:
    """Starts the subprocesses (one at a time), with a timeout each and an overall budget."""

    def __init__(self, args):
        self.args = args
        self.scratch = Path(args.scratch)
        self.logs = self.scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.scratch / "run").mkdir(exist_ok=True)
        self.started = time.monotonic()

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started) if self.args.budget else float("inf")

    def env(self, variant: str | None) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        if self.args.tiny:
            env["CUDA_VISIBLE_DEVICES"] = ""
        if variant == "unsloth":
            env["UNSLOTH_DISABLE_STATISTICS"] = "1"
            if self.args.unsloth_site:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.args.unsloth_site, env.get("PYTHONPATH")]))
        return env

    def call(self, mode: str, spec: dict, name: str, variant: str | None = None, timeout: float | None = None) -> dict:
        """Run ``bench.py --<mode> spec.json`` in a new session; its JSON result, or a failure row."""
        wanted = timeout or self.args.timeout
        timeout = min(wanted, self.left())
        if timeout <= 5:
            return {"status": "skipped", "reason": "out of --budget time"}
        with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:
            spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
            log_path = self.logs / f"{name}.log"
            cmd = [sys.executable, str(Path(__file__).resolve()), f"--{mode}", str(spec_path)]
            start = time.monotonic()
            with open(log_path, "w") as log_file:
                proc = subprocess.Popen(
                    cmd,
                    cwd=self.scratch / "run",  # Unsloth writes its compiled cache into the working directory
                    env=self.env(variant),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    rc = None
                finally:
                    if proc.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
            wall = time.monotonic() - start
            if result_path.exists():
                result = json.loads(result_path.read_text())
            elif rc is None:
                result = {"status": "failed", "reason": f"timeout after {timeout:.0f} s", "timeout": True}
                if timeout < wanted:  # cut short by --budget: says nothing about the job
                    result.update(status="skipped", reason=f"out of --budget time after {timeout:.0f} s")
            else:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                why = "killed (host out of memory?)" if rc == -9 else f"exit code {rc}"
                result = {"status": "failed", "reason": f"{why}: {' | '.join(tail)[-400:]}"}
        result["wall_s"] = wall
        result["log"] = str(log_path)
        return result


def availability(variant: str, sc: dict, gpu: dict, args) -> str | None:
    """Why ``variant`` cannot run here (a skip reason), or None."""
    search = [args.unsloth_site, *sys.path] if variant == "unsloth" and args.unsloth_site else sys.path
    package = {"liger": "liger_kernel", "unsloth": "unsloth"}.get(variant)
    if package and importlib.machinery.PathFinder.find_spec(package, search) is None:
        where = (
            f" (searched --unsloth-site {args.unsloth_site} first)"
            if variant == "unsloth" and args.unsloth_site
            else ""
        )
        return f"{package} is not installed{where}"
    if sc.get("quant") and importlib.machinery.PathFinder.find_spec("bitsandbytes", search) is None:
        return "bitsandbytes is not installed (4-bit)"
    if not gpu["cuda"] and variant in ("liger", "fusetune_triton"):
        return "needs CUDA (Triton kernels; --tiny runs on the CPU, where the interpreter is too slow for steps)"
    return None


def s4_mode(variant: str, args) -> str:
    return "padded" if args.s4_mode == "padded" else "padding_free"


def fp8_note(args) -> str:
    return "; base GEMMs in FP8 (fp8_base=True)" if args.fusetune_fp8 else ""


def checkpointing(variant: str, args) -> str:
    if variant.startswith("fusetune"):
        if args.fusetune_checkpointing == "plain":
            return "use_gradient_checkpointing=True (plain, fusetune's)" + fp8_note(args)
        if args.fusetune_checkpointing == "smart":
            budget = f"memory_budget={args.memory_gib:g}" if args.memory_gib else "the free memory as budget"
            return f'use_gradient_checkpointing="smart" ({budget}; the rest offloaded)' + fp8_note(args)
        return CHECKPOINTING[variant] + fp8_note(args)
    elif args.peer_checkpointing == "off":
        return "none (use_gradient_checkpointing=False)"
    return CHECKPOINTING[variant]


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
        "its window; a linear-attention layer: none); recompute not counted",
        "gpu": gpu["name"],
        "peak_tflops": gpu.get("peak_tflops"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S"),
    }


def worker_spec(scenario, variant, sc, folder, source, gpu, args, *, seq=None, mode=None) -> dict:
    sc = dict(sc, seq=seq) if seq else sc
    warmup = args.warmup if args.warmup is not None else sc["warmup"]
    steps = args.steps if args.steps is not None else sc["steps"]
    lengths = document_lengths(sc, args.seed, warmup + steps)
    cfg = scenario_config(sc)
    widest = max(sum(d) if mode == "padding_free" else max(d) for d in lengths)
    return {
        "variant": variant,
        "scenario": {**sc, "name": scenario},
        "folder": str(folder),
        "source": source,
        "arch_config": cfg,
        "targets": lora_targets(cfg),
        "mode": mode or "fixed",
        "warmup": warmup,
        "steps": steps,
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


def max_context(runner, scenario, variant, sc, folder, source, gpu, args) -> dict:
    """S5: probe batch-1 lengths, one training step each in its own subprocess, from ``--s5-min`` up
    (next_probe picks each next length; capacity: the GPU's memory less 5%). A timed-out probe counts
    as a failure at that length, and is listed as such."""
    gran, top = args.s5_granularity, args.s5_max
    capacity = min(gpu.get("total_gib", 0), args.s5_memory_gib or math.inf) * 0.95
    probes, fits, ok, bad = [], [], None, None

    def probe(length: int) -> dict:
        spec = worker_spec(scenario, variant, sc, folder, source, gpu, args, seq=length)
        spec.update(warmup=0, steps=1, alt_steps=0, memory_cap_gib=args.s5_memory_gib)
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

    def run(variant: str) -> dict:
        result = max_context(runner, scenario, variant, sc, folder, source, gpu, args)
        return {**result, "concurrent_with": [v for v in ready if v != variant]}

    futures = {v: pool.submit(run, v) for v in ready}
    pool.shutdown(wait=False)
    return futures


def prepare_folder(runner, sc: dict, gpu: dict, args) -> tuple[Path | None, str, dict]:
    """The model folder a scenario loads (building it, or the bf16 one it derives from, if missing)."""
    arch = sc["arch"] + ("-tiny" if sc.get("shrink") else f"-{sc['layers']}l" if sc.get("layers") else "")
    want_nf4 = sc.get("quant") == "nf4" and args.qlora_source == "nf4"
    setup = {}
    plan = [("bf16", arch, None)] + ([("nf4", f"{arch}-nf4", "nf4")] if want_nf4 else [])
    specs = [
        {
            "format": FORMAT,
            "arch": sc["arch"],
            "shrink": sc.get("shrink"),
            "layers": sc.get("layers"),
            "seed": args.seed,
            "cuda": gpu["cuda"],
            "quant": quant,
            "folder": str(runner.scratch / name),
            "source": str(runner.scratch / arch),
        }
        for _, name, quant in plan
    ]

    def ready(spec: dict) -> dict | None:
        found = Path(spec["folder"]) / "bench_source.json"
        stored = json.loads(found.read_text()) if found.exists() else {}
        return stored if stored and all(stored.get(k) == v for k, v in marker(spec).items()) else None

    if want_nf4 and ready(specs[-1]):  # the bf16 folder it came from is not needed again
        plan, specs = plan[-1:], specs[-1:]
    folder = None
    for (kind, name, _), spec in zip(plan, specs, strict=True):
        folder = Path(spec["folder"])
        stored = ready(spec)
        if stored:
            setup[kind] = {"reused": True, **stored.get("info", {})}
            continue
        log(f"preparing {folder} ...")
        info = runner.call("prepare", spec, f"prepare-{name}", timeout=args.timeout)
        if info.get("status") == "failed" or info.get("status") == "skipped":
            return None, kind, {kind: info}
        setup[kind] = {"reused": False, **info}
        log(f"  {name}: {json.dumps({k: round(v, 1) for k, v in info.items() if isinstance(v, float)})}")
    source = "nf4" if want_nf4 else "bf16"
    return folder, source, setup


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


def orchestrate(args) -> Path:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still ends its subprocess (finally)
    runner = Runner(args)
    if args.tiny:
        gpu = {"cuda": False, "name": "cpu"}
    else:
        log("measuring the GPU's bf16 matmul peak ...")
        gpu = runner.call("gpu-info", {}, "gpu-info", timeout=300)
        if gpu.get("status") == "failed":
            raise SystemExit(f"bench: cannot query the GPU: {gpu['reason']}")
        for key in ("wall_s", "log"):
            gpu.pop(key, None)
        if not gpu["cuda"]:
            raise SystemExit("bench: no CUDA device; --tiny is the CPU smoke mode")
        log(f"{gpu['name']}: {gpu['total_gib']:.0f} GiB, bf16 matmul {gpu['peak_tflops']:.0f} TFLOP/s")
    jsonl, md = out_paths(args, gpu)
    table = TINY_SCENARIOS if args.tiny else SCENARIOS
    for scenario in args.scenarios:
        sc = table.get(scenario)
        if sc is None:
            reason = f"--tiny runs {', '.join(TINY_SCENARIOS)} only" if args.tiny else "unknown scenario"
            for variant in args.variants:
                row = {"scenario": scenario, "variant": variant, "status": "skipped", "reason": reason}
                append(jsonl, md, row)
            continue
        if sc.get("quant") and not gpu["cuda"]:
            for variant in args.variants:
                row = {**base_row(scenario, variant, sc, gpu, args), "status": "skipped", "reason": "4-bit needs CUDA"}
                append(jsonl, md, row)
            continue
        folder, source, setup = None, "bf16", {}
        together = {}  # S5 with --s5-together: each variant's probes, started at once
        for variant in args.variants:
            row = base_row(scenario, variant, sc, gpu, args)
            reason = availability(variant, sc, gpu, args)
            if reason:
                append(jsonl, md, {**row, "status": "skipped", "reason": reason})
                log(f"{scenario} {variant}: skipped ({reason})")
                continue
            if folder is None:
                folder, source, setup = prepare_folder(runner, sc, gpu, args)
                if folder is None:
                    info = next(iter(setup.values()))
                    why = f"preparing the model folder: {info.get('reason')}"
                    for v in args.variants[args.variants.index(variant) :]:
                        row = {**base_row(scenario, v, sc, gpu, args), "status": info["status"], "reason": why}
                        append(jsonl, md, row)
                    break
            row["setup"] = {"source": source, **setup}
            mode = s4_mode(variant, args) if sc["kind"] == "docs" else None
            log(f"{scenario} {variant} ...")
            if sc["kind"] == "max_context" and args.s5_together:
                if not together:
                    together = start_together(runner, scenario, sc, folder, source, gpu, args)
                result = together[variant].result()
            elif sc["kind"] == "max_context":
                result = max_context(runner, scenario, variant, sc, folder, source, gpu, args)
            else:
                spec = worker_spec(scenario, variant, sc, folder, source, gpu, args, mode=mode)
                result = runner.call("worker", spec, f"{scenario}-{variant}", variant)
                crashed = result["status"] == "failed" and not (result.get("oom") or result.get("timeout"))
                if mode == "padding_free" and crashed:
                    log(f"{scenario} {variant}: padding-free failed ({result['reason']}); padded instead")
                    spec = worker_spec(scenario, variant, sc, folder, source, gpu, args, mode="padded")
                    failed = result
                    result = runner.call("worker", spec, f"{scenario}-{variant}-padded", variant)
                    result["padding_free_failure"] = failed["reason"]
            if mode and result["status"] == "ok":
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
                result["mode_detail"] = detail
            row.update(result)
            append(jsonl, md, row)
            log(f"{scenario} {variant}: {summary(row)}")
    print(md.read_text() if md.exists() else "no rows")
    return jsonl


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


# ---------------------------------------------------------------- tables


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
        "tok/s: tokens per step over the median step (S4: real tokens over the summed step time); x best peer: "
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


# ---------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
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
    p.add_argument("--profile", default="", help="variants whose log gets a kernel table of two profiled steps")
    p.add_argument("--render", nargs="+", default=None, metavar="JSONL", help="merge .jsonl files into --out")
    p.add_argument("--readme-table", default=None, metavar="PATH", help="print the README table (file or folder)")
    for hidden in ("worker", "prepare", "gpu-info"):
        p.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
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


def internal(mode: str, spec_path: str) -> None:
    """A subprocess: run one job and write its JSON result where the spec says."""
    spec = json.loads(Path(spec_path).read_text())
    if mode == "worker":
        result = {"versions": versions(), **run_worker(spec)}
    elif mode == "prepare":
        result = prepare(spec)
    else:
        result = gpu_info()
    Path(spec["result"]).write_text(json.dumps(result))


def main(argv=None):
    args = parse_args(argv)
    for mode in ("worker", "prepare", "gpu_info"):
        if getattr(args, mode):
            return internal(mode.replace("_", "-"), getattr(args, mode))
    if args.readme_table:
        print(readme_table(Path(args.readme_table)), end="")
        return None
    if args.render:
        rows = read_rows(args.render)
        first = next((r for r in rows if r.get("gpu")), {"gpu": "gpu"})
        out = Path(args.out)
        if out.suffix != ".jsonl":
            out.mkdir(parents=True, exist_ok=True)
            out = out / f"{first.get('date', 'undated')}-{gpu_slug(first['gpu'])}-peers.jsonl"
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.with_suffix(".md").write_text(render(rows))
        print(out.with_suffix(".md").read_text(), end="")
        return out
    return orchestrate(args)


if __name__ == "__main__":
    main()
