"""Model shapes, the modules LoRA adapts, and the useful FLOPs of a step, from a shipped config.json.

The parent's: it reads the library's own rules from fusetune (the projections LoRA targets, the 3-D expert
parameters, the keys that count routed experts, the shipped architectures and their toy sizes). A job
subprocess gets what it needs of these in its spec, never from here."""

import functools
import json
import os
import sys
import types
from pathlib import Path

# Families whose projections have other names: the same layers adapted (as conf/model/phi4_mini.yaml)
FAMILY_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


@functools.cache
def library() -> types.SimpleNamespace:
    """The fusetune modules whose rules the parent reads. A process that has not started torch (the parent)
    imports them with no GPU visible: importing fusetune imports bitsandbytes, which starts CUDA, and a CUDA
    context here would hold GPU memory that the jobs need, for the whole run."""
    hide = "torch" not in sys.modules
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hide:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        from fusetune import families, loading, modules, tiny
    finally:
        if hide and visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        elif hide:  # the jobs see the GPUs this process was given
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    return types.SimpleNamespace(families=families, loading=loading, modules=modules, tiny=tiny)


def arch_folder(arch: str) -> Path:
    """A shipped architecture's folder (``tiny``: the embedded tiny Llama)."""
    if arch == "tiny":
        return library().tiny.TINY_LLAMA
    return Path(library().loading.resolve(f"fusetune:archs/{arch}"))


def arch_config(arch: str, shrink: bool = False, layers: int | None = None) -> dict:
    """The language model's config.json (a composite config's text part); ``shrink``: at toy size; ``layers``:
    the first that many layers (a scenario whose full depth does not fit; ignored at toy size)."""
    cfg = json.loads((arch_folder(arch) / "config.json").read_text())
    if shrink:
        cfg = library().tiny.shrunk(cfg)
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


def experts(cfg: dict) -> int:
    """Routed experts per layer (0 or 1: a dense MLP), under any of the names the library counts them by."""
    return max(cfg.get(k) or 0 for k in library().families.EXPERT_COUNTS)


def routed_experts(cfg: dict) -> bool:
    return experts(cfg) > 1


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
    d, count = cfg["hidden_size"], experts(cfg)
    if count <= 1:
        return 3 * d * cfg["intermediate_size"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    return d * count + cfg["num_experts_per_tok"] * 3 * d * inter


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


def dpo_flops(cfg: dict, doc_lengths: list[int]) -> float:
    """A DPO step's useful FLOPs: the policy's forward and input gradients over the chosen and rejected sequences
    (``useful_flops``), and the reference's forward over the same tokens, half that (2N per token and the causal
    attention's forward), which DPO needs as much as the policy's."""
    return 1.5 * useful_flops(cfg, doc_lengths)


def lora_targets(cfg: dict) -> list[str]:
    """The modules LoRA adapts: the library's projections (a family's own names where they differ); with routed
    experts, attention only (the experts' 3-D parameters are adapted as ``target_parameters``; the router stays
    frozen)."""
    projections = library().modules.PROJECTIONS
    if routed_experts(cfg):
        return list(projections[:4])  # its attention projections (q, k, v, o) come first
    return FAMILY_TARGETS.get(cfg.get("model_type"), list(projections))
