"""The text of ``fusetune train --help``: the config groups, then every key of the composed config with its value
and its one-line description, taken from the schema's dataclass: a field's ``metadata["help"]`` (TRL's and
transformers' fields, FastSFTConfig's and FastDPOConfig's own) or the comment beside or above it (the app's schemas
in config.py)."""

import dataclasses
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
import typing
from enum import Enum
from functools import cache

from omegaconf import DictConfig, ListConfig, OmegaConf

LINE = 110  # a description longer than this is cut at its first sentence, or shortened
FLAGS_WITH_VALUES = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}  # fmt: skip


def overrides_of(argv: list[str]) -> list[str]:
    """The ``key=value`` / ``group=option`` arguments of a Hydra command line, its flags and their values aside."""
    found, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in FLAGS_WITH_VALUES
        else:
            found.append(arg)
    return found


def short_description(text: str) -> str:
    """A description on one line: whitespace collapsed; a long one cut at its first sentence, or shortened."""
    text = " ".join(str(text).split())
    if len(text) <= LINE:
        return text
    first = re.match(r"(.+?)([.;])\s", text)
    if first and len(first.group(1)) < LINE and first.group(1).count("(") == first.group(1).count(")"):
        return first.group(1) + (first.group(2) if first.group(2) == "." else "")
    return text[: LINE - 1] + "…"


@cache
def _comments(cls: type) -> dict[str, str]:
    """The comments of a dataclass's source: a field's own (beside it), else the comment lines just above it."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    comment_at = {}
    for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if token.type == tokenize.COMMENT:
            comment_at[token.start[0]] = token.string.lstrip("#").strip()
    found, above = {}, []
    for number, line in enumerate(lines, start=1):
        field = re.match(r"\s+(\w+)\s*:", line)
        if line.strip().startswith("#"):
            above.append(comment_at.get(number, ""))
            continue
        if field and not line.strip().startswith(("def ", "class ")):
            text = comment_at.get(number) or " ".join(above)
            if text:
                found.setdefault(field.group(1), text)
        above = []
    return found


@cache
def _field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if f.metadata.get("help")}


def descriptions(schema: type) -> dict[str, str]:
    """Each field of ``schema`` (a config.py schema) and its description."""
    from ..training.trainer import FastSFTConfig
    from .config import TRAINER_CLASSES, AppTrainerKeys, TrainerConfig

    # the other trainer classes first: FastSFTConfig's words win for the fields they share
    sources = [*TRAINER_CLASSES.values(), FastSFTConfig, AppTrainerKeys] if schema is TrainerConfig else [schema]
    found: dict[str, str] = {}
    for source in sources:
        for name, text in {**_field_help(source), **_comments(source)}.items():
            found[name] = short_description(text)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kinds = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if isinstance(t, type)]
        choices = next(([m.value for m in t] for t in kinds if issubclass(t, Enum)), None)
        if choices:  # an Enum's values are the choices
            found[f.name] = f"{found.get(f.name, '')} [{' | '.join(choices)}]".strip()
    return found


def _plain(value) -> str:
    """A value as an override writes it: null, true, [a, b], {k: v}."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_plain, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Enum):
        return value.name
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value) if value != "" else "''"


def _shown(node) -> str:
    if isinstance(node, DictConfig | ListConfig) and not node._is_none() and not node._is_interpolation():
        return _plain(OmegaConf.to_container(node, resolve=False))
    return _plain(node._value())


def key_lines(cfg, prefix: str = "") -> list[tuple[str, str]]:
    """(``key=value``, description) for every leaf of ``cfg`` (hydra.* aside), in the config's order."""
    schema = cfg._metadata.object_type if isinstance(cfg, DictConfig) else None
    about = descriptions(schema) if dataclasses.is_dataclass(schema) else {}
    rows = []
    for key in cfg.keys() if isinstance(cfg, DictConfig) else ():
        if not prefix and key == "hydra":
            continue
        node = cfg._get_node(key)
        path = f"{prefix}{key}"
        typed = isinstance(node, DictConfig) and dataclasses.is_dataclass(node._metadata.object_type)
        if typed and not node._is_none() and not node._is_interpolation():
            rows += key_lines(node, f"{path}.")
        else:
            rows.append((f"{path}={_shown(node)}", about.get(str(key), "")))
    return rows


def compose_for_help(overrides: list[str], config_dir: str, extra_dirs: list[str]):
    """The config the app would compose (with hydra.*), ``extra_dirs`` on the search path."""
    from hydra import compose, initialize_config_dir

    from .config import expand_resume_shorthand
    from .train import register

    register()
    folders = ",".join("file://" + os.path.abspath(d) for d in extra_dirs)  # as --config-dir adds them
    searchpath = [f"hydra.searchpath=[{folders}]"] if extra_dirs else []
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose("train", expand_resume_shorthand(overrides) + searchpath, return_hydra_config=True)


def help_text(argv: list[str], config_dir: str, extra_dirs: list[str], prog: str, options: dict[str, set]) -> str:
    """The whole help for the command line ``argv`` (without --help); ``options``: each group's options."""
    cfg = compose_for_help(overrides_of(argv), config_dir, extra_dirs)
    choices = cfg.hydra.runtime.choices
    out = [
        f"usage: {prog} [group=option ...] [key=value ...] [-m] [--config-dir DIR] [--cfg job]",
        "",
        "  group=option       choose an option of a config group (below; `fusetune presets` describes each)",
        "  key=value          set a key; +key=value adds one its group lacks (trainer.extra.KEY: untyped)",
        "  -m, --multirun     a sweep: key=a,b runs each value; experiment=... names prepared ones",
        "  --config-dir DIR   your own config folder: DIR/GROUP/NAME.yaml is the option NAME of GROUP",
        "  --cfg job          print the composed config and exit; --hydra-help: Hydra's own flags",
        "",
        "Config groups (the chosen option in [brackets]):",
    ]
    for group, names in sorted(options.items()):
        chosen = choices.get(group)
        shown = [f"[{name}]" if name == chosen else name for name in sorted(names)]
        out += textwrap.wrap(", ".join(shown), LINE, initial_indent=f"  {group}: ", subsequent_indent="    ")
    out += ["", "Keys (key=value), as this config sets them:"]
    rows = key_lines(cfg)
    width = min(48, max(len(setting) for setting, _ in rows))
    for setting, about in rows:
        out.append(f"  {setting:<{width}}  {about}".rstrip() if about else f"  {setting}")
    return "\n".join(out) + "\n"


def help_text_or_exit(argv: list[str], config_dir: str, extra_dirs: list[str], prog: str, options: dict) -> str:
    """``help_text``; a config that does not compose exits 2 with one line, as the app does."""
    from hydra.errors import CompactHydraException

    from .hydra_errors import hydra_error_line

    try:
        return help_text(argv, config_dir, extra_dirs, prog, options)
    except CompactHydraException as error:
        print(f"fusetune: error: {hydra_error_line(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
