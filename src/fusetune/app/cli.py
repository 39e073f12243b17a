"""The boundary between the Hydra app and the library: user mistakes become one line, not a traceback."""

import logging
import os
import sys
import warnings

from ..errors import FusetuneError


def quiet_third_party() -> None:
    """Keep the terminal to what a user acts on."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("bitsandbytes", "transformers.modeling_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_or_exit(cfg) -> None:
    quiet_third_party()
    from .run import run

    try:
        run(cfg)
    except FusetuneError as error:
        print(f"fusetune: error: {error}", file=sys.stderr)
        sys.exit(2)
