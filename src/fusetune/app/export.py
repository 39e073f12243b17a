"""The export group of keys: what a run writes besides its model or adapter, for using the result."""

import logging
from pathlib import Path

from ..fast_model import FastModel

log = logging.getLogger(__name__)


def export_merged(model, tokenizer, out: Path) -> Path:
    """export.merged=true: ``<run>/merged/``, 16-bit weights with the tokenizer that plain transformers loads
    (``FastModel.save_merged``): the LoRA adapters merged into the base, or a full fine-tune's whole model.

    Done on a copy of the trained model in memory, so it needs no base weights on disk (a random_init base has
    none); only a quantized base is reloaded in 16 bits from its weights first, for an exact merge.
    """
    from peft import PeftModel

    folder = out / "merged"
    FastModel.save_merged(model, tokenizer, str(folder))
    what = "the adapters merged into" if isinstance(model, PeftModel) else "the fully fine-tuned model in"
    log.info("export.merged: %s 16-bit weights in %s", what, folder)
    return folder
