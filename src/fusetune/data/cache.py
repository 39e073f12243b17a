"""The tokenized-dataset cache: each source's records, as TRL tokenizes them, kept on disk and reused across runs.

What is cached is one *record set* (``RecordSet``): the checked, formatted records of one file or hub split (a
source, or its eval file), tokenized by TRL's own dataset preparation with its labels built (``input_ids``,
``labels``, and the formatted columns), before truncation, packing and shuffling. A split is then a selection of
rows of its record sets (``SplitLayout``): all of one file, the part an eval hold-out leaves, or the draws of a
mixture. So runs that differ only in seed, mixture weights or size, eval hold-out, max length, packing or the
model's other settings tokenize nothing again. data.too_long then decides the records longer than the max length
(``lengths.py``: counted, named, dropped, truncated or refused), and TRL truncates, packs and shuffles the selected
rows itself, as it would have, so the loss masks are exactly TRL's (tests/data/test_cache.py compares them with an
uncached build). With data.cache=false the record sets are tokenized the same way, and nothing is read or written.

The key of a record set (a SHA-256 of the JSON below, which is saved next to the records as ``fusetune-key.json``):

- the records: a local file's absolute path and a SHA-256 of its bytes (never its modification time: an edit that
  keeps it is still seen; the datasets library's own cache of the file is named by the same hash); a hub dataset's
  name, subset, split,
  revision and the fingerprint ``datasets`` gives its download; the synthetic set's sizes and seed;
- how they were read: formatter, field, whether the chat template renders them, data.empty_content,
  data.max_examples, and a hash of this package's code;
- the tokenizer: its class, name, a hash of its full state (vocabulary, merges, normalizer, added tokens), its
  special tokens and options, and its chat template (data.chat_template included);
- TRL's options that shape the tokens and labels: the training chat template TRL may swap in for assistant-only
  loss, completion_only_loss (as TRL resolved it), assistant_only_loss, dataset_text_field;
- the versions of fusetune, TRL, transformers, tokenizers, datasets and jinja2.

A record set is written into a temporary folder and renamed into place, so readers never see a partial one; a
folder that cannot be read back is tokenized again. Nothing is ever evicted: delete the folder to reclaim it.

Preference data (trainer=dpo on prompt/chosen/rejected pairs, trainer=kto on prompt/completion/label answers) is
cached the same way, record set by record set: TRL's DPO and KTO trainers tokenize each record on its own (the
prompt extracted, EOS added to answers given as strings, ``prompt_ids`` and the answers' ids), which is what is
kept; what reads max_length or the split's other rows (the rows whose prompt alone fills max_length dropped, KTO's
mismatched KL pairs, its desirable/undesirable balance) runs on the split's rows each time, and TRL truncates each
pair in its collator. Their key holds the tokenizer, which of TRL's preparations ran (DPO's or KTO's) and the
versions in place of the SFT label options. trainer=orpo and trainer=simpo (TRL's experimental ORPO and CPO
trainers) tokenize inside their constructors, truncating to max_length (and max_completion_length) as they go, with no
method to route through: their runs skip the cache, with one log line, and summary.json's ``data_cache.skipped``
says why.

``DatasetCacheHook`` is the trainer side: a mixin for a TRL SFTTrainer subclass that takes ``dataset_cache=``
(``Splits.cache``) and routes TRL's dataset preparation through ``DatasetCache.prepare``; ``PairsCacheHook`` is
the same for TRL's DPO and KTO trainers (``DatasetCache.prepare_pairs``).
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets, load_from_disk

from fusetune_cli.paths import cache_root

from ..compat.trl import (
    finish_pairs_as_trl,
    label_options,
    pairs_preparation,
    prepare_as_trl,
    tokenize_pairs_as_trl,
)
from ..errors import FusetuneError
from ..versions import DATA_CACHE_KEY, installed
from .checks import DatasetOrigin
from .files import MAX_SHOWN
from .lengths import POLICIES, SPLITTING_PACKERS, LengthRule, shown
from .templates import bounded_renders

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when what a record set holds changes
KEY_FILE = "fusetune-key.json"
_CODE = Path(__file__).parent


def default_cache_dir() -> Path:
    return cache_root() / "datasets"


def digest(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def code_hash() -> str:
    """A hash of the data package's code: a change to a formatter or the synthetic set makes new keys."""
    return digest("".join(path.read_text(encoding="utf-8") for path in sorted(_CODE.glob("*.py"))))[:16]


@dataclass
class RecordSet:
    """One file or hub split, checked and formatted: what the cache keeps tokenized."""

    label: str  # how messages name it: "data.path a.jsonl", "data.sources.1.name org/set (split train)"
    dataset: Dataset  # the formatted records
    identity: dict  # where the records come from and how they were read: the data part of the key
    origin: DatasetOrigin | None = None  # for line numbers, and a local file's content hash
    rows: np.ndarray | None = None  # each row's index among the records read (None: the same)
    read_count: int = 0  # how many records were read

    def where(self, rows: list[int]) -> list[str]:
        """How a user finds each of ``rows``: 'data.path a.jsonl: line 7' (or 'record 7')."""
        read = [int(self.rows[r]) if self.rows is not None else int(r) for r in rows]
        if self.origin is None:
            return [f"{self.label}: record {r + 1}" for r in read]
        return [f"{self.label}: {place}" for place in self.origin.where(read, self.read_count or len(self.dataset))]


@dataclass
class SplitLayout:
    """Which rows of which record sets make a split's formatted dataset: their rows concatenated, then selected."""

    record_sets: list[RecordSet]
    indices: np.ndarray | None  # None: every row of the one record set, in order

    def origins(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(record set, row of that record set) of each of the split's ``rows``."""
        offsets = np.cumsum([0] + [len(record_set.dataset) for record_set in self.record_sets])
        rows = np.asarray(rows, dtype=np.int64)
        picked = rows if self.indices is None else np.asarray(self.indices)[rows]
        sets = np.searchsorted(offsets, picked, side="right") - 1
        return sets, picked - offsets[sets]

    def where(self, rows: np.ndarray) -> str:
        """The first few of the split's ``rows`` as a user finds them, and how many more."""
        sets, within = self.origins(rows)
        first = sorted(set(zip(sets.tolist(), within.tolist(), strict=True)))[:MAX_SHOWN]  # in file order
        return shown([self.record_sets[s].where([r])[0] for s, r in first], len(rows))

    def sources(self) -> list[str] | None:
        """Each row's record-set label, where the split has several (a mixture, several eval files); else None."""
        if len(self.record_sets) == 1:
            return None
        count = len(self.record_sets[0].dataset) if self.indices is None else len(self.indices)
        sets, _ = self.origins(np.arange(count))
        return [self.record_sets[s].label for s in sets.tolist()]


def tokenizer_identity(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    options = {
        key: value
        for key, value in sorted(getattr(tokenizer, "init_kwargs", {}).items())
        if isinstance(value, str | int | float | bool) or value is None
    }
    return {
        "class": type(tokenizer).__name__,
        "name": getattr(tokenizer, "name_or_path", None),
        "state": digest(state),
        "special_tokens": {name: str(token) for name, token in sorted(tokenizer.special_tokens_map.items())},
        "options": options,
        "chat_template": digest(json.dumps(tokenizer.chat_template, sort_keys=True)),
    }


def trainer_identity(trainer, processing_class, args) -> dict:
    """What, besides the records, decides TRL's tokens and labels."""
    options = label_options(trainer)
    training_template = options["chat_template"]  # TRL's training template (assistant-only loss)
    return {
        "tokenizer": tokenizer_identity(processing_class),
        "training_chat_template": digest(training_template) if training_template else None,
        "completion_only_loss": options["completion_only_loss"],
        "assistant_only_loss": args.assistant_only_loss,
        "dataset_text_field": args.dataset_text_field,
        "versions": installed(DATA_CACHE_KEY),
    }


def pairs_identity(trainer, processing_class) -> dict:
    """What, besides the records, decides TRL's DPO or KTO tokens: the tokenizer (its EOS ends each answer given as
    a string, its template renders conversations), which of TRL's preparations runs, and the versions."""
    return {
        "tokenizer": tokenizer_identity(processing_class),
        "preparation": pairs_preparation(trainer),
        "versions": installed(DATA_CACHE_KEY),
    }


def tokenize_with_trl(trainer, record_set: RecordSet, processing_class, args, dataset_name: str) -> Dataset:
    """TRL's own preparation of ``record_set``'s records with the trainer's tokenizer, templates and loss options,
    stopped before truncation, packing and shuffling: its tokens and labels, one row per record. Each chat template
    render is bounded (``templates.bounded_renders``)."""
    kept = args.max_length, args.shuffle_dataset
    args.max_length, args.shuffle_dataset = None, False
    templates = [getattr(processing_class, "chat_template", None), label_options(trainer)["chat_template"]]
    try:
        with bounded_renders(templates, f"a {dataset_name} record of {record_set.label}"):
            return prepare_as_trl(trainer, record_set.dataset, processing_class, args, False, None, dataset_name)
    finally:
        args.max_length, args.shuffle_dataset = kept


class DatasetCache:
    """The cache of one build_splits call: where it lives, the layouts of its splits, and what each run found."""

    def __init__(self, folder: str | Path | None = None, enabled: bool = True, too_long: str = "drop"):
        if too_long not in POLICIES:
            raise FusetuneError(f"data.too_long must be one of {', '.join(POLICIES)}, got {too_long!r}")
        self.folder = Path(folder).expanduser() if folder else default_cache_dir()
        self.enabled = enabled
        self.too_long = too_long  # data.too_long, applied to every split of this build (fusetune.data.lengths)
        self.layouts: dict[str, SplitLayout] = {}  # a split's fingerprint -> the rows it is made of
        self.entries: dict[str, dict] = {}  # key -> source, key, path, hit (read from disk), saved
        self.lengths: dict[str, dict] = {}  # split ("train", "eval") -> records, longer, dropped, truncated
        self._tokenized_here: dict[
            str, Dataset
        ] = {}  # a record set in both splits (an eval hold-out) is looked up once
        self.skipped: str | None = None  # why this run's trainer did not use the cache (``skip``)

    def register(self, dataset: Dataset, layout: SplitLayout) -> None:
        self.layouts[dataset._fingerprint] = layout

    def summary(self) -> dict:
        """For summary.json: whether the cache was on and used, and each record set's key, folder and hit or miss."""
        entries = list(self.entries.values())
        hits = sum(entry["hit"] for entry in entries)
        files = {
            record_set.label: {"source": record_set.label, **record_set.origin.hashed}
            for layout in self.layouts.values()
            for record_set in layout.record_sets
            if record_set.origin is not None and record_set.origin.hashed
        }
        return {
            "enabled": self.enabled,
            "dir": str(self.folder),
            "used": hits > 0,
            "skipped": self.skipped,
            "hits": hits,
            "misses": len(entries) - hits,
            "entries": entries,
            "files": list(files.values()),  # each local file's content hash, size and the seconds hashing took
        }

    def prepare(
        self,
        trainer,
        dataset,
        processing_class,
        args,
        packing: bool,
        formatting_func: Callable | None,
        dataset_name: str,
        finish: Callable,
    ):
        """TRL's preparation of ``dataset``, from cached record sets where the dataset is a split of this build.

        ``finish`` is the trainer's own preparation (same arguments as TRL's ``_prepare_dataset``). Given the
        tokenized rows it truncates, packs and shuffles them as it would have the formatted ones."""
        layout = self.layouts.get(getattr(dataset, "_fingerprint", None)) if isinstance(dataset, Dataset) else None
        if layout is None or formatting_func is not None:
            return finish(dataset, processing_class, args, packing, formatting_func, dataset_name)
        key_parts = trainer_identity(trainer, processing_class, args)

        def tokenize(record_set: RecordSet) -> Dataset:
            return tokenize_with_trl(trainer, record_set, processing_class, args, dataset_name)

        tokenized = self._split_rows(layout, key_parts, tokenize)
        rule = LengthRule(
            self.too_long,
            args.max_length,
            keep_end=args.truncation_mode == "keep_end",
            splits_long=packing and args.packing_strategy in SPLITTING_PACKERS,
        )
        tokenized, self.lengths[dataset_name] = rule.apply(tokenized, dataset_name, layout.where, layout.sources())
        return finish(tokenized, processing_class, args, packing, None, dataset_name)

    def prepare_pairs(self, trainer, dataset, processing_class, args, dataset_name: str, finish: Callable):
        """TRL's DPO or KTO preparation of ``dataset``, from cached record sets where the dataset is a split of this
        build.

        The cached rows are TRL's tokenizing of each record (``compat.trl.tokenize_pairs_as_trl``), which reads
        nothing of max_length or the other rows; what does (the rows whose prompt fills max_length dropped, KTO's
        KL pairs) runs on the split's rows (``finish_pairs_as_trl``). ``finish`` is the trainer's own preparation,
        for datasets that are not a split of this build. data.too_long applies to the split's rows first (``truncate``
        leaves the cut to TRL's collator; KTO's always keeps each sequence's start)."""
        layout = self.layouts.get(getattr(dataset, "_fingerprint", None)) if isinstance(dataset, Dataset) else None
        if layout is None:
            return finish(dataset, processing_class, args, dataset_name)
        key_parts = pairs_identity(trainer, processing_class)
        templates = [getattr(processing_class, "chat_template", None)]

        def tokenize(record_set: RecordSet) -> Dataset:
            with bounded_renders(templates, f"a {dataset_name} record of {record_set.label}"):
                return tokenize_pairs_as_trl(trainer, record_set.dataset, processing_class, args, dataset_name)

        keep_end = pairs_preparation(trainer) == "DPOTrainer" and args.truncation_mode == "keep_end"
        rule = LengthRule(self.too_long, args.max_length, keep_end=keep_end)
        tokenized = self._split_rows(layout, key_parts, tokenize)
        tokenized, self.lengths[dataset_name] = rule.apply(tokenized, dataset_name, layout.where, layout.sources())
        return finish_pairs_as_trl(trainer, tokenized, args, dataset_name)

    def skip(self, why: str) -> None:
        """This run's trainer prepares its data in a way the cache cannot keep: said once, in the log and the
        summary."""
        self.skipped = why
        if self.enabled:
            log.info("data cache: not used: %s", why)

    def _split_rows(self, layout: SplitLayout, key_parts: dict, tokenize: Callable[[RecordSet], Dataset]) -> Dataset:
        """The split's rows, tokenized: each of its record sets read from the cache or tokenized, then selected."""
        sets = [self._tokenized(record_set, key_parts, tokenize) for record_set in layout.record_sets]
        tokenized = sets[0] if len(sets) == 1 else concatenate_datasets(sets)
        return tokenized if layout.indices is None else tokenized.select(layout.indices)

    def _tokenized(self, record_set: RecordSet, key_parts: dict, tokenize: Callable[[RecordSet], Dataset]) -> Dataset:
        key_json = {"format": CACHE_FORMAT, "records": record_set.identity, "trainer": key_parts}
        key = digest(key_json)[:32]
        if key in self._tokenized_here:
            return self._tokenized_here[key]
        if not self.enabled:
            self._tokenized_here[key] = found = tokenize(record_set)
            return found
        folder = self.folder / key
        entry = self.entries[key] = {"source": record_set.label, "key": key, "path": str(folder), "hit": False}
        self._tokenized_here[key] = found = self._read_or_tokenize(record_set, folder, entry, key_json, tokenize)
        return found

    def _read_or_tokenize(self, record_set, folder, entry, key_json, tokenize: Callable[[RecordSet], Dataset]):
        if (folder / KEY_FILE).is_file():
            try:
                found = load_from_disk(str(folder))
            except Exception as error:  # a damaged folder is tokenized again
                log.warning("data cache: %s is unreadable (%s); tokenizing %s again", folder, error, record_set.label)
            else:
                if len(found) == len(record_set.dataset):
                    entry["hit"] = True
                    log.info("data cache: %s: tokenized records reused from %s", record_set.label, folder)
                    return found
                log.warning(
                    "data cache: %s holds %d rows, not %d; tokenizing again",
                    folder,
                    len(found),
                    len(record_set.dataset),
                )
            shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        tokenized = tokenize(record_set)
        if len(tokenized) != len(record_set.dataset):  # TRL drops nothing before truncation; never cache if it did
            log.warning(
                "data cache: %s: TRL kept %d of %d rows; not cached",
                record_set.label,
                len(tokenized),
                len(record_set.dataset),
            )
            return tokenized
        entry["saved"] = self._save(tokenized, folder, key_json)
        log.info(
            "data cache: %s tokenized in %.1f s%s",
            record_set.label,
            time.perf_counter() - started,
            f", saved to {folder}" if entry["saved"] else "",
        )
        return tokenized

    def _save(self, dataset: Dataset, folder: Path, key_json: dict) -> bool:
        """Write ``dataset`` to ``folder`` atomically (a temporary folder, then a rename). False where it cannot."""
        temporary = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=self.folder))
            dataset.save_to_disk(str(temporary))
            (temporary / KEY_FILE).write_text(json.dumps(key_json, indent=2, sort_keys=True, default=str) + "\n")
            if (folder / KEY_FILE).is_file():  # another job saved the same record set meanwhile: keep theirs
                return True
            if folder.exists():  # a damaged copy
                shutil.rmtree(folder, ignore_errors=True)
            os.replace(temporary, folder)
            return True
        except Exception as error:  # a cache that cannot be written costs time, never the run
            log.warning("data cache: cannot save into %s (%s); this run goes on without it", self.folder, error)
            return False
        finally:  # a write cut short, by an error or a signal, leaves nothing behind
            if temporary is not None and temporary.exists():
                shutil.rmtree(temporary, ignore_errors=True)


class PairsCacheHook:
    """Trainer mixin for TRL's DPO and KTO trainers (before ``compat.trl.PreparePairsHook`` in the bases):
    ``dataset_cache=`` takes a ``Splits.cache``; None prepares every dataset as TRL does."""

    def __init__(self, *args, dataset_cache: DatasetCache | None = None, **kwargs):
        self.dataset_cache = dataset_cache
        super().__init__(*args, **kwargs)

    def prepare_pairs(self, dataset, processing_class, args, dataset_name):
        finish = super().prepare_pairs
        if self.dataset_cache is None:
            return finish(dataset, processing_class, args, dataset_name)
        return self.dataset_cache.prepare_pairs(self, dataset, processing_class, args, dataset_name, finish)


class DatasetCacheHook:
    """Trainer mixin (before the class that defines ``prepare_dataset``, e.g. fusetune.compat.trl.PrepareDatasetHook,
    in the bases): ``dataset_cache=`` takes a ``Splits.cache``; None prepares every dataset as TRL does."""

    def __init__(self, *args, dataset_cache: DatasetCache | None = None, **kwargs):
        self.dataset_cache = dataset_cache
        super().__init__(*args, **kwargs)

    def prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        finish = super().prepare_dataset
        if self.dataset_cache is None:
            return finish(dataset, processing_class, args, packing, formatting_func, dataset_name)
        return self.dataset_cache.prepare(
            self, dataset, processing_class, args, packing, formatting_func, dataset_name, finish
        )
