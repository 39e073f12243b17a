"""FastSFTConfig and FastSFTTrainer: TRL's SFT classes with fusetune's kernels and defaults.

- precision from the hardware when neither bf16 nor fp16 is set (bf16, else fp16 on GPU; fp32 on CPU
  or with ``use_cpu``);
- the kernels backend (``kernels``: auto | triton | reference) is applied to the model;
- padding-free batches by default where that is safe, and the reason logged where it is not; ``packing`` or
  ``padding_free`` on a model whose own layers would mix the documents of a row
  (``fusetune.sequences.packed_sequences``: convolutions, state-space scans, linear attention without a
  boundary-reading kernel) is an error;
- ``embedding_learning_rate``: trainable embed_tokens/lm_head weights get their own optimizer group;
  biases and norm weights get no weight decay (``fusetune.training.optim``);
- older spellings still work, with a FutureWarning (the table is ``fusetune.compat.renames``): trainer
  keywords that TRL moved into SFTConfig (``dataset_text_field=``, ``max_seq_length=``, ``packing=`` ...),
  ``tokenizer=`` for ``processing_class=``, and renamed or removed TrainingArguments fields
  (``evaluation_strategy``, ``warmup_ratio``, ``logging_dir`` ...);
- a config that asks for bf16 or fp16 on a host without CUDA trains in fp32 on the CPU, with one warning;
- no host syncs in a step that are not needed: on a patched model the loss and TRL's metrics
  (entropy, mean_token_accuracy, num_tokens) come from one fused pass and stay on the GPU until
  the trainer logs (``fusetune.training.token_stats``), and ``logging_nan_inf_filter`` is off by default (it
  reads the loss on the host every step; with it off a NaN loss shows in the log instead of being
  averaged away). ``fused_loss``: None (the default): wherever the fused pass computes TRL's loss
  (``fused_loss_blocker``), else TRL's own compute_loss; False: TRL's compute_loss always; True: an
  error where it cannot;
- ``cuda_graphs``: padding-free steps on one GPU replay CUDA graphs of the forward and backward
  (``fusetune.sequences.graphs``), so a step of a few thousand tokens is not bound by the host's eager
  launches. None (the default): on where safe (``cuda_graph_blocker``), else off with the reason
  logged; True: an error where impossible; False: eager steps;
- on CUDA, batches are copied to the GPU without a host wait (accelerate's ``non_blocking``, from
  pinned memory), so the host can prepare the next step while the GPU runs this one.
"""

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedType
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from .. import fp8_base, limits, precision
from ..compat.renames import accepts_older_names, merge_into_config, pop_trainer_keywords
from ..compat.trl import PrepareDatasetHook, head_adapter_allowed
from ..data.cache import DatasetCacheHook
from ..errors import FusetuneError
from ..families import is_experts
from ..loading import pick_dtype
from ..modules import base_model, is_quantized
from ..patching import apply_kernels, is_applied
from ..sequences.graphs import StepGraphs
from ..sequences.packed_sequences import packing_blocker
from ..sequences.varlen import VARLEN, enable_varlen_attention, varlen_kernel_available
from .faults import NAN_POLICIES
from .guards import GuardedTrainer
from .optim import optimizer_with_embedding_lr
from .token_stats import StepStats, TokenStats, batch_tokens

log = logging.getLogger(__name__)
# Model types where padding-free batching is known to give wrong results.
PADDING_FREE_BLOCKLIST = {"mllama", "gemma3n", "qwen2_vl", "qwen2_5_vl"}
SFT_DEFAULT_MAX_LENGTH = SFTConfig.__dataclass_fields__["max_length"].default


def hardware_precision() -> tuple[bool, bool]:
    """(bf16, fp16): bf16 where supported, fp16 on older GPUs, neither on CPU."""
    dtype = pick_dtype("auto")
    return dtype == torch.bfloat16, dtype == torch.float16


def settle_precision(args) -> None:
    """bf16/fp16 from the hardware where neither is set; a half precision asked for without CUDA becomes fp32
    on the CPU, with one warning. Called before TRL's __post_init__ (which would turn bf16=None into True)."""
    half = [name for name in ("bf16", "fp16") if getattr(args, name)]
    if half and not torch.cuda.is_available():
        warnings.warn(f"{half[0]}=True, but there is no CUDA GPU: training in fp32 on the CPU", stacklevel=5)
        args.bf16, args.fp16 = False, False
    if args.bf16 is None and not args.fp16:
        args.bf16, args.fp16 = (False, False) if args.use_cpu else hardware_precision()


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
    nan_policy: str = field(
        default="stop",
        metadata={
            "help": "A non-finite loss or gradient: stop (checked at each log and save, no extra host reads; "
            "the last good checkpoint stays the newest) or skip (that step changes nothing, counted in "
            "skipped_steps; one host read a step)."
        },
    )
    max_skipped_fraction: float = field(
        default=0.1,
        metadata={
            "help": "nan_policy=skip: the run has diverged, and stops as failed, when more than this share of its "
            "steps were skipped (judged once 10 steps have run)."
        },
    )
    max_skipped_in_a_row: int = field(
        default=3,
        metadata={
            "help": "nan_policy=skip: the run has diverged, and stops as failed, at this many skipped steps in a row."
        },
    )
    fused_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Take the loss and TRL's entropy / mean_token_accuracy / num_tokens from fusetune's fused "
            "loss head, kept on the device until the trainer logs. None: wherever that computes TRL's loss "
            "(a patched model; no compute_loss_func, label smoothing, router aux loss, Liger kernel or sequence "
            "parallelism; loss_type nll), else TRL's own compute_loss; False: always TRL's compute_loss (its "
            "metrics read on the host every step; no CUDA graphs); True: an error where it does not apply."
        },
    )

    def __post_init__(self):
        limits.refuse(self, limits.TRAINER)  # one line, not a ZeroDivisionError mid-run
        settle_precision(self)
        on_gpu = torch.cuda.is_available() and not self.use_cpu
        if self.accelerator_config is None and self.dataloader_pin_memory and on_gpu:
            # a blocking copy waits for the GPU to finish the previous step; this one does not
            self.accelerator_config = {"non_blocking": True}
        if self.nan_policy not in NAN_POLICIES:
            raise FusetuneError(f"nan_policy: expected one of {', '.join(NAN_POLICIES)}, got {self.nan_policy!r}")
        if self.nan_policy == "skip":  # a skipped step's NaN loss stays out of the logged mean
            self.logging_nan_inf_filter = True
        super().__post_init__()


def check_sft_columns(dataset, text_field: str, dataset_name: str | None) -> None:
    """One line naming the columns TRL can train on, where the dataset has none of them (TRL: KeyError)."""
    columns = set(getattr(dataset, "column_names", None) or [])
    if not columns:  # an IterableDataset without features: TRL finds out itself
        return
    usable = [{text_field}, {"messages"}, {"prompt", "completion"}, {"input_ids"}]
    if not any(group <= columns for group in usable):
        name = f"{dataset_name} dataset" if dataset_name else "dataset"
        raise FusetuneError(
            f"the {name} has columns {sorted(columns)}, none that SFT trains on: give '{text_field}' "
            "(dataset_text_field), 'messages', 'prompt' and 'completion', or 'input_ids'; or a formatting_func"
        )


def as_fast_config(args, config_class: type | None = None):
    """``args`` as a ``config_class`` (default FastSFTConfig): a default one, or one built from another config or
    plain TrainingArguments (the fields the class has)."""
    config_class = config_class or FastSFTConfig
    if args is None:
        return config_class(output_dir="outputs/trainer")
    if isinstance(args, config_class):
        return args
    fields = config_class.__dataclass_fields__
    return config_class(**{k: v for k, v in args.to_dict().items() if k in fields and not k.startswith("_")})


class SettledPrecision:
    """A mixin for TRL's config classes: the precision settled (``settle_precision``) before TRL's __post_init__."""

    def __post_init__(self):
        settle_precision(self)
        super().__post_init__()


def padding_free_blocker(model, data_collator, processing_class, device=None) -> str | None:
    """Why padding-free batching would be unsafe here, or None when it is safe. ``device``: where training runs."""
    config = model.config
    if data_collator is not None:
        return "a custom data collator is given"
    if getattr(config, "vision_config", None) is not None or hasattr(processing_class, "image_processor"):
        return "vision-language model"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    if config.model_type in PADDING_FREE_BLOCKLIST:
        return f"model type '{config.model_type}' is on the padding-free blocklist"
    return packing_blocker(model, device)


def choose_padding_free(model, args, data_collator, processing_class) -> bool:
    """``padding_free=None`` decided: on where it is safe, with the reason logged where it is not."""
    if args.packing:
        return False  # packing decides on its own (BFD packing is padding-free already)
    reason = padding_free_blocker(model, data_collator, processing_class, args.device)
    if reason:
        log.info("padding-free batching off: %s", reason)
        return False
    log.info("padding-free batching on")
    return True


def refuse_mixed_documents(model, args) -> None:
    """One line, where ``packing`` or ``padding_free`` is on and the model's own layers would mix the documents
    of a row. TRL's wrapped packing is left alone: its rows cross documents by design, in attention too."""
    if args.padding_free:
        key = "padding_free"
    elif args.packing and args.packing_strategy != "wrapped":
        key = "packing"
    else:
        return
    reason = packing_blocker(model, args.device)
    if reason is not None:
        raise FusetuneError(f"{key}=True: {reason}; set {key}=False (the app: trainer.{key}=false)")


def fused_loss_blocker(trainer, model) -> str | None:
    """Why compute_loss cannot take TRL's loss and metrics from fusetune's fused loss head here, or None.

    ``model`` is the one compute_loss is given (maybe wrapped by accelerate, DDP or PEFT)."""
    base = base_model(trainer.accelerator.unwrap_model(model))
    args = trainer.args
    if not getattr(type(base).forward, "_fusetune", False):
        return "the model's forward is not fusetune's (no kernels backend, or its loss op is off)"
    if trainer.compute_loss_func is not None:
        return "a compute_loss_func is given"
    if trainer.label_smoother is not None:
        return "label smoothing is on"
    if args.loss_type != "nll":
        return f"loss_type={args.loss_type!r} (the fused loss head computes nll)"
    if args.use_liger_kernel:
        return "use_liger_kernel is on"
    if getattr(getattr(trainer.accelerator, "parallelism_config", None), "sp_enabled", False):
        return "sequence parallelism is on"
    return None


def cuda_graph_blocker(trainer) -> str | None:
    """Why padding-free steps cannot be replayed as CUDA graphs here, or None."""
    args, model = trainer.args, trainer.model
    base = base_model(model)
    if args.use_cpu or not torch.cuda.is_available():
        return "no CUDA"
    if next(model.parameters()).device.type != "cuda":
        return "the model is not on CUDA"
    accelerator = trainer.accelerator
    if accelerator.num_processes > 1 or accelerator.distributed_type != DistributedType.NO:
        return "distributed training (its gradient hooks run in an eager backward)"
    if not (args.padding_free or args.packing):
        return "batches are padded, not padding-free"
    if base.config._attn_implementation != VARLEN or not varlen_kernel_available():
        return "the CUDA varlen attention kernel is not in use"
    if args.fused_loss is False:
        return "the loss is not fusetune's fused loss head (fused_loss=False)"
    reason = fused_loss_blocker(trainer, model)
    if reason is not None:
        return f"the loss is not fusetune's fused loss head: {reason}"
    if is_quantized(base):
        return "the base weights are quantized"
    if any(is_experts(m) for m in base.modules()):
        return "routed experts (mixture of experts): their token segments and load-balancing loss vary per batch"
    if args.torch_compile or getattr(args, "activation_offloading", False):
        return "torch_compile or activation offloading is on"
    return None


def head_adapter_trains(model, peft_config=None) -> bool:
    """Whether a LoRA adapter sits on the lm_head (or ``peft_config``, which TRL applies, puts one there); one line
    if so where fusetune's fused loss head is off.

    TRL refuses such an adapter, as its own fused head reads ``lm_head.weight`` and would never train it;
    fusetune's forward adds it (``forwards.head_adapter``), so the caller lifts TRL's check when this is True."""
    head = model.get_output_embeddings()
    targets = getattr(peft_config, "target_modules", None) or ()
    if not hasattr(head, "lora_A") and not (isinstance(peft_config, LoraConfig) and "lm_head" in targets):
        return False
    if not getattr(type(base_model(model)).forward, "_fusetune", False):
        raise FusetuneError(
            "LoRA on lm_head (target_modules) trains only through fusetune's fused loss head, which is off here "
            "(no kernels backend, or its loss op is off); use kernels=auto|triton|reference, or "
            "modules_to_save=['lm_head'] to train the whole head"
        )
    return True


@contextlib.contextmanager
def max_length_as(args, value: int | None):
    """``args.max_length`` is ``value`` for the block, and what it was after it."""
    before, args.max_length = args.max_length, value
    try:
        yield
    finally:
        args.max_length = before


class FastSFTTrainer(DatasetCacheHook, PrepareDatasetHook, GuardedTrainer, SFTTrainer):
    """TRL's SFTTrainer with fusetune's kernels, padding-free batches, fused loss and CUDA graphs.

    ``compute_loss`` takes TRL's loss and its entropy / mean_token_accuracy / num_tokens metrics from
    one pass of the fused loss head (``token_stats=True``) where ``fused_loss_blocker`` finds nothing
    against it, and ``args.fused_loss`` is not False; the sums wait on the device in ``token_stats``
    until ``log``. ``args.fused_loss=True`` makes a blocker an error, at construction and at every
    step. A prediction step that returns outputs (logits) always runs TRL's compute_loss.

    Training steps of padding-free batches replay CUDA graphs (``step_graphs``, made at the first
    step by ``step_graphs_factory``; None: eager steps) where ``cuda_graph_blocker`` finds nothing.
    """

    def __init__(self, model, args=None, data_collator=None, *pos, tokenizer=None, processing_class=None, **kwargs):
        if tokenizer is not None:
            if processing_class is not None and processing_class is not tokenizer:
                raise FusetuneError("FastSFTTrainer: give either tokenizer= or processing_class=, not both")
            warnings.warn("tokenizer= is TRL's older name for processing_class=", FutureWarning, stacklevel=2)
            processing_class = tokenizer
        moved = pop_trainer_keywords(kwargs, type(self).__name__)
        args = as_fast_config(args)
        merge_into_config(args, moved, type(self).__name__)
        self._truncate_to = None
        self.token_stats = TokenStats()
        if not isinstance(model, str):
            refuse_mixed_documents(model, args)  # before anything changes the model
            fp8_base.refuse_unheld(model)
            if not is_applied(model):  # by FastModel, run() or the user: left as it is
                apply_kernels(model, args.kernels, on_cuda=torch.cuda.is_available() and not args.use_cpu)
            model_max = getattr(model, "max_seq_length", None)  # set by FastModel.from_pretrained
            if model_max and args.max_length == SFT_DEFAULT_MAX_LENGTH:
                args.max_length = model_max
            if args.padding_free is None:
                args.padding_free = choose_padding_free(model, args, data_collator, processing_class)
            if args.padding_free and not args.packing and args.max_length is not None:
                # TRL refuses padding-free with max_length, as its collator cannot truncate; we truncate
                # while preparing the dataset instead (see prepare_dataset).
                self._truncate_to = args.max_length
            if args.padding_free or args.packing:
                log.info("attention for packed rows: %s", enable_varlen_attention(model, device=args.device))
        head_adapter = not isinstance(model, str) and head_adapter_trains(model, kwargs.get("peft_config"))
        hidden = self._truncate_to is not None  # TRL sees no max_length while it checks and prepares the data
        with head_adapter_allowed(head_adapter), max_length_as(args, None if hidden else args.max_length):
            super().__init__(model, args, data_collator, *pos, processing_class=processing_class, **kwargs)
        if is_quantized(self.model):  # TRL has cast the trainable weights to bf16
            precision.fp32_master_weights(self.model)
            precision.hidden_states_in(self.model, precision.model_compute_dtype(self.model))
        if args.fused_loss:
            self._uses_fused_loss(self.model)  # raises where it cannot
        self.step_graphs: StepGraphs | None = None  # made at the first training step (after any resume)
        # (trainable parameters, pad token id) -> StepGraphs; None: eager steps. Replaceable before training
        # (a StepGraphs with another recorder, say: tests run the graphed path on CPU with graphs.Reruns).
        self.step_graphs_factory = StepGraphs if self._want_step_graphs() else None
        if args.logging_dir is not None:
            self._set_tensorboard_dir(args.logging_dir)
        self.guard_run(args.nan_policy, args.max_skipped_fraction, args.max_skipped_in_a_row)

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

    def _want_step_graphs(self) -> bool:
        if self.args.cuda_graphs is False:
            return False
        reason = cuda_graph_blocker(self)
        if reason is not None:
            if self.args.cuda_graphs:
                raise FusetuneError(f"cuda_graphs=True: not possible here: {reason}")
            log.info("cuda graphs off: %s", reason)
            return False
        log.info("cuda graphs on: padding-free steps replay captured graphs (rows padded to bucket shapes)")
        return True

    def _graphed_step(self, model, inputs, num_items_in_batch):
        """The step from CUDA graph replays, or None where it runs eagerly."""
        if self.step_graphs is None:
            if self.step_graphs_factory is None:
                return None
            # made here, not in __init__: a resumed run has loaded its checkpoint by now, and the
            # graphs must read the parameters that train
            pad = getattr(self.processing_class, "pad_token_id", None)
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.step_graphs = self.step_graphs_factory(params, pad if pad is not None else 0)
        return self.step_graphs.run(model, inputs, num_items_in_batch)

    def _uses_fused_loss(self, model) -> bool:
        """Whether compute_loss takes the loss and metric sums from our forward (else TRL's own)."""
        if self.args.fused_loss is False:
            return False
        reason = fused_loss_blocker(self, model)
        if reason is not None and self.args.fused_loss:
            raise FusetuneError(f"fused_loss=True: not possible here: {reason}")
        return reason is None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss (token mean, or sum over ``num_items_in_batch``) and metrics, without host syncs."""
        if return_outputs or not self._uses_fused_loss(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        training = mode == "train" and torch.is_grad_enabled()
        out = self._graphed_step(model, inputs, num_items_in_batch) if training else None
        if out is None:
            router = {"output_router_logits": True} if self.aux_loss_enabled else {}
            out = model(
                **{**inputs, "use_cache": False, **router}, token_stats=True, num_items_in_batch=num_items_in_batch
            )
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages gradients
        aux = getattr(out, "aux_loss", None)
        if aux is not None:  # as TRL weighs it: per micro-batch, averaged over the accumulation steps
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * aux / steps
        tokens = batch_tokens(inputs) if mode == "train" else 0
        stats = StepStats(out.entropy_sum, out.num_correct, out.num_valid, tokens, aux)
        self.token_stats.add(self, mode, stats)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.token_stats.flush(self)
        if self.args.nan_policy == "skip" and "loss" in logs:
            self._without_skipped_losses(logs)
        super().log(logs, start_time)

    def _without_skipped_losses(self, logs: dict) -> None:
        """A log window of skipped steps only has no loss (None), never the 0.0 HF's NaN filter leaves; a
        non-finite value of a skipped step (grad_norm, entropy) is None too."""
        guard, step = self.nonfinite_guard, self.state.global_step
        skipped, window = set(guard.skipped_at), range(guard.logged_through + 1, step + 1)
        if window and all(s in skipped for s in window):
            logs["loss"] = None
        if step in skipped:
            logs.update({k: None for k, v in logs.items() if isinstance(v, float) and not math.isfinite(v)})
        guard.logged_through = step
        logs["skipped_steps"] = guard.skipped

    def prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL's preparation of one dataset; padding-free rows are truncated here, as TRL's collator cannot."""
        if formatting_func is None:
            check_sft_columns(dataset, args.dataset_text_field, dataset_name)
        if self._truncate_to is None:
            return super().prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        with max_length_as(args, self._truncate_to):
            return super().prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def create_optimizer(self, model=None):
        embedding_lr = getattr(self.args, "embedding_learning_rate", None)
        if embedding_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(opt_model))
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_with_embedding_lr(
            opt_model, decay_names, self.args.weight_decay, embedding_lr, optimizer_cls, optimizer_kwargs
        )
        return self.optimizer
