"""Every group option composes against its schema; broken overrides fail at composition."""

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from fusetune.app.config import validate
from fusetune.errors import FusetuneError

from ..conftest import CONF, ROOT

GROUPS = ["model", "data", "kernels", "trainer", "logger", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)
    expected_models = {"tiny_llama", "llama3_1b", "llama3_8b", "qwen2_5_1_5b", "mistral_7b"}
    assert expected_models <= {o for g, o in OPTIONS if g == "model"}
    assert {"chat", "alpaca", "sharegpt", "text", "completion", "synthetic"} <= {o for g, o in OPTIONS if g == "data"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes(compose_cfg, group, option):
    cfg = compose_cfg([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group == "model":
        assert cfg.model.name_or_path and cfg.model.max_seq_length > 0
        assert cfg.model.lora is None or cfg.model.lora.r > 0
    if group == "kernels":
        assert cfg.kernels.backend.value == option


def test_default_is_the_embedded_run(compose_cfg):
    cfg = compose_cfg()
    assert cfg.model.name_or_path == "fusetune:tiny_llama" and cfg.model.random_init
    assert cfg.data.formatter.value == "synthetic"
    assert cfg.kernels.backend.value == "auto" and cfg.logger.kind.value == "wandb"
    validate(cfg)


def test_lora_block_overrides_and_null_means_full_finetuning(compose_cfg):
    cfg = compose_cfg(["model=llama3_1b", "model.lora.r=4"])
    assert cfg.model.lora.r == 4 and cfg.model.lora.target_modules[0] == "q_proj"
    assert compose_cfg(["model=llama3_1b", "model.lora=null"]).model.lora is None
    assert compose_cfg(["model=tiny_llama_lora"]).model.lora.modules_to_save == ["embed_tokens", "lm_head"]


@pytest.mark.parametrize(
    "override",
    [
        "model.max_seq_lenght=64",  # misspelled key
        "trainer.max_steps=many",  # wrong type
        "kernels.backend=cuda",  # not an enum member
        "data.formatter=xml",
        "trainer=nonexistent",  # missing group option
    ],
)
def test_broken_override_fails_at_composition(compose_cfg, override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg([override])


def test_cli_typo_fails_with_hydras_message_before_loading():
    proc = subprocess.run(
        [sys.executable, "train.py", "trainer.max_stepz=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "max_stepz" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.load_in_4bit=true"], "needs model.lora"),
        (["trainer.packing=true", "trainer.padding_free=true"], "choose one"),
        (["data=alpaca"], "exactly one of data.path or data.name"),
        (["data=alpaca", "data.path=x.jsonl", "trainer.eval_strategy=steps"], "needs eval data"),
    ],
)
def test_cross_group_rules(compose_cfg, overrides, message):
    with pytest.raises(FusetuneError, match=message):
        validate(compose_cfg(overrides))
