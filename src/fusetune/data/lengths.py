"""data.too_long: what happens to a record longer than the model's max length, stated and counted, never silent.

A record's length is its token count as TRL tokenized it (template, special tokens, EOS included); it is too long
when it holds more than max_length tokens. A preference pair's length is its prompt's and its longer answer's, a KTO
record's its prompt's and its answer's: the longest sequence TRL's collator builds from it. The policy:

- ``drop`` (the default): too-long records are removed;
- ``truncate``: they keep their first max_length tokens (their last with TRL's truncation_mode=keep_end); one
  whose trained (labelled) tokens all fall beyond the limit would train on nothing, so it is dropped instead (a
  pair whose prompt alone fills max_length, which TRL would drop unsaid);
- ``error``: the run ends with one line naming the first.

Each split logs one warning line with the counts and the first few records, and its counts go into summary.json
(``data_length``). A split that the policy leaves empty ends the run with one line naming the cause. Packing
strategies that split long records over rows (bfd_split, wrapped) lose no token: those records are counted, kept.
"""

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset

from ..errors import FusetuneError
from .files import MAX_SHOWN

log = logging.getLogger(__name__)
POLICIES = ("drop", "truncate", "error")
SPLITTING_PACKERS = ("bfd_split", "wrapped")
BATCH = 10_000


PAIR_ANSWERS = ("chosen_ids", "rejected_ids", "completion_ids")  # TRL's DPO and KTO tokenized answers


def _lengths(dataset: Dataset, column: str) -> np.ndarray:
    """Each row's length of the list column ``column``, read from the Arrow columns (no Python lists)."""
    counts = [
        pc.list_value_length(batch[column]).to_numpy(zero_copy_only=False)
        for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=BATCH)
    ]
    return np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, dtype=np.int64)


def token_counts(dataset: Dataset) -> np.ndarray:
    """Each row's number of tokens: its input_ids, or for a tokenized pair (``prompt_ids``) its prompt and its
    longest answer."""
    if "prompt_ids" not in dataset.column_names:
        return _lengths(dataset, "input_ids")
    answers = [_lengths(dataset, column) for column in PAIR_ANSWERS if column in dataset.column_names]
    return _lengths(dataset, "prompt_ids") + np.maximum.reduce(answers)


def _trains_on_nothing(dataset: Dataset, rows: np.ndarray, max_length: int, keep_end: bool) -> np.ndarray:
    """Which of ``rows`` have no labelled token among the max_length tokens truncation keeps (a pair: its prompt
    fills them)."""
    if "prompt_ids" in dataset.column_names:
        return np.zeros(len(rows), dtype=bool) if keep_end else _lengths(dataset, "prompt_ids")[rows] >= max_length
    window = slice(-max_length, None) if keep_end else slice(None, max_length)
    labels = dataset.select(rows)["labels"] if len(rows) else []
    return np.array([all(label == -100 for label in row[window]) for row in labels], dtype=bool)


@dataclass(frozen=True)
class LengthRule:
    """How one split is cut to length: the policy, the limit and TRL's options that decide what a cut keeps."""

    policy: str  # one of POLICIES
    max_length: int | None  # None: no limit
    keep_end: bool = False  # TRL's truncation_mode=keep_end
    splits_long: bool = False  # packing that splits long records over rows loses no token

    def apply(self, dataset: Dataset, split: str, where, sources) -> tuple[Dataset, dict]:
        """The split with the policy applied, and its counts for summary.json.

        ``where(rows)`` names split rows as a user finds them; ``sources`` gives each row's source label (None:
        one source)."""
        records = len(dataset)
        counts = {"records": records, "longer": 0, "dropped": 0, "truncated": 0}
        if self.max_length is None or records == 0:
            return dataset, counts
        longer = np.flatnonzero(token_counts(dataset) > self.max_length)
        counts["longer"] = len(longer)
        if not len(longer) or self.splits_long:
            if len(longer):
                log.info(
                    "data: %d of %d %s records are longer than max_seq_length=%d; packing splits them over rows",
                    len(longer),
                    records,
                    split,
                    self.max_length,
                )
            return dataset, self._per_source(counts, sources, longer, longer[:0], longer[:0])
        limit = self.max_length
        if self.policy == "error":
            raise FusetuneError(
                f"data.too_long=error: {split} record {where(longer[:1])} is longer than max_seq_length={limit} "
                f"tokens ({len(longer)} of {records} {split} records are); data.too_long=drop drops them, "
                f"truncate keeps their first {limit} tokens"
            )
        if self.policy == "truncate":
            empty = _trains_on_nothing(dataset, longer, limit, self.keep_end)
            dropped, truncated = longer[empty], longer[~empty]
        else:
            dropped, truncated = longer, longer[:0]
        if len(dropped) == records:
            raise FusetuneError(self._emptied(split, records))
        counts.update(dropped=len(dropped), truncated=len(truncated))
        self._warn(split, records, where, dropped, truncated)
        if len(dropped):
            keep = np.ones(records, dtype=bool)
            keep[dropped] = False
            dataset = dataset.select(np.flatnonzero(keep))
        return dataset, self._per_source(counts, sources, longer, dropped, truncated)

    def _warn(self, split: str, records: int, where, dropped: np.ndarray, truncated: np.ndarray) -> None:
        limit, end = self.max_length, "last" if self.keep_end else "first"
        untrained = f"none of their {end} {limit} tokens is trained"
        if len(truncated):
            also = f"; {len(dropped)} more were dropped ({where(dropped)}): {untrained}" if len(dropped) else ""
            log.warning(
                "data: %d of %d %s records are longer than max_seq_length=%d and were truncated to their %s %d "
                "tokens (%s)%s",
                len(truncated),
                records,
                split,
                limit,
                end,
                limit,
                where(truncated),
                also,
            )
        elif len(dropped):
            why = f"data.too_long=truncate keeps their {end} {limit} tokens" if self.policy == "drop" else untrained
            log.warning(
                "data: %d of %d %s records are longer than max_seq_length=%d and were dropped (%s)%s %s",
                len(dropped),
                records,
                split,
                limit,
                where(dropped),
                ";" if self.policy == "drop" else ":",
                why,
            )

    def _emptied(self, split: str, records: int) -> str:
        limit, end = self.max_length, "last" if self.keep_end else "first"
        every = f"the one {split} record" if records == 1 else f"all {records} {split} records"
        if self.policy == "drop":
            why = f"{'is' if records == 1 else 'are'} longer than max_seq_length={limit} and were dropped"
        else:
            why = f"{'has' if records == 1 else 'have'} no trained token in their {end} {limit} tokens"
        use = "nothing is left to train on" if split == "train" else f"nothing is left in the {split} split"
        return (
            f"data: {every} {why} (data.too_long={self.policy}), so {use}: raise model.max_seq_length, "
            "or shorten the records"
        )

    @staticmethod
    def _per_source(counts: dict, sources, longer, dropped, truncated) -> dict:
        if sources is None:
            return counts
        labels = np.asarray(sources, dtype=object)
        per = {}
        for label in dict.fromkeys(labels.tolist()):
            per[label] = {
                "records": int(np.count_nonzero(labels == label)),
                "longer": int(np.count_nonzero(labels[longer] == label)),
                "dropped": int(np.count_nonzero(labels[dropped] == label)),
                "truncated": int(np.count_nonzero(labels[truncated] == label)),
            }
        return {**counts, "sources": per}


def shown(names: list[str], count: int) -> str:
    """'data.path a.jsonl: lines 3, 7, 9 and 4 more': the first MAX_SHOWN names (each '<label>: line N')."""
    groups: dict[str, list[str]] = {}
    for name in names[:MAX_SHOWN]:
        label, _, number = name.rpartition(": ")
        groups.setdefault(label, []).append(number)
    parts = []
    for label, numbers in groups.items():
        words = {n.split()[0] for n in numbers}
        text = (
            f"{words.pop()}s {', '.join(n.split()[1] for n in numbers)}"
            if len(words) == 1 and len(numbers) > 1
            else ", ".join(numbers)
        )
        parts.append(f"{label}: {text}" if label else text)
    more = f" and {count - min(count, MAX_SHOWN)} more" if count > MAX_SHOWN else ""
    return "; ".join(parts) + more
