"""Security: remote code off unless asked, pickles only as weights, no secret on disk, no open instantiate."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml

from fusetune import FastModel
from fusetune.patching import remove_kernels

from .conftest import ROOT, needs_wandb

SOURCES = [p for folder in ("src", "kernels", "scripts") for p in (ROOT / folder).rglob("*.py")]
# Every _target_ the shipped configs may instantiate (Hydra builds only these; the app calls no instantiate).
ALLOWED_TARGETS = {
    "fusetune.app.run_folder.GuardRunFolder",
    "fusetune.app.callbacks.AblationReport",
    "fusetune.app.gpus.OneGPUPerWorker",  # hydra/launcher=local: each joblib worker takes one GPU
}
ALLOWED_PREFIXES = ("hydra_plugins.",)  # the launcher and sweeper plugins' own configs


def calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path, node


@pytest.mark.parametrize("asked", [False, True])
def test_remote_code_runs_only_when_asked(asked, monkeypatch):
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(bool(kwargs.get("trust_remote_code")))  # None and absent: transformers says no
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    FastModel.from_pretrained("fusetune:tiny_llama", random_init=True, trust_remote_code=asked)
    remove_kernels()
    assert seen and set(seen) == {asked}


def test_the_app_keeps_remote_code_off_by_default(compose_cfg):
    assert compose_cfg([]).model.trust_remote_code is False


def test_torch_load_only_reads_weights():
    found = list(calls("load"))
    for path, node in found:
        if getattr(node.func, "value", None) is not None and getattr(node.func.value, "id", None) == "torch":
            keywords = {k.arg: k.value for k in node.keywords}
            assert "weights_only" in keywords and getattr(keywords["weights_only"], "value", None) is True, path


def test_models_are_saved_as_safetensors(tmp_path):
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", random_init=True)
    remove_kernels()
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    model.save_pretrained(tmp_path / "adapter")
    FastModel.save_merged(model, tokenizer, str(tmp_path / "merged"))
    for folder in ("adapter", "merged"):
        files = {p.suffix for p in (tmp_path / folder).iterdir()}
        assert ".safetensors" in files and not files & {".bin", ".pt", ".pth", ".pkl"}, folder


def test_nothing_instantiates_from_config_but_the_allowed_targets():
    assert not list(calls("instantiate")), "the app calls no hydra.utils.instantiate"
    targets = set()
    for path in (ROOT / "conf").rglob("*.yaml"):
        stack = [yaml.safe_load(path.read_text())]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                targets |= {v for k, v in node.items() if k == "_target_"}
                stack += list(node.values())
            elif isinstance(node, list):
                stack += node
    strays = {t for t in targets if t not in ALLOWED_TARGETS and not t.startswith(ALLOWED_PREFIXES)}
    assert not strays, strays


def test_secrets_in_the_config_are_refused_before_they_reach_disk(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "logger=none",
            "trainer.hub_token=hf_not_a_real_token",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("fusetune: error: trainer.hub_token: secrets are not read")
    written = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert not any("hf_not_a_real_token" in p.read_text(errors="ignore") for p in written)


@needs_wandb
def test_environment_secrets_stay_out_of_the_record(tmp_path):
    secrets = {"WANDB_API_KEY": "local-" + "0123456789abcdef" * 3, "HF_TOKEN": "hf_secret_0123456789"}
    run_dir = tmp_path / "run"
    env = {**__import__("os").environ, **secrets, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "logger=wandb",
            "logger.mode=offline",
            "trainer.max_steps=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "summary.json" for p in written) and any(p.parent.name == ".hydra" for p in written)
    for path in written:
        data = path.read_bytes()
        assert not any(secret.encode() in data for secret in secrets.values()), path
