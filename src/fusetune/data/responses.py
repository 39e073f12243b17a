"""Loss on the responses only, found by their markers: Unsloth's ``train_on_responses_only(trainer, ...)``.

A trainer's prepared dataset holds ``input_ids`` and ``labels`` (TRL builds the labels from its completion and
assistant masks; ``-100`` is a token the loss skips). This keeps a label only on response tokens: those after
each ``response_part`` up to the next ``instruction_part`` (or the next ``response_part``, or the end of the
document), so every assistant turn of a multi-turn chat trains and nothing else does. A label already
``-100`` stays so. The fused loss and TRL's loss both count exactly the labels left.

Markers are found among the token ids. Where a marker's tokens appear as its own tokenization, that is a match;
where the text around it merged one or two of its edge tokens with a neighbour (``"\\n\\n"`` then content that
opens with a newline, say), the marker's remaining core is matched and the decoded text of the tokens around it
must hold the whole marker. A token that holds the end of a response marker and the start of the response is
trained; one that holds the end of a response and the start of an instruction marker is not.

A record (a packed row: each of its documents) where either marker is missing is refused with one line naming
it, and so is a dataset where no response token is left: training on nothing is never what was meant.
"""

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

from ..errors import FusetuneError

LLAMA31_INSTRUCTION = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA31_RESPONSE = "<|start_header_id|>assistant<|end_header_id|>\n\n"
IGNORE = -100
EDGE_MERGES = ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0))  # (head, tail) marker tokens that may merge with neighbours


@dataclass(frozen=True)
class Marker:
    text: str
    ids: tuple[int, ...]


def make_marker(tokenizer, text, what: str) -> Marker:
    if not isinstance(text, str) or not text:
        raise FusetuneError(f"train_on_responses_only: {what} must be a non-empty string, got {text!r}")
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise FusetuneError(f"train_on_responses_only: {what} {text!r} tokenizes to nothing")
    return Marker(text, ids)


def _occurrences(ids: list[int], part: tuple[int, ...], lo: int = 0, hi: int | None = None) -> list[int]:
    hi = len(ids) if hi is None else hi
    k = len(part)
    return [p for p in range(lo, hi - k + 1) if ids[p] == part[0] and tuple(ids[p : p + k]) == part]


def find_marker(ids: list[int], marker: Marker, decode: Callable[[list[int]], str]) -> list[tuple[int, int]]:
    """(first token, first token after it holding no marker text) of each place ``marker`` is, in order."""
    k = len(marker.ids)
    found = {p: (p, p + k) for p in _occurrences(ids, marker.ids)}
    taken = [range(s, e) for s, e in found.values()]
    for head, tail in EDGE_MERGES:
        core = marker.ids[head : k - tail]
        if not core:
            continue
        for p in _occurrences(ids, core):
            if any(p in span for span in taken):
                continue
            span = _merged_span(ids, p, len(core), head, tail, marker.text, decode)
            if span is not None:
                found[span[0]] = span
                taken.append(range(*span))
    return sorted(found.values())


def _merged_span(ids, p, length, head, tail, text, decode) -> tuple[int, int] | None:
    """The span of a marker whose core sits at ``p``, where up to ``head`` / ``tail`` tokens around it hold the
    rest of its text (merged with text that is not the marker); None where they do not."""
    lo, hi = max(0, p - head), min(len(ids), p + length + tail)
    if text not in decode(ids[lo:hi]):
        return None
    start = next(s for s in range(p, lo - 1, -1) if text in decode(ids[s:hi]))
    end = next(e for e in range(p + length, hi + 1) if text in decode(ids[start:e]))
    window = decode(ids[start:end])
    if window.endswith(text) or end == p + length:
        return start, end
    return start, end - 1  # the last token holds the marker's end and what follows it: it belongs to the response


def response_mask(
    ids: list[int], instruction: Marker, response: Marker, decode, bounds: list[int] | None = None
) -> list[bool] | str:
    """Which tokens are response tokens; a problem (a string) where a document lacks either marker.
    ``bounds``: the start of each document of a packed row, and its end (default: one document)."""
    bounds = bounds or [0, len(ids)]
    mask = [False] * len(ids)
    for n, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        doc = ids[lo:hi]
        asks = [s for s, _ in find_marker(doc, instruction, decode)]
        answers = find_marker(doc, response, decode)
        where = f" (document {n + 1} of the packed row)" if len(bounds) > 2 else ""
        if not answers or not asks:
            missing = ", ".join(
                f"{what} {marker.text!r}" for what, marker, hits in
                (("instruction_part", instruction, asks), ("response_part", response, answers)) if not hits
            )  # fmt: skip
            return f"no {missing} in its tokens{where}"
        starts = sorted(asks + [s for s, _ in answers])
        for _, begin in answers:
            stop = next((s for s in starts if s >= begin), len(doc))
            for i in range(begin, stop):
                mask[lo + i] = True
    return mask


def _bounds(row: dict) -> list[int] | None:
    lengths = row.get("seq_lengths")
    return list(accumulate(lengths, initial=0)) if lengths else None


def _datasets(trainer) -> list[tuple[str, object, Callable]]:
    """(name, dataset, put it back) for the trainer's train dataset and each eval dataset."""

    def put_train(dataset):
        trainer.train_dataset = dataset

    found = [("train", trainer.train_dataset, put_train)]
    evals = trainer.eval_dataset
    if isinstance(evals, dict):
        for key in evals:
            found.append((f"eval '{key}'", evals[key], lambda d, key=key: evals.__setitem__(key, d)))
    elif evals is not None:
        found.append(("eval", evals, lambda d: setattr(trainer, "eval_dataset", d)))
    return found


def train_on_responses_only(
    trainer, instruction_part: str = LLAMA31_INSTRUCTION, response_part: str = LLAMA31_RESPONSE, tokenizer=None
):
    """Keep the labels of the trainer's tokenized train and eval datasets on response tokens only (see the
    module's docstring); returns the trainer. Call it after the trainer is built, before ``train()``."""
    tokenizer = tokenizer or getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    instruction = make_marker(tokenizer, instruction_part, "instruction_part")
    response = make_marker(tokenizer, response_part, "response_part")

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for name, dataset, put in _datasets(trainer):
        columns = list(getattr(dataset, "column_names", None) or [])
        if "input_ids" not in columns:
            raise FusetuneError(
                f"train_on_responses_only: the trainer's {name} dataset is not tokenized (columns {columns}); "
                "build the trainer without skip_prepare_dataset, then call it"
            )
        trained = [0]

        def relabel(row, index, name=name, trained=trained):
            mask = response_mask(row["input_ids"], instruction, response, decode, _bounds(row))
            if isinstance(mask, str):
                raise FusetuneError(f"train_on_responses_only: {name} record {index}: {mask}")
            labels = row.get("labels") or row["input_ids"]
            kept = [label if keep else IGNORE for label, keep in zip(labels, mask, strict=True)]
            trained[0] += sum(label != IGNORE for label in kept)
            return {"labels": kept}

        if hasattr(dataset, "cache_files"):  # a map-style Dataset: relabelled now, and the total checked
            relabelled = dataset.map(
                relabel, with_indices=True, load_from_cache_file=False, desc=f"Responses only ({name})"
            )
            if trained[0] == 0:
                raise FusetuneError(
                    f"train_on_responses_only: no response tokens are left in the {name} dataset (after "
                    f"{response_part!r}, before {instruction_part!r}): it would train on nothing"
                )
        else:  # an IterableDataset: relabelled as it streams
            relabelled = dataset.map(relabel, with_indices=True)
        put(relabelled)
    return trainer
