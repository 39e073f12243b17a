"""Help that helps: every entry point answers --help with its usage and exit 0, creating nothing; the app's
--help lists the groups and every key with its description, hides the *_schema entries, and answers in under
3 s (from the cache that the first one fills)."""

import os
import re
import runpy
import subprocess
import sys
import time
import warnings

import pytest

from fusetune_cli import main as fusetune_main
from fusetune_cli.train_help import print_train_help

from ..conftest import CONF, ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))
MODULES = sorted(
    ".".join(p.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__main__")
    for p in (ROOT / "src").rglob("*.py")
    if 'if __name__ == "__main__"' in p.read_text() or p.name == "__main__.py"
)


def test_the_tables_cover_the_known_entry_points():
    assert {"bench_table.py", "bench.py", "wheelhouse.py"} <= set(SCRIPTS)
    assert {"fusetune", "fusetune.tiny", "fusetune.chat", "fusetune.report", "fusetune.coverage"} <= set(MODULES)


@pytest.fixture
def kept_global_state(monkeypatch):
    """What an entry point's start changes for its process (noise.quiet_third_party), given back to this one."""
    import logging

    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ.get("TOKENIZERS_PARALLELISM", "true"))
    verbosity, bars, peft = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), logging.getLogger("peft")
    peft_level = peft.level
    with warnings.catch_warnings():
        yield
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    peft.setLevel(peft_level)


def _help_of(run, argv0, monkeypatch, capsys, tmp_path) -> str:
    monkeypatch.chdir(tmp_path)  # what the entry point creates would land here
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as exited:
        run()
    out = capsys.readouterr().out
    assert exited.value.code in (0, None), out
    assert list(tmp_path.iterdir()) == []  # python -m fusetune.tiny --help made a folder named --help
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script, monkeypatch, capsys, tmp_path, kept_global_state):
    path = str(ROOT / "scripts" / script)
    out = _help_of(lambda: runpy.run_path(path, run_name="__main__"), path, monkeypatch, capsys, tmp_path)
    assert out.startswith("usage: ") and len(out.splitlines()) >= 3, out


@pytest.mark.parametrize("module", MODULES)
def test_every_module_has_help(module, monkeypatch, capsys, tmp_path, kept_global_state):
    """As ``python -m MODULE --help`` in tmp_path (runpy, in-process): fusetune.tiny made a folder named --help."""
    out = _help_of(lambda: runpy.run_module(module, run_name="__main__"), module, monkeypatch, capsys, tmp_path)
    assert out.startswith("usage: ") and len(out.splitlines()) >= 3, out


@pytest.fixture
def help_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSETUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "help"


def settings(text: str) -> dict[str, tuple[str, str]]:
    """{key: (value, description)} of the help's key lines."""
    return {k: (v, about) for k, v, about in re.findall(r"^  ([a-z_.0-9]+)=(.*?)(?:  +(.*))?$", text, flags=re.M)}


def _train_help(argv, capsys, prog="python train.py") -> str:
    assert print_train_help([*argv, "--help"], str(CONF), prog) == 0
    return capsys.readouterr().out


def test_train_help_lists_groups_and_described_keys(help_cache, capsys):
    text = _train_help([], capsys)
    assert text.startswith("usage: python train.py [group=option ...] [key=value ...]")
    assert "_schema" not in text
    assert "  model: " in text and "[tiny_llama]" in text and "  trainer: " in text and "[sft]" in text
    keys = {key: about for key, (_, about) in settings(text).items()}
    assert len(keys) > 150
    assert "hub id or local folder" in keys["model.name_or_path"]  # a comment in config.py
    assert keys["trainer.weight_decay"].startswith("Weight decay")  # TRL / transformers metadata["help"]
    assert keys["trainer.nan_policy"].startswith("A non-finite loss")  # FastSFTConfig's own
    assert keys["kernels.backend"] == "[auto | triton | reference]"  # an Enum's choices
    described = sum(bool(about) for about in keys.values())
    assert described / len(keys) > 0.9, [k for k, about in keys.items() if not about]
    assert len(list(help_cache.iterdir())) == 1


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["model=tiny_llama_lora"], {"model.lora.r": "8", "model.lora.modules_to_save": "[embed_tokens, lm_head]"}),
        (["trainer.max_steps=7"], {"trainer.max_steps": "7"}),  # the overrides shape the config it lists
        (["-m", "trainer=packing"], {"trainer.packing": "true"}),  # Hydra's flags are no overrides
        (["--config-dir", "{user}", "model=mine"], {"model.max_seq_length": "32"}),  # a user's own option
        (["--config-dir=user", "model=mine"], {"model.max_seq_length": "32"}),  # relative to where it runs
    ],
)
def test_train_help_follows_the_command_line(argv, expected, help_cache, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user" / "model").mkdir(parents=True)
    mine = tmp_path / "user" / "model" / "mine.yaml"
    mine.write_text("defaults:\n  - tiny_llama\n  - _self_\nmax_seq_length: 32\n")
    argv = [arg.replace("{user}", str(tmp_path / "user")) for arg in argv]
    text = _train_help(argv, capsys)
    assert {key: settings(text)[key][0] for key in expected} == expected
    if "model=mine" in argv:
        assert "mine" in text.split("Keys")[0]  # listed among the model options


def test_train_help_bad_override_is_one_line(help_cache, capsys):
    with pytest.raises(SystemExit) as exited:
        print_train_help(["model=tiny_lama", "--help"], str(CONF), "python train.py")
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusetune: error: ") and "tiny_lama" in err[0], err
    assert not help_cache.exists() or list(help_cache.iterdir()) == []


def test_train_help_is_fast(help_cache, capsys):
    """The first --help composes the config (seconds: torch and TRL load) and fills the cache; a later one, as
    any after an install's first, answers from it in a fresh process in under 3 s, with the same text."""
    composed = _train_help([], capsys)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == composed
    assert elapsed < 3.0, f"train.py --help took {elapsed:.1f} s"


def test_the_cache_misses_when_a_config_changes(help_cache, capsys, tmp_path):
    conf = tmp_path / "conf"
    subprocess.run(["cp", "-r", str(CONF), str(conf)], check=True)
    before = print_train_help(["--help"], str(conf), "fusetune train") == 0 and capsys.readouterr().out
    yaml = conf / "model" / "tiny_llama.yaml"
    yaml.write_text(yaml.read_text().replace("max_seq_length: 128", "max_seq_length: 96"))
    assert print_train_help(["--help"], str(conf), "fusetune train") == 0
    after = capsys.readouterr().out
    assert settings(before)["model.max_seq_length"][0] == "128" and settings(after)["model.max_seq_length"][0] == "96"
    assert len(list(help_cache.iterdir())) == 2


COMMANDS = "train, report, chat, presets"


@pytest.mark.parametrize(
    "argv, code, out, err",
    [
        (["--help"], 0, "usage: fusetune COMMAND", ""),
        ([], 2, "usage: fusetune COMMAND", ""),
        (["trian"], 2, "", "fusetune: error: no command 'trian' (did you mean train?); commands: " + COMMANDS),
        (["report", "--help"], 0, "usage: python -m fusetune.report", ""),
        (["chat", "--help"], 0, "usage: python -m fusetune.chat", ""),
        (["presets", "--help"], 0, "usage: fusetune presets", ""),
    ],
)
def test_the_fusetune_command(argv, code, out, err, capsys, kept_global_state):
    try:
        got = fusetune_main(argv)
    except SystemExit as exited:
        got = exited.code
    captured = capsys.readouterr()
    assert got == code
    assert captured.out.startswith(out) if out else captured.out == ""
    assert captured.err.strip() == err if err else True
