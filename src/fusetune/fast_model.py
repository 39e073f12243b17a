"""FastModel: load a causal LM with fusetune's kernels, add LoRA, save a merged 16-bit model.

model, tokenizer = FastModel.from_pretrained("path-or-hub-id", max_seq_length=2048, load_in_4bit=True)
model = FastModel.get_peft_model(model, r=16, modules_to_save=["embed_tokens", "lm_head"])
FastModel.save_merged(model, tokenizer, "out/merged")
"""

import copy
import logging
import tempfile
import warnings

import torch

from . import models
from .config import ALL_PROJECTIONS
from .errors import FusetuneError
from .patching import apply_kernels

log = logging.getLogger(__name__)
EMBEDDINGS = ("embed_tokens", "lm_head")


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return models.pick_dtype("auto")
    if isinstance(dtype, str):
        if dtype not in models.DTYPES and dtype != "auto":
            raise FusetuneError(f"dtype: expected one of auto, {', '.join(models.DTYPES)}, got '{dtype}'")
        return models.pick_dtype(dtype)
    return dtype


class FastModel:
    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int = 2048,
        dtype=None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        kernels: str = "auto",
        *,
        random_init: bool = False,
        config: str | None = None,
        tokenizer_name: str | None = None,
        attn_implementation: str | None = None,
        device_map=None,
    ):
        """(model, tokenizer). ``dtype`` None: bf16 where supported, fp16 on older GPUs, fp32 on CPU."""
        dtype = _dtype(dtype)
        tokenizer = models.load_tokenizer(tokenizer_name or model_name)
        tokenizer.model_max_length = max_seq_length
        quantized = load_in_4bit or load_in_8bit
        if quantized and device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}
        model = models.load_model(
            model_name,
            dtype,
            config=config,
            random_init=random_init,
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            attn_implementation=attn_implementation,
            device_map=device_map,
        )
        if not quantized and device_map is None and torch.cuda.is_available():
            model = model.to("cuda")
        apply_kernels(model, kernels)  # records the backend as model.fusetune_kernels
        model.max_seq_length = max_seq_length
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        modules_to_save: list[str] | None = None,
        use_gradient_checkpointing: bool | str = True,
        random_state: int = 3407,
        **unused,
    ):
        """LoRA adapters on ``target_modules`` (default: every attention and MLP projection present)."""
        for name in unused:
            warnings.warn(f"FastModel.get_peft_model: '{name}' is not supported and is ignored", stacklevel=2)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = list(target_modules) if target_modules else [p for p in ALL_PROJECTIONS if p in present]
        lora_on_embeddings = sorted(set(targets) & set(EMBEDDINGS))
        if lora_on_embeddings:
            warnings.warn(
                f"target_modules has {lora_on_embeddings}: they get LoRA factors, which train at learning_rate; "
                "embedding_learning_rate applies only to full embedding weights listed in modules_to_save",
                stacklevel=2,
            )
        if isinstance(use_gradient_checkpointing, str):
            log.info(
                "use_gradient_checkpointing=%r: using non-reentrant activation checkpointing",
                use_gradient_checkpointing,
            )
        checkpointing = bool(use_gradient_checkpointing)
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if checkpointing and not quantized:  # the quantized path enables it while preparing the model
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(random_state)
        peft_model = models.add_lora(
            model,
            r=r,
            alpha=lora_alpha,
            dropout=lora_dropout,
            target_modules=targets,
            modules_to_save=modules_to_save,
            gradient_checkpointing=checkpointing,
        )
        peft_model.max_seq_length = getattr(model, "max_seq_length", None)
        return peft_model

    @staticmethod
    def save_merged(model, tokenizer, save_directory: str, dtype: torch.dtype | None = None) -> str:
        """Merge the LoRA adapters into 16-bit weights that plain transformers loads.

        A quantized base is reloaded in 16 bits from its original weights first, so the merge
        is exact rather than into 4-bit blocks. The model passed in is left unchanged.
        """
        from peft import PeftModel

        if dtype is None:  # the hardware's 16-bit type; bf16 on CPU
            dtype = torch.float16 if models.pick_dtype("auto") == torch.float16 else torch.bfloat16
        if not isinstance(model, PeftModel):
            merged = copy.deepcopy(model)
        elif getattr(model.get_base_model(), "is_loaded_in_4bit", False) or getattr(
            model.get_base_model(), "is_loaded_in_8bit", False
        ):
            base_path = model.peft_config[model.active_adapter].base_model_name_or_path
            with tempfile.TemporaryDirectory() as adapter_dir:
                model.save_pretrained(adapter_dir)
                base = models.load_model(base_path, dtype)
                merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        else:
            merged = copy.deepcopy(model).merge_and_unload()
        merged = merged.to(dtype)
        merged.save_pretrained(save_directory, safe_serialization=True)
        tokenizer.save_pretrained(save_directory)
        return save_directory
