"""FastSFTConfig and FastSFTTrainer: TRL's SFT classes with fusetune's kernels and defaults.

- precision from the hardware when neither bf16 nor fp16 is set (bf16, else fp16 on GPU; fp32 on CPU);
- the kernels backend (``kernels``: auto | triton | reference) is applied to the model;
- padding-free batches by default where that is safe, and the reason logged where it is not;
- ``embedding_learning_rate``: trainable embed_tokens/lm_head weights get their own optimizer group;
  biases and norm weights get no weight decay;
- TRL's older names still work: ``tokenizer=`` for ``processing_class=``, ``max_seq_length=`` for ``max_length=``.
"""

import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from trl import SFTConfig, SFTTrainer

from .errors import FusetuneError
from .models import pick_dtype
from .patching import active_backends, apply_kernels, family_of
from .varlen import enable_varlen_attention

log = logging.getLogger(__name__)
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
# Model types where padding-free batching is known to give wrong results.
PADDING_FREE_BLOCKLIST = {"mllama", "gemma3n", "qwen2_vl", "qwen2_5_vl"}
SFT_DEFAULT_MAX_LENGTH = SFTConfig.__dataclass_fields__["max_length"].default


def hardware_precision() -> tuple[bool, bool]:
    """(bf16, fp16): bf16 where supported, fp16 on older GPUs, neither on CPU."""
    dtype = pick_dtype("auto")
    return dtype == torch.bfloat16, dtype == torch.float16


@dataclass
class FastSFTConfig(SFTConfig):
    embedding_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate for trainable embed_tokens and lm_head weights; null: learning_rate."},
    )
    kernels: str = field(default="auto", metadata={"help": "auto | triton | reference"})
    max_seq_length: int | None = field(default=None, metadata={"help": "Older name of max_length."})
    padding_free: bool | None = field(
        default=None, metadata={"help": "None: on where it is safe (the trainer logs its choice)."}
    )

    def __post_init__(self):
        if self.max_seq_length is not None:
            warnings.warn(
                "max_seq_length is TRL's older name for max_length; using it as max_length", FutureWarning, stacklevel=3
            )
            self.max_length = self.max_seq_length
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


def padding_free_blocker(model, data_collator, processing_class) -> str | None:
    """Why padding-free batching would be unsafe here, or None when it is safe."""
    config = model.config
    if data_collator is not None:
        return "a custom data collator is given"
    if getattr(config, "vision_config", None) is not None or hasattr(processing_class, "image_processor"):
        return "vision-language model"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    if config.model_type in PADDING_FREE_BLOCKLIST:
        return f"model type '{config.model_type}' is on the padding-free blocklist"
    return None


class FastSFTTrainer(SFTTrainer):
    def __init__(self, model, args=None, data_collator=None, *pos, tokenizer=None, processing_class=None, **kwargs):
        if tokenizer is not None:
            if processing_class is not None and processing_class is not tokenizer:
                raise FusetuneError("FastSFTTrainer: give either tokenizer= or processing_class=, not both")
            warnings.warn("tokenizer= is TRL's older name for processing_class=", FutureWarning, stacklevel=2)
            processing_class = tokenizer
        if args is None:
            args = FastSFTConfig(output_dir="outputs/trainer")
        elif not isinstance(args, FastSFTConfig):
            args = FastSFTConfig(
                **{
                    k: v
                    for k, v in args.to_dict().items()
                    if k in FastSFTConfig.__dataclass_fields__ and not k.startswith("_")
                }
            )
        self._truncate_to = None
        if not isinstance(model, str):
            # auto means triton on CUDA; a run forced onto the CPU gets the reference twins
            backend = "reference" if args.kernels == "auto" and args.use_cpu else args.kernels
            self._apply_kernels(model, backend)
            model_max = getattr(model, "max_seq_length", None)  # set by FastModel.from_pretrained
            if model_max and args.max_seq_length is None and args.max_length == SFT_DEFAULT_MAX_LENGTH:
                args.max_length = model_max
            if args.padding_free is None:
                args.padding_free = self._decide_padding_free(model, args, data_collator, processing_class)
                if args.padding_free and args.max_length is not None:
                    # TRL refuses padding-free with max_length, as its collator cannot truncate; we truncate
                    # while preparing the dataset instead (see _prepare_dataset).
                    self._truncate_to, args.max_length = args.max_length, None
            if args.padding_free or args.packing:
                log.info("attention for packed rows: %s", enable_varlen_attention(model))
        try:
            super().__init__(model, args, data_collator, *pos, processing_class=processing_class, **kwargs)
        finally:
            if self._truncate_to is not None:
                args.max_length = self._truncate_to

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if self._truncate_to is None:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        args.max_length = self._truncate_to
        try:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        finally:
            args.max_length = None

    @staticmethod
    def _apply_kernels(model, backend: str) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        applied = getattr(base, "fusetune_kernels", None)
        if applied is not None and active_backends().get(base.config.model_type) == applied:
            return  # already applied (by FastModel, run() or the user) and still in place
        try:
            family_of(base)
        except FusetuneError:
            if backend != "auto":
                raise
            log.warning(
                "kernels=auto: %s is not a supported family; training with its own modules", base.config.model_type
            )
            return
        apply_kernels(base, backend)

    @staticmethod
    def _decide_padding_free(model, args, data_collator, processing_class) -> bool:
        if args.packing:
            return False  # packing decides on its own (BFD packing is padding-free already)
        reason = padding_free_blocker(model, data_collator, processing_class)
        if reason:
            log.info("padding-free batching off: %s", reason)
            return False
        log.info("padding-free batching on")
        return True

    def create_optimizer(self, model=None):
        embedding_lr = getattr(self.args, "embedding_learning_rate", None)
        if embedding_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = parameter_groups(
            opt_model, set(self.get_decay_parameter_names(opt_model)), self.args.weight_decay, embedding_lr
        )
        if not any(g.get("lr") == embedding_lr for g in groups):
            warnings.warn(
                f"embedding_learning_rate={embedding_lr} is set, but no full embed_tokens/lm_head weight is trainable "
                "(list them in modules_to_save, not target_modules): it has no effect",
                stacklevel=2,
            )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        if "bitsandbytes" in str(optimizer_cls) and optimizer_kwargs.get("optim_bits") == 8:
            self._keep_embedding_states_32bit(opt_model)
        return self.optimizer

    @staticmethod
    def _keep_embedding_states_32bit(model) -> None:
        """bitsandbytes' advice: 8-bit optimizer states lose too much on embeddings; keep those in 32 bits."""
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
