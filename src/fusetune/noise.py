"""Third-party log lines that say nothing a user can act on, dropped by package, level and a stable marker.

``KNOWN`` holds one kind, installed at ``import fusetune``: bitsandbytes, on a CPU with AVX512-BF16, fetches at
import an optional CPU kernel from the hub organization ``kernels-community`` through the ``kernels`` package.
Where that cannot work (no network, offline mode, no ``kernels``), both packages log warnings about it at every
start, and bitsandbytes uses its own CPU path, as intended. A rule drops a record that comes from its package's
logger or any logger under it, at WARNING or below, and names the marker: a reworded line, or one from a module
the package adds later, goes too, and every other message of those packages (an error, another publisher's
kernel) still shows. ``APP_ONLY`` holds the lines the app's own messages replace, installed by
``quiet_third_party``.
"""

import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Noise:
    package: str  # the logger of this name and every logger under it
    marker: str  # a record at WARNING or below whose message contains this is dropped
    seen: str  # the versions and the line it was seen with


KNOWN = (
    Noise(
        "bitsandbytes",
        "kernels-community",
        "bitsandbytes 0.49-0.50.2: 'Failed to load CPU gemm_4bit_forward from kernels-community: ...'",
    ),
    Noise(
        "kernels",
        "'kernels-community/",
        "kernels 0.19.1, offline: \"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
        'because Hugging Face Hub is in offline mode."',
    ),
)


# The app's own: data.too_long states and counts the records longer than model.max_seq_length (one line per
# split), so the tokenizer's claim that they "will result in indexing errors" (TRL cuts or drops them) goes.
APP_ONLY = (
    Noise(
        "transformers.tokenization_utils_base",
        "Token indices sequence length is longer than the specified maximum",
        "transformers 5.17-5.25: 'Token indices sequence length is longer than the specified maximum sequence length "
        "for this model (25 > 24). Running this sequence through the model will result in indexing errors'",
    ),
)


def is_noise(rule: Noise, record: logging.LogRecord) -> bool:
    return record.levelno <= logging.WARNING and rule.marker in record.getMessage()


class DropNoise(logging.Handler):
    """On the package's logger, in place of propagation: passes every record of the package on to the parent's
    handlers, as propagation would, except the rule's noise. (A logger's own filters see only the records made
    by that logger, not those of the loggers under it.)"""

    def __init__(self, logger: logging.Logger, rule: Noise):
        super().__init__()
        self.logger, self.rule = logger, rule

    def emit(self, record: logging.LogRecord) -> None:
        if not is_noise(self.rule, record) and self.logger.parent is not None:
            self.logger.parent.callHandlers(record)


def drop_known_noise(rules: tuple[Noise, ...] = KNOWN) -> None:
    """Install the rules (once); call before the noisy package is imported."""
    for rule in rules:
        logger = logging.getLogger(rule.package)
        if not any(isinstance(h, DropNoise) for h in logger.handlers):
            logger.addHandler(DropNoise(logger, rule))
            logger.propagate = False


def quiet_third_party(answers_only: bool = False) -> None:
    """Keep the terminal to what a user acts on: FutureWarnings and the warnings of bitsandbytes and of
    transformers' model loading go. ``answers_only`` (the chat, whose terminal holds answers and one-line errors):
    every UserWarning, transformers' and PEFT's warnings, and the progress bars go too."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    drop_known_noise(APP_ONLY)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("bitsandbytes", "transformers.modeling_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if answers_only:
        warnings.filterwarnings("ignore", category=UserWarning)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logging.getLogger("peft").setLevel(logging.ERROR)


@contextmanager
def muted(name: str):
    """Logger ``name`` says nothing inside the block (a library that logs a failure it then raises, which
    comes back as fusetune's own line); its level is given back after."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
