"""The trainer group is generated from FastSFTConfig (then FastDPOConfig's own fields): its keys and defaults, but for
the app's own (listed once)."""

import dataclasses
import warnings
from typing import get_type_hints

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fusetune.app.config import (
    OWN_TRAINER_DEFAULTS,
    PRESET_KEYS,
    SET_BY_THE_APP,
    SFT_DEFAULTS,
    SFT_TRAINER_FIELDS,
    TRAINER_CLASSES,
    TRAINER_FIELDS,
    AppTrainerKeys,
    TrainerConfig,
    schema_type,
    validate,
)
from fusetune.app.run import sft_config
from fusetune.errors import FusetuneError
from fusetune.training.preference_trainer import FastDPOConfig
from fusetune.training.trainer import FastSFTConfig

from ..conftest import CONF

SFT_YAML = yaml.safe_load((CONF / "trainer" / "sft.yaml").read_text())
APP_KEYS = {f.name for f in dataclasses.fields(AppTrainerKeys)}


def test_the_schemas_defaults_are_fastsftconfigs():
    """For the fields FastSFTConfig lacks (beta, label_smoothing, ...): the first preference class's that has
    the field (config.TRAINER_CLASSES, FastDPOConfig first)."""
    preference = [{f.name: f.default for f in dataclasses.fields(cls)} for cls in TRAINER_CLASSES.values()]
    assert next(iter(TRAINER_CLASSES.values())) is FastDPOConfig
    for f in dataclasses.fields(TrainerConfig):
        if f.name not in APP_KEYS:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            expected = (
                SFT_DEFAULTS[f.name] if f.name in SFT_DEFAULTS else next(d[f.name] for d in preference if f.name in d)
            )
            assert default == expected, f.name
    assert {"beta", "label_smoothing", "precompute_ref_log_probs"} <= TRAINER_FIELDS - SFT_TRAINER_FIELDS
    assert OmegaConf.structured(TrainerConfig).padding_free is None  # it was false, FastSFTConfig's is None


def test_every_default_the_app_does_not_override_is_fastsftconfigs(compose_cfg):
    """The app's own defaults are OWN_TRAINER_DEFAULTS, each set in conf/trainer/sft.yaml, and PRESET_KEYS, which a
    model preset may set and sft.yaml leaves to the schema (AppTrainerKeys); all others are TRL's."""
    assert set(SFT_YAML) - {"name"} == set(OWN_TRAINER_DEFAULTS) and not set(SFT_YAML) & set(PRESET_KEYS)
    trainer = OmegaConf.to_container(compose_cfg(["model=llama3_1b"]).trainer)  # a preset that sets no trainer key
    assert trainer["name"] == "sft" and trainer["extra"] == {}
    for key in SFT_TRAINER_FIELDS:
        if key in PRESET_KEYS:
            assert trainer[key] == getattr(AppTrainerKeys(), key), key  # the batch size's is TRL's 8 too
        elif key in OWN_TRAINER_DEFAULTS:
            assert trainer[key] == SFT_YAML[key], key
        else:
            assert trainer[key] == SFT_DEFAULTS[key], key


def test_every_fastsftconfig_field_is_a_trainer_key_set_by_the_app_or_untyped():
    """The untyped ones (``dict | str`` and the like) go through trainer.extra."""
    assert set(SET_BY_THE_APP) <= set(SFT_DEFAULTS) and not set(SET_BY_THE_APP) & TRAINER_FIELDS
    types = get_type_hints(FastSFTConfig)
    untyped = set(SFT_DEFAULTS) - SFT_TRAINER_FIELDS - set(SET_BY_THE_APP)
    assert untyped and all(schema_type(types[name]) is None for name in untyped), untyped
    assert {"lr_scheduler_kwargs", "deepspeed", "fsdp_config", "model_init_kwargs"} <= untyped
    assert {"adam_beta1", "tf32", "eval_on_start", "save_total_limit", "embedding_learning_rate"} <= TRAINER_FIELDS


@pytest.mark.parametrize(
    "tp,expected",
    [
        (int, int),
        (float | None, float | None),
        (list[str], list[str]),
        (dict[str, bool] | None, dict[str, bool] | None),
        (dict | str | None, None),
        (str | list[str], None),
        (int | str | None, None),
    ],
)
def test_schema_type(tp, expected):
    assert schema_type(tp) == expected


def test_generated_keys_are_typed_at_composition(compose_cfg):
    cfg = compose_cfg(["trainer.adam_beta1=0.8", "trainer.tf32=true", "trainer.include_for_metrics=[loss]"])
    assert cfg.trainer.adam_beta1 == 0.8 and cfg.trainer.tf32 is True and cfg.trainer.include_for_metrics == ["loss"]
    for override in ("trainer.adam_beta1=high", "trainer.tf32=maybe", "trainer.save_total_limit=x"):
        with pytest.raises(ConfigCompositionException):
            compose_cfg([override])


def args_for(compose_cfg, overrides, tmp_path) -> FastSFTConfig:
    cfg = compose_cfg(overrides, output_dir=tmp_path)
    validate(cfg)
    return sft_config(
        cfg, tmp_path, torch.float32, [], "reference", cfg.model.max_seq_length
    )  # as _load_model hands it


def test_sft_config_takes_the_apps_defaults_and_the_models_recommendations(compose_cfg, tmp_path):
    args = args_for(compose_cfg, ["model=tiny_llama"], tmp_path)
    assert (args.learning_rate, args.per_device_train_batch_size) == (3e-3, 64)  # the preset's rate and batch size
    assert args.padding_free is False and args.save_strategy == "no" and args.optim == "adamw_torch"
    assert args.lr_scheduler_type == "cosine" and args.num_train_epochs == 1 and args.warmup_steps == 0.05
    assert args.kernels == "reference" and args.max_length == 128 and args.seed == args.data_seed == 42
    overrides = ["trainer=padding_free", "trainer.adam_beta1=0.8", "trainer.learning_rate=1e-4"]
    args = args_for(compose_cfg, overrides, tmp_path)
    assert args.padding_free is True and args.adam_beta1 == 0.8 and args.learning_rate == 1e-4


def test_extra_passes_other_fields_and_older_spellings(compose_cfg, tmp_path):
    args = args_for(compose_cfg, ["+trainer.extra.lr_scheduler_kwargs={min_lr_rate: 0.1}"], tmp_path)
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args_for(compose_cfg, ["+trainer.extra.overwrite_output_dir=true"], tmp_path)  # removed by transformers 5
    assert any("overwrite_output_dir" in str(w.message) for w in caught)
    with pytest.raises(FusetuneError, match="save_safetensors=False"):
        args_for(compose_cfg, ["+trainer.extra.save_safetensors=false"], tmp_path)


@pytest.mark.parametrize(
    "key,message",
    [
        ("adam_beta1", "trainer.extra.adam_beta1: set trainer.adam_beta1 instead"),
        ("seed", "trainer.extra.seed: fusetune sets seed from seed"),
        ("evaluation_strategy", "trainer.extra.evaluation_strategy: an older spelling of eval_strategy"),
        ("max_seq_length", "older spelling of max_length, which fusetune sets from model.max_seq_length"),
        ("adam_betaa", "trainer.extra.adam_betaa: not a field of FastSFTConfig"),
    ],
)
def test_extra_refuses_trainer_keys_and_fields_the_app_sets(compose_cfg, key, message):
    with pytest.raises(FusetuneError, match=message):
        validate(compose_cfg([f"+trainer.extra.{key}=1"]))
