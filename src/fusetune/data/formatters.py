"""Dataset formatters: each maps one raw record to a TRL standard format.

TRL's SFTTrainer then renders and tokenizes the record and builds its labels:
prompt/completion records train on the completion only, conversations train on
assistant turns when ``assistant_only_loss`` is set, and text records on everything.
"""

from collections.abc import Callable

from ..errors import FusetuneError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def _column(record: dict, name: str, formatter: str) -> object:
    if name not in record:
        raise FusetuneError(f"data: formatter '{formatter}' needs a '{name}' column; the data has {sorted(record)}")
    return record[name]


def chat(record: dict, field: str, chat_template: bool) -> dict:
    messages = _column(record, field or "messages", "chat")
    for message in messages:
        if set(message) < {"role", "content"}:
            raise FusetuneError(f"data: chat messages need 'role' and 'content' keys, got {sorted(message)}")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def sharegpt(record: dict, field: str, chat_template: bool) -> dict:
    turns = _column(record, field or "conversations", "sharegpt")
    messages = []
    for turn in turns:
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise FusetuneError(
                f"data: sharegpt turn 'from' must be one of {sorted(SHAREGPT_ROLES)}, got {turn.get('from')!r}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages}


def alpaca(record: dict, field: str, chat_template: bool) -> dict:
    instruction = _column(record, "instruction", "alpaca")
    context = record.get("input") or ""
    output = _column(record, "output", "alpaca")
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


def text(record: dict, field: str, chat_template: bool) -> dict:
    return {"text": _column(record, field or "text", "text")}


def completion(record: dict, field: str, chat_template: bool) -> dict:
    return {
        "prompt": _column(record, "prompt", "completion"),
        "completion": _column(record, "completion", "completion"),
    }


FORMATTERS: dict[str, Callable[[dict, str, bool], dict]] = {
    "chat": chat,
    "sharegpt": sharegpt,
    "alpaca": alpaca,
    "text": text,
    "completion": completion,
    "synthetic": completion,
}
