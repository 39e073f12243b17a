"""A model folder's own Python code runs only when asked: library, app and chat alike.

The folder here maps its config and model classes to Python files (``auto_map``) that write a marker file when
imported. Without ``trust_remote_code`` every entry point refuses it with one line, and never asks: the app and the
chat run under a pseudo-terminal with "y" already typed, which transformers' "[y/N]" prompt would take as a yes.
"""

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import transformers

from fusetune import FastModel, loading
from fusetune.errors import FusetuneError
from fusetune.patching import remove_kernels

from .conftest import ROOT

TINY = Path(loading.resolve("fusetune:tiny_llama"))
REFUSED = "needs its own Python code (auto_map in config.json); trust_remote_code=true"
CODE = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import {base}
{extra}
class {name}({base}):
    {body}
"""


def code_folder(tmp_path: Path, config: dict | None = None) -> tuple[Path, Path]:
    """(folder, marker): a tiny Llama whose classes live in its own Python files, which write ``marker``."""
    folder, marker = tmp_path / "custom", tmp_path / "MARKER"
    shutil.copytree(TINY, folder)
    settings = json.loads((TINY / "config.json").read_text())
    settings.update(
        model_type="fusetune_marker",
        auto_map={
            "AutoConfig": "configuration_marker.MarkerConfig",
            "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM",
        },
    )
    settings.update(config or {})
    (folder / "config.json").write_text(json.dumps(settings))
    (folder / "configuration_marker.py").write_text(
        CODE.format(
            marker=str(marker), base="LlamaConfig", extra="", name="MarkerConfig", body="model_type = 'fusetune_marker'"
        )
    )
    (folder / "modeling_marker.py").write_text(
        CODE.format(
            marker=str(marker),
            base="LlamaForCausalLM",
            extra="from .configuration_marker import MarkerConfig",
            name="MarkerForCausalLM",
            body="config_class = MarkerConfig",
        )
    )
    (folder / "model.safetensors").write_bytes(b"")  # chat looks for a weights file before it loads anything
    return folder, marker


LIBRARY_CALLS = {
    "FastModel.from_pretrained": lambda folder, **hub: FastModel.from_pretrained(str(folder), **hub),
    "FastModel.from_pretrained(random_init)": lambda f, **hub: FastModel.from_pretrained(
        str(f), random_init=True, **hub
    ),
    "loading.load_config": lambda folder, **hub: loading.load_config(str(folder), **hub),
    "loading.load_tokenizer": lambda folder, **hub: loading.load_tokenizer(str(folder), **hub),
    "loading.load_model": lambda folder, **hub: loading.load_model(str(folder), loading.pick_dtype("float32"), **hub),
}


@pytest.mark.parametrize("asked", [{}, {"trust_remote_code": False}, {"trust_remote_code": None}])
@pytest.mark.parametrize("call", list(LIBRARY_CALLS), ids=list(LIBRARY_CALLS))
def test_the_library_refuses_a_folder_that_needs_its_code(call, asked, tmp_path):
    folder, marker = code_folder(tmp_path)
    with pytest.raises(FusetuneError) as refused:
        LIBRARY_CALLS[call](folder, **asked)
    assert str(refused.value).startswith(f"model {folder} {REFUSED}")
    assert not marker.exists()


@pytest.mark.parametrize(
    "config,line",
    [
        ({"model_type": None}, REFUSED),  # auto_map and no model_type: only its own code can build it
        ({"model_type": "nobody_knows", "auto_map": None}, "config.json has model_type 'nobody_knows', which this"),
    ],
    ids=["auto-map-without-model-type", "unknown-model-type"],
)
def test_other_folders_transformers_cannot_build_alone(config, line, tmp_path):
    folder, marker = code_folder(tmp_path, config)
    with pytest.raises(FusetuneError, match=line.replace("(", r"\(").replace(")", r"\)")):
        loading.load_config(str(folder))
    assert not marker.exists()


def test_transformers_refusal_is_the_same_line():
    refusal = ValueError("The repository org/x contains custom code ... pass the argument `trust_remote_code=True`")
    assert str(loading._hub_error("model.name_or_path", "org/x", refusal)).startswith(
        "model org/x needs its own Python code (auto_map); trust_remote_code=true"
    )


def test_false_reaches_transformers_as_false(tmp_path, monkeypatch):
    """Not dropped on the way: None would let transformers ask instead of refuse."""
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "absent")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", random_init=True)
    remove_kernels()
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    FastModel.from_pretrained(str(tmp_path / "saved"))
    remove_kernels()
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(value is False for _, value in seen), seen


def under_a_terminal(command: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as stdin, stdout and stderr, "y" already typed; (exit code, output)."""
    main, child = pty.openpty()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    os.write(main, b"y\ny\n")  # a yes for any [y/N] prompt
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(main)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    return code, output.decode(errors="replace")


ENTRY_POINTS = {
    "train.py-false": lambda folder, run_dir: [
        sys.executable, "train.py", "logger=none", f"model.name_or_path={folder}", "model.random_init=false",
        "model.trust_remote_code=false", f"hydra.run.dir={run_dir}",
    ],
    "fusetune.chat": lambda folder, run_dir: [sys.executable, "-m", "fusetune.chat", str(folder)],
}  # fmt: skip


TRUSTED = "trusted"  # the one way in: asked for, the folder's code runs


@pytest.fixture(scope="module")
def terminal_runs(tmp_path_factory) -> dict:
    """Every entry point at once (each is mostly imports), each with its own folder and marker:
    {entry: (folder, marker, exit code, output)}."""
    jobs = {}
    for entry in [*ENTRY_POINTS, TRUSTED]:
        tmp = tmp_path_factory.mktemp(entry.replace(".", "_"))
        folder, marker = code_folder(tmp)
        if entry == TRUSTED:
            load = f"from fusetune import loading; loading.load_config({str(folder)!r}, trust_remote_code=True)"
            command = [sys.executable, "-c", load]
        else:
            command = ENTRY_POINTS[entry](folder, tmp / "run")
        jobs[entry] = (folder, marker, command, {**os.environ, "HF_MODULES_CACHE": str(tmp / "modules")})
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = {entry: pool.submit(under_a_terminal, job[2], job[3]) for entry, job in jobs.items()}
        return {entry: (*jobs[entry][:2], *done[entry].result()) for entry in jobs}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_no_prompt_under_a_terminal(entry, terminal_runs):
    folder, marker, code, output = terminal_runs[entry]
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output[-3000:]
    assert "[y/N]" not in output and "Traceback" not in output, output[-3000:]
    assert lines[-1].strip() == (
        f"fusetune: error: model {folder} {REFUSED} (fusetune.chat: --trust-remote-code) runs it, only for code you "
        "trust"
    ), output[-3000:]
    assert not marker.exists()


def test_trust_remote_code_true_runs_it(terminal_runs):
    folder, marker, code, output = terminal_runs[TRUSTED]
    assert code == 0, output[-3000:]
    assert marker.read_text() == "ran"
