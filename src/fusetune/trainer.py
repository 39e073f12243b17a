"""FastSFTConfig and FastSFTTrainer: TRL's SFT classes with fusetune's defaults.

- precision from the hardware when neither bf16 nor fp16 is set;
- ``embedding_learning_rate``: trainable embed_tokens/lm_head weights get their own optimizer group;
- weight decay on everything but biases and norm weights.
"""

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from trl import SFTConfig, SFTTrainer

log = logging.getLogger(__name__)
EMBEDDING_MODULES = ("embed_tokens", "lm_head")


def hardware_precision() -> tuple[bool, bool]:
    """(bf16, fp16): bf16 where supported, fp16 on older GPUs, neither on CPU."""
    if not torch.cuda.is_available():
        return False, False
    bf16 = torch.cuda.is_bf16_supported()
    return bf16, not bf16


@dataclass
class FastSFTConfig(SFTConfig):
    embedding_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate for trainable embed_tokens and lm_head weights; null: learning_rate."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self.bf16, self.fp16 = hardware_precision()
        super().__post_init__()


def is_embedding_parameter(name: str) -> bool:
    """A full embed_tokens/lm_head weight (or its PEFT modules_to_save copy), not a LoRA factor on it."""
    parts = name.split(".")
    return any(module in parts for module in EMBEDDING_MODULES) and not any(p.startswith("lora_") for p in parts)


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


class FastSFTTrainer(SFTTrainer):
    def create_optimizer(self, model=None):
        embedding_lr = getattr(self.args, "embedding_learning_rate", None)
        if embedding_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = parameter_groups(
            opt_model, set(self.get_decay_parameter_names(opt_model)), self.args.weight_decay, embedding_lr
        )
        if not any(g.get("lr") == embedding_lr for g in groups):
            log.warning(
                "embedding_learning_rate=%s is set, but no embed_tokens/lm_head weight is trainable; "
                "add them to modules_to_save (LoRA) to train them",
                embedding_lr,
            )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer
