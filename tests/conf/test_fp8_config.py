"""kernels.fp8: typed, off by default in every kernels option, refused by validate where the config alone shows it
cannot run (the device is checked when the model loads), and the fp8_ablation experiment sweeps it."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from fusetune.app.config import validate
from fusetune.errors import FusetuneError

LORA = "model=tiny_llama_lora"


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_off_by_default_in_every_kernels_option(compose_cfg, backend):
    assert compose_cfg([f"kernels={backend}"]).kernels.fp8 is False


def test_not_a_bool_fails_at_composition(compose_cfg):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg(["kernels.fp8=maybe"])


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ["kernels.fp8=true"],
            "kernels.fp8 needs model.lora: it runs the frozen base weights under LoRA adapters in FP8",
        ),
        ([LORA, "kernels.fp8=true", "model.dtype=float32"], "kernels.fp8 computes in bfloat16: model.dtype is float32"),
        ([LORA, "kernels.fp8=true", "model.dtype=float16"], "kernels.fp8 computes in bfloat16: model.dtype is float16"),
        (
            [LORA, "kernels.fp8=true", "distributed=ddp", "allow_single_process=true"],
            "kernels.fp8 trains in one process: distributed=ddp is not supported",
        ),
        (
            ["kernels.fp8=true", "model.dtype=float16"],
            "kernels.fp8 needs model.lora: it runs the frozen base weights under LoRA adapters in FP8; "
            "kernels.fp8 computes in bfloat16: model.dtype is float16",
        ),
    ],
    ids=["full-finetuning", "fp32", "fp16", "ddp", "two-at-once"],
)
def test_refused_in_one_line(compose_cfg, overrides, line):
    with pytest.raises(FusetuneError) as refused:
        validate(compose_cfg(overrides))
    assert str(refused.value) == line


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_lora_in_bf16_passes(compose_cfg, dtype):
    validate(compose_cfg([LORA, "kernels.fp8=true", f"model.dtype={dtype}"]))


def test_the_ablation_sweeps_bf16_against_fp8_over_the_same_seeds(compose_cfg):
    cfg = compose_cfg(["experiment=fp8_ablation"])
    validate(cfg)
    assert cfg.model.lora is not None and cfg.model.lora.dropout == 0  # plain LoRA: the fused node runs every call
    assert cfg.trainer.max_steps == 300 and cfg.kernels.fp8 is False
    assert cfg.logger.kind.value == "none"
