"""Kernel backends and the patch table: which ops replace which parts of which model family.

``apply_kernels(model, backend)`` patches the family's classes and functions in place: its
RMSNorm forwards, its pre-norm decoder layers' forwards (the attention's residual add and the
post-attention RMSNorm in one launch), its ``apply_rotary_pos_emb``, its gated MLP forwards, its routed
experts' forwards (grouped GEMMs, ``fusetune_kernels.moe``; the routers keep their own code), and its
causal-LM forward, whose loss head becomes the fused linear cross-entropy (the full ``[tokens, vocab]``
logits never exist while training). The family's row is read off its own modules
(``families.derive``), and each op is patched only after it agrees with the model's own code on
a small random model (``self_check``); the rest stay as they are, with the reason logged. PEFT's LoRA ``Linear`` forward
becomes one fused node where the call is plain LoRA (PEFT's own forward otherwise), and so does its
``ParamWrapper`` (LoRA on the experts' 3-D parameters) over patched experts. ``triton`` uses fusetune's
kernels, ``reference`` their plain-PyTorch twins on the same code path, so any run can
be repeated for parity. ``remove_kernels()`` restores every original.

TRL 1.16's SFTTrainer wraps the model with its own fused LM head
(``trl.trainer.sft_trainer.add_fused_lm_head``) and computes its loss and its
``entropy`` / ``mean_token_accuracy`` metrics from the per-token outputs. That entry
is in the table too: on a patched model it does nothing, and our causal-LM forward
answers ``fused_lm_head=True`` itself, with the same per-token fields from the same
chunked pass, so no metric brings the full logits back.
"""

import functools
import importlib
import logging
import os

import torch

from . import families, forwards, ledger, self_check
from .errors import FusetuneError
from .families import FAMILY_OPS, Family, NotPatchable
from .modules import base_model
from .state import peek, state_of

log = logging.getLogger(__name__)
KERNEL_BACKENDS = ("auto", "triton", "reference")  # what a user asks for; "none" is an unpatched model
OPS = ("rms_norm", "add_norm", "rope", "glu", "experts", "loss", "lora")  # the switches of apply_kernels, one per op
TRL_FUSED_HEAD = ("trl.trainer.sft_trainer", "add_fused_lm_head")
PEFT_LORA_LINEAR = ("peft.tuners.lora.layer", "Linear")  # its forward: one fused node for plain LoRA
PEFT_LORA_PARAM = ("peft.tuners.lora.layer", "ParamWrapper")  # LoRA on 3-D expert parameters
# PEFT's LoRA over a bitsandbytes 4-bit base (and that base's class): one fused node, NF4 dequantized inside
PEFT_LORA_NF4 = ("peft.tuners.lora.bnb", "Linear4bit", "bitsandbytes.nn", "Linear4bit")

# (owner object, attribute) -> the original value, for everything currently patched
KERNELS = "kernels"  # the ledger's tag for the patch table's replacements
_active: dict[str, tuple[str, frozenset]] = {}  # family -> (backend, ops patched)
_told: set[tuple[str, str, str]] = set()  # (family, op, reason) already logged


def _unpatchable(requested: str, model_type: str, reason: str) -> str:
    """``auto``: "none", with the reason logged; ``triton``/``reference``: the one-line error."""
    if requested != "auto":
        raise FusetuneError(
            f"kernels={requested}: model type '{model_type}' cannot be patched: {reason}; "
            "use kernels=auto to train it with its own modules"
        )
    log.warning("kernels=auto: model type '%s' trains with its own modules: %s", model_type, reason)
    return "none"


def choose_backend(requested: str, config, on_cuda: bool | None = None, dtype=torch.float32) -> str:
    """The whole backend policy: "triton", "reference", or "none" (train the model's own modules).

    - ``auto``: triton on CUDA, reference elsewhere; a family where no op passes its self-check
      trains unpatched, with the reason logged.
    - ``triton`` / ``reference``: such a family is an error (callers ask before any weights load,
      with the model's config); triton off CUDA needs TRITON_INTERPRET=1.

    ``dtype``: the one the model will train in (the self-check compiles Triton's kernels for it).
    """
    if requested not in KERNEL_BACKENDS:
        raise FusetuneError(f"kernels: unknown backend '{requested}'; choose one of {', '.join(KERNEL_BACKENDS)}")
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    backend = ("triton" if on_cuda else "reference") if requested == "auto" else requested
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise FusetuneError("kernels=triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU")
    try:
        accepted, rejected = check_family(config, backend, torch.device("cuda" if on_cuda else "cpu"), dtype)
    except NotPatchable as why:
        return _unpatchable(requested, config.model_type, str(why))
    if not accepted:
        return _unpatchable(requested, config.model_type, "; ".join(f"{op}: {r}" for op, r in sorted(rejected.items())))
    if requested == "auto":
        log.info("kernels=auto chose %s (%s)", backend, "CUDA" if on_cuda else "no CUDA")
    return backend


def family_rows(family: Family) -> list[tuple]:
    """(op, owner, attribute, make(ops, original)) for the family's own modules and functions."""
    rows = []
    for module, name, gemma in family.norms:
        owner = getattr(importlib.import_module(module), name)
        rows.append(("rms_norm", owner, "forward", lambda ops, o, g=gemma: forwards.norm_forward(ops, g, o)))
    for module, name, gemma in family.prenorm_layers:
        owner = getattr(importlib.import_module(module), name)
        make = functools.partial(_prenorm_layer_forward, owner, gemma)
        rows.append(("add_norm", owner, "forward", make))
    feeds = family.mlp_output_feeds_residual_only
    for module, name, fused in family.mlps:
        owner = getattr(importlib.import_module(module), name)
        rows.append(("glu", owner, "forward", lambda ops, _, f=fused: forwards.mlp_forward(ops, f, feeds)))
    for module, name in family.experts:
        owner = getattr(importlib.import_module(module), name)
        rows.append(("experts", owner, "forward", forwards.experts_forward))
    for module in family.rope_modules:
        rows.append(
            (
                "rope",
                importlib.import_module(module),
                "apply_rotary_pos_emb",
                lambda ops, _: forwards.rope_function(ops),
            )
        )
    if family.causal_lm:
        owner = getattr(importlib.import_module(family.causal_lm[0]), family.causal_lm[1])
        rows.append(("loss", owner, "forward", forwards.causal_lm_forward))
    return rows


def _prenorm_layer_forward(layer_cls, gemma, ops, original):
    return forwards.prenorm_layer_forward(ops, gemma, layer_cls, original)


def shared_rows() -> list[tuple]:
    """Rows every family shares: TRL's fused head (with the loss op) and PEFT's LoRA forwards."""
    rows = [
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
    param_wrapper = getattr(importlib.import_module(PEFT_LORA_PARAM[0]), PEFT_LORA_PARAM[1], None)
    if param_wrapper is not None:
        rows.append(("lora", param_wrapper, "forward", forwards.lora_experts_forward))
    lora_nf4 = getattr(importlib.import_module(PEFT_LORA_NF4[0]), PEFT_LORA_NF4[1], None)
    if lora_nf4 is not None:  # PEFT defines it where bitsandbytes imports
        linear4bit = getattr(importlib.import_module(PEFT_LORA_NF4[2]), PEFT_LORA_NF4[3])
        rows.append(("lora", lora_nf4, "forward", lambda ops, o: forwards.lora_nf4_forward(ops, o, linear4bit)))
    return rows


def check_family(config, backend: str, device, dtype=torch.float32) -> tuple[set[str], dict[str, str]]:
    """(the family ops that pass their self-check, {op: why not} for the rest). NotPatchable if no row."""
    family = families.derive(config)
    rows = [(op, owner, name, make, ledger.original(owner, name)) for op, owner, name, make in family_rows(family)]
    found = self_check.verdicts(config, backend, forwards.OPS[backend], rows, device, dtype) if rows else {}
    rejected = {op: why for op, why in found.items() if why is not None}
    rejected.update({op: why for op, why in family.missing})
    for op, why in sorted(rejected.items()):
        if (config.model_type, op, why) not in _told:
            _told.add((config.model_type, op, why))
            log.info("%s: %s left unpatched: %s", config.model_type, op, why)
    return {op for op, why in found.items() if why is None}, rejected


def check_seconds() -> float:
    """Seconds this process has spent checking family ops before patching them (near zero where cached)."""
    return self_check.check_seconds()


def patch_family(config, backend: str, ops: frozenset = frozenset(OPS), device=None, dtype=torch.float32) -> frozenset:
    """Replace the family's forwards and functions with ``backend``'s ops: those in ``ops`` that pass their
    self-check on ``device`` in ``dtype`` (the rest restored). Returns the ops patched."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    accepted, _ = check_family(config, backend, device, dtype)
    patched = frozenset(op for op in ops if op in accepted or op not in FAMILY_OPS)
    if _active.get(config.model_type) == (backend, patched):
        return patched
    kernels = forwards.OPS[backend]
    for op, owner, name, make in family_rows(families.derive(config)) + shared_rows():
        if op in patched:
            ledger.replace(owner, name, make(kernels, ledger.original(owner, name)), KERNELS)
        else:
            ledger.restore(owner, name)
    _active[config.model_type] = (backend, patched)
    return patched


def apply_kernels(
    model,
    backend: str = "auto",
    *,
    on_cuda: bool | None = None,
    rms_norm=True,
    add_norm=True,
    rope=True,
    glu=True,
    experts=True,
    loss=True,
    lora=True,
) -> str:
    """Patch ``model``'s family for ``backend``; returns the backend used ("none": left unpatched).

    The switches name the ops that are patched (``lora=False`` keeps PEFT's own LoRA forward, ...).
    ``on_cuda``: where ``auto`` should assume the model trains (default: where CUDA is available).
    """
    base = base_model(model)
    dtype = base.get_input_embeddings().weight.dtype  # 4-bit models keep their embeddings in the compute dtype
    backend = backend if backend == "none" else choose_backend(backend, base.config, on_cuda, dtype)
    state_of(base).backend = backend  # the trainer leaves a model with this set as it is
    if backend == "none":
        return backend
    switches = dict(rms_norm=rms_norm, add_norm=add_norm, rope=rope, glu=glu, experts=experts, loss=loss, lora=lora)
    ops = frozenset(op for op, on in switches.items() if on)
    device = base.get_input_embeddings().weight.device
    device = device if device.type != "meta" else ("cuda" if on_cuda else "cpu")
    patched = patch_family(base.config, backend, ops, device, dtype)
    log.info(
        "kernels=%s patched the %s family (%s)", backend, base.config.model_type, ", ".join(sorted(patched)) or "no ops"
    )
    return backend


def remove_kernels() -> None:
    """Restore every original class forward and function."""
    ledger.restore_all(KERNELS)
    _active.clear()


def is_applied(model) -> bool:
    """Whether ``model`` was given a backend that is still in place (so the trainer leaves it as it is)."""
    base = base_model(model)
    applied = peek(base).backend
    if applied == "none":
        return True
    return applied is not None and _active.get(base.config.model_type, (None,))[0] == applied


def active_backends() -> dict[str, str]:
    """family -> the backend it is patched with."""
    return {family: backend for family, (backend, _) in _active.items()}
