"""build_splits: the data config in, TRL-ready train and eval splits out, checked before any weights load.

The steps: check the config and the chat template, read every source (``sources.py``), render each source's
first record, make the train split (one source's rows, or a mixture drawn by weight: ``mixture.py``) and the eval
split (every source's held-out records, unweighted), and take generation prompts in turns across sources.
``Splits.cache`` remembers which rows of which record sets make each split, so a trainer given
``dataset_cache=splits.cache`` tokenizes each record set once and reuses it in later runs (``cache.py``).
"""

import logging
from dataclasses import dataclass, field

from datasets import Dataset
from jinja2 import TemplateError

from ..errors import FusetuneError, one_line
from .cache import DatasetCache, RecordSet
from .mixture import combine_rows, draw_mixture
from .rules import KTO_FORMATTERS, PREFERENCE_FORMATTERS, data_problems, is_mixture, value
from .sources import LoadedSource, ReadOptions, SourceSpec, load_source, source_specs
from .templates import bounded_renders, check_template, render_within, use_chat_template

log = logging.getLogger(__name__)
CONVERSATIONS = "conversations (messages)"
CHAT_FORMATTERS = ("chat", "sharegpt")
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
    # the tokenized cache: FastSFTTrainer, FastDPOTrainer or FastKTOTrainer(dataset_cache=splits.cache)
    cache: DatasetCache | None = None


def _record_form(formatter: str, chat_template: bool) -> str:
    if formatter in CHAT_FORMATTERS:
        return CONVERSATIONS
    if formatter == "alpaca":
        return "prompt/completion turns" if chat_template else "prompt/completion text"
    if formatter in PREFERENCE_FORMATTERS:
        return "prompt/chosen/rejected pairs"
    if formatter in KTO_FORMATTERS:
        return "prompt/completion/label answers"
    return "text" if formatter == "text" else "prompt/completion text"


def _refuse_plain_for_assistant_only(specs: list[SourceSpec], forms: dict[str, str]) -> None:
    plain = [s for s in specs if forms[s.key] not in (CONVERSATIONS, "prompt/completion turns")]
    if not plain:
        return
    spec = plain[0]
    already = " (prompt/completion records train on the completion only already)" if "prompt" in forms[spec.key] else ""
    raise FusetuneError(
        f"trainer.assistant_only_loss=true trains on the assistant turns of conversations, but {spec.key} "
        f"({spec.formatter}) gives {forms[spec.key]}{already}: set trainer.assistant_only_loss=false"
    )


def _check_record_forms(specs: list[SourceSpec], chat_template: bool, mixture: bool, assistant_only_loss: bool) -> bool:
    """Whether alpaca records become one-turn conversations (a mixture with conversations); raises where the
    sources cannot be mixed, or cannot train on assistant tokens only."""
    as_messages = mixture and chat_template and any(_record_form(s.formatter, True) == CONVERSATIONS for s in specs)
    forms = {
        s.key: CONVERSATIONS if as_messages and s.formatter == "alpaca" else _record_form(s.formatter, chat_template)
        for s in specs
    }
    if len(set(forms.values())) > 1:
        given = ", ".join(f"{s.key} ({s.formatter}) gives {forms[s.key]}" for s in specs)
        raise FusetuneError(f"data.sources: {FORM_HINT}; here {given}")
    if assistant_only_loss:
        _refuse_plain_for_assistant_only(specs, forms)
    elif as_messages and any(s.formatter == "alpaca" for s in specs):
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


def _template_label(cfg) -> str:
    return f"data.chat_template={cfg.chat_template}" if cfg.chat_template else "the tokenizer's chat template"


def _read_options(cfg, tokenizer, specs: list[SourceSpec], assistant_only_loss: bool) -> ReadOptions:
    """How every source is read, once the chat template and the record forms are checked (before anything loads)."""
    has_template = tokenizer.chat_template is not None
    chat_template = has_template if cfg.use_chat_template is None else cfg.use_chat_template
    if chat_template and not has_template:
        raise FusetuneError("data.use_chat_template: the tokenizer has no chat template")
    for spec in specs:
        if spec.formatter in CHAT_FORMATTERS and not has_template:
            raise FusetuneError(f"{spec.key}: formatter '{spec.formatter}' needs a tokenizer with a chat template")
    as_messages = _check_record_forms(specs, chat_template, is_mixture(cfg), assistant_only_loss)
    if assistant_only_loss:
        _check_training_template(tokenizer)
    if has_template and (chat_template or any(spec.formatter in CHAT_FORMATTERS for spec in specs)):
        check_template(tokenizer.chat_template, _template_label(cfg))
    return ReadOptions(chat_template, as_messages, value(cfg.empty_content), cfg.max_examples)


def _render_first(record_set: RecordSet, tokenizer, label: str) -> None:
    """Render the record set's first record with the chat template, bounded, before any weights load: a template
    that fails or never ends shows here, in one line naming the record."""
    record = record_set.dataset[0]
    messages = record.get("messages")
    if messages is None and isinstance(record.get("prompt"), list):
        messages = record["prompt"] + record["completion" if "completion" in record else "chosen"]
    if messages is None:
        return
    (where,) = record_set.where([0])
    try:
        render_within(lambda: tokenizer.apply_chat_template(messages, tokenize=False), where)
    except TemplateError as error:
        raise FusetuneError(f"{label}: the template does not render {where}: {one_line(error)}") from error


def generation_pair(record: dict, tokenizer) -> tuple[str, str] | None:
    """The prompt text the model sees and the answer it should produce, or None for plain text and for KTO's
    undesirable answers (``label`` false: not what the model should produce)."""
    if "messages" in record:
        *context, last = record["messages"]
        if last["role"] != "assistant" or not context:
            return None
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        return prompt, last["content"]
    if "prompt" in record and "completion" in record and record.get("label") is not False:
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


def _source_summary(source: LoadedSource, probability: float, drawn: int) -> dict:
    """One source's line of summary.json's data_sources."""
    spec, held_out = source.spec, source.held_out()
    eval_count = 0 if held_out is None else len(held_out[0].dataset) if held_out[1] is None else len(held_out[1])
    return {
        "source": spec.key,
        "path": spec.path,
        "name": spec.name,
        "split": spec.split if spec.name else None,
        "formatter": spec.formatter,
        "field": spec.field,
        "weight": spec.weight,
        "probability": probability,
        "records": len(source.records.dataset),
        "train_records": source.train_count(),
        "eval_records": eval_count,
        "drawn": drawn,
    }


def _mixture_train(
    sources: list[LoadedSource], cfg, seed: int, cache: DatasetCache
) -> tuple[Dataset, list[dict], dict]:
    """The mixture's training split, each source's summary (logged) and the mixture's size and seed."""
    train, counts, size = draw_mixture(sources, cfg.mixture_size, seed, cache)
    total = sum(source.spec.weight for source in sources)
    summaries = [
        _source_summary(source, source.spec.weight / total, count)
        for source, count in zip(sources, counts, strict=True)
    ]
    for summary in summaries:
        log.info(
            "%s (%s): weight %g, p=%.3f: %d examples drawn from %d training records",
            summary["source"],
            summary["path"] or summary["name"],
            summary["weight"],
            summary["probability"],
            summary["drawn"],
            summary["train_records"],
        )
    return train, summaries, {"size": size, "seed": seed}


def build_splits(cfg, tokenizer, seed: int, *, assistant_only_loss: bool = False) -> Splits:
    """Load ``cfg`` (a DataConfig), check every record, and format it into TRL-ready train/eval datasets.

    ``data.chat_template`` becomes ``tokenizer``'s template (``Splits.chat_template`` holds it for the tokenizer
    that trains). ``assistant_only_loss`` (trainer.assistant_only_loss) is checked here, before any weights load:
    it needs conversations and a chat template that marks the assistant's tokens."""
    problems = data_problems(cfg)
    if problems:
        raise FusetuneError("; ".join(problems))
    template = use_chat_template(cfg.chat_template, tokenizer) if cfg.chat_template else None
    specs = source_specs(cfg)
    options = _read_options(cfg, tokenizer, specs, assistant_only_loss)
    sources = [load_source(spec, cfg, seed, options) for spec in specs]
    for source in sources:
        for record_set in (source.records, source.eval_records):
            if record_set is not None:
                _render_first(record_set, tokenizer, _template_label(cfg))
    cache = DatasetCache(cfg.cache_dir, enabled=cfg.cache, too_long=value(cfg.too_long))
    if is_mixture(cfg):
        train, summaries, mixture = _mixture_train(sources, cfg, seed, cache)
    else:
        (source,) = sources
        train = combine_rows([(source.records, source.train_rows)], cache)
        summaries, mixture = [_source_summary(source, 1.0, len(train))], None
    held = [segment for source in sources if (segment := source.held_out()) is not None]
    held_out = combine_rows(held, cache) if held else None
    with bounded_renders([tokenizer.chat_template], "a held-out prompt"):
        pairs = _generation_pairs(
            [record_set.dataset if rows is None else record_set.dataset.select(rows) for record_set, rows in held],
            tokenizer,
            cfg.num_generate,
        )
    return Splits(train, held_out, pairs, sources=summaries, mixture=mixture, chat_template=template, cache=cache)
