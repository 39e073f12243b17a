"""Load datasets (local files, the hub, or the embedded synthetic set), check every record, format them for TRL,
and mix several sources by weight (data=mixture).

Where things live: ``pipeline.py`` (build_splits, Splits: the steps from config to splits), ``sources.py``
(reading one source into record sets), ``mixture.py`` (splits from rows of record sets, drawing a mixture),
``cache.py`` (the tokenized cache), ``checks.py`` (every record checked), ``formatters.py``, ``templates.py``,
``lengths.py`` (records longer than the max length), ``files.py`` (local files), ``rules.py`` (the config's rules).
"""

from .cache import DatasetCache, DatasetCacheHook, PairsCacheHook
from .files import LOCAL_BUILDERS, load_local
from .pipeline import Splits, build_splits, generation_pair

__all__ = [
    "LOCAL_BUILDERS",
    "DatasetCache",
    "DatasetCacheHook",
    "PairsCacheHook",
    "Splits",
    "build_splits",
    "generation_pair",
    "load_local",
]
