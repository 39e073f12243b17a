"""Dataset formatters: each checks one raw record, then maps it to a TRL standard format.

TRL's SFTTrainer then renders and tokenizes the record and builds its labels:
prompt/completion records train on the completion only, conversations train on
assistant turns when ``assistant_only_loss`` is set, and text records on everything.

Every record is checked before any is formatted (``checks.py`` runs the checks over the columns).
A check gets the record's values of the formatter's columns, in order, and returns None for a good
record, a problem (a short string) for a bad one, or an ``Empty`` problem for a well-formed record
with nothing in it to learn from or to condition on: ``data.empty_content`` decides those.
"""

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import FusetuneError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
# Tool turns are refused: only role and content are kept, so the assistant's tool calls would be lost.
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class Empty(str):
    """The problem of a well-formed record that is empty: an empty answer, prompt, text or message."""


def kind(value: object) -> str:
    """A value's type in the words of JSON."""
    names = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _string(value: object, name: str) -> str | None:
    """The problem with a required string, if any."""
    if isinstance(value, str):
        return None
    if value is None:
        return f"'{name}' is missing or null"
    return f"'{name}' must be a string, got {kind(value)}"


@dataclass(frozen=True)
class Turns:
    """How one style of conversation names its keys and roles."""

    role: str
    content: str
    roles: dict[str, str]  # the role as written -> TRL's role
    other: str  # the data option for the other style, suggested when a message uses its keys
    other_role: str
    other_content: str


CHAT_TURNS = Turns("role", "content", CHAT_ROLES, "sharegpt", "from", "value")
SHAREGPT_TURNS = Turns("from", "value", SHAREGPT_ROLES, "chat", "role", "content")


def check_conversation(messages: object, name: str, turns: Turns, needs_answer: bool = True) -> str | None:
    """A non-empty list of messages with known roles and string contents, and (``needs_answer``) an assistant turn
    to learn."""
    if not isinstance(messages, list):
        return f"'{name}' is missing or null" if messages is None else f"'{name}' must be a list, got {kind(messages)}"
    if not messages:
        return f"'{name}' is empty"
    empty = None
    answered = False
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            return f"message {n} must be an object with '{turns.role}' and '{turns.content}', got {kind(message)}"
        written = message.get(turns.role)
        if written is None:
            if message.get(turns.other_role) is not None:
                return (
                    f"message {n} has '{turns.other_role}'/'{turns.other_content}' keys, "
                    f"not '{turns.role}'/'{turns.content}': use data={turns.other}"
                )
            return f"message {n} has no '{turns.role}'"
        role = turns.roles.get(written) if isinstance(written, str) else None
        if role is None:
            if written == "tool":
                return f"message {n}: tool turns are not supported (only role and content are kept)"
            return f"message {n} has {turns.role} {_short(written)}, not one of {', '.join(turns.roles)}"
        if message.get("tool_calls") is not None:
            return f"message {n}: tool calls are not supported (only role and content are kept)"
        content = message.get(turns.content)
        if not isinstance(content, str):
            if content is None:
                return f"message {n} ({written}) has no '{turns.content}'"
            return f"message {n} ({written}) '{turns.content}' must be a string, got {kind(content)}"
        answered = answered or role == "assistant"
        # An empty system message is a choice of the data; an empty user or assistant turn is not.
        if empty is None and role != "system" and not content.strip():
            empty = Empty(f"message {n} ({written}) is empty")
    if not answered and needs_answer:
        return "no assistant message (nothing to train on)"
    return empty


def _check_strings(values: tuple, names: tuple[str, ...]) -> str | None:
    """Every value a string; an empty one (blank after stripping) makes the record Empty."""
    for value, name in zip(values, names, strict=True):
        problem = _string(value, name)
        if problem:
            return problem
    for value, name in zip(values, names, strict=True):
        if not value.strip():
            return Empty(f"empty '{name}'")
    return None


def check_chat(values: tuple, names: tuple[str, ...]) -> str | None:
    return check_conversation(values[0], names[0], CHAT_TURNS)


def check_sharegpt(values: tuple, names: tuple[str, ...]) -> str | None:
    return check_conversation(values[0], names[0], SHAREGPT_TURNS)


def check_alpaca(values: tuple, names: tuple[str, ...]) -> str | None:
    instruction, context, output = values
    if context is not None and not isinstance(context, str):  # a missing or null input is no input
        return _string(instruction, names[0]) or f"'{names[1]}' must be a string, got {kind(context)}"
    return _check_strings((instruction, output), (names[0], names[2]))


def check_text(values: tuple, names: tuple[str, ...]) -> str | None:
    return _check_strings(values, names)


def check_completion(values: tuple, names: tuple[str, ...]) -> str | None:
    return _check_strings(values, names)


def check_preference(values: tuple, names: tuple[str, ...]) -> str | None:
    """A prompt and two answers to it, all strings or all conversations (the prompt's turns, then each answer's
    assistant turns), as TRL's DPOTrainer takes them. Answers that are the same teach nothing: Empty."""
    lists = [isinstance(v, list) for v in values]
    if not any(lists):
        problem = _check_strings(values, names)
    elif not all(lists):
        given = ", ".join(f"'{name}' {kind(v)}" for name, v in zip(names, values, strict=True))
        return f"give {', '.join(names)} all as strings or all as conversations, got {given}"
    else:
        problem = check_conversation(values[0], names[0], CHAT_TURNS, needs_answer=False)
        if problem is None or isinstance(problem, Empty):
            for value, name in zip(values[1:], names[1:], strict=True):
                answer = check_conversation(value, name, CHAT_TURNS)
                if answer is not None and not isinstance(answer, Empty):
                    return f"'{name}' {answer}" if answer.startswith("message") else answer
                problem = problem or (answer and Empty(f"'{name}' {answer}"))
    if problem is None and values[1] == values[2]:
        return Empty(f"'{names[1]}' and '{names[2]}' are the same (nothing to prefer)")
    return problem


def preference(values: tuple, chat_template: bool) -> dict:
    def plain(value):
        return [_role_content(m) for m in value] if isinstance(value, list) else value

    prompt, chosen, rejected = values
    return {"prompt": plain(prompt), "chosen": plain(chosen), "rejected": plain(rejected)}


def check_kto(values: tuple, names: tuple[str, ...]) -> str | None:
    """A prompt and one answer to it (strings, or conversations as data=preference takes them) and whether the
    answer is desirable: a true/false label, as TRL's KTOTrainer takes them."""
    label = values[2]
    if not isinstance(label, bool):
        return f"'{names[2]}' must be true or false (is the answer desirable?), got {kind(label)}"
    lists = [isinstance(v, list) for v in values[:2]]
    if not any(lists):
        return _check_strings(values[:2], names[:2])
    if not all(lists):
        return f"give {names[0]} and {names[1]} both as strings or both as conversations"
    problem = check_conversation(values[0], names[0], CHAT_TURNS, needs_answer=False)
    if problem is None or isinstance(problem, Empty):
        answer = check_conversation(values[1], names[1], CHAT_TURNS)
        if answer is not None and not isinstance(answer, Empty):
            return f"'{names[1]}' {answer}" if answer.startswith("message") else answer
        problem = problem or (answer and Empty(f"'{names[1]}' {answer}"))
    return problem


def kto(values: tuple, chat_template: bool) -> dict:
    def plain(value):
        return [_role_content(m) for m in value] if isinstance(value, list) else value

    return {"prompt": plain(values[0]), "completion": plain(values[1]), "label": values[2]}


def chat(values: tuple, chat_template: bool) -> dict:
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in values[0]]}


def as_messages(turns: list[dict]) -> list[dict]:
    """ShareGPT turns (checked by ``check_sharegpt``) as TRL's messages: {from, value} -> {role, content}."""
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def sharegpt(values: tuple, chat_template: bool) -> dict:
    return {"messages": as_messages(values[0])}


def standardize_sharegpt(dataset, field: str = "conversations"):
    """Unsloth's ``standardize_sharegpt``: the dataset with each ShareGPT conversation in ``field`` turned into
    role/content messages (human -> user, gpt -> assistant), in the same column; other columns are kept.

    The records are checked as ``data=sharegpt`` checks them (a record that is well formed but has an empty turn
    passes); the first bad one is refused in one line with its index. Records already in role/content form pass."""
    columns = list(getattr(dataset, "column_names", None) or [])
    if field not in columns:
        raise FusetuneError(f"standardize_sharegpt: the dataset has no '{field}' column (it has {columns})")
    standard = []
    for index, turns in enumerate(dataset[field]):
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and turns[0].get("role") is not None:
            problem, style = check_conversation(turns, field, CHAT_TURNS), CHAT_TURNS
        else:
            problem, style = check_conversation(turns, field, SHAREGPT_TURNS), SHAREGPT_TURNS
        if problem and not isinstance(problem, Empty):
            raise FusetuneError(f"standardize_sharegpt: record {index}: {problem}")
        standard.append(as_messages(turns) if style is SHAREGPT_TURNS else [_role_content(t) for t in turns])
    if columns == [field]:  # removing the only column leaves no rows to add the new one to
        return type(dataset).from_dict({field: standard})
    return dataset.remove_columns(field).add_column(field, standard).select_columns(columns)


def _role_content(message: dict) -> dict:
    return {"role": message["role"], "content": message["content"]}


def alpaca(values: tuple, chat_template: bool) -> dict:
    instruction, context, output = values
    if chat_template:
        user = f"{instruction}\n\n{context}" if context else instruction
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": output}],
        }
    prompt = ALPACA_PROMPT.format(
        context=", paired with an input that provides further context" if context else "",
        instruction=instruction,
        input_block=f"### Input:\n{context}\n\n" if context else "",
    )
    return {"prompt": prompt, "completion": output}


def text(values: tuple, chat_template: bool) -> dict:
    return {"text": values[0]}


def completion(values: tuple, chat_template: bool) -> dict:
    return {"prompt": values[0], "completion": values[1]}


@dataclass(frozen=True)
class Formatter:
    """The columns a formatter reads, how it checks a record, and how it maps one to TRL's form."""

    columns: tuple[str, ...]  # read in this order; data.field renames the first where takes_field
    check: Callable[[tuple, tuple[str, ...]], str | None]
    format: Callable[[tuple, bool], dict]  # (the record's values of columns, chat template?) -> TRL's form
    optional: tuple[str, ...] = ()  # columns the data may lack (read as null)
    takes_field: bool = False

    def column_names(self, field: str | None) -> tuple[str, ...]:
        return (field, *self.columns[1:]) if self.takes_field and field else self.columns


FORMATTERS: dict[str, Formatter] = {
    "chat": Formatter(("messages",), check_chat, chat, takes_field=True),
    "sharegpt": Formatter(("conversations",), check_sharegpt, sharegpt, takes_field=True),
    "alpaca": Formatter(("instruction", "input", "output"), check_alpaca, alpaca, optional=("input",)),
    "text": Formatter(("text",), check_text, text, takes_field=True),
    "completion": Formatter(("prompt", "completion"), check_completion, completion),
    "synthetic": Formatter(("prompt", "completion"), check_completion, completion),
    "preference": Formatter(("prompt", "chosen", "rejected"), check_preference, preference),
    "synthetic_preference": Formatter(("prompt", "chosen", "rejected"), check_preference, preference),
    "kto": Formatter(("prompt", "completion", "label"), check_kto, kto),
    "synthetic_kto": Formatter(("prompt", "completion", "label"), check_kto, kto),
}
