"""Chat templates by the names Unsloth's notebooks use: ``get_chat_template(tokenizer, "llama-3.1")``.

Each name is backed by a real template: one shipped with fusetune (``assets/chat_templates``, marked for
assistant-only loss), or the model's own template as TRL ships it (``trl/chat_templates``; TRL swaps in its
marked twin when ``assistant_only_loss`` is on). A name is known only where such a template exists; the
error for any other lists the known ones. The template is installed through ``templates.install_template``,
so a tokenizer that lacks the template's turn tokens is refused there (Unsloth would rename its vocabulary).

``map_eos_token`` makes the template's end-of-turn token the tokenizer's ``eos_token``, so generation and
``train_on_responses_only`` stop where an answer ends. ``mapping`` lets the template read ShareGPT turns
(``{"from": "human", "value": ...}``) as they are: a prefix renames their keys and roles before the template.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FusetuneError
from .templates import SHIPPED_DIR, SHIPPED_TOKENS, install_template

DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Named:
    """Where a named template's text lives, the special tokens it writes, and the token that ends an answer."""

    source: str  # "fusetune" (shipped) or "trl"
    file: str  # the file's stem
    needs: tuple[str, ...]
    stop: str | None  # None: the tokenizer's own eos_token ends an answer


LLAMA3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHATML = ("<|im_start|>", "<|im_end|>")
GEMMA = ("<start_of_turn>", "<end_of_turn>")
PHI3 = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def _shipped(name: str, stop: str | None) -> Named:
    return Named("fusetune", name, SHIPPED_TOKENS[name], stop)


# Unsloth's names (and their common spellings) -> the template that backs them.
NAMED: dict[str, Named] = {
    **dict.fromkeys(("llama-3", "llama3"), _shipped("llama3", "<|eot_id|>")),
    **dict.fromkeys(
        ("llama-3.1", "llama-31", "llama3.1", "llama-3.3", "llama-33"), Named("trl", "llama3_1", LLAMA3, "<|eot_id|>")
    ),
    **dict.fromkeys(("llama-3.2", "llama-32", "llama3.2"), Named("trl", "llama3_2", LLAMA3, "<|eot_id|>")),
    "chatml": _shipped("chatml", "<|im_end|>"),
    **dict.fromkeys(("qwen-2.5", "qwen-25", "qwen2.5", "qwen25"), Named("trl", "qwen2_5", CHATML, "<|im_end|>")),
    **dict.fromkeys(("qwen-3", "qwen3"), Named("trl", "qwen3", CHATML, "<|im_end|>")),
    **dict.fromkeys(("gemma", "gemma-2", "gemma2"), _shipped("gemma", "<end_of_turn>")),
    **dict.fromkeys(("gemma-3", "gemma3"), Named("trl", "gemma3", GEMMA, "<end_of_turn>")),
    **dict.fromkeys(("phi-3", "phi3"), _shipped("phi3", "<|end|>")),
    **dict.fromkeys(("phi-3.5", "phi-35", "phi3.5"), Named("trl", "phi3_5", PHI3, "<|end|>")),
    "mistral": _shipped("mistral", None),
}


def _trl_dir() -> Path:
    import trl

    return Path(trl.__file__).parent / "chat_templates"


def template_text(named: Named) -> str:
    folder = SHIPPED_DIR if named.source == "fusetune" else _trl_dir()
    path = folder / f"{named.file}.jinja"
    if not path.is_file():
        raise FusetuneError(f"get_chat_template: the installed TRL has no {path.name} (in {folder})")
    return path.read_text(encoding="utf-8")


def _literal(value: str) -> str:
    return json.dumps(value)  # a JSON string is a Jinja string literal


def mapped(text: str, mapping: dict) -> str:
    """``text`` preceded by a prefix that renames each message's keys and roles as ``mapping`` says (Unsloth's
    form: ``{"role": "from", "content": "value", "user": "human", "assistant": "gpt"}``). Messages already in
    role/content form pass unchanged."""
    unknown = sorted(set(mapping) - set(DEFAULT_MAPPING))
    if unknown or not all(isinstance(v, str) for v in mapping.values()):
        raise FusetuneError(
            f"get_chat_template: mapping takes string values for the keys {', '.join(DEFAULT_MAPPING)}; got {mapping!r}"
        )
    full = {**DEFAULT_MAPPING, **mapping}
    if full == DEFAULT_MAPPING:
        return text
    role, content = _literal(full["role"]), _literal(full["content"])
    roles = "{" + ", ".join(f"{_literal(full[r])}: {_literal(r)}" for r in ("user", "assistant")) + "}"
    prefix = (
        "{%- set _ns = namespace(turns=[]) -%}{%- for _m in messages -%}"
        f"{{%- set _role = _m[{role}] if {role} in _m else _m['role'] -%}}"
        f"{{%- set _content = _m[{content}] if {content} in _m else _m['content'] -%}}"
        f"{{%- set _ns.turns = _ns.turns + [{{'role': {roles}.get(_role, _role), 'content': _content}}] -%}}"
        "{%- endfor -%}{%- set messages = _ns.turns %}"
    )
    return prefix + text


def get_chat_template(tokenizer, chat_template="llama-3.1", mapping: dict | None = None, map_eos_token: bool = True):
    """Set ``tokenizer.chat_template`` to the template Unsloth calls ``chat_template``; returns the tokenizer.

    ``chat_template`` may also be ``(jinja_text, stop_token)``, as Unsloth takes a custom one (``"eos_token"``: the
    tokenizer's own). ``map_eos_token``:
    the template's end-of-turn token becomes the tokenizer's ``eos_token``.
    """
    if isinstance(chat_template, tuple) and len(chat_template) == 2 and all(isinstance(p, str) for p in chat_template):
        text, stop = chat_template
        stop = None if stop in ("", "eos_token") else stop  # Unsloth's "eos_token": the tokenizer's own
        needs, label = ((stop,) if stop else ()), "get_chat_template(a custom template)"
    elif isinstance(chat_template, str) and chat_template.lower() in NAMED:
        named = NAMED[chat_template.lower()]
        text, stop, needs, label = (
            template_text(named),
            named.stop,
            named.needs,
            f"get_chat_template({chat_template!r})",
        )
    else:
        raise FusetuneError(
            f"get_chat_template: no template named {chat_template!r}; known: {', '.join(NAMED)}; "
            "or pass (jinja_text, stop_token)"
        )
    install_template(mapped(text, mapping or {}), tokenizer, label, needs, "or pass (jinja_text, stop_token)")
    if map_eos_token and stop and tokenizer.eos_token != stop:
        tokenizer.eos_token = stop
    return tokenizer
