"""The export group of keys: what a run writes besides its model or adapter, for using the result."""

import logging
from pathlib import Path

from ..fast_model import FastModel
from ..gguf_export import check_exportable

log = logging.getLogger(__name__)


def export_merged(model, tokenizer, out: Path, saved_to: Path | None = None) -> Path:
    """export.merged=true: ``<run>/merged/``, 16-bit weights with the tokenizer that plain transformers loads
    (``FastModel.save_merged``): the LoRA adapters merged into the base, or a full fine-tune's whole model.

    Done on a copy of the trained model in memory, so it needs no base weights on disk (a random_init base has
    none); only a quantized base is reloaded in 16 bits from its weights first, for an exact merge. A full fine-tune
    has nothing to merge: ``merged/`` is then a 16-bit copy of its whole model, so that ``merged/`` means the same in
    every run, and the log line says so (``saved_to``: its ``model/``, if saved).
    """
    from peft import PeftModel

    folder = out / "merged"
    FastModel.save_merged(model, tokenizer, str(folder))
    if isinstance(model, PeftModel):
        log.info("export.merged: the adapters merged into 16-bit weights in %s", folder)
    else:
        whole = (
            f"{saved_to} is already the whole model" if saved_to else "the model is already whole (save_model=false)"
        )
        log.info("export.merged: a full fine-tune has no adapters to merge: %s; %s holds a 16-bit copy", whole, folder)
    return folder


def check_gguf(model, quantization: str | None) -> None:
    """export.gguf: a family or type the GGUF writer lacks is refused before training, not after it."""
    if quantization is not None:
        check_exportable(model.config.get_text_config().model_type, quantization)


def export_gguf(model, tokenizer, out: Path, quantization: str) -> Path:
    """export.gguf=f16|q8_0: ``<run>/gguf/model-<type>.gguf`` (``FastModel.save_gguf``), the adapters merged in."""
    path = out / "gguf" / f"model-{quantization}.gguf"
    FastModel.save_gguf(model, tokenizer, str(path), quantization)
    log.info("export.gguf: %s (%s, %.1f MiB), for llama.cpp", path, quantization, path.stat().st_size / 2**20)
    return path
