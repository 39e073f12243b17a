"""Every group option composes against its schema; broken overrides fail at composition."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from fusetune.app.config import validate
from fusetune.errors import FusetuneError

from ..conftest import CONF

GROUPS = ["model", "data", "kernels", "trainer", "logger", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)
    expected_models = {
        "tiny_llama",
        "llama3_1b",
        "llama3_8b",
        "qwen2_5_1_5b",
        "mistral_7b",
        "llama3_2_3b",
        "smollm3_3b",
    }
    expected_models |= {"qwen3_5_2b", "gemma3_1b", "gemma3_4b", "phi4_mini"}
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
    assert cfg.kernels.backend.value == "auto" and cfg.logger.kind.value == "tensorboard"  # local; W&B is opt-in
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


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.load_in_4bit=true"], "needs model.lora"),
        (["trainer.packing=true", "trainer.padding_free=true"], "choose one"),
        (["data=alpaca"], "exactly one of data.path or data.name"),
        (["data=alpaca", "data.path=x.jsonl", "trainer.eval_strategy=steps"], "needs eval data"),
        (
            ["trainer.max_steps=0"],
            "^trainer.max_steps=0 trains nothing: give a positive number, or -1 to train by epochs$",
        ),
        (["trainer.num_train_epochs=0"], "^trainer: set max_steps or num_train_epochs above zero$"),
    ],
)
def test_cross_group_rules(compose_cfg, overrides, message):
    with pytest.raises(FusetuneError, match=message):
        validate(compose_cfg(overrides))


def test_negative_max_steps_trains_by_epochs(compose_cfg):
    validate(compose_cfg(["trainer.max_steps=-1", "trainer.num_train_epochs=2"]))
    with pytest.raises(FusetuneError, match=r"trainer.max_steps must be >= -1 \(-1: train by num_train_epochs\)"):
        validate(compose_cfg(["trainer.max_steps=-5"]))  # HF reads any negative as -1; -1 is the one that says so


DEFAULT_LORA = {
    "r": 16,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "modules_to_save": None,
}
# Each model option's lora block as it was written out in full in every file before conf/model/lora/default.yaml.
LORA = {
    "llama3_1b": DEFAULT_LORA,
    "llama3_1b_qlora": DEFAULT_LORA,
    "llama3_8b": DEFAULT_LORA,
    "llama3_8b_qlora": DEFAULT_LORA,
    "mistral_7b": DEFAULT_LORA,
    "qwen2_5_1_5b": DEFAULT_LORA,
    "tiny_llama": None,
    **{
        m + twin: DEFAULT_LORA
        for m in ("qwen3_5_2b", "gemma3_1b", "gemma3_4b", "llama3_2_3b", "smollm3_3b")
        for twin in ("", "_qlora")
    },
    **{
        "phi4_mini" + twin: {**DEFAULT_LORA, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
        for twin in ("", "_qlora")
    },
    "tiny_llama_lora": {**DEFAULT_LORA, "r": 8, "modules_to_save": ["embed_tokens", "lm_head"]},
    # mixture of experts: the experts are 3-D parameters (FastModel.get_peft_model adds them where patched)
    **{
        m: {**DEFAULT_LORA, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
        for m in ("qwen3_moe_30b_a3b", "olmoe_1b_7b")
    },
}


@pytest.mark.parametrize("model", sorted(LORA))
def test_every_model_keeps_its_lora_values(compose_cfg, model):
    assert {o for g, o in OPTIONS if g == "model"} == set(LORA)  # a new model option gets a row here
    lora = compose_cfg([f"model={model}"]).model.lora
    assert (None if lora is None else OmegaConf.to_container(lora)) == LORA[model]
