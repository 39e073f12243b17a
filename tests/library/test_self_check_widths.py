"""The self-check on a GPU: at the model's real widths, in the half dtype it trains in, so the kernels it
compiles are training's; still strict enough that a changed module's maths is caught."""

import pytest
import torch
from transformers import AutoConfig

from fusetune import families, patching, self_check

from ..kernels.tiny_models import tiny_model


@pytest.fixture
def fresh_verdicts(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(self_check, "_memory", {})
    yield
    patching.remove_kernels()


def llama_8b_like(**changes) -> dict:
    values = AutoConfig.for_model(
        "llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        num_hidden_layers=32,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    ).to_dict()
    return {**values, **changes}


def test_widths_keep_the_sizes_the_kernels_specialise_on():
    kept = families.shrink_values(llama_8b_like(), widths=True)
    assert [kept[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")] == [
        4096,
        32,
        8,
        128,
    ]
    # clipped where the GLU (2048) and cross-entropy (4096) blocks stop growing, as divisible by 16 as before
    assert kept["intermediate_size"] == 2048 and kept["vocab_size"] == 4096 and kept["num_hidden_layers"] == 2
    odd = families.shrink_values(llama_8b_like(intermediate_size=11009, vocab_size=50257), widths=True)
    assert odd["intermediate_size"] == 2049 and odd["vocab_size"] == 4097
    narrow = families.shrink_values(llama_8b_like(intermediate_size=1536, vocab_size=3000), widths=True)
    assert narrow["intermediate_size"] == 1536 and narrow["vocab_size"] == 3000
    small = families.shrink_values(llama_8b_like())
    assert small["hidden_size"] == families.SMALL["hidden_size"] and small["vocab_size"] == families.SMALL["vocab_size"]


def test_only_triton_on_a_gpu_in_a_half_dtype_checks_in_that_dtype():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert self_check.half_precision("triton", cuda, torch.bfloat16) is torch.bfloat16
    assert self_check.half_precision("triton", cuda, torch.float32) is None
    assert self_check.half_precision("reference", cuda, torch.bfloat16) is None
    assert self_check.half_precision("triton", cpu, torch.bfloat16) is None


def small_qwen3():
    return tiny_model("qwen3").config


def test_in_a_half_dtype_the_ops_agree_and_a_changed_rotation_is_still_caught(fresh_verdicts, monkeypatch):
    """The half-dtype check (forced on the CPU): a tolerance scaled by the model's own bf16 error accepts
    every correct op, and still rejects rope where the model's own rotation changed sign."""
    monkeypatch.setattr(self_check, "half_precision", lambda backend, device, dtype: torch.bfloat16)
    accepted, rejected = patching.check_family(small_qwen3(), "reference", "cpu", torch.bfloat16)
    assert accepted == {"rms_norm", "add_norm", "rope", "glu", "loss"}, rejected

    from transformers.models.qwen3 import modeling_qwen3

    original = modeling_qwen3.apply_rotary_pos_emb
    monkeypatch.setattr(
        modeling_qwen3, "apply_rotary_pos_emb", lambda q, k, cos, sin, unsqueeze_dim=1: original(q, k, cos, -sin)
    )
    accepted, rejected = patching.check_family(small_qwen3(), "reference", "cpu", torch.bfloat16)
    assert "rope" not in accepted and rejected["rope"].startswith("max rel error"), rejected
    assert {"rms_norm", "glu", "loss"} <= accepted


def test_verdicts_in_a_half_dtype_are_cached_apart_from_fp32(fresh_verdicts, monkeypatch):
    calls = []
    real_run = self_check.run
    monkeypatch.setattr(self_check, "run", lambda *a: calls.append(a[-1]) or real_run(*a))
    monkeypatch.setattr(
        self_check, "half_precision", lambda backend, device, dtype: dtype if dtype != torch.float32 else None
    )
    config = small_qwen3()
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        patching.check_family(config, "reference", "cpu", dtype)
    assert calls == [torch.float32, torch.bfloat16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the half-dtype check runs only on a CUDA GPU")
@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3_5_text", "phi3", "granite", "olmo2", "qwen3_moe"])
def test_on_a_gpu_the_families_keep_their_ops_in_bf16(fresh_verdicts, model_type):
    """At each type's default widths in bf16, triton keeps every op the fp32 reference check keeps."""
    from .test_coverage import NAMED

    config = AutoConfig.for_model(model_type)
    accepted, rejected = patching.check_family(config, "triton", "cuda", torch.bfloat16)
    lost = set(NAMED[model_type].split()) - accepted
    assert not lost, f"{model_type}: {sorted(lost)} rejected in bf16: {rejected}"
