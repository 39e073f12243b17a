"""Kernel backends and the patch table: which ops replace which parts of which model family.

``apply_kernels(model, backend)`` patches the family's classes and functions in place:
its RMSNorm forward, its ``apply_rotary_pos_emb``, its gated MLP forward, and its
causal-LM forward, whose loss head becomes the fused linear cross-entropy (the full
``[tokens, vocab]`` logits never exist while training). PEFT's LoRA ``Linear`` forward
becomes one fused node where the call is plain LoRA (PEFT's own forward otherwise). ``triton`` uses fusetune's
kernels, ``reference`` their plain-PyTorch twins on the same code path, so any run can
be repeated for parity. ``remove_kernels()`` restores every original.

TRL 1.16's SFTTrainer wraps the model with its own fused LM head
(``trl.trainer.sft_trainer.add_fused_lm_head``) and computes its loss and its
``entropy`` / ``mean_token_accuracy`` metrics from the per-token outputs. That entry
is in the table too: on a patched model it does nothing, and our causal-LM forward
answers ``fused_lm_head=True`` itself, with the same per-token fields from the same
chunked pass, so no metric brings the full logits back.
"""

import importlib
import logging
import os
from dataclasses import dataclass

import torch

from . import patched
from .errors import FusetuneError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class Family:
    module: str  # the transformers modeling module
    norm: str  # RMSNorm class
    mlp: str  # gated MLP class
    causal_lm: str  # *ForCausalLM class
    gemma_norm: bool = False  # scale by (1 + weight), all in fp32
    activation: str = "hidden_act"  # config attribute naming the MLP activation


M = "transformers.models"
FAMILIES = {
    "llama": Family(f"{M}.llama.modeling_llama", "LlamaRMSNorm", "LlamaMLP", "LlamaForCausalLM"),
    "mistral": Family(f"{M}.mistral.modeling_mistral", "MistralRMSNorm", "MistralMLP", "MistralForCausalLM"),
    "qwen2": Family(f"{M}.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP", "Qwen2ForCausalLM"),
    "qwen3": Family(f"{M}.qwen3.modeling_qwen3", "Qwen3RMSNorm", "Qwen3MLP", "Qwen3ForCausalLM"),
    "gemma": Family(
        f"{M}.gemma.modeling_gemma",
        "GemmaRMSNorm",
        "GemmaMLP",
        "GemmaForCausalLM",
        gemma_norm=True,
        activation="hidden_activation",
    ),
    "gemma2": Family(
        f"{M}.gemma2.modeling_gemma2",
        "Gemma2RMSNorm",
        "Gemma2MLP",
        "Gemma2ForCausalLM",
        gemma_norm=True,
        activation="hidden_activation",
    ),
}
TRL_FUSED_HEAD = ("trl.trainer.sft_trainer", "add_fused_lm_head")
PEFT_LORA_LINEAR = ("peft.tuners.lora.layer", "Linear")  # its forward: one fused node for plain LoRA
# PEFT's LoRA over a bitsandbytes 4-bit base (and that base's class): one fused node, NF4 dequantized inside
PEFT_LORA_NF4 = ("peft.tuners.lora.bnb", "Linear4bit", "bitsandbytes.nn", "Linear4bit")

# (owner object, attribute) -> the original value, for everything currently patched
_originals: dict[tuple[object, str], object] = {}
_active: dict[str, str] = {}  # family -> backend


def resolve_backend(name: str) -> str:
    """``auto`` becomes ``triton`` on CUDA and ``reference`` elsewhere, and says so."""
    if name not in BACKENDS:
        raise FusetuneError(f"kernels: unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "triton" if torch.cuda.is_available() else "reference"
        log.info("kernels=auto chose %s (%s)", name, "CUDA is available" if name == "triton" else "no CUDA")
    if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise FusetuneError("kernels=triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU")
    return name


def family_of(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    if model_type not in FAMILIES:
        raise FusetuneError(
            f"kernels: model type '{model_type}' is not supported; supported: {', '.join(sorted(FAMILIES))} "
            "(or use kernels=reference with a supported family)"
        )
    return model_type


def _set(owner, name: str, value) -> None:
    _originals.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, value)


def patch_family(family_name: str, backend: str) -> None:
    """Replace the family's classes' forwards and functions with ``backend``'s ops."""
    if _active.get(family_name) == backend:
        return
    family, ops = FAMILIES[family_name], patched.OPS[backend]
    module = importlib.import_module(family.module)
    norm, mlp, causal_lm = (getattr(module, name) for name in (family.norm, family.mlp, family.causal_lm))
    _set(norm, "forward", patched.norm_forward(ops, family.gemma_norm))
    _set(mlp, "forward", patched.mlp_forward(ops, family.activation))
    _set(module, "apply_rotary_pos_emb", patched.rope_function(ops))
    original_lm_forward = _originals.get((causal_lm, "forward"), causal_lm.forward)
    _set(causal_lm, "forward", patched.causal_lm_forward(ops, original_lm_forward))
    trl_module = importlib.import_module(TRL_FUSED_HEAD[0])
    original_head = _originals.get((trl_module, TRL_FUSED_HEAD[1]), getattr(trl_module, TRL_FUSED_HEAD[1]))
    _set(trl_module, TRL_FUSED_HEAD[1], patched.skip_trl_fused_head(original_head))
    lora_linear = getattr(importlib.import_module(PEFT_LORA_LINEAR[0]), PEFT_LORA_LINEAR[1])
    original_lora = _originals.get((lora_linear, "forward"), lora_linear.forward)
    _set(lora_linear, "forward", patched.lora_forward(ops, original_lora))
    lora_nf4 = getattr(importlib.import_module(PEFT_LORA_NF4[0]), PEFT_LORA_NF4[1], None)
    if lora_nf4 is not None:  # PEFT defines it where bitsandbytes imports
        linear4bit = getattr(importlib.import_module(PEFT_LORA_NF4[2]), PEFT_LORA_NF4[3])
        original_nf4 = _originals.get((lora_nf4, "forward"), lora_nf4.forward)
        _set(lora_nf4, "forward", patched.lora_nf4_forward(ops, original_nf4, linear4bit))
    _active[family_name] = backend


def apply_kernels(model, backend: str) -> str:
    """Patch ``model``'s family for ``backend`` (auto/triton/reference); returns the backend used."""
    backend = resolve_backend(backend)
    family = family_of(model)
    patch_family(family, backend)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.fusetune_kernels = backend  # the trainer leaves a model with this set as it is
    log.info("kernels=%s patched the %s family", backend, family)
    return backend


def remove_kernels() -> None:
    """Restore every original class forward and function."""
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()
    _active.clear()


# TRL's public names that ``import fusetune`` points at fusetune's subclasses.
TRL_CLASSES = [
    ("trl", "SFTTrainer"),
    ("trl.trainer", "SFTTrainer"),
    ("trl.trainer.sft_trainer", "SFTTrainer"),
    ("trl", "SFTConfig"),
    ("trl.trainer", "SFTConfig"),
    ("trl.trainer.sft_config", "SFTConfig"),
]


def patch_trl() -> None:
    """Make ``from trl import SFTTrainer, SFTConfig`` give FastSFTTrainer and FastSFTConfig."""
    from .trainer import FastSFTConfig, FastSFTTrainer

    ours = {"SFTTrainer": FastSFTTrainer, "SFTConfig": FastSFTConfig}
    for module_name, name in TRL_CLASSES:
        module = importlib.import_module(module_name)
        _trl_originals.setdefault((module, name), getattr(module, name))
        setattr(module, name, ours[name])


def unpatch_trl() -> None:
    for (module, name), original in _trl_originals.items():
        setattr(module, name, original)
    _trl_originals.clear()


_trl_originals: dict[tuple[object, str], object] = {}


def active_backends() -> dict[str, str]:
    return dict(_active)
