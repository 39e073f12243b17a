"""data.chat_template: a chat template shipped in fusetune, or a Jinja file, in place of the tokenizer's own.

The shipped templates (``src/fusetune/assets/chat_templates/``) are written for fusetune from the formats' public
descriptions. Each marks an assistant's content and its end-of-turn token with ``{% generation %}``, so TRL's
assistant-only loss can find them (and train the model to stop). A shipped template writes its turn markers as
the tokenizer's own special tokens: it is refused for a tokenizer that lacks them, which would spell each marker
out in pieces and never learn to stop. A Jinja file is used as written.

Every template in use is checked before any weights load, and its renders are bounded:

- ``{% include %}``, ``{% import %}``, ``{% from %}`` and ``{% extends %}`` load other templates, which
  transformers cannot do (it renders without a loader): such a template is refused with one line;
- each render takes at most ``RENDER_SECONDS`` (``bounded_renders``: a SIGALRM timer, on the main thread);
  a render that runs longer ends the run (or the chat) with one line asking whether the template loops.
  Off the main thread there is no timer: ``render_within`` runs a check render in a thread it waits for.
"""

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from jinja2 import Environment, TemplateError, TemplateSyntaxError

from ..errors import FusetuneError

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "chat_templates"
# The special tokens each shipped template writes, besides the tokenizer's own bos_token and eos_token.
SHIPPED_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),  # [INST] and [/INST] are text in older Mistral tokenizers; an answer ends with eos_token
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
}
SAMPLE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


RENDER_SECONDS = 10.0  # the longest one render of a chat template may take
LOADS = ("include", "import", "from", "extends")  # tags that load another template


class RenderTimeout(FusetuneError):
    """A chat template render ran past RENDER_SECONDS."""


def template_problem(text: str) -> str | None:
    """Why transformers cannot render ``text``, seen without rendering it: a tag that loads another template. None
    where it can be tried (text that is not Jinja fails its first render, with jinja's own words)."""
    try:
        tokens = [(line, kind, value) for line, kind, value in Environment().lex(text) if kind != "whitespace"]
    except TemplateSyntaxError:
        return None
    for (_, kind, _), (line, _, value) in zip(tokens, tokens[1:], strict=False):
        if kind == "block_begin" and value in LOADS:
            return (
                f"{{% {value} %}} on line {line} loads another template, which transformers cannot do (it renders "
                "chat templates without a loader): write the other template's text in place"
            )
    return None


def check_template(text, label: str) -> None:
    """Refuse (one line) a chat template transformers cannot render; ``text`` may be a dict of named ones."""
    for name, one in text.items() if isinstance(text, dict) else [(None, text)]:
        problem = template_problem(one) if isinstance(one, str) else None
        if problem:
            raise FusetuneError(f"{label}{f' ({name})' if name else ''}: {problem}")


def _too_slow(what: str, seconds: float) -> str:
    return f"chat template: rendering {what} took over {seconds:g} s; does it loop?"


@contextmanager
def _alarm(seconds: float, what: str) -> Iterator[None]:
    """Raise RenderTimeout in this (the main) thread after ``seconds``; nothing where a timer is already set."""
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:  # someone else's timer: leave it alone
        yield
        return

    def expired(signum, frame):
        raise RenderTimeout(_too_slow(what, seconds))

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def bounded_renders(templates, what: str | Callable[[], str], seconds: float | None = None) -> Iterator[None]:
    """Within the block, every render of each of ``templates`` (texts; None skipped) by transformers on the main
    thread takes at most ``seconds`` (default RENDER_SECONDS), else raises RenderTimeout naming ``what``."""
    seconds = RENDER_SECONDS if seconds is None else seconds
    compiled = [_compiled(text) for text in dict.fromkeys(templates) if isinstance(text, str)]
    if not _on_main_thread() or not compiled:
        yield
        return
    kept = [(template, template.root_render_func) for template in compiled]
    for template, render in kept:
        template.root_render_func = _bounded(render, what, seconds)
    try:
        yield
    finally:
        for template, render in kept:
            template.root_render_func = render


def _bounded(render, what, seconds: float):
    def bounded(context):
        with _alarm(seconds, what() if callable(what) else what):
            yield from render(context)

    return bounded


def _compiled(text: str):
    """The compiled template transformers renders ``text`` with (it keeps one per text)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(text)


def render_within(render: Callable[[], str], what: str, seconds: float | None = None) -> str:
    """``render()``, bounded: by a timer on the main thread, else in a thread waited for (a render that never ends
    keeps that thread busy until the process exits)."""
    seconds = RENDER_SECONDS if seconds is None else seconds
    if _on_main_thread():
        with _alarm(seconds, what):
            return render()
    done: list = []
    worker = threading.Thread(target=lambda: done.append(_outcome(render)), daemon=True)
    started = time.perf_counter()
    worker.start()
    worker.join(seconds)
    if not done:
        raise RenderTimeout(_too_slow(what, time.perf_counter() - started))
    value, error = done[0]
    if error is not None:
        raise error
    return value


def _outcome(render: Callable[[], str]) -> tuple:
    try:
        return render(), None
    except Exception as error:  # raised again in the thread that waits
        return None, error


def shipped() -> list[str]:
    return sorted(path.stem for path in SHIPPED_DIR.glob("*.jinja"))


def _is_path(choice: str) -> bool:
    return "/" in choice or "\\" in choice or choice.startswith(("~", ".")) or choice.endswith((".jinja", ".j2"))


def find_chat_template(choice: str) -> tuple[str, str | None]:
    """(the template's text, the shipped name or None for a file) for data.chat_template's value."""
    if not _is_path(choice):
        if choice not in shipped():
            raise FusetuneError(
                f"data.chat_template: no shipped template '{choice}'; shipped: {', '.join(shipped())}; "
                "or give the path of a Jinja file"
            )
        return (SHIPPED_DIR / f"{choice}.jinja").read_text(encoding="utf-8"), choice
    file = Path(choice).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "no such file"
        raise FusetuneError(f"data.chat_template: {what}: {file} (a Jinja file, or one of {', '.join(shipped())})")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FusetuneError(f"data.chat_template {file}: cannot be read: {error}") from error
    if not text.strip():
        raise FusetuneError(f"data.chat_template {file}: the file is empty")
    return text, None


def use_chat_template(choice: str, tokenizer) -> str:
    """Make data.chat_template the tokenizer's template; returns its text. Checks that the tokenizer can write a
    shipped template's markers, and that the template renders a conversation."""
    text, name = find_chat_template(choice)
    needs = SHIPPED_TOKENS[name] if name is not None else None
    return install_template(text, tokenizer, f"data.chat_template={choice}", needs)


FILE_HINT = "or give a Jinja file (used as written)"


def install_template(text: str, tokenizer, label: str, needs: tuple[str, ...] | None, hint: str = FILE_HINT) -> str:
    """Make ``text`` the tokenizer's chat template; returns it. ``needs``: the special tokens it writes (refused where
    the tokenizer lacks one, with ``hint`` for another way; None: a user's file, used as written). It must render
    a conversation."""
    if needs is not None:
        vocab = tokenizer.get_vocab()
        missing = [token for token in needs if token not in vocab]
        if missing:
            raise FusetuneError(
                f"{label}: the tokenizer has no {'token' if len(missing) == 1 else 'tokens'} {', '.join(missing)}, "
                "so the template's turn markers would be written in pieces and the model would not learn to stop; "
                f"choose the template of the tokenizer's own family, {hint}"
            )
        if "eos_token" in text and tokenizer.eos_token is None:
            raise FusetuneError(f"{label}: the template ends each answer with the tokenizer's eos_token; it has none")
    check_template(text, label)
    try:
        render_within(lambda: tokenizer.apply_chat_template(SAMPLE, tokenize=False, chat_template=text), "a sample")
        render_within(
            lambda: tokenizer.apply_chat_template(
                SAMPLE[:2], tokenize=False, add_generation_prompt=True, chat_template=text
            ),
            "a sample",
        )
    except TemplateError as error:
        raise FusetuneError(f"{label}: the template does not render a conversation: {error}") from error
    tokenizer.chat_template = text
    return text
