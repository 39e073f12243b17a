"""Whether a model can train on packed rows: every layer that mixes tokens must keep documents apart.

Inside attention, fusetune's varlen attention keeps the documents of a packed row apart. Hybrid and
linear-attention decoders also mix tokens outside attention: causal convolutions, state-space scans
(Mamba), gated delta rules, lightning attention, recurrent cells. Such a layer keeps documents apart only
where its own code takes the boundaries the collator gives (``cu_seq_lens_q``) and hands them to kernels
that read them (causal-conv1d, mamba-ssm, flash-linear-attention, on CUDA). The
PyTorch fallbacks that transformers runs without those kernels, and always on the CPU, carry one
document's state into the next, or refuse the boundaries with an error mid-step.

``packing_blocker(model)`` finds those layers from the model's own modules and says why packing would mix
documents there. Where it finds none, it still asks the model: a small random copy built from its config
(``families.small_model``) must give a packed row the loss of the same documents as a padded batch
(``packing_check``, cached with the self-check's verdicts). Attention with its own notion of position or
masking (chunked or compressed attention, positions that grow across a row) fails there, and is refused.
"""

import functools
import importlib.util
import inspect
import re
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from .. import families, self_check
from ..errors import first_line
from ..modules import base_model

# A parameter that only a state-carrying mixer has: the decay of a state-space scan or a gated delta rule.
STATE_PARAMETERS = ("A_log",)
# Token mixers with neither a causal convolution nor a decay parameter to find them by.
UNMARKED_MIXERS = ("MiniMaxLightningAttention", "xLSTMLayer", "RwkvSelfAttention")
# What a mixer's code names where it hands document boundaries to a variable-length kernel. ``seq_idx`` alone is not
# enough: some mixers hand it to their convolution and not to their scan (transformers 5.17's Zamba).
BOUNDARY_ARGUMENTS = ("cu_seqlens",)
# Kernel packages that read boundaries (import name: distribution); transformers falls back to PyTorch without them.
DOCUMENT_LENGTHS = (5, 9, 3)  # the documents of the packed row packing_check compares with a padded batch
PACKED_TOLERANCE = 1e-5  # relative, fp32
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
    if not parts and not mixers and not stateful:
        why = packing_check(config)
        parts = [why] if why else []
    if not parts:
        return None
    return f"{config.model_type}: {'; '.join(parts)}; packed rows would mix documents"


def packed_and_padded_loss(model, docs: list[torch.Tensor]) -> tuple[float, float]:
    """(packed loss, padded loss) of ``model``: one row holding ``docs`` with positions restarting per document
    (as TRL's padding-free collator gives it, through fusetune's masked varlen attention), and the same
    documents as a right-padded batch. No target crosses a document boundary."""
    from .varlen import enable_varlen_attention

    enable_varlen_attention(model, "masked")
    input_ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = input_ids.clone()
    labels[position_ids == 0] = -100
    padded = torch.zeros(len(docs), max(len(d) for d in docs), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, doc in enumerate(docs):
        padded[row, : len(doc)], mask[row, : len(doc)] = doc, 1
    padded_labels = padded.masked_fill(mask == 0, -100)
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        batch = model(input_ids=padded, attention_mask=mask, use_cache=False).logits
    return _mean_loss(packed, labels), _mean_loss(batch, padded_labels)


def _mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    return F.cross_entropy(logits.float(), labels, ignore_index=-100).item()


def documents(vocab: int, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in DOCUMENT_LENGTHS]


def _packing_check(config) -> str | None:
    try:
        model = families.small_model(config)
        packed, padded = packed_and_padded_loss(model, documents(model.get_input_embeddings().num_embeddings))
    except Exception as error:  # its own attention cannot take a packed row
        return f"its small random copy cannot run a packed row ({first_line(error, with_type=True)})"
    if abs(packed - padded) > PACKED_TOLERANCE * abs(padded):
        losses = f"{packed:.5f} vs {padded:.5f}"
        return f"a packed row gives its small random copy another loss than the padded batch ({losses})"
    return None


def packing_check(config) -> str | None:
    """Why a small random copy of the model does not train on a packed row as on the padded batch, or None."""
    return self_check.cached(config, "packing", "none", torch.device("cpu"), [], lambda: _packing_check(config))
