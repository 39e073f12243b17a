"""The optimizer's parameter groups: embeddings at their own learning rate, no weight decay on biases and norms.

- ``is_embedding_parameter(name)``: a full embed_tokens/lm_head weight (or its PEFT ``modules_to_save``
  copy), not a LoRA factor on one;
- ``parameter_groups(model, decay_names, weight_decay, embedding_lr)``: decayed, not decayed, and
  embeddings at ``embedding_lr``;
- ``optimizer_with_embedding_lr(...)``: the optimizer over those groups, warning where no embedding
  trains; with bitsandbytes' 8-bit optimizers, embeddings keep 32-bit states
  (``keep_embedding_states_32bit``).
"""

import warnings

from torch import nn

from ..modules import EMBEDDINGS


def is_embedding_parameter(name: str) -> bool:
    """A full embed_tokens/lm_head weight (or its PEFT modules_to_save copy), not a LoRA factor on it."""
    parts = name.split(".")
    return any(module in parts for module in EMBEDDINGS) and not any(p.startswith("lora_") for p in parts)


def parameter_groups(model: nn.Module, decay_names: set[str], weight_decay: float, embedding_lr: float | None):
    """Optimizer groups: decayed, not decayed (biases, norms), and embeddings at their own learning rate."""
    decay, no_decay, embeddings = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if embedding_lr is not None and is_embedding_parameter(name):
            embeddings.append(param)
        elif name in decay_names:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if embeddings:
        groups.append({"params": embeddings, "weight_decay": weight_decay, "lr": embedding_lr})
    return [g for g in groups if g["params"]]


def optimizer_with_embedding_lr(
    model: nn.Module,
    decay_names: set[str],
    weight_decay: float,
    embedding_lr: float,
    optimizer_cls: type,
    optimizer_kwargs: dict,
):
    """``optimizer_cls`` over ``parameter_groups``: what the trainer's optimizer is with ``embedding_learning_rate``."""
    groups = parameter_groups(model, decay_names, weight_decay, embedding_lr)
    if not any(g.get("lr") == embedding_lr for g in groups):
        warnings.warn(
            f"embedding_learning_rate={embedding_lr} is set, but no full embed_tokens/lm_head weight is trainable "
            "(list them in modules_to_save, not target_modules): it has no effect",
            stacklevel=3,
        )
    optimizer = optimizer_cls(groups, **optimizer_kwargs)
    if "bitsandbytes" in str(optimizer_cls) and optimizer_kwargs.get("optim_bits") == 8:
        keep_embedding_states_32bit(model)
    return optimizer


def keep_embedding_states_32bit(model: nn.Module) -> None:
    """bitsandbytes' advice: 8-bit optimizer states lose too much on embeddings; keep those in 32 bits."""
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
