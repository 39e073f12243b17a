"""Load datasets (local files, the hub, or the embedded synthetic set), check every record, format them for TRL,
and mix several sources by weight (data=mixture).

Each file or hub split is read, checked (every record: ``checks.py``), cut to data.max_examples and formatted
once, as a *unit* (``cache.Unit``). A split is rows of its units: all of one file, what an eval hold-out leaves,
or the draws of a mixture. ``Splits.cache`` remembers how, so a trainer given ``dataset_cache=splits.cache``
tokenizes each unit once and reuses it in later runs (``cache.py``).

A mixture (data=mixture, data.sources) draws data.mixture_size training examples (null: as many as the sources
hold for training together). Each draw picks source i with probability weight_i / sum(weights), through
``datasets.interleave_datasets`` with the run's seed; a source walks through its records in a shuffled order, and
one drawn past its end starts a new shuffled pass. So the size of the mixture, and the number of steps, is the
same whatever the weights: a weight sweep compares equal budgets. A source of weight 0 is read, checked and
evaluated on, but never drawn for training. The eval split is every source's held-out records (its eval_path or
eval_split, else data.eval_fraction of it), unweighted, and the generation prompts take turns across sources.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets, interleave_datasets, load_dataset
from jinja2 import TemplateError

from ..errors import FusetuneError
from .cache import DatasetCache, DatasetCacheHook, Plan, Unit, code_hash
from .checks import Source, checked, record_check
from .files import LOCAL_BUILDERS, content_hash, load_local, one_line
from .formatters import FORMATTERS
from .rules import PREFERENCE_FORMATTERS, SYNTHETIC, data_problems, is_mixture, value
from .synthetic import preference_pairs, synthetic_splits
from .templates import bounded_renders, check_template, render_within, use_chat_template

__all__ = [
    "LOCAL_BUILDERS",
    "DatasetCache",
    "DatasetCacheHook",
    "Splits",
    "build_splits",
    "generation_pair",
    "load_local",
]
log = logging.getLogger(__name__)
CONVERSATIONS = "conversations (messages)"
FORM_HINT = (
    "a mixture needs one record form: conversations (chat, sharegpt, and alpaca with a chat template), "
    "prompt/completion text (completion, and alpaca without one) or text (text)"
)


@dataclass
class Splits:
    train: Dataset
    eval: Dataset | None
    # (prompt text, expected answer) pairs for greedy exact-match evaluation
    generation: list[tuple[str, str]]
    # one dict per source (a single dataset is one source, "data"), for summary.json: source, path, name, split,
    # formatter, field, weight, probability, records, train_records, eval_records, drawn
    sources: list[dict] = field(default_factory=list)
    mixture: dict | None = None  # data=mixture: {"size", "seed"}
    chat_template: str | None = None  # data.chat_template's text, to set on the trained tokenizer; None: its own
    cache: DatasetCache | None = None  # the tokenized cache: FastSFTTrainer(dataset_cache=splits.cache)


@dataclass(frozen=True)
class Read:
    """One dataset the config names: the data group itself ("data"), or a source of a mixture ("data.sources.N")."""

    key: str
    formatter: str
    path: str | None = None
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    eval_path: str | None = None
    eval_split: str | None = None
    field: str | None = None
    weight: float = 1.0


@dataclass
class Part:
    """A read dataset: its unit, the rows that train, and where its held-out records are."""

    read: Read
    unit: Unit
    train_rows: np.ndarray | None = None  # None: every row
    eval_unit: Unit | None = None  # an eval file or split
    eval_rows: np.ndarray | None = None  # else rows of ``unit`` held out by data.eval_fraction

    def train_count(self) -> int:
        return len(self.unit.dataset) if self.train_rows is None else len(self.train_rows)

    def held_out(self) -> tuple[Unit, np.ndarray | None] | None:
        if self.eval_unit is not None:
            return self.eval_unit, None
        return (self.unit, self.eval_rows) if self.eval_rows is not None else None


def _reads(cfg) -> list[Read]:
    if is_mixture(cfg):
        keys = ("path", "name", "subset", "split", "revision", "eval_path", "eval_split", "field", "weight")
        return [
            Read(f"data.sources.{n}", value(s.formatter), **{k: getattr(s, k) for k in keys})
            for n, s in enumerate(cfg.sources)
        ]
    keys = ("path", "name", "subset", "split", "revision", "eval_path", "eval_split", "field")
    return [Read("data", value(cfg.formatter), **{k: getattr(cfg, k) for k in keys})]


def _hub(read: Read, split: str) -> tuple[Dataset, Source, dict]:
    subset = f"subset {read.subset}, " if read.subset else ""
    revision = f"revision {read.revision}, " if read.revision else ""
    source = Source(f"{read.key}.name {read.name} ({subset}{revision}split {split})")
    options = {"revision": read.revision} if read.revision else {}
    try:
        dataset = load_dataset(read.name, read.subset, split=split, **options)
    # not found (DatasetNotFoundError), offline (ConnectionError), an unknown split or subset (ValueError)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        raise FusetuneError(f"{source.label}: cannot load: {one_line(error)}") from error
    if len(dataset) == 0:
        raise FusetuneError(f"{source.label}: no records (0 records)")
    identity = {"kind": "hub", "name": read.name, "subset": read.subset, "split": split, "revision": read.revision}
    return dataset, source, {**identity, "fingerprint": getattr(dataset, "_fingerprint", None)}


def _local(path: str, key: str, check=None) -> tuple[Dataset, Source, dict]:
    """The file's records, keyed by its content: a SHA-256 of its bytes names every cache entry of it. ``check``:
    a record's problem, named with the file's unreadable lines when it cannot be read (files.load_local)."""
    file = Path(path).expanduser()
    if not file.is_file():
        return load_local(path, key), Source(f"{key} {path}", file), {}  # raises the one line that says why
    before = file.stat()
    hashed = content_hash(file)
    log.debug("data: %s hashed (%d bytes) in %.3f s", path, hashed["bytes"], hashed["seconds"])
    dataset = load_local(path, key, sha256=hashed["sha256"], check=check)
    after = file.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise FusetuneError(f"{key} {path}: the file changed while it was read; run again once it is written")
    identity = {"kind": "file", "path": str(file.resolve()), "sha256": hashed["sha256"], "size": hashed["bytes"]}
    return dataset, Source(f"{key} {path}", file, hashed), identity


def _format(dataset: Dataset, formatter_name: str, field: str | None, chat_template: bool, as_messages: bool):
    formatter = FORMATTERS[formatter_name]
    names = formatter.column_names(field)

    def format_batch(batch: dict) -> dict:
        size = len(next(iter(batch.values())))
        columns = [batch[name] if name in batch else [None] * size for name in names]
        rows = [formatter.format(values, chat_template) for values in zip(*columns, strict=True)]
        if as_messages:  # a one-turn conversation, mixed with others (alpaca with a chat template)
            rows = [{"messages": row["prompt"] + row["completion"]} for row in rows]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}

    return dataset.map(format_batch, batched=True, remove_columns=dataset.column_names)


@dataclass(frozen=True)
class Reading:
    """How every dataset of this build is read: the data group's options that apply to all of them."""

    chat_template: bool
    as_messages: bool
    empty_content: str
    max_examples: int | None


def _unit(loaded: tuple[Dataset, Source, dict], read: Read, how: Reading) -> Unit:
    dataset, source, identity = loaded
    read_count = len(dataset)
    dataset, rows = checked(dataset, source, read.formatter, read.field, how.empty_content)
    if how.max_examples is not None:
        dataset = dataset.select(range(min(how.max_examples, len(dataset))))
        rows = rows[: len(dataset)] if rows is not None else None
    as_messages = how.as_messages and read.formatter == "alpaca"
    formatted = _format(dataset, read.formatter, read.field, how.chat_template, as_messages)
    identity = {
        **identity,
        "formatter": read.formatter,
        "field": read.field,
        "chat_template": how.chat_template,
        "as_messages": as_messages,
        "empty_content": how.empty_content,
        "max_examples": how.max_examples,
        "code": code_hash(),
    }
    return Unit(source.label, formatted, identity, source=source, rows=rows, read=read_count)


def _render_first(unit: Unit, tokenizer, label: str) -> None:
    """Render the unit's first record with the chat template, bounded, before any weights load: a template that
    fails or never ends shows here, in one line naming the record."""
    record = unit.dataset[0]
    messages = record.get("messages")
    if messages is None and isinstance(record.get("prompt"), list):
        messages = record["prompt"] + record["completion" if "completion" in record else "chosen"]
    if messages is None:
        return
    (where,) = unit.where([0])
    try:
        render_within(lambda: tokenizer.apply_chat_template(messages, tokenize=False), where)
    except TemplateError as error:
        raise FusetuneError(f"{label}: the template does not render {where}: {one_line(error)}") from error


def _hold_out(count: int, fraction: float, seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of ``count`` records: datasets' train_test_split, as on the records themselves."""
    rows = Dataset.from_dict({"row": np.arange(count)})
    try:
        parts = rows.train_test_split(test_size=fraction, seed=seed)
    except ValueError as error:
        raise FusetuneError(f"{key}={fraction}: {one_line(error)}") from error
    return np.asarray(parts["train"]["row"]), np.asarray(parts["test"]["row"])


def _part(read: Read, cfg, seed: int, how: Reading) -> Part:
    check = record_check(read.formatter, read.field)  # a file that cannot be read is refused with its bad records
    if read.formatter in SYNTHETIC:
        train, held_out = synthetic_splits(cfg.num_train, cfg.num_eval, seed)
        if read.formatter == "synthetic_preference":
            train, held_out = preference_pairs(train, seed), preference_pairs(held_out, seed + 1)
        identity = {"kind": "synthetic", "num_train": cfg.num_train, "num_eval": cfg.num_eval, "seed": seed}
        source = Source("data (synthetic)")
        part = Part(read, _unit((Dataset.from_list(train), source, {**identity, "part": "train"}), read, how))
        if held_out:
            part.eval_unit = _unit((Dataset.from_list(held_out), source, {**identity, "part": "eval"}), read, how)
    elif read.path is not None:
        part = Part(read, _unit(_local(read.path, f"{read.key}.path", check), read, how))
    else:
        part = Part(read, _unit(_hub(read, read.split), read, how))
    if read.eval_path:
        part.eval_unit = _unit(_local(read.eval_path, f"{read.key}.eval_path", check), read, how)
    elif read.eval_split:
        part.eval_unit = _unit(_hub(read, read.eval_split), read, how)
    elif part.eval_unit is None and cfg.eval_fraction > 0:
        key = "data.eval_fraction" if read.key == "data" else f"data.eval_fraction (of {read.key})"
        part.train_rows, part.eval_rows = _hold_out(len(part.unit.dataset), cfg.eval_fraction, seed, key)
    return part


def _form(formatter: str, chat_template: bool) -> str:
    if formatter in ("chat", "sharegpt"):
        return CONVERSATIONS
    if formatter == "alpaca":
        return "prompt/completion turns" if chat_template else "prompt/completion text"
    if formatter in PREFERENCE_FORMATTERS:
        return "prompt/chosen/rejected pairs"
    return "text" if formatter == "text" else "prompt/completion text"


def _check_forms(reads: list[Read], chat_template: bool, mixture: bool, assistant_only_loss: bool) -> bool:
    """Whether alpaca records become one-turn conversations (a mixture with conversations); raises where the
    reads cannot be mixed, or cannot train on assistant tokens only."""
    as_messages = mixture and chat_template and any(_form(r.formatter, True) == CONVERSATIONS for r in reads)
    forms = {
        r.key: CONVERSATIONS if as_messages and r.formatter == "alpaca" else _form(r.formatter, chat_template)
        for r in reads
    }
    if len(set(forms.values())) > 1:
        given = ", ".join(f"{r.key} ({r.formatter}) gives {forms[r.key]}" for r in reads)
        raise FusetuneError(f"data.sources: {FORM_HINT}; here {given}")
    if assistant_only_loss:
        plain = [r for r in reads if forms[r.key] not in (CONVERSATIONS, "prompt/completion turns")]
        if plain:
            r = plain[0]
            raise FusetuneError(
                f"trainer.assistant_only_loss=true trains on the assistant turns of conversations, but {r.key} "
                f"({r.formatter}) gives {forms[r.key]}"
                + (
                    " (prompt/completion records train on the completion only already)"
                    if "prompt" in forms[r.key]
                    else ""
                )
                + ": set trainer.assistant_only_loss=false"
            )
    elif as_messages and any(r.formatter == "alpaca" for r in reads):
        log.warning(
            "data.sources: alpaca records are mixed with conversations, so they become conversations too (a user "
            "turn, then an assistant turn); with trainer.assistant_only_loss=false every token trains, the user's "
            "too. Set trainer.assistant_only_loss=true to train on the answers only"
        )
    return as_messages


def _check_training_template(tokenizer) -> None:
    """Assistant-only loss needs {% generation %} markers in the chat template, or TRL's training version of it."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return
    try:
        training = get_training_chat_template(tokenizer)
    except ValueError:
        training = None
    if training is None:
        raise FusetuneError(
            "trainer.assistant_only_loss=true needs a chat template that marks the assistant's tokens "
            "({% generation %} ... {% endgeneration %}); the tokenizer's has no such marks and TRL has no training "
            "version of it: set data.chat_template to a shipped template of the tokenizer's family (chatml, gemma, "
            "llama3, mistral, phi3) or to a Jinja file with the marks around each assistant turn, or set "
            "trainer.assistant_only_loss=false"
        )
    log.info("assistant-only loss: TRL's training version of the chat template (with generation marks) is used")


def _concatenate(units: list[Unit]) -> Dataset:
    if len(units) == 1:
        return units[0].dataset
    features = units[0].dataset.features
    datasets = []
    for unit in units:
        dataset = unit.dataset
        if dataset.features != features:
            try:
                dataset = dataset.cast(features)
            except (ValueError, TypeError) as error:
                raise FusetuneError(
                    f"data.sources: {unit.label} gives records of another shape than {units[0].label}: "
                    f"{one_line(error)}"
                ) from error
        datasets.append(dataset)
    return concatenate_datasets(datasets)


def _combine(segments: list[tuple[Unit, np.ndarray | None]], cache: DatasetCache) -> Dataset:
    """The dataset of the given rows of each unit (None: all), in order, registered with the cache."""
    units = [unit for unit, _ in segments]
    indices = None
    if len(segments) > 1 or segments[0][1] is not None:
        offsets = np.cumsum([0] + [len(unit.dataset) for unit in units[:-1]])
        indices = np.concatenate(
            [
                offset + (np.arange(len(unit.dataset)) if rows is None else rows)
                for (unit, rows), offset in zip(segments, offsets, strict=True)
            ]
        )
    dataset = _concatenate(units)
    if indices is not None:
        dataset = dataset.select(indices)
    cache.register(dataset, Plan(units, indices))
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


def _mix(parts: list[Part], size: int | None, seed: int, cache: DatasetCache) -> tuple[Dataset, list[int], int]:
    """The training mixture, the number drawn from each part, and its size."""
    used = [n for n, part in enumerate(parts) if part.read.weight > 0]
    total = sum(parts[n].read.weight for n in used)
    size = size if size is not None else sum(parts[n].train_count() for n in used)
    rows = [np.arange(parts[n].train_count()) if parts[n].train_rows is None else parts[n].train_rows for n in used]
    source, row = _draw(rows, [parts[n].read.weight / total for n in used], size, seed)
    counts = [0] * len(parts)
    for position, n in enumerate(used):
        counts[n] = int(np.count_nonzero(source == position))
    units = [parts[n].unit for n in used]
    offsets = np.cumsum([0] + [len(unit.dataset) for unit in units[:-1]])
    indices = offsets[source] + row
    dataset = _concatenate(units).select(indices)
    cache.register(dataset, Plan(units, indices))
    return dataset, counts, size


def generation_pair(record: dict, tokenizer) -> tuple[str, str] | None:
    """The prompt text the model sees and the answer it should produce, or None for plain text."""
    if "messages" in record:
        *context, last = record["messages"]
        if last["role"] != "assistant" or not context:
            return None
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        return prompt, last["content"]
    if "prompt" in record and "completion" in record:
        prompt, answer = record["prompt"], record["completion"]
        if isinstance(prompt, list):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            answer = answer[-1]["content"]
        return prompt, answer
    return None


def _generation_pairs(held_out: list[Dataset], tokenizer, count: int) -> list[tuple[str, str]]:
    """Up to ``count`` pairs, taking turns across the held-out datasets (one per source)."""
    pairs: list[tuple[str, str]] = []
    records = [iter(dataset) for dataset in held_out]
    while records and len(pairs) < count:
        for each in list(records):
            record = next(each, None)
            if record is None:
                records.remove(each)
            elif (pair := generation_pair(record, tokenizer)) is not None:
                pairs.append(pair)
                if len(pairs) == count:
                    break
    return pairs


def _record(part: Part, probability: float, drawn: int) -> dict:
    read, held_out = part.read, part.held_out()
    eval_count = 0 if held_out is None else len(held_out[0].dataset) if held_out[1] is None else len(held_out[1])
    return {
        "source": read.key,
        "path": read.path,
        "name": read.name,
        "split": read.split if read.name else None,
        "formatter": read.formatter,
        "field": read.field,
        "weight": read.weight,
        "probability": probability,
        "records": len(part.unit.dataset),
        "train_records": part.train_count(),
        "eval_records": eval_count,
        "drawn": drawn,
    }


def build_splits(cfg, tokenizer, seed: int, *, assistant_only_loss: bool = False) -> Splits:
    """Load ``cfg`` (a DataConfig), check every record, and format it into TRL-ready train/eval datasets.

    ``data.chat_template`` becomes ``tokenizer``'s template (``Splits.chat_template`` holds it for the tokenizer
    that trains). ``assistant_only_loss`` (trainer.assistant_only_loss) is checked here, before any weights load:
    it needs conversations and a chat template that marks the assistant's tokens."""
    problems = data_problems(cfg)
    if problems:
        raise FusetuneError("; ".join(problems))
    template = use_chat_template(cfg.chat_template, tokenizer) if cfg.chat_template else None
    has_template = tokenizer.chat_template is not None
    chat_template = has_template if cfg.use_chat_template is None else cfg.use_chat_template
    if chat_template and not has_template:
        raise FusetuneError("data.use_chat_template: the tokenizer has no chat template")
    reads = _reads(cfg)
    for read in reads:
        if read.formatter in ("chat", "sharegpt") and not has_template:
            raise FusetuneError(f"{read.key}: formatter '{read.formatter}' needs a tokenizer with a chat template")
    mixture = is_mixture(cfg)
    as_messages = _check_forms(reads, chat_template, mixture, assistant_only_loss)
    if assistant_only_loss:
        _check_training_template(tokenizer)
    template_label = f"data.chat_template={cfg.chat_template}" if cfg.chat_template else "the tokenizer's chat template"
    if has_template and (chat_template or any(read.formatter in ("chat", "sharegpt") for read in reads)):
        check_template(tokenizer.chat_template, template_label)
    how = Reading(chat_template, as_messages, value(cfg.empty_content), cfg.max_examples)
    parts = [_part(read, cfg, seed, how) for read in reads]
    for part in parts:
        for unit in (part.unit, part.eval_unit):
            if unit is not None:
                _render_first(unit, tokenizer, template_label)
    cache = DatasetCache(cfg.cache_dir, enabled=cfg.cache, too_long=value(cfg.too_long))

    if mixture:
        train, counts, size = _mix(parts, cfg.mixture_size, seed, cache)
        total = sum(part.read.weight for part in parts)
        sources = [_record(part, part.read.weight / total, count) for part, count in zip(parts, counts, strict=True)]
        for record in sources:
            log.info(
                "%s (%s): weight %g, p=%.3f: %d examples drawn from %d training records",
                record["source"],
                record["path"] or record["name"],
                record["weight"],
                record["probability"],
                record["drawn"],
                record["train_records"],
            )
        mix = {"size": size, "seed": seed}
    else:
        (part,) = parts
        train = _combine([(part.unit, part.train_rows)], cache)
        sources, mix = [_record(part, 1.0, len(train))], None
    held = [segment for part in parts if (segment := part.held_out()) is not None]
    held_out = _combine(held, cache) if held else None
    with bounded_renders([tokenizer.chat_template], "a held-out prompt"):
        pairs = _generation_pairs(
            [unit.dataset if rows is None else unit.dataset.select(rows) for unit, rows in held],
            tokenizer,
            cfg.num_generate,
        )
    return Splits(train, held_out, pairs, sources=sources, mixture=mix, chat_template=template, cache=cache)
