"""Unsloth's saving methods on the models FastModel returns: ``model.save_pretrained_merged``,
``model.push_to_hub_merged`` and ``model.save_pretrained_gguf``, with Unsloth's names and arguments, so its
notebooks' last cells run unchanged.

``add_saving_methods`` binds them to one model object (``FastModel.from_pretrained`` and ``get_peft_model`` call it);
each is a thin call into ``merging.save_merged`` (``FastModel.save_merged``), ``gguf_export.save_gguf``
(``FastModel.save_gguf``) or PEFT's ``save_pretrained``.
"""

import logging
import tempfile
import types
import warnings
from pathlib import Path

import torch

from .errors import FusetuneError
from .gguf_export import save_gguf
from .merging import clear_for_weights, save_merged

log = logging.getLogger(__name__)

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
GGUF_ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0"}  # Unsloth's names
MERGED_4BIT = (
    "save_method='merged_4bit': the adapters merged into 16-bit weights, then every linear layer but lm_head "
    "re-quantized to bitsandbytes nf4 (double-quantized, blocks of 64), saved as a bitsandbytes 4-bit model that "
    "transformers loads on CUDA; merged_16bit is the exact merge"
)


def save_pretrained_merged(
    model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit", token=None, overwrite=False, **unused
) -> str:
    """``save_method``: "merged_16bit" (``FastModel.save_merged``), "merged_4bit" (that merge re-quantized to
    bitsandbytes nf4, on CUDA) or "lora" (the adapter alone, PEFT's ``save_pretrained``); the tokenizer beside it."""
    if unused.pop("push_to_hub", False):
        raise FusetuneError("save_pretrained_merged: push_to_hub=True is not supported; use model.push_to_hub_merged")
    _warn_unused("save_pretrained_merged", unused)
    if save_method not in SAVE_METHODS:
        raise FusetuneError(f"save_method: expected one of {', '.join(SAVE_METHODS)}, got '{save_method}'")
    if save_method == "merged_16bit":
        save_merged(model, tokenizer, save_directory, overwrite=overwrite, token=token)
        log.info("save_method='merged_16bit': the adapters merged into 16-bit weights in %s", save_directory)
        return save_directory
    if save_method == "lora":
        if not hasattr(model, "peft_config"):
            raise FusetuneError("save_method='lora': the model has no LoRA adapters (use merged_16bit)")
        model.save_pretrained(save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        log.info("save_method='lora': the LoRA adapter and the tokenizer in %s", save_directory)
        return save_directory
    return _save_merged_4bit(model, tokenizer, save_directory, token, overwrite)


def _save_merged_4bit(model, tokenizer, save_directory: str, token, overwrite: bool) -> str:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise FusetuneError(
            "save_method='merged_4bit' re-quantizes with bitsandbytes, which needs CUDA; use merged_16bit"
        )
    clear_for_weights(Path(save_directory), overwrite)
    log.info(MERGED_4BIT)
    with tempfile.TemporaryDirectory() as merged:
        save_merged(model, tokenizer, merged, token=token, overwrite=True)
        nf4 = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
        )
        quantized = AutoModelForCausalLM.from_pretrained(merged, quantization_config=nf4, device_map={"": 0})
        quantized.save_pretrained(save_directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    return save_directory


def push_to_hub_merged(
    model,
    repo_id: str,
    tokenizer=None,
    save_method: str = "merged_16bit",
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload model trained with fusetune",
    **unused,
) -> str:
    """``save_pretrained_merged`` into a temporary folder, uploaded to the hub repository ``repo_id`` (created if
    missing) with huggingface_hub's ``create_repo`` and ``upload_folder``; returns the commit's URL."""
    from huggingface_hub import HfApi

    _warn_unused("push_to_hub_merged", unused)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained_merged(model, folder, tokenizer, save_method, token=token, overwrite=True)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    log.info("push_to_hub_merged: %s (%s) uploaded to %s", save_method, repo_id, commit.commit_url)
    return commit.commit_url


def save_pretrained_gguf(
    model, save_directory: str, tokenizer, quantization_method: str = "q8_0", token=None, **unused
) -> str:
    """``<save_directory>/model-<quantization_method>.gguf`` (``FastModel.save_gguf``): "f16" or "q8_0" (also by
    Unsloth's names for them, "not_quantized" and "fast_quantized")."""
    if unused.pop("push_to_hub", False):
        raise FusetuneError("save_pretrained_gguf: push_to_hub=True is not supported; upload the file it writes")
    _warn_unused("save_pretrained_gguf", unused)
    quantization_method = GGUF_ALIASES.get(quantization_method.lower(), quantization_method.lower())
    path = Path(save_directory) / f"model-{quantization_method}.gguf"
    save_gguf(model, tokenizer, str(path), quantization_method, token=token)
    log.info("save_pretrained_gguf: %s", path)
    return str(path)


METHODS = (save_pretrained_merged, push_to_hub_merged, save_pretrained_gguf)


def add_saving_methods(model):
    """Bind Unsloth's saving methods to this one model object (its class is left alone); returns it."""
    for method in METHODS:
        setattr(model, method.__name__, types.MethodType(method, model))
    return model


def _warn_unused(where: str, unused: dict) -> None:
    for name in unused:
        warnings.warn(f"{where}: '{name}' is not supported and is ignored", stacklevel=3)
