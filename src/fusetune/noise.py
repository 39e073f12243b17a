"""Third-party log lines that say nothing a user can act on, dropped by their exact text, never by level.

bitsandbytes, on a CPU with AVX512-BF16, tries at import to fetch an optional CPU kernel from the Hugging
Face hub through the `kernels` package, and logs a warning at every start when it cannot: `Failed to load
CPU gemm_4bit_forward from kernels-community: ...`. Its own CPU path is used instead, as intended. Every
other message of those loggers still shows. In offline mode, the `kernels` package (0.19 on) first logs that
it skips its publisher check for that same repository; that line goes too.
"""

import logging

KNOWN = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
}


class DropKnownLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def drop_known_noise() -> None:
    """Install the filters (once); call before the noisy package is imported."""
    for name, prefixes in KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownLines) for f in logger.filters):
            logger.addFilter(DropKnownLines(prefixes))
