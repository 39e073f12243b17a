"""The installed versions of named packages (None for one that is not installed), for records and cache keys:
the one list of what a run records, and the one list of what a tokenized data set's cache key depends on."""

import importlib.metadata
import sys

# what a run's summary.json records ("versions"), with Python's own
RUN_RECORD = ("torch", "triton", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "fusetune")
# an upgrade of any of these makes new keys in the tokenized data cache (fusetune.data.cache)
DATA_CACHE_KEY = ("fusetune", "trl", "transformers", "tokenizers", "datasets", "jinja2")


def installed(names) -> dict[str, str | None]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_versions() -> dict[str, str | None]:
    """Python's version and those of RUN_RECORD, as summary.json records them."""
    return {"python": sys.version.split()[0], **installed(RUN_RECORD)}
