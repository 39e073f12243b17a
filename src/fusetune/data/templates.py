"""data.chat_template: a chat template shipped in fusetune, or a Jinja file, in place of the tokenizer's own.

The shipped templates (``src/fusetune/assets/chat_templates/``) are written for fusetune from the formats' public
descriptions. Each marks an assistant's content and its end-of-turn token with ``{% generation %}``, so TRL's
assistant-only loss can find them (and train the model to stop). A shipped template writes its turn markers as
the tokenizer's own special tokens: it is refused for a tokenizer that lacks them, which would spell each marker
out in pieces and never learn to stop. A Jinja file is used as written.
"""

from pathlib import Path

from jinja2 import TemplateError

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
    label = f"data.chat_template={choice}"
    if name is not None:
        vocab = tokenizer.get_vocab()
        missing = [token for token in SHIPPED_TOKENS[name] if token not in vocab]
        if missing:
            raise FusetuneError(
                f"{label}: the tokenizer has no {'token' if len(missing) == 1 else 'tokens'} {', '.join(missing)}, "
                "so the template's turn markers would be written in pieces and the model would not learn to stop; "
                "choose the template of the tokenizer's own family, or give a Jinja file (used as written)"
            )
        if "eos_token" in text and tokenizer.eos_token is None:
            raise FusetuneError(f"{label}: the template ends each answer with the tokenizer's eos_token; it has none")
    try:
        tokenizer.apply_chat_template(SAMPLE, tokenize=False, chat_template=text)
        tokenizer.apply_chat_template(SAMPLE[:2], tokenize=False, add_generation_prompt=True, chat_template=text)
    except TemplateError as error:
        raise FusetuneError(f"{label}: the template does not render a conversation: {error}") from error
    tokenizer.chat_template = text
    return text
