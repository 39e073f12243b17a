"""`fusetune presets`: every option of every group is listed with its one-line description, the default marked;
`presets copy` copies one to edit, and refuses in one line what it cannot do."""

import re

import pytest

from fusetune_cli import presets
from fusetune_cli.configs import description, groups

from ..conftest import CONF


def test_every_option_has_a_description():
    found = groups(CONF)
    assert {"model", "data", "kernels", "trainer", "logger", "experiment", "model/lora"} <= set(found)
    missing = [f"{g}/{o}" for g, options in found.items() for o, path in options.items() if not description(path)]
    assert missing == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("# One line.\n# more\nkey: 1\n", "One line."),
        ("# @package _global_\n# After the directive.\n", "After the directive."),
        ("\n\n#   Spaced.\n", "Spaced."),
        ("key: 1  # not a description\n", ""),
        ("", ""),
    ],
)
def test_description_is_the_first_comment_line(text, expected, tmp_path):
    (tmp_path / "x.yaml").write_text(text)
    assert description(tmp_path / "x.yaml") == expected


def test_the_listing(capsys):
    assert presets.main([]) == 0
    out = capsys.readouterr().out
    assert "model (default: tiny_llama)\n" in out and "trainer (default: sft)\n" in out
    assert re.search(r"^  tiny_llama +The embedded default: ~2M-parameter Llama", out, flags=re.M)
    assert "_schema" not in out and "launcher" not in out  # the schemas and Hydra's own group are not options
    assert all(len(line) <= presets.WIDTH for line in out.splitlines())


def test_the_listing_adds_a_users_folder(capsys, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("# My own model.\ndefaults:\n  - tiny_llama\n")
    assert presets.main(["--config-dir", str(tmp_path)]) == 0
    assert re.search(r"^  mine +My own model\.$", capsys.readouterr().out, flags=re.M)


@pytest.mark.parametrize(
    "args, code, made, err",
    [
        (["model/llama3_1b", "my.yaml"], 0, "my.yaml", ""),
        (["model/llama3_1b"], 0, "llama3_1b.yaml", ""),  # the option's name, here
        (["model/lora/default", "sub"], 0, "sub/default.yaml", ""),  # into a folder
        (["model/llama3_1bb", "x.yaml"], 2, None, "no preset model/llama3_1bb (did you mean model/llama3_1b?)"),
        (["model/llama3_1b", "taken.yaml"], 2, None, "taken.yaml exists: give another FILE, or remove it first"),
        (["model/llama3_1b", "nowhere/x.yaml"], 2, None, "No such file or directory"),
    ],
)
def test_copy(args, code, made, err, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "taken.yaml").write_text("mine\n")
    assert presets.main(["copy", *args]) == code
    captured = capsys.readouterr()
    if made:
        group, option = args[0].rsplit("/", 1)
        assert (tmp_path / made).read_text() == (CONF / group / f"{option}.yaml").read_text()
        assert captured.out.startswith(f"copied {args[0]} to ") and captured.err == ""
    else:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fusetune: error: ") and err in lines[0], captured.err
        assert (tmp_path / "taken.yaml").read_text() == "mine\n"
