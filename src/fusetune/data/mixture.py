"""Make the train and eval splits from rows of the sources' record sets, and draw a mixture by weight.

A mixture (data=mixture, data.sources) draws data.mixture_size training examples (null: as many as the sources
hold for training together). Each draw picks source i with probability weight_i / sum(weights), through
``datasets.interleave_datasets`` with the run's seed; a source walks through its records in a shuffled order, and
one drawn past its end starts a new shuffled pass. So the size of the mixture, and the number of steps, is the
same whatever the weights: a weight sweep compares equal budgets. A source of weight 0 is read, checked and
evaluated on, but never drawn for training.

Each split is registered with the cache with its ``SplitLayout``, so the trainer tokenizes each record set once.
"""

import numpy as np
from datasets import Dataset, concatenate_datasets, interleave_datasets

from ..errors import FusetuneError, one_line
from .cache import DatasetCache, RecordSet, SplitLayout
from .sources import LoadedSource


def _concatenate(record_sets: list[RecordSet]) -> Dataset:
    if len(record_sets) == 1:
        return record_sets[0].dataset
    features = record_sets[0].dataset.features
    datasets = []
    for record_set in record_sets:
        dataset = record_set.dataset
        if dataset.features != features:
            try:
                dataset = dataset.cast(features)
            except (ValueError, TypeError) as error:
                raise FusetuneError(
                    f"data.sources: {record_set.label} gives records of another shape than {record_sets[0].label}: "
                    f"{one_line(error)}"
                ) from error
        datasets.append(dataset)
    return concatenate_datasets(datasets)


def combine_rows(segments: list[tuple[RecordSet, np.ndarray | None]], cache: DatasetCache) -> Dataset:
    """The dataset of the given rows of each record set (None: all), in order, registered with the cache."""
    record_sets = [record_set for record_set, _ in segments]
    indices = None
    if len(segments) > 1 or segments[0][1] is not None:
        offsets = np.cumsum([0] + [len(record_set.dataset) for record_set in record_sets[:-1]])
        indices = np.concatenate(
            [
                offset + (np.arange(len(record_set.dataset)) if rows is None else rows)
                for (record_set, rows), offset in zip(segments, offsets, strict=True)
            ]
        )
    dataset = _concatenate(record_sets)
    if indices is not None:
        dataset = dataset.select(indices)
    cache.register(dataset, SplitLayout(record_sets, indices))
    return dataset


def _draw(rows: list[np.ndarray], probabilities: list[float], size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, row) of each of ``size`` draws: source i with probability probabilities[i], its rows in a shuffled
    order that starts a new shuffled pass when it runs out."""
    rng = np.random.default_rng(seed)
    streams = []
    for n, available in enumerate(rows):
        passes = -(-size // len(available))
        order = np.concatenate([rng.permutation(available) for _ in range(passes)])[:size]
        streams.append(Dataset.from_dict({"source": np.full(size, n, dtype=np.int64), "row": order}))
    # Every stream holds `size` rows, so "first_exhausted" stops at `size` draws or later: the first `size` are kept.
    drawn = interleave_datasets(streams, probabilities=probabilities, seed=seed, stopping_strategy="first_exhausted")
    drawn = drawn.select(range(size)).with_format("numpy")
    return np.asarray(drawn["source"]), np.asarray(drawn["row"])


def draw_mixture(
    sources: list[LoadedSource], size: int | None, seed: int, cache: DatasetCache
) -> tuple[Dataset, list[int], int]:
    """The training mixture, the number drawn from each source, and its size."""
    used = [n for n, source in enumerate(sources) if source.spec.weight > 0]
    total = sum(sources[n].spec.weight for n in used)
    size = size if size is not None else sum(sources[n].train_count() for n in used)
    rows = [sources[n].rows_that_train() for n in used]
    drawn_source, drawn_row = _draw(rows, [sources[n].spec.weight / total for n in used], size, seed)
    counts = [0] * len(sources)
    for position, n in enumerate(used):
        counts[n] = int(np.count_nonzero(drawn_source == position))
    record_sets = [sources[n].records for n in used]
    offsets = np.cumsum([0] + [len(record_set.dataset) for record_set in record_sets[:-1]])
    indices = offsets[drawn_source] + drawn_row
    dataset = _concatenate(record_sets).select(indices)
    cache.register(dataset, SplitLayout(record_sets, indices))
    return dataset, counts, size
