"""The export group of keys: what a run writes besides its model or adapter, for using the result."""

import logging
from pathlib import Path

from ..fast_model import FastModel

log = logging.getLogger(__name__)


def export_merged(model, tokenizer, out: Path) -> Path | None:
    """export.merged=true: ``<run>/merged/``, the LoRA adapters merged into 16-bit weights that plain transformers
    loads (``FastModel.save_merged``). Returns the folder, or None where there is nothing to merge.

    The merge is done on a copy of the trained model in memory, so it needs no base weights on disk (a random_init
    base has none); only a quantized base is reloaded in 16 bits from its weights first, for an exact merge.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        saved = out / "model"
        where = f"its weights are in {saved}" if saved.is_dir() else "save_model=true saves its weights"
        log.info("export.merged: a full fine-tune has no adapter to merge; %s", where)
        return None
    folder = out / "merged"
    FastModel.save_merged(model, tokenizer, str(folder))
    log.info("export.merged: the adapters merged into 16-bit weights in %s", folder)
    return folder
