"""The data config's own rules, checked before anything loads: by ``app.config.validate`` and by ``build_splits``.

Each rule gives one problem line that names the key to change. Rules that need the data or the tokenizer (a bad
record, a column that is not there, a chat template without generation markers) are checked where those load.
"""

import math

from ..errors import FusetuneError
from .formatters import FORMATTERS
from .templates import check_template, find_chat_template

SOURCE_FORMATTERS = ("chat", "sharegpt", "alpaca", "text", "completion", "preference", "kto")
SYNTHETIC = ("synthetic", "synthetic_preference", "synthetic_kto")  # the embedded set: num_train, num_eval, no path
PREFERENCE_FORMATTERS = ("preference", "synthetic_preference")  # chosen/rejected pairs, for trainer=dpo, orpo, simpo
KTO_FORMATTERS = ("kto", "synthetic_kto")  # single answers labelled desirable or not, for trainer=kto
# What a formatter's records train: the preference trainers take only their own kind, the SFT trainers the rest.
PAIRS, LABELLED, SINGLE = "chosen/rejected pairs", "labelled answers", "single answers"
# Top-level keys that name one dataset; a mixture reads each source's own instead.
ONE_DATASET_KEYS = ("path", "name", "subset", "revision", "eval_path", "eval_split", "field")
EXAMPLE = (
    "data.sources='[{path: a.jsonl, formatter: chat, weight: 0.7}, {name: org/set, formatter: alpaca, weight: 0.3}]'"
)


def value(x):
    """An Enum member's value; anything else as it is."""
    return getattr(x, "value", x)


def is_mixture(cfg) -> bool:
    return value(cfg.formatter) == "mixture"


def record_kind(formatter: str | None) -> str:
    """What a formatter's records are: chosen/rejected pairs, labelled answers (KTO), or single answers (SFT)."""
    if formatter in PREFERENCE_FORMATTERS:
        return PAIRS
    return LABELLED if formatter in KTO_FORMATTERS else SINGLE


def record_formatters(cfg) -> list[tuple[str, str | None]]:
    """(how messages name it, formatter) of each dataset of the data config: "data=chat", or each source of a
    mixture ("data.sources.1 (preference)")."""
    if is_mixture(cfg):
        return [(f"data.sources.{n} ({value(s.formatter)})", value(s.formatter)) for n, s in enumerate(cfg.sources)]
    return [(f"data={value(cfg.formatter)}", value(cfg.formatter))]


def has_eval_data(cfg) -> bool:
    """Whether the data config holds out records for evaluation."""
    if value(cfg.formatter) in SYNTHETIC and cfg.num_eval > 0:
        return True
    if is_mixture(cfg):
        return cfg.eval_fraction > 0 or any(s.eval_path or s.eval_split for s in cfg.sources)
    return bool(cfg.eval_path or cfg.eval_split or cfg.eval_fraction > 0)


def eval_requested(cfg) -> bool:
    """Whether the data config asks for held-out records itself (the synthetic data always has its eval split)."""
    return value(cfg.formatter) not in SYNTHETIC and has_eval_data(cfg)


def _field_problem(key: str, formatter: str, field: str | None) -> str | None:
    spec = FORMATTERS.get(formatter)
    if field and spec is not None and not spec.takes_field:
        return (
            f"{key}: formatter '{formatter}' reads the columns {list(spec.columns)}; "
            f"{key}={field!r} names the column only for chat, sharegpt and text"
        )
    return None


def _source_problems(key: str, source) -> list[str]:
    problems = []
    if (source.path is None) == (source.name is None):
        problems.append(
            f"{key}: give exactly one of path (a local file) or name (a hub dataset), "
            f"got path={source.path!r} name={source.name!r}"
        )
    formatter = value(source.formatter)
    if formatter is None:
        problems.append(f"{key}.formatter is missing: give one of {', '.join(SOURCE_FORMATTERS)}")
    elif formatter not in SOURCE_FORMATTERS:
        problems.append(
            f"{key}.formatter: '{formatter}' is not a source formatter; one of {', '.join(SOURCE_FORMATTERS)}"
        )
    else:
        problems.append(_field_problem(f"{key}.field", formatter, source.field))
    weight = source.weight
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
        problems.append(f"{key}.weight must be a finite number >= 0 (weights are relative), got {weight}")
    if source.eval_path and source.eval_split:
        problems.append(f"{key}: give eval_path (a file) or eval_split (of the hub dataset), not both")
    elif source.eval_split and source.name is None:
        problems.append(f"{key}.eval_split names a split of a hub dataset; a local source takes eval_path")
    return [p for p in problems if p]


def _mixture_problems(cfg) -> list[str]:
    problems = []
    given = [f"data.{key}" for key in ONE_DATASET_KEYS if getattr(cfg, key) is not None]
    if given:
        problems.append(
            f"{', '.join(given)}: data=mixture reads its records from data.sources; give each source its own "
            "(data.sources.N.path, .name, .field, .eval_path ...)"
        )
    if not cfg.sources:
        problems.append(f"data.sources is empty: data=mixture needs at least one source, e.g. {EXAMPLE}")
        return problems
    for n, source in enumerate(cfg.sources):
        problems += _source_problems(f"data.sources.{n}", source)
    kinds = [(label, record_kind(f)) for label, f in record_formatters(cfg) if f in SOURCE_FORMATTERS]
    odd = next(((label, kind) for label, kind in kinds if kind != kinds[0][1]), None)
    if odd is not None:  # pairs, labelled answers and SFT records train different trainers: never one mixture
        problems.append(
            f"{odd[0]} gives {odd[1]}, but {kinds[0][0]} gives {kinds[0][1]}: a mixture's sources must all give "
            "one kind (chosen/rejected pairs: preference; labelled answers: kto; single answers: the SFT formatters)"
        )
    weights = [s.weight for s in cfg.sources]
    if all(isinstance(w, int | float) and w == 0 for w in weights):
        problems.append("data.sources: every weight is 0, so there is nothing to train on")
    if cfg.mixture_size is not None and cfg.mixture_size < 1:
        problems.append(
            f"data.mixture_size must be at least 1 (null: as many as the sources hold), got {cfg.mixture_size}"
        )
    return problems


def data_problems(cfg) -> list[str]:
    """The problems of a DataConfig that show without loading anything: one line each."""
    formatter = value(cfg.formatter)
    problems = []
    if is_mixture(cfg):
        problems += _mixture_problems(cfg)
    else:
        if cfg.sources:
            problems.append(
                f"data.sources is read only by data=mixture (data.formatter=mixture); formatter '{formatter}' "
                "reads data.path or data.name"
            )
        if cfg.mixture_size is not None:
            problems.append("data.mixture_size applies only to data=mixture")
        if formatter not in SYNTHETIC:
            if (cfg.path is None) == (cfg.name is None):
                problems.append(
                    f"data: formatter '{formatter}' needs exactly one of data.path or data.name "
                    f"(a local file or a hub dataset), got path={cfg.path!r} name={cfg.name!r}"
                )
            if cfg.eval_path and cfg.eval_split:
                problems.append("data: give data.eval_path (a file) or data.eval_split (of the hub dataset), not both")
            elif cfg.eval_split and cfg.name is None:
                problems.append(
                    "data.eval_split names a split of the hub dataset data.name; with data.path give data.eval_path"
                )
            problems.append(_field_problem("data.field", formatter, cfg.field))
    if cfg.max_examples is not None and cfg.max_examples < 1:
        problems.append(f"data.max_examples must be at least 1, got {cfg.max_examples}")
    if not 0 <= cfg.eval_fraction < 1:
        problems.append(f"data.eval_fraction must be at least 0 and below 1, got {cfg.eval_fraction}")
    if cfg.chat_template is not None:
        if cfg.use_chat_template is False:
            problems.append(
                "data.chat_template is set but data.use_chat_template=false renders no record with a template: "
                "drop one of them"
            )
        try:
            text, _ = find_chat_template(cfg.chat_template)
            check_template(text, f"data.chat_template={cfg.chat_template}")
        except FusetuneError as error:
            problems.append(str(error))
    return [p for p in problems if p]
