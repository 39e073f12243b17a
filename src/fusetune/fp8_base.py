"""The opt-in FP8 base (``FastModel.from_pretrained(..., fp8_base=True)``, the app's ``kernels.fp8=true``).

The frozen base weights of the LoRA-wrapped decoder projections (q, k, v, o, gate, up, down) run their two
products, x W^T and dy W, as scaled FP8 GEMMs (``fusetune_kernels.fp8``) inside the fused LoRA node; the
adapters, norms, attention, embeddings, lm_head and the loss stay in the compute dtype.

- bf16 LoRA: each base ``nn.Linear`` holds its weight as an ``FP8Weight`` (``fusetune_fp8``: e4m3 codes and
  per-channel scales, 1 byte per element) and its bf16 weight is freed: the ``weight`` parameter becomes a
  NaN placeholder of the same shape, dtype and device that holds one element, so any code that reads it
  shows NaN rather than a wrong number. ``restore_weights`` puts the dequantized weight back (a merge).
- QLoRA: the NF4 weight stays; each call takes it to e4m3 (``fusetune_fp8`` is ``NF4_TO_FP8``).

Only plain LoRA calls take the fused node; any other call on a held layer is refused with one line
(``forwards``), since PEFT's own forward would read the placeholder.
"""

import logging

import torch
from torch import nn

from fusetune_kernels.fp8 import FP8Weight, quantize_weight

from .errors import FusetuneError
from .modules import PROJECTIONS
from .state import peek, state_of

log = logging.getLogger(__name__)
FP8_CAPABILITY = (8, 9)  # Ada and Hopper and later have FP8 tensor cores
NF4_TO_FP8 = "nf4"  # a QLoRA base: NF4 goes to e4m3 on every call
KEY = "kernels.fp8 (fp8_base)"


def refuse_without_fp8(dtype: torch.dtype, kernels: str = "auto", trains_base: bool = False) -> None:
    """One line unless this process trains LoRA over a frozen bf16 or NF4 base on a GPU with FP8 tensor cores,
    in bfloat16, on fusetune's kernels (the reference backend is the bf16 definition of correct)."""
    if trains_base:
        raise FusetuneError(f"{KEY} is for a frozen bf16 or 4-bit base under LoRA adapters")
    if kernels == "reference":
        raise FusetuneError(f"{KEY} runs fusetune's kernels; kernels=reference is the bf16 definition of correct")
    if not torch.cuda.is_available():
        where = "this run is on the CPU"
    else:
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) >= FP8_CAPABILITY:
            if dtype != torch.bfloat16:
                raise FusetuneError(f"{KEY} computes in bfloat16; the model's dtype is {str(dtype)[6:]}")
            return
        where = f"this run is on {torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    raise FusetuneError(
        f"{KEY}: the FP8 base GEMMs need a GPU with FP8 tensor cores (compute capability 8.9 or later); {where}"
    )


def _placeholder(weight: torch.Tensor) -> nn.Parameter:
    """A frozen NaN parameter with ``weight``'s shape, dtype and device, one element of storage."""
    nan = torch.full((), float("nan"), dtype=weight.dtype, device=weight.device)
    return nn.Parameter(nan.expand(weight.shape), requires_grad=False)


def _lora_layers(model):
    """(name, LoRA layer) for every PEFT LoRA layer on a decoder projection."""
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A") and name.rsplit(".", 1)[-1] in PROJECTIONS:
            yield name, module


def hold_fp8(model) -> str:
    """Give every LoRA-wrapped projection's base an FP8 product (see the module docstring); the log line.
    FusetuneError where the fused LoRA forward is not patched (PEFT's own would not use it)."""
    held = nf4 = freed = kept = 0
    for name, layer in _lora_layers(model):
        if not getattr(type(layer).forward, "_fusetune", False):
            raise FusetuneError(
                f"{KEY}: {name} keeps PEFT's own LoRA forward (kernels left unpatched), which has no FP8 path"
            )
        base = layer.base_layer
        if getattr(base, "fusetune_fp8", None) is not None:
            continue
        if type(base) is nn.Linear:
            weight = quantize_weight(base.weight)
            freed += base.weight.numel() * base.weight.element_size()
            kept += weight.nbytes
            base.fusetune_fp8 = weight
            base.weight = _placeholder(base.weight)
            held += 1
        elif hasattr(base.weight, "quant_state"):
            base.fusetune_fp8 = NF4_TO_FP8
            nf4 += 1
    state_of(model).fp8_base = True
    if nf4:
        return f"{KEY}: {nf4} NF4 projections go to e4m3 on every call"
    return f"{KEY}: {held} projections hold e4m3 weights, {kept / 2**30:.2f} GiB (their {freed / 2**30:.2f} GiB freed)"


def held_weight(base) -> FP8Weight | None:
    weight = getattr(base, "fusetune_fp8", None)
    return weight if isinstance(weight, FP8Weight) else None


def restore_weights(model) -> int:
    """Put each held projection's dequantized weight back as its ``weight`` (in the dtype it was quantized from)
    and drop the FP8 copy; the number restored. The values are e4m3 ones: 3 mantissa bits, per-channel scale."""
    restored = 0
    for module in model.modules():
        weight = held_weight(module)
        if weight is not None:
            module.weight = nn.Parameter(weight.dequantize(), requires_grad=False)
            del module.fusetune_fp8
            restored += 1
    state_of(model).fp8_base = False
    return restored


def refuse_unheld(model) -> None:
    """One line where ``fp8_base`` was asked for but no projection runs in FP8 (no LoRA adapters were added):
    training would go on in bf16 without saying so."""
    if peek(model).fp8_base and not any(
        getattr(module, "fusetune_fp8", None) is not None for module in model.modules()
    ):
        raise FusetuneError(
            f"{KEY}: no projection runs in FP8; add LoRA adapters with FastModel.get_peft_model before training "
            "(the FP8 base is the frozen weight under the adapters)"
        )
