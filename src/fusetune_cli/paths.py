"""Where fusetune keeps what it can rebuild: ``FUSETUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusetune``
(``~/.cache/fusetune``). The self-check's verdicts, the tokenized datasets and ``train --help`` live under it."""

import os
from pathlib import Path


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusetune"
    return Path(os.environ.get("FUSETUNE_CACHE_DIR") or default)
