"""Merging LoRA adapters into a plain 16-bit model: on a copy (the trained model is left as it is), a quantized
base reloaded in 16 bits first. ``FastModel.save_merged``, the GGUF export and Unsloth's saving methods share it."""

import copy
import tempfile
from pathlib import Path

import torch

from . import fp8_base as fp8
from . import loading
from .errors import FusetuneError
from .modules import is_quantized
from .state import peek

# Files that make a folder load as a model or an adapter: all go before a merged model is written.
STALE = (*loading.WEIGHT_FILES, "adapter_config.json")


def clear_for_weights(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise FusetuneError(f"save_merged: {folder} is a file, not a folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise FusetuneError(f"save_merged: {folder} is not empty; pass overwrite=True to replace what it holds")
    for pattern in STALE:
        for stale in folder.glob(pattern):
            stale.unlink()


def save_merged(
    model,
    tokenizer,
    save_directory: str,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    token: str | None = None,
) -> str:
    """Merge the LoRA adapters into 16-bit weights that plain transformers loads.

    A quantized base is reloaded in 16 bits from its original weights first, so the merge
    is exact rather than into 4-bit blocks; with the revision and remote-code choice it was
    loaded with, and ``token`` (not kept from ``from_pretrained``) for a gated repository.
    The model passed in is left unchanged, and the saved config has ``use_cache`` on (training
    turns it off). A base held in FP8 (``fp8_base``, bf16 LoRA) merges as its dequantized e4m3
    weights, the base the adapters trained against (3 mantissa bits, a scale per output channel;
    the saved adapter merged into the original model gives the 16-bit base). A folder that holds
    anything is refused unless ``overwrite``; then every weight, index and adapter file in it is
    removed first, so none of them can load beside the merge.
    """
    clear_for_weights(Path(save_directory), overwrite)

    dtype = dtype or sixteen_bit()
    merged = merged_copy(model, dtype, token).to(dtype)
    merged.config.use_cache = True
    merged.save_pretrained(save_directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    return save_directory


def sixteen_bit() -> torch.dtype:
    """The hardware's 16-bit type: fp16 on GPUs without bf16, else bf16 (on CPU too)."""
    return torch.float16 if loading.pick_dtype("auto") == torch.float16 else torch.bfloat16


def merged_copy(model, dtype: torch.dtype | None = None, token: str | None = None):
    """A plain transformers model holding ``model``'s weights with its LoRA adapters merged in; ``model`` is left
    as it is (the merge happens on a copy). A quantized base is reloaded in ``dtype`` (default: the hardware's
    16-bit type) from its original weights first (``save_merged`` says why); an FP8 base merges as
    its dequantized weights."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return copy.deepcopy(model)
    if is_quantized(model):
        dtype = dtype or sixteen_bit()
        base_path = model.peft_config[model.active_adapter].base_model_name_or_path
        with tempfile.TemporaryDirectory() as adapter_dir:
            model.save_pretrained(adapter_dir)
            hub = peek(model).hub
            base = loading.load_model(base_path, dtype, token=token, **hub)
            return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged = copy.deepcopy(model)
    fp8.restore_weights(merged)
    return merged.merge_and_unload()
