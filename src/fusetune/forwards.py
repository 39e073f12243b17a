"""The forwards that the patch table installs, built for one backend's ops."""

import contextvars
import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
from transformers.utils import ModelOutput
from trl.trainer.utils import FusedCausalLMOutput

from fusetune_kernels import add_rms_norm, fused_linear_cross_entropy, glu, lora, lora_nf4, moe, rms_norm, rope
from fusetune_kernels.fused_linear_cross_entropy import find_kept_rows
from fusetune_kernels.nf4 import NF4Weight
from fusetune_kernels.offloaded_checkpoint import recomputing

from . import fp8_base, prenorm
from .errors import FusetuneError
from .families import LOGIT_SCALES, activation_kind


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable
    swiglu: Callable
    geglu: Callable
    fused_linear_cross_entropy: Callable
    lora_linear: Callable
    lora_nf4_linear: Callable
    moe_experts: Callable


def _moe_experts_triton(*args, **kwargs):
    return moe.moe_experts(*args, backend=MOE_EXECUTOR, **kwargs)


MOE_EXECUTOR = "auto"  # fusetune_kernels.moe's grouped GEMMs: torch's grouped_mm where it fits, else Triton's
OPS = {
    "triton": Ops(
        rms_norm.rms_norm,
        add_rms_norm.add_rms_norm,
        rope.rope,
        glu.swiglu,
        glu.geglu,
        fused_linear_cross_entropy.fused_linear_cross_entropy,
        lora.lora_linear,
        lora_nf4.lora_nf4_linear,
        _moe_experts_triton,
    ),
    "reference": Ops(
        rms_norm.rms_norm_reference,
        add_rms_norm.add_rms_norm_reference,
        rope.rope_reference,
        glu.swiglu_reference,
        glu.geglu_reference,
        fused_linear_cross_entropy.fused_linear_cross_entropy_reference,
        lora.lora_linear_reference,
        lora_nf4.lora_nf4_linear_reference,
        moe.moe_experts_reference,
    ),
}
IGNORE_INDEX = -100
# Set while a checkpointed layer's recompute calls its MLP's down projection, whose output nobody reads there.
_output_unused = contextvars.ContextVar("fusetune_output_unused", default=False)


def _eps(norm) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def norm_forward(ops: Ops, gemma: bool, original_forward):
    """RMSNorm through ``ops.rms_norm``; an instance built without a weight (Gemma 4's ``with_scale=False``)
    keeps the original forward."""

    def forward(self, hidden_states):
        weight = getattr(self, "weight", None)
        if weight is None:
            return original_forward(self, hidden_states)
        return ops.rms_norm(hidden_states, weight, _eps(self), gemma=gemma)

    return forward


def _add_then_norm(ops: Ops, gemma: bool, norm, residual, delta):
    """``(norm(residual + delta), residual + delta)``: one ``ops.add_rms_norm``, or the add and the norm's own
    forward for an instance without a weight."""
    if getattr(norm, "weight", None) is None:
        summed = residual + delta
        return norm(summed), summed
    return ops.add_rms_norm(residual, delta, norm.weight, _eps(norm), gemma=gemma)


def prenorm_layer_forward(ops: Ops, gemma: bool, layer_cls: type, original_forward):
    """A pre-norm decoder layer (``prenorm``) whose attention residual add and post-attention RMSNorm run as
    one ``ops.add_rms_norm``. Everything else is the original's: the same arguments reach the attention, the
    input norm and the MLP are the modules' own (patched or not, so the recompute's down-projection skip
    holds), and it returns the layer's output tensor, as the original does.

    Returned as the forward of a throwaway subclass of ``layer_cls``: a transformers that checkpoints inside
    ``forward`` (5.25 wraps the forward of every subclass) wraps ours as it wraps the original; one that
    checkpoints in ``__call__`` (5.17) needs nothing."""
    call = prenorm.read(original_forward)
    if isinstance(call, str):
        raise FusetuneError(f"kernels: {layer_cls.__name__} is not a pre-norm decoder layer: {call}")

    @functools.wraps(original_forward)
    def forward(self, hidden_states, *args, **kwargs):
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        attention_args, attention_kwargs = call.arguments(self, hidden_states, args, kwargs, normed)
        attention, _ = self.self_attn(*attention_args, **attention_kwargs)
        normed, residual = _add_then_norm(ops, gemma, self.post_attention_layernorm, residual, attention)
        return residual + self.mlp(normed)

    for decorate in reversed(call.decorators):  # the original's keyword renames, on ours too
        forward = decorate(forward)
    names = {"forward": forward, "__module__": layer_cls.__module__, "__qualname__": layer_cls.__qualname__}
    return type(layer_cls.__name__, (layer_cls,), names).forward


def gated_activation(ops: Ops, mlp):
    """The fused gated op for the MLP's own activation module (``families.activation_kind``)."""
    kind = activation_kind(mlp)
    if kind == "silu":
        return ops.swiglu
    if kind in ("gelu", "gelu_tanh"):
        return functools.partial(ops.geglu, approximate="none" if kind == "gelu" else "tanh")
    act = getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None))
    raise FusetuneError(
        f"kernels: no fused gated activation for {type(act).__name__}; supported: silu, gelu, gelu tanh"
    )


def mlp_forward(ops: Ops, fused_gate_up: bool, output_feeds_residual_only: bool):
    """The gated MLP through ``ops``: ``down(act(gate(x)) * up(x))``, gate and up from two projections or
    from the halves of one ``gate_up_proj``. When the decoder layer only adds the MLP's output to the
    residual (``output_feeds_residual_only``), its recompute under fusetune's checkpointing tells a fused
    LoRA down projection that its output is unused: that projection then saves its tensors without the matmul."""

    def forward(self, x):
        if fused_gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        hidden = gated_activation(ops, self)(gate, up)
        layer = recomputing()
        if output_feeds_residual_only and layer is not None and getattr(layer, "mlp", None) is self:
            token = _output_unused.set(True)
            try:
                return self.down_proj(hidden)
            finally:
                _output_unused.reset(token)
        return self.down_proj(hidden)

    return forward


def _routed(experts, hidden_states, args, kwargs):
    """``(top_k_index, top_k_weights)`` where the call is the fused kernel's: the experts module's plain
    ``(hidden_states, top_k_index, top_k_weights)``, not expert-parallel; else None."""
    if kwargs or len(args) != 2 or getattr(experts, "_is_expert_parallel", False):
        return None
    if not hidden_states.is_floating_point() or hidden_states.dim() != 2:
        return None
    return args


def experts_forward(ops: Ops, original_forward):
    """The routed experts (``families.experts_refusal`` is None for their class) through ``ops.moe_experts``;
    any other call (expert-parallel, another signature) keeps the original forward, and with it transformers'
    ``experts_implementation`` dispatch."""

    @functools.wraps(original_forward)
    def forward(self, hidden_states, *args, **kwargs):
        routed = _routed(self, hidden_states, args, kwargs)
        if routed is None:
            return original_forward(self, hidden_states, *args, **kwargs)
        return ops.moe_experts(hidden_states, *routed, self.gate_up_proj, self.down_proj)

    forward._fusetune = True
    return forward


def _expert_factors(wrapper, name: str, experts):
    """``(A [E, r, in], B [E, out, r], scaling)`` of a PEFT ParamWrapper on ``experts``' 3-D parameter: its
    lora_A [E r, in] and lora_B [out, r E] as PEFT's (experts, out, in) layout lays them out. Another layout
    (an older PEFT's) is one line, not a silently different adapter."""
    param = getattr(experts, wrapper.parameter_name)
    num_experts, n_out, n_in = param.shape
    a, b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
    rank = wrapper.r[name]
    fits = getattr(wrapper, "_did_swap_in_out_features", False) and a.shape == (num_experts * rank, n_in)
    if not fits or b.shape != (n_out, num_experts * rank):
        import peft

        raise FusetuneError(
            f"model.lora: PEFT {peft.__version__} lays out the LoRA factors of {type(experts).__name__}."
            f"{wrapper.parameter_name} as [{a.shape[0]}, {a.shape[1]}] and [{b.shape[0]}, {b.shape[1]}], not the "
            "(experts, out, in) layout fusetune's expert kernel reads; upgrade PEFT (pip install -U peft)"
        )
    # B [E, out, r] laid out afresh (r E out values): torch's grouped_mm takes no permuted operand
    b = b.view(n_out, rank, num_experts).permute(2, 0, 1).contiguous()
    return a.view(num_experts, rank, n_in), b, wrapper.scaling[name]


def lora_experts_forward(ops: Ops, original_forward):
    """PEFT's ParamWrapper forward (LoRA on ``target_parameters``): where its chain of wrappers ends in routed
    experts whose forward is ours and every wrapper is plain LoRA on a different one of ``gate_up_proj`` /
    ``down_proj``, one ``ops.moe_experts`` call with both adapters (no merged copy of the experts);
    PEFT's own forward otherwise."""

    @functools.wraps(original_forward)
    def forward(self, x, *args, **kwargs):
        wrappers, experts = [], self
        while hasattr(experts, "parameter_name") and hasattr(experts, "lora_A"):
            wrappers.append(experts)
            experts = experts.base_layer
        routed = None
        if getattr(type(experts).forward, "_fusetune", False):
            routed = _routed(experts, x, args, kwargs)
        names = [_plain_adapter(w) for w in wrappers]
        params = [w.parameter_name for w in wrappers]
        plain = None not in names and len(set(params)) == len(params) <= 2
        if routed is None or not plain or not set(params) <= {"gate_up_proj", "down_proj"}:
            return original_forward(self, x, *args, **kwargs)
        lora_of = {w.parameter_name: _expert_factors(w, n, experts) for w, n in zip(wrappers, names, strict=True)}
        return ops.moe_experts(
            x,
            *routed,
            experts.gate_up_proj,
            experts.down_proj,
            lora_of.get("gate_up_proj"),
            lora_of.get("down_proj"),
        )

    forward._fusetune = True
    return forward


def _partial_rope(ops: Ops, q, k, cos, sin, unsqueeze_dim):
    rotary = cos.shape[-1]
    if rotary == q.shape[-1]:
        return ops.rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    q_rot, k_rot = ops.rope(q[..., :rotary], k[..., :rotary], cos, sin, unsqueeze_dim=unsqueeze_dim)
    return torch.cat([q_rot, q[..., rotary:]], dim=-1), torch.cat([k_rot, k[..., rotary:]], dim=-1)


def rope_function(ops: Ops):
    """``apply_rotary_pos_emb`` through ``ops.rope``, called as ``(q, k, cos, sin)`` or one tensor at a time
    as ``(x, cos, sin)`` (Gemma 4). Partial rotary (cos/sin narrower than the heads, as in Phi-3): the
    first ``cos.shape[-1]`` features of each head rotate and the rest pass through."""

    def apply_rotary_pos_emb(*args, position_ids=None, unsqueeze_dim=1):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        rest = args[len(tensors) :]
        unsqueeze_dim = rest[-1] if rest and isinstance(rest[-1], int) else unsqueeze_dim
        if len(tensors) == 3:
            x, cos, sin = tensors
            return _partial_rope(ops, x, x, cos, sin, unsqueeze_dim)[0]
        q, k, cos, sin = tensors
        return _partial_rope(ops, q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb


def logit_scale(config) -> float:
    """The scalar the model's head multiplies its logits by (Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``, Falcon-H1's ``lm_head_multiplier``); 1 for most models."""
    text = config.get_text_config()
    scale = 1.0
    for name, multiplies in LOGIT_SCALES.items():
        value = getattr(text, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale = scale * value if multiplies else scale / value
    return scale


@dataclass
class TokenStatsOutput(ModelOutput):
    """The loss, with the sums behind TRL's entropy and token-accuracy metrics (no per-token tensors). Where the
    router's logits are asked for, ``loss`` is the cross-entropy alone and ``aux_loss`` the unweighted
    load-balancing loss: the trainer weights it, as TRL's does."""

    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    num_correct: torch.Tensor | None = None
    num_valid: int | torch.Tensor | None = None  # a tensor with static_shapes=True


def _kept_rows(targets: torch.Tensor, static_shapes: bool) -> torch.Tensor:
    if static_shapes:
        return torch.arange(targets.numel(), device=targets.device)
    return find_kept_rows(targets, IGNORE_INDEX)


def router_aux_loss(model, original_forward, args, kwargs, router_logits):
    """The family's own load-balancing loss (its module's ``load_balancing_loss_func``) of ``router_logits``,
    over the tokens of the call's attention mask, as the model's own forward computes it; one line where the
    family has none fusetune can call."""
    text = model.config.get_text_config()
    function = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    experts = getattr(model, "num_experts", getattr(text, "num_experts", None))
    top_k = getattr(model, "num_experts_per_tok", getattr(text, "num_experts_per_tok", None))
    if function is None or experts is None or top_k is None:
        raise FusetuneError(
            f"kernels: the fused loss head cannot add {type(model).__name__}'s router load-balancing loss; "
            "set router_aux_loss_coef=0 or train without the loss kernel"
        )
    mask = inspect.signature(original_forward).bind_partial(model, *args, **kwargs).arguments.get("attention_mask")
    return function(router_logits, experts, top_k, mask)


def aux_loss_coef(model) -> float:
    """The weight the model's own forward gives its router's load-balancing loss."""
    return getattr(model, "router_aux_loss_coef", getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0))


def head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the fused loss head computes in: the half precision of the two. A trained lm_head may be an fp32
    master weight (QLoRA), and a model computing in fp32 under autocast hands fp32 hidden states to a half-precision
    head."""
    return hidden.dtype if hidden.dtype != torch.float32 else weight.dtype


def head_adapter(lm_head, hidden: torch.Tensor, dtype: torch.dtype):
    """PEFT LoRA on the lm_head as the fused loss's low-rank term: ``(lora_in, lora_b, bias)``, where
    lora_in @ lora_b.T = sum over the active adapters of s * dropout(hidden) @ A.T @ B.T, as PEFT's forward adds
    it (several active adapters are stacked along the rank); ``bias``: the head's bias plus any LoRA bias
    (s * B's bias), or None. ``(None, None, bias)`` where the head has no adapter in use: not a LoRA layer, adapters
    disabled (unmerged first, as PEFT does) or merged into the weight. DoRA and other variants: one line.
    Costs r values a token (lora_in); a LoRA dropout while training makes a dropped copy of the hidden states,
    as PEFT's forward does."""
    bias = None if lm_head.bias is None else lm_head.bias.to(dtype)
    if not isinstance(lm_head, BaseTunerLayer):  # an nn.Linear, or a ModulesToSaveWrapper: its weight is in use
        return None, None, bias
    if not hasattr(lm_head, "lora_A"):
        raise FusetuneError(
            f"kernels: the adapter on lm_head ({type(lm_head).__module__}.{type(lm_head).__name__}) is not LoRA, "
            "which the fused loss head does not compute; leave lm_head out of the adapter's target_modules"
        )
    if lm_head.disable_adapters:
        if lm_head.merged:
            lm_head.unmerge()
        return None, None, bias
    if lm_head.merged:
        return None, None, bias
    ins, bs = [], []
    for name in lm_head.active_adapters:
        if name not in lm_head.lora_A:
            continue
        if name in getattr(lm_head, "lora_variant", {}) or getattr(lm_head, "use_dora", {}).get(name, False):
            raise FusetuneError(
                f"kernels: LoRA adapter '{name}' on lm_head is DoRA or another LoRA variant, which the fused loss "
                "head does not compute; use plain LoRA on lm_head, or leave lm_head out of target_modules"
            )
        a, b, scale = lm_head.lora_A[name], lm_head.lora_B[name], lm_head.scaling[name]
        if a.bias is not None:
            raise FusetuneError(
                f"kernels: LoRA adapter '{name}' on lm_head has a bias on lora_A, which the fused loss head lacks"
            )
        # .to(dtype): under autocast the product comes out in autocast's dtype, whatever its inputs'
        ins.append((lm_head.lora_dropout[name](hidden) @ a.weight.to(dtype).t() * scale).to(dtype))
        bs.append(b.weight.to(dtype))
        if b.bias is not None:
            lora_bias = b.bias.to(dtype) * scale
            bias = lora_bias if bias is None else bias + lora_bias
    if not bs:
        return None, None, bias
    if len(bs) == 1:
        return ins[0], bs[0], bias
    return torch.cat(ins, dim=-1), torch.cat(bs, dim=1), bias


def causal_lm_forward(ops: Ops, original_forward):
    """The causal-LM forward with a fused loss head.

    Without labels (generation, logits for metrics) it is the original forward. With labels it
    runs the backbone and the fused linear cross-entropy, returning the loss without logits.
    With ``fused_lm_head=True`` (TRL 1.16's SFTTrainer) it returns TRL's FusedCausalLMOutput:
    per-token log-probabilities, entropy and top-1 hits from the same chunked pass. With
    ``token_stats=True`` (FastSFTTrainer) it returns the loss and the sums of those statistics.
    Where the router's logits are asked for (``output_router_logits``, else the config's), the family's
    load-balancing loss is added as the model's own forward adds it (``TokenStatsOutput``: returned apart).
    A PEFT LoRA adapter on the lm_head trains through the same pass (``head_adapter``): its two small
    products join each chunk's logits, so the head is W + s B A without a [tokens, vocab] tensor.

    The rows that carry a label are found before the backbone is queued: that costs a host sync,
    which here waits only for the inputs, not for the whole forward. With ``static_shapes=True``
    (CUDA graph captures, ``fusetune.sequences.graphs``) the loss head scores every row instead, unlabelled
    ones adding nothing, so the forward has no host sync and no data-dependent shape.
    """

    @functools.wraps(original_forward)
    def forward(
        self,
        *args,
        labels=None,
        shift_labels=None,
        fused_lm_head=False,
        token_stats=False,
        static_shapes=False,
        num_items_in_batch=None,
        **kwargs,
    ):
        if labels is None and shift_labels is None:
            return original_forward(self, *args, **kwargs)
        head = _head_inputs(self, original_forward, args, kwargs, labels, shift_labels, static_shapes)
        if fused_lm_head:
            return _fused_head_output(self, ops, head, num_items_in_batch)
        return _loss_output(self, ops, head, num_items_in_batch, token_stats, static_shapes)

    forward._fusetune = True
    return forward


@dataclass
class _HeadInputs:
    """What the fused loss head takes from the backbone: flat hidden states and the head in one dtype."""

    hidden: torch.Tensor  # [rows, hidden], logit-scaled
    weight: torch.Tensor
    targets: torch.Tensor  # [batch, positions], shifted
    kept: torch.Tensor | None  # the labelled rows (all rows under static shapes)
    options: dict  # bias, softcap, the lm_head adapter's terms
    aux: torch.Tensor | None  # the router's load-balancing loss, where asked for


def _head_inputs(model, original_forward, args, kwargs, labels, shift_labels, static_shapes) -> _HeadInputs:
    """Run the backbone (with the router's logits where they are asked for) and gather the loss head's inputs."""
    kwargs.pop("logits_to_keep", None)
    kwargs["use_cache"] = False
    lm_head = model.get_output_embeddings()
    targets = (labels[:, 1:] if shift_labels is None else shift_labels).to(lm_head.weight.device)
    kept = _kept_rows(targets, static_shapes)  # before the backbone is queued: its host sync waits for less
    router = kwargs.pop("output_router_logits", None)
    if router is None:
        router = getattr(model.config.get_text_config(), "output_router_logits", False)
    if router:
        kwargs["output_router_logits"] = True
    backbone_out = getattr(model, model.base_model_prefix)(*args, **kwargs)
    hidden = backbone_out.last_hidden_state
    aux = router_aux_loss(model, original_forward, args, kwargs, backbone_out.router_logits) if router else None
    if shift_labels is None:
        hidden = hidden[:, :-1]
    dtype = head_dtype(hidden, lm_head.weight)
    flat_hidden = hidden.reshape(-1, hidden.size(-1)).to(lm_head.weight.device, dtype)
    scale = logit_scale(model.config)
    if scale != 1.0:  # (s h) W^T = s (h W^T)
        flat_hidden = flat_hidden * scale
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    lora_in, lora_b, bias = head_adapter(lm_head, flat_hidden, dtype)
    options = dict(bias=bias, softcap=softcap, ignore_index=IGNORE_INDEX, lora_in=lora_in, lora_b=lora_b)
    return _HeadInputs(flat_hidden, lm_head.weight.to(dtype), targets, kept, options, aux)


def _loss_output(model, ops: Ops, head: _HeadInputs, num_items_in_batch, token_stats: bool, static_shapes: bool):
    """The loss (plus the router's, weighted as the model's own forward weighs it), or with ``token_stats`` the
    loss and the sums of entropy and top-1 hits."""
    out = ops.fused_linear_cross_entropy(
        head.hidden,
        head.weight,
        head.targets.reshape(-1),
        reduction="sum" if num_items_in_batch is not None else "mean",
        num_items_in_batch=num_items_in_batch,
        return_stats=token_stats,
        kept_rows=head.kept,
        **head.options,
    )
    aux = head.aux
    if not token_stats:
        if aux is None:
            return CausalLMOutputWithPast(loss=out, logits=None)
        return MoeCausalLMOutputWithPast(
            loss=out + aux_loss_coef(model) * aux.to(out.device), aux_loss=aux, logits=None
        )
    loss, entropy, is_top1 = out
    num_valid = (head.targets != IGNORE_INDEX).sum() if static_shapes else head.kept.numel()
    return TokenStatsOutput(
        loss=loss, aux_loss=aux, entropy_sum=entropy.sum(), num_correct=is_top1.sum(), num_valid=num_valid
    )


def _fused_head_output(model, ops: Ops, head: _HeadInputs, num_items_in_batch) -> FusedCausalLMOutput:
    """TRL's fused-head output: per-token log-probabilities, entropy and top-1 hits beside the loss."""
    per_token, entropy, is_top1 = ops.fused_linear_cross_entropy(
        head.hidden, head.weight, head.targets.reshape(-1), reduction="none", return_stats=True, kept_rows=head.kept,
        **head.options,
    )  # fmt: skip
    mask = head.targets != IGNORE_INDEX
    shape = head.targets.shape
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = per_token.sum() / count
    if head.aux is not None:  # as TRL's fused head adds it: the config's weight
        coef = getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0)
        loss = loss + coef * head.aux.to(loss.device)
    return FusedCausalLMOutput(
        loss=loss,
        aux_loss=head.aux,
        log_probs=-per_token.view(shape),
        entropy=entropy.view(shape),
        is_top1=is_top1.view(shape).bool(),
        label_mask=mask,
    )


def _plain_lora(layer, x, args, kwargs, base_type: type) -> str | None:
    """The one active adapter of a PEFT LoRA layer, when the call is plain LoRA on a ``base_type``; else None.

    Anything else (several or no active adapters, merged or disabled adapters, DoRA and other
    variants, a LoRA bias, dropout while training, per-example adapter names, another or a
    hooked base layer, fan_in_fan_out) keeps PEFT's own forward.
    """
    if args or kwargs or getattr(layer, "fan_in_fan_out", False):
        return None
    base = layer.base_layer
    if type(base) is not base_type or base._forward_hooks or base._forward_pre_hooks:
        return None
    if hasattr(base, "_hf_hook") or not x.is_floating_point():
        return None
    return _plain_adapter(layer)


def _plain_adapter(layer) -> str | None:
    """The one active adapter of a PEFT LoRA layer where it is plain LoRA (not merged or disabled, no DoRA or
    other variant, no LoRA bias, no dropout while training); else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    if getattr(layer, "use_dora", {}).get(name, False):
        return None
    if layer.lora_B[name].bias is not None or layer.lora_A[name].bias is not None:
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity) and (dropout.training and getattr(dropout, "p", 1.0) > 0):
        return None
    return name


def _refuse_unplain_fp8(layer) -> None:
    """A layer whose base went FP8 (``fusetune.fp8_base``) runs only the fused node: one line otherwise."""
    if getattr(layer.base_layer, "fusetune_fp8", None) is not None:
        raise FusetuneError(
            f"{fp8_base.KEY}: a LoRA call the fused node does not cover (LoRA dropout while training, DoRA, a "
            "LoRA bias, merged, disabled or several adapters) has no FP8 path; use model.lora.dropout=0 and plain LoRA"
        )


def lora_forward(ops: Ops, original_forward):
    """PEFT's LoRA Linear forward, as one fused node (``ops.lora_linear``) where the call is plain LoRA; a base
    held in FP8 (``fusetune.fp8_base``) enters the node as its FP8Weight."""

    @functools.wraps(original_forward)
    def forward(self, x, *args, **kwargs):
        name = _plain_lora(self, x, args, kwargs, torch.nn.Linear)
        if name is None:
            _refuse_unplain_fp8(self)
            return original_forward(self, x, *args, **kwargs)
        base = self.base_layer
        held = fp8_base.held_weight(base)
        return ops.lora_linear(
            x,
            base.weight if held is None else held,
            base.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            compute_output=not _output_unused.get(),
        )

    forward._fusetune = True
    return forward


def _nf4_weight(base) -> NF4Weight | None:
    """The bitsandbytes Linear4bit's weight as an NF4Weight (cached per quantization), or None if not NF4."""
    # bitsandbytes may requantize, or repack the bytes in place for its CPU kernels (in eval): key on both
    key = (id(getattr(base.weight, "quant_state", None)), base.weight.data_ptr(), base.weight.shape)
    key += (getattr(base.weight.quant_state, "packing_format_for_cpu", False),) if key[0] else ()
    cached = getattr(base, "_fusetune_nf4", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        weight = NF4Weight.from_bnb(base.weight)
    except ValueError:
        weight = None  # fp4, not yet quantized, or bitsandbytes' CPU layout: PEFT's own forward
    base._fusetune_nf4 = (key, weight)
    return weight


def lora_nf4_forward(ops: Ops, original_forward, linear4bit: type):
    """PEFT's LoRA forward over a bitsandbytes 4-bit base, as one fused node (``ops.lora_nf4_linear``):
    the NF4 weight is dequantized into a shared buffer in forward and again in backward, never saved."""

    @functools.wraps(original_forward)
    def forward(self, x, *args, **kwargs):
        name = _plain_lora(self, x, args, kwargs, linear4bit)
        weight = None if name is None else _nf4_weight(self.base_layer)
        if weight is None:
            _refuse_unplain_fp8(self)
            return original_forward(self, x, *args, **kwargs)
        return ops.lora_nf4_linear(
            x,
            weight,
            self.base_layer.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            compute_output=not _output_unused.get(),
            fp8=getattr(self.base_layer, "fusetune_fp8", None) == fp8_base.NF4_TO_FP8,
        )

    forward._fusetune = True
    return forward


def skip_trl_fused_head(trl_add_fused_lm_head):
    """TRL's add_fused_lm_head, which steps aside for a model whose forward is already ours."""

    @functools.wraps(trl_add_fused_lm_head)
    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, **kwargs):
        ours = getattr(type(model).forward, "_fusetune", False)
        if ours and temperature == 1.0 and not cast_lm_head_to_fp32:
            return None
        return trl_add_fused_lm_head(
            model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, **kwargs
        )

    return add_fused_lm_head
