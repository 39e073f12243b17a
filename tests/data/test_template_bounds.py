"""Chat templates are bounded: a render that runs too long (a template that loops) ends training or the chat
with one line, within the bound; a template that loads another one ({% include %}, {% import %}, {% from %},
{% extends %}, which transformers cannot render) is one line before any weights load."""

import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from fusetune import chat
from fusetune.data import build_splits, templates
from fusetune.data.rules import data_problems
from fusetune.errors import FusetuneError
from fusetune.loading import load_model, load_tokenizer

from ..conftest import ROOT
from .conftest import trainer_on
from .test_formatters import data_cfg

BOUND = 0.5  # seconds, in-process
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
PLAIN = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
PLAIN += "{% if add_generation_prompt %}<|assistant|>{% endif %}"


def when(condition: str) -> str:
    """A template that loops only where ``condition`` holds, and renders plainly elsewhere."""
    return "{% if " + condition + " %}" + LOOP + "{% endif %}" + PLAIN


def conversation(user: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "yo"}]}


@pytest.fixture(autouse=True)
def short_bound(monkeypatch):
    monkeypatch.setattr(templates, "RENDER_SECONDS", BOUND)


def write(tmp_path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


# (id, the tokenizer's own template, data config, the one line, when: "data" = build_splits, "trainer" = TRL's
# tokenization of the split)
LOOPS = [
    (
        "data.chat_template-loops",
        PLAIN,
        {"chat_template": "{tmp}/loop.jinja"},
        "chat template: rendering a sample took over 0.5 s; does it loop?",
        "data",
    ),
    (
        "own-template-loops-on-every-record",
        LOOP + PLAIN,
        {},
        "chat template: rendering data.path {tmp}/c.jsonl: line 1 took over 0.5 s; does it loop?",
        "data",
    ),
    (
        "loops-on-a-later-record",
        when("messages[0]['content'] == 'slow'"),
        {},
        "chat template: rendering a train record of data.path {tmp}/c.jsonl took over 0.5 s; does it loop?",
        "trainer",
    ),
    (
        "loops-on-an-eval-file-record",
        when("messages[0]['content'] == 'held'"),
        {"eval_path": "{tmp}/e.jsonl"},
        "chat template: rendering data.eval_path {tmp}/e.jsonl: line 1 took over 0.5 s; does it loop?",
        "data",
    ),
    (
        "loops-on-a-generation-prompt",
        when("add_generation_prompt and messages[0]['content'] == 'hi 1'"),
        {"eval_path": "{tmp}/e2.jsonl", "num_generate": 2},
        "chat template: rendering a held-out prompt took over 0.5 s; does it loop?",
        "data",
    ),
]


@pytest.mark.parametrize("case, own, data, message, where", LOOPS, ids=[row[0] for row in LOOPS])
def test_a_looping_template_is_one_line_within_the_bound(case, own, data, message, where, tiny_model, tmp_path):
    tokenizer = load_tokenizer("fusetune:tiny_llama")
    tokenizer.chat_template = own
    write(tmp_path, "loop.jinja", LOOP + PLAIN)
    lines = [conversation(f"hi {i}") for i in range(6)]
    lines[3] = conversation("slow")
    write(tmp_path, "c.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    write(tmp_path, "e.jsonl", json.dumps(conversation("held")) + "\n")
    write(tmp_path, "e2.jsonl", "".join(json.dumps(conversation(f"hi {i}")) + "\n" for i in range(3)))
    values = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in data.items()}
    cfg = data_cfg(formatter="chat", path=str(tmp_path / "c.jsonl"), cache=False, **values)
    started = time.perf_counter()
    with pytest.raises(FusetuneError) as raised:
        splits = build_splits(cfg, tokenizer, 0)
        assert where == "trainer", "build_splits should have refused it"
        trainer_on(splits, tiny_model, tokenizer, tmp_path)
    assert str(raised.value) == message.format(tmp=tmp_path)
    assert time.perf_counter() - started < BOUND + 10  # the bound, plus the data's own preparation


LOADS = [
    ("include", "{% include 'other.jinja' %}", 1),
    ("import", PLAIN + "\n{% import 'macros.jinja' as m %}", 2),
    ("from-import", "{%- from 'macros.jinja' import turn -%}" + PLAIN, 1),
    ("extends", "\n\n{% extends 'base.jinja' %}", 3),
]


@pytest.mark.parametrize("case, text, line", LOADS, ids=[row[0] for row in LOADS])
def test_a_template_that_loads_another_is_one_line(case, text, line, tmp_path):
    tag = {"from-import": "from"}.get(case, case)
    problem = f"{{% {tag} %}} on line {line} loads another template, which transformers cannot do"
    # as data.chat_template: refused by the config's rules, before anything loads
    path = write(tmp_path, "t.jinja", text)
    cfg = data_cfg(formatter="chat", path=str(tmp_path / "c.jsonl"), chat_template=path)
    [found] = [p for p in data_problems(cfg) if "chat_template" in p]
    assert found.startswith(f"data.chat_template={path}: {problem}")
    # as the tokenizer's own: refused when the data is prepared
    write(tmp_path, "c.jsonl", json.dumps(conversation("hi")) + "\n")
    tokenizer = load_tokenizer("fusetune:tiny_llama")
    tokenizer.chat_template = text
    with pytest.raises(FusetuneError) as raised:
        build_splits(data_cfg(formatter="chat", path=str(tmp_path / "c.jsonl")), tokenizer, 0)
    assert str(raised.value).startswith(f"the tokenizer's chat template: {problem}")
    # in the chat: refused before the weights load
    with pytest.raises(FusetuneError) as raised:
        chat.Chat(None, tokenizer)
    assert str(raised.value).startswith(f"the chat template: {problem}")


def test_a_template_named_include_in_text_is_fine(tmp_path):
    """Only a tag loads a template: the word in text or a string is no problem."""
    assert templates.template_problem("include {{ 'import' }} {% set extends = 1 %}" + PLAIN) is None


def test_off_the_main_thread_a_render_is_waited_for(tmp_path):
    tokenizer = load_tokenizer("fusetune:tiny_llama")
    tokenizer.chat_template = LOOP + PLAIN
    caught = []

    def render():
        try:
            templates.render_within(
                lambda: tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False),
                "a record",
            )
        except FusetuneError as error:
            caught.append(str(error))

    worker = threading.Thread(target=render)
    started = time.perf_counter()
    worker.start()
    worker.join(30)
    assert caught and caught[0].startswith("chat template: rendering a record took over 0.")
    assert time.perf_counter() - started < 5


@pytest.fixture(scope="module")
def looping_model(tmp_path_factory):
    """A model folder whose tokenizer's chat template loops (the 10^5 x 10^5 of a hostile or broken template)."""
    folder = tmp_path_factory.mktemp("looping")
    torch.manual_seed(0)
    load_model("fusetune:tiny_llama", torch.float32, random_init=True).save_pretrained(folder)
    tokenizer = load_tokenizer("fusetune:tiny_llama")
    tokenizer.chat_template = when("messages[-1]['content'] == 'loop'")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "args, stdin",
    [
        (["--prompt", "loop"], ""),
        ([], "hello\nloop\n"),
    ],
    ids=["prompt", "interactive"],
)
def test_fusetune_chat_stops_a_looping_template_with_one_line(args, stdin, looping_model):
    import io

    out, notes = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    code = chat.main([str(looping_model), "--max-new-tokens", "2", *args], io.StringIO(stdin), out, notes)
    errors = [line for line in notes.getvalue().splitlines() if line.startswith("fusetune: error:")]
    assert errors == ["fusetune: error: chat template: rendering the conversation took over 0.5 s; does it loop?"]
    assert time.perf_counter() - started < 30
    assert code == (0 if stdin else 2)  # the interactive chat goes on after a turn that fails


def test_python_m_fusetune_chat_exits_2_within_the_default_bound(looping_model):
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fusetune.chat", str(looping_model), "--prompt", "loop"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        "fusetune: error: chat template: rendering the conversation took over 10 s; does it loop?"
    )
    assert time.perf_counter() - started < 120  # imports and the model load on a busy CI machine, then 10 s
