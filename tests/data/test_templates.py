"""data.chat_template: shipped templates or a Jinja file replace the tokenizer's own, and assistant-only loss masks
exactly the assistant's tokens."""

import json
import logging
from pathlib import Path

import pytest
import trl
from trl.chat_template_utils import has_generation_markers

from fusetune.data import build_splits
from fusetune.data.templates import SHIPPED_DIR, find_chat_template, shipped
from fusetune.errors import FusetuneError
from fusetune.loading import load_tokenizer

from .test_formatters import data_cfg

SYSTEM, USER, ANSWER = "Be brief.", "hi", "yo"
TURNS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ANSWER},
    {"role": "user", "content": "more?"},
    {"role": "assistant", "content": "sure"},
]
# What each shipped template trains on for an assistant turn: its content and the end of its turn.
ASSISTANT = {
    "chatml": "{}<|im_end|>",
    "gemma": "{}<end_of_turn>",
    "llama3": "{}<|eot_id|>",
    "mistral": " {}<|end|>",  # the tiny tokenizer's eos_token is <|end|>
    "phi3": "{}<|end|>",
}


@pytest.fixture
def tokenizer():
    return load_tokenizer("fusetune:tiny_llama")  # a fresh one: these tests change its template


def chat_file(tmp_path, *records) -> str:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in records))
    return str(path)


def test_the_shipped_templates_are_the_documented_ones():
    assert shipped() == sorted(ASSISTANT) == ["chatml", "gemma", "llama3", "mistral", "phi3"]


@pytest.mark.parametrize("name", sorted(ASSISTANT))
def test_each_shipped_template_marks_each_answer_and_its_end_of_turn(name, tokenizer):
    text, found = find_chat_template(name)
    assert found == name and has_generation_markers(text)
    out = tokenizer.apply_chat_template(
        TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=text
    )
    marked = [token for token, mask in zip(out["input_ids"], out["assistant_masks"], strict=True) if mask]
    assert tokenizer.decode(marked) == ASSISTANT[name].format(ANSWER) + ASSISTANT[name].format("sure")
    # the generation prompt is what precedes the answer in training
    whole = tokenizer.apply_chat_template(TURNS[:3], tokenize=False, chat_template=text)
    prompt = tokenizer.apply_chat_template(TURNS[:2], tokenize=False, add_generation_prompt=True, chat_template=text)
    assert whole.startswith(prompt) and whole[len(prompt) :].startswith(ASSISTANT[name].format(ANSWER))


def test_assistant_only_loss_trains_exactly_the_assistant_tokens_of_a_shipped_template(tokenizer, tiny_model, tmp_path):
    path = chat_file(tmp_path, TURNS)
    splits = build_splits(
        data_cfg(formatter="chat", path=path, chat_template="phi3"), tokenizer, 0, assistant_only_loss=True
    )
    config = {"output_dir": str(tmp_path), "max_steps": 1, "report_to": [], "use_cpu": True}
    from fusetune.training.trainer import FastSFTConfig, FastSFTTrainer

    trainer = FastSFTTrainer(
        model=tiny_model,
        args=FastSFTConfig(**config, assistant_only_loss=True),
        train_dataset=splits.train,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    # the expected tokens and mask, piece by piece (the tiny tokenizer has one token per character or marker)
    pieces = [
        ("<s>", False),
        (f"<|system|>\n{SYSTEM}<|end|>\n", False),
        (f"<|user|>\n{USER}<|end|>\n", False),
        ("<|assistant|>\n", False),
        (f"{ANSWER}<|end|>", True),
        ("\n<|user|>\nmore?<|end|>\n<|assistant|>\n", False),
        ("sure<|end|>", True),
        ("\n", False),
    ]
    expected_ids, expected_mask = [], []
    for piece, trained in pieces:
        piece_ids = tokenizer.encode(piece, add_special_tokens=False)
        expected_ids += piece_ids
        expected_mask += [trained] * len(piece_ids)
    assert ids == expected_ids
    assert [label != -100 for label in labels] == expected_mask
    assert all(label == token for label, token in zip(labels, ids, strict=True) if label != -100)


def test_the_template_replaces_the_tokenizers_own_and_is_saved_with_it(tokenizer, tmp_path):
    path = chat_file(tmp_path, TURNS[1:3])
    cfg = data_cfg(formatter="chat", path=path, chat_template="phi3", eval_path=path, num_generate=1)
    splits = build_splits(cfg, tokenizer, 0)
    text = (SHIPPED_DIR / "phi3.jinja").read_text()
    assert splits.chat_template == tokenizer.chat_template == text
    assert splits.generation == [(f"<s><|user|>\n{USER}<|end|>\n<|assistant|>\n", ANSWER)]
    tokenizer.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(str(tmp_path / "saved")).chat_template == text
    plain = build_splits(data_cfg(formatter="chat", path=path), load_tokenizer("fusetune:tiny_llama"), 0)
    assert plain.chat_template is None


def test_a_jinja_file_is_used_as_written(tokenizer, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    cfg = data_cfg(formatter="chat", path=chat_file(tmp_path, TURNS[1:3]), chat_template=str(template))
    splits = build_splits(cfg, tokenizer, 0, assistant_only_loss=True)
    assert splits.chat_template == template.read_text() == tokenizer.chat_template


@pytest.mark.parametrize(
    "choice,message",
    [
        ("vicuna", "data.chat_template: no shipped template 'vicuna'; shipped: chatml, gemma, llama3, mistral, phi3;"),
        ("{tmp}/nope.jinja", "data.chat_template: no such file: {tmp}/nope.jinja"),
        ("{tmp}", "data.chat_template: is a directory: {tmp}"),
        ("{tmp}/empty.jinja", "data.chat_template {tmp}/empty.jinja: the file is empty"),
        ("{tmp}/broken.jinja", "data.chat_template={tmp}/broken.jinja: the template does not render a conversation:"),
        (
            "chatml",
            "data.chat_template=chatml: the tokenizer has no tokens <|im_start|>, <|im_end|>, so the template's",
        ),
    ],
)
def test_a_template_that_cannot_be_used_is_one_line(choice, message, tokenizer, tmp_path):
    (tmp_path / "empty.jinja").write_text("\n")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    cfg = data_cfg(formatter="chat", path=chat_file(tmp_path, TURNS[1:3]), chat_template=choice.format(tmp=tmp_path))
    with pytest.raises(FusetuneError) as caught:
        build_splits(cfg, tokenizer, 0)
    assert str(caught.value).startswith(message.format(tmp=tmp_path)) and "\n" not in str(caught.value)
    assert tokenizer.chat_template != (tmp_path / "broken.jinja").read_text()  # left as it was


def test_use_chat_template_false_contradicts_a_template(tokenizer, tmp_path):
    cfg = data_cfg(formatter="alpaca", path="a.jsonl", chat_template="phi3", use_chat_template=False)
    with pytest.raises(FusetuneError, match="data.chat_template is set but data.use_chat_template=false"):
        build_splits(cfg, tokenizer, 0)


def test_assistant_only_loss_without_generation_marks_says_what_to_do(tokenizer, tmp_path):
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    cfg = data_cfg(formatter="chat", path=chat_file(tmp_path, TURNS[1:3]))
    build_splits(cfg, tokenizer, 0)  # fine without assistant-only loss
    with pytest.raises(FusetuneError) as caught:
        build_splits(cfg, tokenizer, 0, assistant_only_loss=True)
    assert str(caught.value) == (
        "trainer.assistant_only_loss=true needs a chat template that marks the assistant's tokens "
        "({% generation %} ... {% endgeneration %}); the tokenizer's has no such marks and TRL has no training "
        "version of it: set data.chat_template to a shipped template of the tokenizer's family (chatml, gemma, "
        "llama3, mistral, phi3) or to a Jinja file with the marks around each assistant turn, or set "
        "trainer.assistant_only_loss=false"
    )
    build_splits(
        data_cfg(formatter="chat", path=cfg.path, chat_template="phi3"), tokenizer, 0, assistant_only_loss=True
    )


def test_assistant_only_loss_uses_trls_training_template_where_trl_has_one(tokenizer, tmp_path, caplog):
    # a template TRL knows (its copy of Llama 3's), without generation marks: TRL's trainer swaps in its training one
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "llama3.jinja").read_text()
    assert not has_generation_markers(tokenizer.chat_template)
    caplog.set_level(logging.INFO, logger="fusetune.data.pipeline")
    build_splits(
        data_cfg(formatter="chat", path=chat_file(tmp_path, TURNS[1:3])), tokenizer, 0, assistant_only_loss=True
    )
    assert "TRL's training version of the chat template" in caplog.text


def test_assistant_only_loss_needs_conversations(tiny_tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(FusetuneError) as caught:
        build_splits(data_cfg(formatter="completion", path=str(path)), tiny_tokenizer, 0, assistant_only_loss=True)
    assert str(caught.value) == (
        "trainer.assistant_only_loss=true trains on the assistant turns of conversations, but data (completion) "
        "gives prompt/completion text (prompt/completion records train on the completion only already): set "
        "trainer.assistant_only_loss=false"
    )
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")  # with a chat template: turns
    build_splits(data_cfg(formatter="alpaca", path=str(alpaca)), tiny_tokenizer, 0, assistant_only_loss=True)
