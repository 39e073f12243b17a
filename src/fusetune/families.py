"""Patch-table rows read off a model family's own modules.

A row names what ``patching`` may replace in one transformers model type: its ``*RMSNorm``
classes (and whether each scales by ``weight`` or ``1 + weight``), its gated MLP classes (separate
``gate_proj``/``up_proj`` or one fused ``gate_up_proj``), the modules whose ``apply_rotary_pos_emb``
its attention calls, its pre-norm decoder layers (``prenorm``), and its causal-LM class.
``derive(config)`` builds a small random model from the config (``small_config``) and reads all of
this from the module instances (and its routed experts: ``experts_refusal``), so a family needs no
hand-written row; ``OVERRIDES`` holds the few facts the structure cannot show. What a row offers
is only a candidate: ``self_check`` runs each op against the model's own code before it is patched.
"""

import copy
import dataclasses
import inspect
import json
import sys
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from . import prenorm
from .errors import first_line

# The ops a family row offers (lora is family-free).
FAMILY_OPS = ("rms_norm", "add_norm", "rope", "glu", "experts", "loss")
# Activation module classes the fused gated kernels compute, by the kind of gate they are.
ACTIVATIONS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
}
# Scalars the causal-LM head applies to its logits, read from the text config: name -> multiply (True) or divide.
LOGIT_SCALES = {"logit_scale": True, "lm_head_multiplier": True, "logits_scaling": False}


@dataclass(frozen=True)
class Family:
    """One model type's row. Class names are looked up in their own modules (``owner.qualname`` pairs)."""

    model_type: str
    causal_lm: tuple[str, str]  # (module, class)
    norms: tuple[tuple[str, str, bool], ...] = ()  # (module, class, scales by 1 + weight)
    mlps: tuple[tuple[str, str, bool], ...] = ()  # (module, class, fused gate_up_proj)
    rope_modules: tuple[str, ...] = ()  # modules whose apply_rotary_pos_emb the attention calls
    # Decoder layers of the standard pre-norm form (``prenorm``), with whether their post-attention
    # RMSNorm scales by 1 + weight: (module, class, gemma)
    prenorm_layers: tuple[tuple[str, str, bool], ...] = ()
    # The decoder layer only adds the MLP's output to the residual (no norm after the MLP), so the
    # checkpointing recompute may leave the down projection's output uncomputed.
    mlp_output_feeds_residual_only: bool = False
    experts: tuple[tuple[str, str], ...] = ()  # (module, class) of routed experts the fused kernel computes
    missing: tuple[tuple[str, str], ...] = ()  # (op, why the structure offers no candidate)

    def offers(self) -> set[str]:
        """The ops with at least one candidate target."""
        have = {
            "rms_norm": self.norms,
            "add_norm": self.prenorm_layers,
            "glu": self.mlps,
            "experts": self.experts,
            "rope": self.rope_modules,
            "loss": self.causal_lm,
        }
        return {op for op, targets in have.items() if targets}


class NotPatchable(Exception):
    """The model type has no row: its reason is one line."""


# Hand-written facts, by model type: fields of Family that replace the derived ones (none needed today).
OVERRIDES: dict[str, dict] = {}

# The widths the check on a GPU keeps (``shrink_values(widths=True)``), and where it clips the others.
WIDTHS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
CHECK_MLP, CHECK_VOCAB = 2048, 4096
SMALL = dict(hidden_size=64, num_attention_heads=4, head_dim=16, vocab_size=256, intermediate_size=96)
# Other names for the same sizes in older or non-Llama configs, and sizes that must shrink with them.
SMALL_ALIASES = dict(
    n_embd=64,
    d_model=64,
    n_head=4,
    n_heads=4,
    n_inner=96,
    ffn_dim=96,
    decoder_ffn_dim=96,
    encoder_ffn_dim=96,
    decoder_attention_heads=4,
    encoder_attention_heads=4,
    n_layer=2,
    encoder_layers=1,
    decoder_layers=2,
    rotary_dim=8,
    num_layers=2,
)
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# The small model's experts, and each token's: all of them. With top-k of fewer, a difference of 1e-7 in one
# layer's output can flip a later layer's choice on a near tie and the loss jumps; the check's verdict would
# then depend on the thread count or the device rather than on the kernel.
EXPERTS = 4
TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k")


def routed_experts(config) -> int:
    """How many routed experts a layer of this config has (its text config's, for a composite), 0 for a dense one."""
    counts = [getattr(c, key, 0) for c in (config, getattr(config, "text_config", None)) for key in EXPERT_COUNTS]
    return max([c for c in counts if isinstance(c, int)], default=0)


def _layer_lists(values: dict) -> list[str]:
    layers = values.get("num_hidden_layers")
    return [k for k, v in values.items() if isinstance(v, list) and layers and len(v) == layers]


def _renumber_layers(values: dict, keep: list[int], per_layer: list[str]) -> None:
    """Layer-index lists and dicts (``per_layer_config``, ``index_layers``) for the layers ``keep`` kept
    (``per_layer``: the lists with one entry per layer, cut already)."""
    new = {old: i for i, old in enumerate(keep)}
    for key, value in list(values.items()):
        if not key.endswith(("_layers", "per_layer_config")) or key in per_layer or key == "num_hidden_layers":
            continue
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            values[key] = {str(new[int(k)]): v for k, v in value.items() if int(k) in new}
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            values[key] = sorted({new[v] for v in value if v in new})


def shrink_values(values: dict, widths: bool = False, every_expert: bool = True) -> dict:
    """A config dict at small sizes: one layer of each kind (per-layer lists decide the kinds), at least two;
    ``EXPERTS`` routed experts, each token sent to all of them (``every_expert``) or to at most two.

    ``widths``: keep the hidden, head and attention-head sizes, and clip the MLP and vocabulary widths
    only where the GLU and cross-entropy kernels' blocks stop growing, so that the kernels the check
    compiles on a GPU are those the full-size model trains with.
    """
    values = dict(values)
    vocab = _clipped(values.get("vocab_size") or CHECK_VOCAB, CHECK_VOCAB) if widths else SMALL["vocab_size"]
    pattern, layers = values.get("sliding_window_pattern"), values.get("num_hidden_layers")
    if not values.get("layer_types") and isinstance(pattern, int) and isinstance(layers, int):
        # Gemma 3: every pattern-th layer global, the others sliding
        kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        values["layer_types"] = kinds
        values.pop("sliding_window_pattern")
    per_layer = _layer_lists(values)
    if "num_hidden_layers" in values and isinstance(values["num_hidden_layers"], int):
        kinds, keep = set(), []
        for i in range(values["num_hidden_layers"]):
            kind = json.dumps([values[k][i] for k in per_layer], default=str)
            if kind not in kinds:
                kinds.add(kind)
                keep.append(i)
        if len(keep) < 2:  # one kind of layer: the first two (or the only one, twice)
            keep = [0, 1] if values["num_hidden_layers"] > 1 else [0, 0]
        for k in per_layer:
            values[k] = [values[k][i] for i in keep]
        values["num_hidden_layers"] = len(keep)
        _renumber_layers(values, keep, per_layer)
    if widths and isinstance(values.get("intermediate_size"), int):
        values["intermediate_size"] = _clipped(values["intermediate_size"], CHECK_MLP)
    heads = values.get("num_attention_heads")
    routed = any(isinstance(values.get(key), int) and values[key] > 0 for key in EXPERT_COUNTS)
    for key, small in {**SMALL, **SMALL_ALIASES}.items():
        if widths and key in WIDTHS:
            continue
        if isinstance(values.get(key), int) or (key in SMALL and key in values and values[key] is None):
            values[key] = small
    if "num_key_value_heads" in values and not widths:
        kv = values["num_key_value_heads"]
        values["num_key_value_heads"] = 4 if kv is None or (heads and kv >= heads) else (1 if kv == 1 else 2)
    if all(isinstance(values.get(k), int) for k in ("mamba_n_heads", "mamba_d_head", "mamba_expand")):
        values["mamba_n_heads"] = 4  # heads * head size = expand * hidden size
        values["mamba_d_head"] = values["mamba_expand"] * values["hidden_size"] // 4
    for key, value in list(values.items()):
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if key.endswith("intermediate_size") and key != "intermediate_size":
            values[key] = 32
        elif key.startswith("linear_") and key.endswith("head_dim"):  # linear-attention heads
            values[key] = 16
        elif key.startswith("linear_num_") and key.endswith("heads"):
            values[key] = 4 if "value" in key else 2
        elif "vocab" in key:
            values[key] = vocab
        elif key.startswith("hidden_size_") or key.endswith("_hidden_size") or key == "emb_dim":
            values[key] = 16 if "per_layer" in key else SMALL["hidden_size"]
        elif key in EXPERT_COUNTS:
            values[key] = EXPERTS
        elif key in TOP_K:  # with routed experts, every expert: routing is then continuous (see TOP_K)
            values[key] = EXPERTS if routed and every_expert else min(value, 2)
        elif key.endswith("_token_id") and value >= vocab:
            values[key] = vocab - 1
        elif "dropout" in key:
            values[key] = 0
    for key, value in list(values.items()):
        if "dropout" in key and isinstance(value, float):
            values[key] = 0.0
        if key.endswith("_token_id") and isinstance(value, list):
            values[key] = [min(v, vocab - 1) for v in value if isinstance(v, int)]
        if isinstance(value, dict) and "model_type" in value:  # a sub-config (text, vision, audio)
            values[key] = shrink_values(value, widths, every_expert)
    for key in ("quantization_config", "auto_map", "_name_or_path"):
        values.pop(key, None)
    if isinstance(values.get("sliding_window"), int):
        values["sliding_window"] = min(values["sliding_window"], 8)  # shorter than the check's rows
    if not widths:
        _shrink_rope(values)
    return values


def _clipped(size: int, most: int) -> int:
    """``size``, or past ``most`` (where the kernel's block stops growing) ``most`` and as divisible by 16
    as ``size`` is (Triton specialises on that too)."""
    return size if size <= most else most + size % 16


def _shrink_rope(values: dict) -> None:
    """Per-frequency rope parameters (Qwen's ``mrope_section``, Phi-3's longrope factors) for the small head size."""
    key = "rope_parameters" if isinstance(values.get("rope_parameters"), dict) else "rope_scaling"
    rope = values.get(key)
    if not isinstance(rope, dict) or not isinstance(values.get("hidden_size"), int):
        return
    head_dim = values.get("head_dim") or values["hidden_size"] // values.get("num_attention_heads", 1)
    partial = rope.get("partial_rotary_factor", values.get("partial_rotary_factor", 1.0)) or 1.0
    half = int(head_dim * partial) // 2  # rotary frequencies per head
    rope = dict(rope)
    if isinstance(rope.get("mrope_section"), list):
        rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    for factors in ("long_factor", "short_factor"):
        if isinstance(rope.get(factors), list):
            rope[factors] = rope[factors][:half]
    values[key] = rope


def small_config(config: PretrainedConfig, widths: bool = False) -> PretrainedConfig:
    """``config``'s architecture at small sizes, every kind of layer kept, for a model built in a blink
    (``widths``: see ``shrink_values``)."""
    try:
        small = type(config).from_dict(shrink_values(config.to_dict(), widths))
    except Exception:  # a config that allows fewer experts a token (ZAYA: one)
        small = type(config).from_dict(shrink_values(config.to_dict(), widths, every_expert=False))
    small._attn_implementation = "eager"
    for sub in ("text_config", "vision_config", "audio_config"):
        if isinstance(getattr(small, sub, None), PretrainedConfig):
            getattr(small, sub)._attn_implementation = "eager"
    return small


def small_model(config: PretrainedConfig, device="cpu", seed: int = 0, widths: bool = False) -> torch.nn.Module:
    """A random fp32 model of ``small_config(config, widths)``; its 1-D weights (norms, biases) are
    perturbed so that a kernel that mistakes ``w`` for ``1 + w`` shows. Built on the CPU (the same
    weights on every device), or with ``widths`` on ``device`` itself (too large to build in a blink)."""
    small = small_config(config, widths)
    build_on = torch.device(device) if widths else torch.device("cpu")
    forked = [build_on] if build_on.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), build_on:  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(small, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return model.to(device).eval()


def _owner_name(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def norm_scales_one_plus_weight(norm: torch.nn.Module) -> bool | None:
    """Whether ``norm`` outputs x_hat * (1 + weight) (True) or x_hat * weight (False); None if neither
    (read off the module: with a zero weight the first gives x_hat, the second zeros)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    probe = copy.deepcopy(norm).float()
    with torch.no_grad():
        probe.weight.zero_()
        try:
            g = torch.Generator().manual_seed(0)
            out = probe(torch.randn(3, weight.shape[0], generator=g).to(weight.device))
        except Exception:  # a norm with another signature (gated, grouped): not an RMSNorm we know
            return None
    if not isinstance(out, torch.Tensor):
        return None
    if torch.count_nonzero(out) == 0:
        return False
    return True


def activation_kind(mlp: torch.nn.Module) -> str | None:
    act = getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None))
    if act is None:
        return None
    kind = ACTIVATIONS.get(type(act).__name__)
    if type(act) is torch.nn.GELU:
        kind = "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return kind


def mlp_layout(mlp: torch.nn.Module) -> bool | None:
    """True for a fused ``gate_up_proj``, False for ``gate_proj``/``up_proj``, None if not a gated MLP."""
    children = dict(mlp.named_children())
    if "down_proj" not in children or activation_kind(mlp) is None:
        return None
    if "gate_up_proj" in children:
        return True
    if "gate_proj" in children and "up_proj" in children:
        return False
    return None


def is_experts(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds routed experts as one 3-D ``down_proj`` parameter [E, H, I]."""
    down = module._parameters.get("down_proj")
    return isinstance(down, torch.Tensor) and down.dim() == 3


def experts_refusal(experts: torch.nn.Module) -> str | None:
    """Why the fused kernel (``fusetune_kernels.moe``) does not compute these experts, or None where it does:
    transformers' experts layout (``use_experts_implementation``) with a gate, gate and up concatenated in one
    ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], not transposed, no bias, no norm after the experts,
    transformers' own gating (``silu(gate) * up``)."""
    from transformers.integrations import moe

    name = type(experts).__name__
    if not hasattr(experts, "has_gate"):
        return f"{name} is not transformers' experts layout (no use_experts_implementation)"
    layout = {
        "has no gate": not experts.has_gate,
        "interleaves gate and up": not getattr(experts, "is_concatenated", False),
        "is transposed": getattr(experts, "is_transposed", False),
        "has biases": getattr(experts, "has_bias", False),
        "has a norm after the experts": getattr(experts, "has_post_expert_norm", False),
        "has its own gating": getattr(type(experts), "_apply_gate", None) is not moe._default_apply_gate,
    }
    found = [why for why, differs in layout.items() if differs]
    if found:
        return f"{name} {', '.join(found)}"
    if activation_kind(experts) != "silu":
        act = getattr(experts, "act_fn", None)
        return f"{name}'s activation is {type(act).__name__}, not SiLU"
    gate_up, down = experts._parameters.get("gate_up_proj"), experts.down_proj
    if not isinstance(gate_up, torch.Tensor) or gate_up.shape != (down.shape[0], 2 * down.shape[2], down.shape[1]):
        return f"{name}'s gate_up_proj is not [E, 2I, H] for its down_proj [E, H, I]"
    return None


def _feeds_residual_only(layer_cls: type) -> bool:
    """The decoder layer's forward adds the MLP's output straight to the residual and nothing else reads it."""
    try:
        lines = [line.strip() for line in inspect.getsource(layer_cls.forward).splitlines() if line.strip()]
    except (OSError, TypeError):
        return False
    calls = [i for i, line in enumerate(lines) if line == "hidden_states = self.mlp(hidden_states)"]
    return (
        len(calls) == 1
        and calls[0] + 1 < len(lines)
        and lines[calls[0] + 1] == "hidden_states = residual + hidden_states"
    )


def _decoder_layers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def _prenorm_layers(model: torch.nn.Module, norms: dict) -> tuple[list, str | None]:
    """(module, class, gemma) of each pre-norm decoder layer class, gemma read off its post-attention norm;
    where there is none, why not."""
    rows, reasons, instances = [], [], {}
    for layer in _decoder_layers(model):
        instances.setdefault(type(layer), layer)
    for cls, layer in sorted(instances.items(), key=lambda item: item[0].__name__):
        found, norm = prenorm.read(cls.forward), type(getattr(layer, "post_attention_layernorm", None))
        if isinstance(found, str):
            reasons.append(found)
        elif norm not in norms:
            reasons.append(f"{cls.__name__}'s post_attention_layernorm is no RMSNorm with a weight ({norm.__name__})")
        else:
            rows.append((*_owner_name(cls), norms[norm]))
    why = None if rows else "; ".join(dict.fromkeys(reasons)) or "no *DecoderLayer module"
    return rows, why


def read_structure(model: torch.nn.Module) -> Family:
    """The row of ``model``'s type, read off its module instances."""
    norms, mlps, rope, missing = {}, {}, set(), []
    unknown_norms, unknown_mlps = [], []
    experts, unknown_experts = set(), []
    for module in model.modules():
        if is_experts(module) and type(module) not in experts:
            why = experts_refusal(module)
            (unknown_experts.append(why) if why else experts.add(type(module)))
        cls = type(module)
        name = cls.__name__
        if name.endswith("RMSNorm") and cls not in norms:
            scales = norm_scales_one_plus_weight(module)
            (unknown_norms.append(name) if scales is None else norms.setdefault(cls, scales))
        if name.endswith("MLP") and cls not in mlps:
            layout = mlp_layout(module)
            (unknown_mlps.append(name) if layout is None else mlps.setdefault(cls, layout))
        owner = sys.modules.get(cls.__module__)
        if owner is not None and "Attention" in name and callable(getattr(owner, "apply_rotary_pos_emb", None)):
            rope.add(cls.__module__)
    if not norms:
        missing.append(
            (
                "rms_norm",
                f"no RMSNorm with a weight ({', '.join(sorted(set(unknown_norms)))})"
                if unknown_norms
                else "no *RMSNorm module",
            )
        )
    if not mlps:
        why = (
            f"no gated MLP with a fused activation ({', '.join(sorted(set(unknown_mlps)))})"
            if unknown_mlps
            else "no *MLP module with gate/up/down projections"
        )
        missing.append(("glu", why))
    if unknown_experts and not experts:  # a dense family has no experts op to miss
        missing.append(("experts", "; ".join(dict.fromkeys(unknown_experts))))
    if not rope:
        missing.append(("rope", "its attention modules have no apply_rotary_pos_emb"))
    layers = {type(layer) for layer in _decoder_layers(model)}
    prenorm_layers, no_prenorm = _prenorm_layers(model, norms)
    if no_prenorm:
        missing.append(("add_norm", no_prenorm))
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    causal_lm = _owner_name(type(model)) if base is not None and model.get_output_embeddings() is not None else ()
    if not causal_lm:
        missing.append(("loss", "no backbone and output embeddings to fuse the loss head over"))
    return Family(
        model_type=model.config.model_type,
        causal_lm=causal_lm,
        norms=tuple(sorted((*_owner_name(c), s) for c, s in norms.items())),
        mlps=tuple(sorted((*_owner_name(c), f) for c, f in mlps.items())),
        rope_modules=tuple(sorted(rope)),
        prenorm_layers=tuple(sorted(prenorm_layers)),
        mlp_output_feeds_residual_only=bool(layers) and all(_feeds_residual_only(c) for c in layers),
        experts=tuple(sorted(_owner_name(c) for c in experts)),
        missing=tuple(missing),
    )


def config_key(config: PretrainedConfig) -> str:
    values = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "auto_map"):
        values.pop(key, None)
    return json.dumps(values, sort_keys=True, default=str)


_rows: dict[str, Family | NotPatchable] = {}


def derive(config: PretrainedConfig) -> Family:
    """The row for ``config``'s model type (cached per config); NotPatchable with the reason if none."""
    key = config_key(config)
    if key not in _rows:
        try:
            family = read_structure(small_model(config))
            _rows[key] = dataclasses.replace(family, **OVERRIDES.get(config.model_type, {}))
        except Exception as error:  # the config's own checks, or a module that cannot be built here
            _rows[key] = NotPatchable(
                f"no small model can be built from its config: {first_line(error, with_type=True)}"
            )
    row = _rows[key]
    if isinstance(row, NotPatchable):
        raise row
    if not row.offers() - {"loss"}:
        raise NotPatchable("no RMSNorm, gated MLP or rotary embedding: none of fusetune's kernels fits it")
    return row
