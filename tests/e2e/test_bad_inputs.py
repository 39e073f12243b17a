"""Bad inputs end the run with exit code 2 and one line: `fusetune: error: <what is wrong and where>`.

One table, one test. To cover a new bad input, add a Row to ROWS. A row runs in-process through
``cli.run_or_exit``, the app's own boundary, in well under a second. A row with ``cli=True`` runs the real app as
a subprocess, about 10 s each, mostly imports. That proves the whole path (Hydra, the exit code, stderr), and
one such row is enough for each kind of failure (here: a bad record, empty content refused, a file the loader
rejects, an empty file). A mistake that Hydra itself reports while composing the config never reaches
run_or_exit: give such a row cli=True and Hydra's exit code.
"""

import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from ..conftest import ROOT
from .app_runs import error_line, exit_and_stderr

BASE = ("logger=none", "trainer.max_steps=1")  # every row's overrides start with these


@dataclass(frozen=True)
class Row:
    id: str
    overrides: tuple[str, ...]  # Hydra overrides; "{tmp}" is the row's folder
    message: str  # part of the one error line ("{tmp}" as above)
    files: dict[str, str | bytes] = field(default_factory=dict)  # written into {tmp} first; "name/" is a folder
    cli: bool = False  # run `python train.py` as a subprocess instead of run_or_exit in-process
    code: int = 2
    leaves_metrics: bool = False  # a mistake found once training has begun may leave metrics.jsonl behind


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


ALPACA = {"instruction": "Double it", "input": "3", "output": "6"}
USER, ANSWER = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}

ROWS = [
    Row(
        "jsonl-every-kind-of-bad-line-at-once",
        ("data=alpaca", "data.path={tmp}/a.jsonl"),
        "data.path {tmp}/a.jsonl: cannot be read as JSON Lines: 4 bad lines: line 2: not valid JSON (Expecting "
        "property name enclosed in double quotes at column 2); line 3: 'output' is missing or null; line 4: not a "
        "JSON object (got a list); line 5: 'output' must be a string, got a number",
        {
            "a.jsonl": jsonl(ALPACA)
            + "{not json\n"
            + jsonl({"instruction": "x"})
            + "[1, 2]\n"
            + jsonl({"instruction": "y", "output": 3}, ALPACA)
        },
    ),  # fmt: skip
    Row(
        "bad-records-and-empty-content-at-once",
        ("data=chat", "data.path={tmp}/c.jsonl", "data.empty_content=error"),
        "data.path {tmp}/c.jsonl: 1 bad record: line 2: message 2 has role 'bot', not one of system, user, assistant; "
        "1 record with empty content (data.empty_content=error; warn keeps them, drop removes them): "
        "line 3: message 2 (assistant) is empty",
        {
            "c.jsonl": jsonl(
                {"messages": [USER, ANSWER]},
                {"messages": [USER, {"role": "bot", "content": "yo"}]},
                {"messages": [USER, {"role": "assistant", "content": ""}]},
            )
        },
    ),  # fmt: skip
    Row(
        "each-kind-its-first-five-and-count",
        ("data=alpaca", "data.path={tmp}/a.jsonl"),
        "8 bad records: line 2: 'output' is missing or null; line 3: 'output' is missing or null; "
        "line 4: 'output' is missing or null; line 5: 'output' is missing or null; "
        "line 6: 'output' is missing or null; (1 more); line 8: 'instruction' must be a string, got a list; "
        "line 9: 'instruction' must be a string, got a list",
        {"a.jsonl": jsonl(ALPACA, *[{"instruction": "x"}] * 6, *[{"instruction": [1], "output": "y"}] * 2)},
    ),
    Row(
        "alpaca-answer-missing-down-the-file",
        ("data=alpaca", "data.path={tmp}/a.jsonl"),
        "data.path {tmp}/a.jsonl: 1 bad record: line 3: 'output' is missing or null",
        {"a.jsonl": jsonl(ALPACA, ALPACA, {"instruction": "x"}, ALPACA)},
    ),
    Row(
        "alpaca-five-bad-shown-then-counted",
        ("data=alpaca", "data.path={tmp}/a.jsonl"),
        "7 bad records: line 2: 'output' is missing or null; line 3: 'output' is missing or null; "
        "line 4: 'output' is missing or null; line 5: 'output' is missing or null; "
        "line 6: 'output' is missing or null; (2 more)",
        {"a.jsonl": jsonl(ALPACA, *[{"instruction": "x"}] * 7)},
    ),
    Row(
        "chat-unknown-role",
        ("data=chat", "data.path={tmp}/c.jsonl"),
        "line 1: message 2 has role 'bot', not one of system, user, assistant",
        {"c.jsonl": jsonl({"messages": [USER, {"role": "bot", "content": "yo"}]})},
    ),
    Row(
        "chat-empty-answer-refused",
        ("data=chat", "data.path={tmp}/c.jsonl", "data.empty_content=error"),
        "c.jsonl: 1 record with empty content (data.empty_content=error; warn keeps them, drop removes them): "
        "line 2: message 2 (assistant) is empty",
        {"c.jsonl": jsonl({"messages": [USER, ANSWER]}, {"messages": [USER, {"role": "assistant", "content": ""}]})},
        cli=True,
    ),
    Row(
        "chat-sharegpt-keys",
        ("data=chat", "data.path={tmp}/c.jsonl"),
        "line 1: message 1 has 'from'/'value' keys, not 'role'/'content': use data=sharegpt",
        {"c.jsonl": jsonl({"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})},
    ),
    Row(
        "chat-no-messages",
        ("data=chat", "data.path={tmp}/c.jsonl"),
        "data.path {tmp}/c.jsonl: 1 bad record: line 1: 'messages' is empty",
        {"c.jsonl": jsonl({"messages": []})},
        cli=True,
    ),
    Row(
        "chat-no-assistant-turn",
        ("data=chat", "data.path={tmp}/c.jsonl"),
        "line 2: no assistant message (nothing to train on)",
        {"c.jsonl": jsonl({"messages": [USER, ANSWER]}, {"messages": [USER]})},
    ),
    Row(
        "sharegpt-unknown-speaker",
        ("data=sharegpt", "data.path={tmp}/s.jsonl"),
        "line 1: message 1 has from 'robot', not one of system, human, user, gpt, assistant",
        {"s.jsonl": jsonl({"conversations": [{"from": "robot", "value": "hi"}]})},
    ),
    Row(
        "text-null",
        ("data=text", "data.path={tmp}/t.jsonl"),
        "line 2: 'text' is missing or null",
        {"t.jsonl": jsonl({"text": "a"}, {"text": None})},
    ),
    Row(
        "completion-column-missing",
        ("data=completion", "data.path={tmp}/p.jsonl"),
        "formatter 'completion' needs a 'completion' column; the data has ['answer', 'prompt']",
        {"p.jsonl": jsonl({"prompt": "a", "answer": "b"})},
    ),
    Row(
        "empty-file",
        ("data=text", "data.path={tmp}/t.jsonl"),
        "data.path {tmp}/t.jsonl: the file is empty (0 records)",
        {"t.jsonl": ""},
        cli=True,
    ),
    Row(
        "malformed-jsonl-line",
        ("data=alpaca", "data.path={tmp}/a.jsonl"),
        "data.path {tmp}/a.jsonl: cannot be read as JSON Lines: 1 bad line: line 2: not valid JSON",
        {"a.jsonl": jsonl(ALPACA) + '{"instruction": "x", "output": "y"\n' + jsonl(ALPACA)},
        cli=True,
    ),
    Row(
        "malformed-json",
        ("data=alpaca", "data.path={tmp}/a.json"),
        "data.path {tmp}/a.json: not valid JSON: Expecting ',' delimiter at line 2 column 1",
        {"a.json": '[{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": "y"}]'},
    ),
    Row(
        "unreadable-csv",
        ("data=alpaca", "data.path={tmp}/a.csv"),
        "a.csv: cannot be read as CSV: Error tokenizing data. C error: Expected 3 fields in line 3, saw 4",
        {"a.csv": "instruction,input,output\nx,,y\nx,,y,z\n"},
    ),
    Row(
        "unreadable-parquet",
        ("data=alpaca", "data.path={tmp}/a.parquet"),
        "a.parquet: cannot be read as Parquet: ",
        {"a.parquet": b"PAR1 not really"},
    ),
    Row(
        "path-is-a-directory",
        ("data=alpaca", "data.path={tmp}/a.jsonl"),
        "data.path: {tmp}/a.jsonl is a directory",
        {"a.jsonl/": ""},
    ),
    Row(
        "bad-eval-file",
        ("data=alpaca", "data.path={tmp}/a.jsonl", "data.eval_path={tmp}/e.jsonl"),
        "data.eval_path {tmp}/e.jsonl: 1 bad record: line 1: 'output' must be a string, got a number",
        {"a.jsonl": jsonl(ALPACA), "e.jsonl": jsonl({"instruction": "x", "output": 4})},
    ),
    Row(
        "mixture-without-sources",
        ("data=mixture",),
        "data.sources is empty: data=mixture needs at least one source, e.g. data.sources='[{{path: a.jsonl, ",
    ),
    Row(
        "mixture-negative-weight",
        ("data=mixture", "data.sources=[{{path: '{tmp}/a.jsonl', formatter: alpaca, weight: -0.5}}]"),
        "data.sources.0.weight must be a finite number >= 0 (weights are relative), got -0.5",
        {"a.jsonl": jsonl(ALPACA)},
    ),
    Row(
        "mixture-source-with-path-and-name",
        ("data=mixture", "data.sources=[{{path: '{tmp}/a.jsonl', name: org/set, formatter: alpaca}}]"),
        "data.sources.0: give exactly one of path (a local file) or name (a hub dataset), "
        "got path='{tmp}/a.jsonl' name='org/set'",
        {"a.jsonl": jsonl(ALPACA)},
    ),
    Row(
        "mixture-bad-record-in-a-source",
        (
            "data=mixture",
            "data.sources=[{{path: '{tmp}/a.jsonl', formatter: alpaca}}, "
            "{{path: '{tmp}/b.jsonl', formatter: alpaca, weight: 0.1}}]",
        ),
        "data.sources.1.path {tmp}/b.jsonl: 1 bad record: line 2: 'output' is missing or null",
        {"a.jsonl": jsonl(ALPACA), "b.jsonl": jsonl(ALPACA, {"instruction": "x"})},
    ),
    Row(
        "unknown-chat-template",
        ("data=alpaca", "data.path={tmp}/a.jsonl", "data.chat_template=vicuna"),
        "data.chat_template: no shipped template 'vicuna'; shipped: chatml, gemma, llama3, mistral, phi3; "
        "or give the path of a Jinja file",
        {"a.jsonl": jsonl(ALPACA)},
    ),
    Row(
        "missing-jinja-file",
        ("data=alpaca", "data.path={tmp}/a.jsonl", "data.chat_template={tmp}/chat.jinja"),
        "data.chat_template: no such file: {tmp}/chat.jinja",
        {"a.jsonl": jsonl(ALPACA)},
    ),
    Row(
        "model-folder-without-a-model",
        ("model.name_or_path={tmp}/empty", "model.random_init=false"),
        "the folder {tmp}/empty holds no loadable model or tokenizer",
        {"empty/": ""},
    ),
    Row(
        "memory-budget-without-smart-checkpointing",
        ("model.gradient_checkpointing=offload", "model.memory_budget=20"),
        "model.memory_budget is read only by smart checkpointing; gradient checkpointing is 'offload'",
    ),
    Row(
        "memory-budget-negative",
        ("model.gradient_checkpointing=smart", "model.memory_budget=-2"),
        "model.memory_budget: expected GiB (> 1) or a fraction of the device's memory (0 to 1], got -2.0",
    ),
    Row(
        "max-steps-zero",
        ("trainer.max_steps=0",),
        "trainer.max_steps=0 trains nothing: give a positive number, or -1 to train by epochs",
    ),
    Row(
        "misspelled-key",
        ("trainer.lerning_rate=1e-3",),
        "Key 'lerning_rate' not in 'TrainerConfig' (did you mean learning_rate?)",
        cli=True,
    ),
    Row(
        "run-folder-of-another-run",
        (),
        "run folder {tmp}/run holds another run's record (summary.json)",
        {"run/": "", "run/summary.json": "{}", "run/fusetune_run.json": '{"writes": ["summary.json"]}'},
        cli=True,
    ),
    Row(
        "resume-from-a-missing-checkpoint",
        ("resume={tmp}/checkpoint-7",),
        "resume: {tmp}/checkpoint-7 is not a checkpoint-N folder",
    ),
    Row(
        "resume-and-overwrite",
        ("resume=auto", "overwrite=true"),
        "resume and overwrite=true: choose one",
    ),
]


def _write(folder, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = folder / name
        if name.endswith("/"):
            path.mkdir(parents=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_exits_2_with_one_line(row, tmp_path, compose_cfg, capsys):
    _write(tmp_path, row.files)
    overrides = [override.format(tmp=tmp_path) for override in (*BASE, *row.overrides)]
    run_dir = tmp_path / "run"
    code, stderr = exit_and_stderr(overrides, run_dir, row.cli, compose_cfg, capsys)
    assert code == row.code, stderr[-3000:]
    assert row.message.format(tmp=tmp_path) in error_line(stderr)
    assert row.leaves_metrics or not (run_dir / "metrics.jsonl").exists()


def test_a_config_mistake_leaves_the_folder_to_the_fixed_rerun(tmp_path):
    """The guard validates before it claims: a refused command writes nothing, so the corrected one is not
    refused as "another run's record"."""
    run_dir = tmp_path / "run"
    mistake = ["trainer=packing", "trainer.padding_free=true"]  # a rule across keys (config.validate)
    code, stderr = exit_and_stderr([*BASE, *mistake], run_dir, True, None, None)
    assert code == 2 and "trainer.packing and trainer.padding_free: choose one" in error_line(stderr)
    assert not run_dir.exists()
    fixed = subprocess.run(
        [sys.executable, "train.py", *BASE, "trainer=packing", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
