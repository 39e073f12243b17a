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

from . import forwards
from .errors import FusetuneError
from .modules import base_model

log = logging.getLogger(__name__)
KERNEL_BACKENDS = ("auto", "triton", "reference")  # what a user asks for; "none" is an unpatched model
OPS = ("rms_norm", "rope", "glu", "loss", "lora")  # the switches of apply_kernels, one per op


@dataclass(frozen=True)
class Family:
    module: str  # the transformers modeling module
    norm: str  # RMSNorm class
    mlp: str  # gated MLP class
    causal_lm: str  # *ForCausalLM class
    gemma_norm: bool = False  # scale by (1 + weight), all in fp32
    activation: str = "hidden_act"  # config attribute naming the MLP activation
    # The decoder layer only adds the MLP's output to the residual (no norm after the MLP), so the
    # checkpointing recompute may leave the down projection's output uncomputed.
    mlp_output_feeds_residual_only: bool = True


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
        mlp_output_feeds_residual_only=False,  # post_feedforward_layernorm saves the MLP's output
    ),
}
TRL_FUSED_HEAD = ("trl.trainer.sft_trainer", "add_fused_lm_head")
PEFT_LORA_LINEAR = ("peft.tuners.lora.layer", "Linear")  # its forward: one fused node for plain LoRA
# PEFT's LoRA over a bitsandbytes 4-bit base (and that base's class): one fused node, NF4 dequantized inside
PEFT_LORA_NF4 = ("peft.tuners.lora.bnb", "Linear4bit", "bitsandbytes.nn", "Linear4bit")

# (owner object, attribute) -> the original value, for everything currently patched
_originals: dict[tuple[object, str], object] = {}
_active: dict[str, tuple[str, frozenset]] = {}  # family -> (backend, ops patched)


def choose_backend(requested: str, model_type: str | None, on_cuda: bool | None = None) -> str:
    """The whole backend policy: "triton", "reference", or "none" (train the model's own modules).

    - ``auto``: triton on CUDA, reference elsewhere; a family outside the table trains unpatched,
      with the reason logged.
    - ``triton`` / ``reference``: a family outside the table is an error listing the supported
      ones (callers ask before any weights load); triton off CUDA needs TRITON_INTERPRET=1.
    """
    if requested not in KERNEL_BACKENDS:
        raise FusetuneError(f"kernels: unknown backend '{requested}'; choose one of {', '.join(KERNEL_BACKENDS)}")
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    supported = ", ".join(sorted(FAMILIES))
    if model_type not in FAMILIES:
        if requested != "auto":
            raise FusetuneError(
                f"kernels={requested}: model type '{model_type}' is not in the patch table (supported: {supported}); "
                "use kernels=auto to train it with its own modules"
            )
        log.warning(
            "kernels=auto: model type '%s' is not in the patch table (%s): its own modules train", model_type, supported
        )
        return "none"
    if requested == "auto":
        requested = "triton" if on_cuda else "reference"
        log.info("kernels=auto chose %s (%s)", requested, "CUDA" if on_cuda else "no CUDA")
    if requested == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise FusetuneError("kernels=triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU")
    return requested


def _set(owner, name: str, value) -> None:
    _originals.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, value)


def _restore(owner, name: str) -> None:
    if (owner, name) in _originals:
        setattr(owner, name, _originals.pop((owner, name)))


def _targets(family: Family):
    """(op, owner, attribute, make(ops, original)) for every entry the family's row patches."""
    module = importlib.import_module(family.module)
    norm, mlp, causal_lm = (getattr(module, name) for name in (family.norm, family.mlp, family.causal_lm))
    rows = [
        ("rms_norm", norm, "forward", lambda ops, _: forwards.norm_forward(ops, family.gemma_norm)),
        (
            "glu",
            mlp,
            "forward",
            lambda ops, _: forwards.mlp_forward(ops, family.activation, family.mlp_output_feeds_residual_only),
        ),
        ("rope", module, "apply_rotary_pos_emb", lambda ops, _: forwards.rope_function(ops)),
        ("loss", causal_lm, "forward", forwards.causal_lm_forward),
        (
            "loss",
            importlib.import_module(TRL_FUSED_HEAD[0]),
            TRL_FUSED_HEAD[1],
            lambda _, o: forwards.skip_trl_fused_head(o),
        ),
        (
            "lora",
            getattr(importlib.import_module(PEFT_LORA_LINEAR[0]), PEFT_LORA_LINEAR[1]),
            "forward",
            forwards.lora_forward,
        ),
    ]
    lora_nf4 = getattr(importlib.import_module(PEFT_LORA_NF4[0]), PEFT_LORA_NF4[1], None)
    if lora_nf4 is not None:  # PEFT defines it where bitsandbytes imports
        linear4bit = getattr(importlib.import_module(PEFT_LORA_NF4[2]), PEFT_LORA_NF4[3])
        rows.append(("lora", lora_nf4, "forward", lambda ops, o: forwards.lora_nf4_forward(ops, o, linear4bit)))
    return rows


def patch_family(family_name: str, backend: str, ops: frozenset = frozenset(OPS)) -> None:
    """Replace the family's forwards and functions with ``backend``'s ops (those in ``ops``; the rest restored)."""
    if _active.get(family_name) == (backend, ops):
        return
    kernels = forwards.OPS[backend]
    for op, owner, name, make in _targets(FAMILIES[family_name]):
        if op in ops:
            _set(owner, name, make(kernels, _originals.get((owner, name), getattr(owner, name))))
        else:
            _restore(owner, name)
    _active[family_name] = (backend, ops)


def apply_kernels(
    model,
    backend: str = "auto",
    *,
    on_cuda: bool | None = None,
    rms_norm=True,
    rope=True,
    glu=True,
    loss=True,
    lora=True,
) -> str:
    """Patch ``model``'s family for ``backend``; returns the backend used ("none": left unpatched).

    The switches name the ops that are patched (``lora=False`` keeps PEFT's own LoRA forward, ...).
    ``on_cuda``: where ``auto`` should assume the model trains (default: where CUDA is available).
    """
    base = base_model(model)
    backend = backend if backend == "none" else choose_backend(backend, base.config.model_type, on_cuda)
    base.fusetune_kernels = backend  # the trainer leaves a model with this set as it is
    if backend == "none":
        return backend
    switches = dict(rms_norm=rms_norm, rope=rope, glu=glu, loss=loss, lora=lora)
    ops = frozenset(op for op, on in switches.items() if on)
    patch_family(base.config.model_type, backend, ops)
    log.info(
        "kernels=%s patched the %s family (%s)", backend, base.config.model_type, ", ".join(sorted(ops)) or "no ops"
    )
    return backend


def remove_kernels() -> None:
    """Restore every original class forward and function."""
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()
    _active.clear()


def is_applied(model) -> bool:
    """Whether ``model`` was given a backend that is still in place (so the trainer leaves it as it is)."""
    base = base_model(model)
    applied = getattr(base, "fusetune_kernels", None)
    if applied == "none":
        return True
    return applied is not None and _active.get(base.config.model_type, (None,))[0] == applied


def active_backends() -> dict[str, str]:
    """family -> the backend it is patched with."""
    return {family: backend for family, (backend, _) in _active.items()}
