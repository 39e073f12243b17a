"""The installed app: a wheel built from this checkout, installed into a fresh virtualenv (no network: it sees this
interpreter's packages for the dependencies), runs from a folder outside the checkout. `fusetune train` composes
the configs packaged in the wheel (a user's --config-dir extending them), trains and writes its run folder;
`fusetune presets` lists the groups; `fusetune --help` answers at once."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

from ..conftest import ROOT

BUILT_FROM = ("pyproject.toml", "README.md", "src", "conf", "kernels")
FAST = ["data.num_train=64", "data.num_eval=8", "data.num_generate=2", "logger=none", "trainer.max_steps=2"]


def _run(args, cwd, env, timeout=300):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin folder, an environment without this checkout on the path)."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this interpreter")
    tmp = tmp_path_factory.mktemp("installed")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    source, wheels = tmp / "source", tmp / "wheels"  # a copy: the build writes build/ and *.egg-info beside it
    source.mkdir()
    for name in BUILT_FROM:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(wheels), str(source)], tmp, env)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp, env).stdout.strip())  # fmt: skip
    # this interpreter's torch, TRL, ...: its site-packages and PYTHONPATH (a GPU host carries wheels there); after
    # the venv's own site-packages, so the wheel's fusetune comes first
    carried = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    (site / "dependencies.pth").write_text("".join(f"{p}\n" for p in [sysconfig.get_paths()["purelib"], *carried]))
    (wheel,) = wheels.glob("fusetune-*.whl")
    pip = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
               tmp, env)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv / "bin", env


@pytest.mark.slow
def test_the_installed_app_trains_outside_the_checkout(installed, tmp_path):
    bin_dir, env = installed
    fusetune = str(bin_dir / "fusetune")
    started = time.perf_counter()
    usage = _run([fusetune, "--help"], tmp_path, env, timeout=30)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: fusetune COMMAND"), usage.stderr
    assert time.perf_counter() - started < 3.0

    presets = _run([fusetune, "presets"], tmp_path, env, timeout=30)
    assert presets.returncode == 0, presets.stderr
    assert "model (default: tiny_llama)" in presets.stdout and "trainer (default: sft)" in presets.stdout
    assert "_schema" not in presets.stdout

    # the README's example: a copy of a packaged option, edited, in the user's own config folder
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    copied = _run([fusetune, "presets", "copy", "model/tiny_llama", "myconf/model/mine.yaml"], tmp_path, env)
    assert copied.returncode == 0, copied.stderr
    mine = tmp_path / "myconf" / "model" / "mine.yaml"
    mine.write_text(mine.read_text().replace("max_seq_length: 128", "max_seq_length: 64"))

    proc = _run([fusetune, "train", "--config-dir", "myconf", "model=mine", *FAST], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "runs").iterdir()  # under the folder it ran in
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert json.loads((run / "summary.json").read_text())["global_step"] == 2
    assert (run / "model" / "model.safetensors").is_file()
    hydra = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]
    sources = {s["provider"]: s["path"] for s in hydra["runtime"]["config_sources"]}
    assert sources["main"].endswith("site-packages/fusetune/conf") and sources["main"].startswith(str(bin_dir.parent))
    assert hydra["runtime"]["choices"]["model"] == "mine" and hydra["job"]["name"] == "train"
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert config["model"]["max_seq_length"] == 64
    assert not (tmp_path / "conf").exists() and not (tmp_path / "train.py").exists()
