"""Whether a model can train on packed rows: every layer that mixes tokens must keep documents apart.

Inside attention, fusetune's varlen attention keeps the documents of a packed row apart. Hybrid and
linear-attention decoders also mix tokens outside attention: causal convolutions, state-space scans
(Mamba), gated delta rules, lightning attention, recurrent cells. Such a layer keeps documents apart only
where its own code takes the boundaries the collator gives (``cu_seq_lens_q``) and hands them to kernels
that read them (causal-conv1d, mamba-ssm, flash-linear-attention, on CUDA). The
PyTorch fallbacks that transformers runs without those kernels, and always on the CPU, carry one
document's state into the next, or refuse the boundaries with an error mid-step.

``packing_blocker(model)`` finds those layers from the model's own modules and says why packing would mix
documents there, or returns None where it is safe.
"""

import functools
import importlib.util
import inspect
import re
import sys

import torch
from torch import nn
from transformers import PretrainedConfig

from .modules import base_model

# A parameter that only a state-carrying mixer has: the decay of a state-space scan or a gated delta rule.
STATE_PARAMETERS = ("A_log",)
# Token mixers with neither a causal convolution nor a decay parameter to find them by.
UNMARKED_MIXERS = ("MiniMaxLightningAttention", "xLSTMLayer", "RwkvSelfAttention")
# What a mixer's code names where it hands document boundaries to a variable-length kernel. ``seq_idx`` alone is not
# enough: some mixers hand it to their convolution and not to their scan (transformers 5.17's Zamba).
BOUNDARY_ARGUMENTS = ("cu_seqlens",)
# Kernel packages that read boundaries (import name: distribution); transformers falls back to PyTorch without them.
KERNEL_PACKAGES = {"causal_conv1d": "causal-conv1d", "mamba_ssm": "mamba-ssm", "fla": "flash-linear-attention"}
_PACKAGE_MENTIONS = re.compile(
    r"[\"'](causal_conv1d|mamba_ssm|fla)[\"']|is_(causal_conv1d|mamba_ssm|flash_linear_attention)_available"
)


def _is_causal_conv(module: nn.Module) -> bool:
    """A depthwise convolution along the sequence (kernel > 1): it reads the previous tokens, whatever document."""
    return isinstance(module, nn.Conv1d) and module.kernel_size[0] > 1 and module.groups == module.in_channels


def _is_mixer(module: nn.Module) -> bool:
    """Whether ``module`` carries information from token to token outside attention."""
    if type(module).__name__ in UNMARKED_MIXERS:
        return True
    if any(name in STATE_PARAMETERS for name, _ in module.named_parameters(recurse=False)):
        return True
    return any(_is_causal_conv(child) for child in module.children())


def token_mixers(model: nn.Module) -> list[nn.Module]:
    """The outermost modules of ``model`` that mix tokens outside attention, in module order."""
    found, prefixes = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in prefixes):
            continue
        if _is_mixer(module):
            found.append(module)
            prefixes.append(name + ".")
    return found


def recurrent_layer_types(config) -> list[str]:
    """The entries of ``config.layer_types`` whose cache transformers gives a convolution or recurrent state."""
    from transformers import cache_utils

    mapping = getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {})
    stateful = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
    layer_types = getattr(config.get_text_config(), "layer_types", None) or []
    if stateful is None:
        return []
    return list(
        dict.fromkeys(t for t in layer_types if isinstance(mapping.get(t), type) and issubclass(mapping[t], stateful))
    )


@functools.cache
def _takes_boundaries(cls: type) -> bool:
    """Whether the class's own code hands document boundaries (``cu_seqlens``) to its kernels."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return any(argument in source for argument in BOUNDARY_ARGUMENTS)


@functools.cache
def _kernel_packages(cls: type) -> tuple[str, ...]:
    """The boundary-reading kernel packages the class's modeling module would use where installed."""
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError):
        return ()
    names = set()
    for quoted, available in _PACKAGE_MENTIONS.findall(source):
        names.add(quoted or ("fla" if available == "flash_linear_attention" else available))
    return tuple(sorted(names))


def _why_mixed(cls: type, device: torch.device) -> str | None:
    """Why a mixer of class ``cls`` would read across document boundaries on ``device``, or None."""
    if not _takes_boundaries(cls):
        return "read no document boundaries (no cu_seqlens in their code)"
    packages = _kernel_packages(cls)
    if not packages:
        return "read no document boundaries (no kernel that takes them)"
    if device.type != "cuda":
        return f"read no document boundaries on {device.type} (transformers' PyTorch fallback)"
    missing = [KERNEL_PACKAGES[name] for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        return f"read no document boundaries without {', '.join(missing)} (transformers' PyTorch fallback)"
    return None


def _layer_type(module: nn.Module, config) -> str | None:
    layer_types = getattr(config, "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if layer_types and isinstance(index, int) and 0 <= index < len(layer_types):
        return layer_types[index]
    return None


def _layers(name: str, kinds: list[str]) -> str:
    return f"{'/'.join(kinds)} layers ({name})" if kinds else f"{name} layers"


def _modules_of(model_or_config) -> nn.Module:
    if isinstance(model_or_config, PretrainedConfig):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_or_config)
    return base_model(model_or_config)


def packing_blocker(model_or_config, device: torch.device | str | None = None) -> str | None:
    """Why packed or padding-free rows would mix documents in this model, as one line; None where they would not.

    ``model_or_config``: a transformers model (PEFT-wrapped or not), or its config (read on the meta device).
    ``device``: where training runs (default: where the model's parameters are). The line names the model
    type, the mixing layers and their class, and why their path ignores the boundaries.
    """
    model = _modules_of(model_or_config)
    config = model.config
    text_config = config.get_text_config()
    if device is None:
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    device = torch.device(device)
    mixers = token_mixers(model)
    problems: dict[str, tuple[list, str]] = {}  # class name: (its layer types, why it mixes documents)
    for mixer in mixers:
        cls = type(mixer)
        why = _why_mixed(cls, device)
        if why is not None:
            kinds = problems.setdefault(cls.__name__, ([], why))[0]
            kind = _layer_type(mixer, text_config)
            if kind is not None and kind not in kinds:
                kinds.append(kind)
    parts = [f"its {_layers(name, kinds)} {why}" for name, (kinds, why) in problems.items()]
    stateful = recurrent_layer_types(config)
    if stateful and not mixers:  # a layer type with a state, and no module found above that holds it
        parts.append(
            f"its {'/'.join(stateful)} layers carry a state from token to token by a path fusetune cannot read"
        )
    if not parts:
        return None
    return f"{config.model_type}: {'; '.join(parts)}; packed rows would mix documents"
