"""FastSFTConfig and FastSFTTrainer: TRL's SFT classes with fusetune's kernels and defaults.

- precision from the hardware when neither bf16 nor fp16 is set (bf16, else fp16 on GPU; fp32 on CPU
  or with ``use_cpu``);
- the kernels backend (``kernels``: auto | triton | reference) is applied to the model;
- padding-free batches by default where that is safe, and the reason logged where it is not;
- ``embedding_learning_rate``: trainable embed_tokens/lm_head weights get their own optimizer group;
  biases and norm weights get no weight decay;
- older spellings still work, with a FutureWarning (the table is ``fusetune.compat.renames``): trainer
  keywords that TRL moved into SFTConfig (``dataset_text_field=``, ``max_seq_length=``, ``packing=`` ...),
  ``tokenizer=`` for ``processing_class=``, and renamed or removed TrainingArguments fields
  (``evaluation_strategy``, ``warmup_ratio``, ``logging_dir`` ...);
- a config that asks for bf16 or fp16 on a host without CUDA trains in fp32 on the CPU, with one warning;
- no host syncs in a step that are not needed: on a patched model the loss and TRL's metrics
  (entropy, mean_token_accuracy, num_tokens) come from one fused pass and stay on the GPU until
  the trainer logs, and ``logging_nan_inf_filter`` is off by default (it reads the loss on the host
  every step; with it off a NaN loss shows in the log instead of being averaged away);
- ``cuda_graphs``: padding-free steps on one GPU replay CUDA graphs of the forward and backward
  (``fusetune.graphs``), so a step of a few thousand tokens is not bound by the host's eager
  launches. None (the default): on where safe, else off with the reason logged; True: an error
  where impossible; False: eager steps;
- on CUDA, batches are copied to the GPU without a host wait (accelerate's ``non_blocking``, from
  pinned memory), so the host can prepare the next step while the GPU runs this one.
"""

import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedType
from torch import nn
from trl import SFTConfig, SFTTrainer

from . import precision
from .compat.renames import accepts_older_names, merge_into_config, pop_trainer_keywords
from .errors import FusetuneError
from .graphs import StepGraphs
from .loading import pick_dtype
from .modules import EMBEDDINGS, base_model, is_quantized
from .patching import apply_kernels, is_applied
from .varlen import VARLEN, enable_varlen_attention, varlen_kernel_available

log = logging.getLogger(__name__)
# Model types where padding-free batching is known to give wrong results.
PADDING_FREE_BLOCKLIST = {"mllama", "gemma3n", "qwen2_vl", "qwen2_5_vl"}
SFT_DEFAULT_MAX_LENGTH = SFTConfig.__dataclass_fields__["max_length"].default


def hardware_precision() -> tuple[bool, bool]:
    """(bf16, fp16): bf16 where supported, fp16 on older GPUs, neither on CPU."""
    dtype = pick_dtype("auto")
    return dtype == torch.bfloat16, dtype == torch.float16


@accepts_older_names
@dataclass
class FastSFTConfig(SFTConfig):
    embedding_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate for trainable embed_tokens and lm_head weights; null: learning_rate."},
    )
    kernels: str = field(default="auto", metadata={"help": "auto | triton | reference"})
    logging_dir: str | None = field(
        default=None,
        metadata={"help": "TensorBoard log folder (transformers 5 reads TENSORBOARD_LOGGING_DIR instead)."},
    )
    padding_free: bool | None = field(
        default=None, metadata={"help": "None: on where it is safe (the trainer logs its choice)."}
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Replace NaN/inf step losses in the logged loss (costs a host sync per step)."},
    )
    cuda_graphs: bool | None = field(
        default=None,
        metadata={
            "help": "Replay padding-free steps as CUDA graphs (an error where that is impossible); "
            "None: on where it is safe, with the choice logged."
        },
    )

    def __post_init__(self):
        half = [name for name in ("bf16", "fp16") if getattr(self, name)]
        if half and not torch.cuda.is_available():
            warnings.warn(f"{half[0]}=True, but there is no CUDA GPU: training in fp32 on the CPU", stacklevel=4)
            self.bf16, self.fp16 = False, False
        if self.bf16 is None and not self.fp16:
            self.bf16, self.fp16 = (False, False) if self.use_cpu else hardware_precision()
        on_gpu = torch.cuda.is_available() and not self.use_cpu
        if self.accelerator_config is None and self.dataloader_pin_memory and on_gpu:
            # a blocking copy waits for the GPU to finish the previous step; this one does not
            self.accelerator_config = {"non_blocking": True}
        super().__post_init__()


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


@dataclass
class _StepStats:
    """One micro-batch's metric sums, left on the device until the trainer logs."""

    entropy_sum: torch.Tensor
    num_correct: torch.Tensor
    num_valid: int | torch.Tensor
    num_tokens: int | torch.Tensor  # 0 in eval


def _number(value) -> float:
    """A count known on the host, or 0 where it is still a device tensor (filled in on the device)."""
    return 0.0 if isinstance(value, torch.Tensor) else float(value)


FLUSH_EVERY = 256  # micro-batches of pending metrics before they are read anyway (when logging is rare)


class FastSFTTrainer(SFTTrainer):
    def __init__(self, model, args=None, data_collator=None, *pos, tokenizer=None, processing_class=None, **kwargs):
        if tokenizer is not None:
            if processing_class is not None and processing_class is not tokenizer:
                raise FusetuneError("FastSFTTrainer: give either tokenizer= or processing_class=, not both")
            warnings.warn("tokenizer= is TRL's older name for processing_class=", FutureWarning, stacklevel=2)
            processing_class = tokenizer
        moved = pop_trainer_keywords(kwargs, type(self).__name__)
        args = self._fast_config(args)
        merge_into_config(args, moved, type(self).__name__)
        self._truncate_to = None
        self._pending_stats: dict[str, list[_StepStats]] = defaultdict(list)
        if not isinstance(model, str):
            if not is_applied(model):  # by FastModel, run() or the user: left as it is
                apply_kernels(model, args.kernels, on_cuda=torch.cuda.is_available() and not args.use_cpu)
            model_max = getattr(model, "max_seq_length", None)  # set by FastModel.from_pretrained
            if model_max and args.max_length == SFT_DEFAULT_MAX_LENGTH:
                args.max_length = model_max
            if args.padding_free is None:
                args.padding_free = self._decide_padding_free(model, args, data_collator, processing_class)
            if args.padding_free and not args.packing and args.max_length is not None:
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
        if is_quantized(self.model):  # TRL has cast the trainable weights to bf16
            precision.fp32_master_weights(self.model)
            precision.hidden_states_in(self.model, precision.compute_dtype(self.model))
        self.step_graphs: StepGraphs | None = None  # made at the first training step (after any resume)
        self._graphs_wanted = self._want_step_graphs()
        if args.logging_dir is not None:
            self._set_tensorboard_dir(args.logging_dir)

    @staticmethod
    def _fast_config(args) -> "FastSFTConfig":
        """``args`` as a FastSFTConfig: a default one, or one built from plain TrainingArguments."""
        if args is None:
            return FastSFTConfig(output_dir="outputs/trainer")
        if isinstance(args, FastSFTConfig):
            return args
        fields = FastSFTConfig.__dataclass_fields__
        return FastSFTConfig(**{k: v for k, v in args.to_dict().items() if k in fields and not k.startswith("_")})

    def _set_tensorboard_dir(self, folder: str) -> None:
        """Point the TensorBoard callback at ``logging_dir`` (transformers 5 dropped that field)."""
        from transformers.integrations import TensorBoardCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback):
                if callback.logging_dir not in (None, folder):
                    raise FusetuneError(
                        f"logging_dir={folder!r} disagrees with TENSORBOARD_LOGGING_DIR={callback.logging_dir!r}"
                    )
                callback.logging_dir = folder

    def cuda_graph_blocker(self) -> str | None:
        """Why padding-free steps cannot be replayed as CUDA graphs here, or None."""
        args, model = self.args, self.model
        base = base_model(model)
        if args.use_cpu or not torch.cuda.is_available():
            return "no CUDA"
        if next(model.parameters()).device.type != "cuda":
            return "the model is not on CUDA"
        if self.accelerator.num_processes > 1 or self.accelerator.distributed_type != DistributedType.NO:
            return "distributed training (its gradient hooks run in an eager backward)"
        if not (args.padding_free or args.packing):
            return "batches are padded, not padding-free"
        if base.config._attn_implementation != VARLEN or not varlen_kernel_available():
            return "the CUDA varlen attention kernel is not in use"
        if not self._uses_token_stats(model):
            return "the loss is not fusetune's fused loss head"
        if is_quantized(base):
            return "the base weights are quantized"
        if args.torch_compile or getattr(args, "activation_offloading", False):
            return "torch_compile or activation offloading is on"
        return None

    def _want_step_graphs(self) -> bool:
        if self.args.cuda_graphs is False:
            return False
        reason = self.cuda_graph_blocker()
        if reason is not None:
            if self.args.cuda_graphs:
                raise FusetuneError(f"cuda_graphs=True: not possible here: {reason}")
            log.info("cuda graphs off: %s", reason)
            return False
        log.info("cuda graphs on: padding-free steps replay captured graphs (rows padded to buckets, < 12.5%)")
        return True

    def _graphed_step(self, model, inputs, num_items_in_batch):
        """The step from CUDA graph replays, or None where it runs eagerly."""
        if self.step_graphs is None:
            if not self._graphs_wanted:
                return None
            # made here, not in __init__: a resumed run has loaded its checkpoint by now, and the
            # graphs must read the parameters that train
            pad = getattr(self.processing_class, "pad_token_id", None)
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.step_graphs = StepGraphs(params, pad if pad is not None else 0)
        return self.step_graphs.run(model, inputs, num_items_in_batch)

    def _uses_token_stats(self, model) -> bool:
        """Whether compute_loss can take the fused loss and metric sums from our forward (else TRL's own)."""
        base = self.accelerator.unwrap_model(model)
        base = base_model(base)
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return (
            getattr(type(base).forward, "_fusetune", False)
            and self.compute_loss_func is None
            and self.label_smoother is None
            and self.args.loss_type == "nll"
            and not self.aux_loss_enabled
            and not self.args.use_liger_kernel
            and not getattr(parallelism, "sp_enabled", False)
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss (token mean, or sum over ``num_items_in_batch``) and metrics, without host syncs.

        TRL's own compute_loss reads entropy, accuracy and token counts on the host every micro-batch,
        which stalls the CPU at the end of each forward until the GPU catches up. Here the sums stay on
        the device and ``log`` reads them all at once.
        """
        if return_outputs or not self._uses_token_stats(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        training = mode == "train" and torch.is_grad_enabled()
        out = self._graphed_step(model, inputs, num_items_in_batch) if training else None
        if out is None:
            out = model(**{**inputs, "use_cache": False}, token_stats=True, num_items_in_batch=num_items_in_batch)
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages gradients
        tokens = 0
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                tokens = inputs["position_ids"].size(1)
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        pending = self._pending_stats[mode]
        pending.append(_StepStats(out.entropy_sum, out.num_correct, out.num_valid, tokens))
        if len(pending) >= FLUSH_EVERY:
            self._flush_token_stats()
        return loss

    def _flush_token_stats(self) -> None:
        """Move the pending sums into TRL's metric lists: one host read (and one all-reduce) for all of them."""
        for mode, pending in self._pending_stats.items():
            if not pending:
                continue
            device = pending[0].entropy_sum.device
            table = torch.tensor(
                [[0.0, 0.0, _number(p.num_valid), _number(p.num_tokens)] for p in pending],
                dtype=torch.float64,
                device=device,
            )
            table[:, 0] = torch.stack([p.entropy_sum for p in pending])
            table[:, 1] = torch.stack([p.num_correct for p in pending])
            for column, field_name in ((2, "num_valid"), (3, "num_tokens")):
                # still on the device: graphed steps' label counts, padded batches' attention_mask sums
                on_device = [i for i, p in enumerate(pending) if isinstance(getattr(p, field_name), torch.Tensor)]
                if on_device:
                    table[on_device, column] = torch.stack(
                        [getattr(pending[i], field_name) for i in on_device]
                    ).double()
            pending.clear()
            for entropy_sum, correct, n_valid, tokens in self.accelerator.reduce(table, reduction="sum").tolist():
                self._metrics[mode]["entropy"].append(entropy_sum / n_valid if n_valid > 0 else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append(correct / n_valid if n_valid > 0 else 0.0)
                self._total_train_tokens += int(tokens) // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush_token_stats()
        super().log(logs, start_time)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if self._truncate_to is None:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        args.max_length = self._truncate_to
        try:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        finally:
            args.max_length = None

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
