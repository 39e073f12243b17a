"""fusetune.sequences.packed_sequences: packing and padding-free only where the model's own layers keep documents apart.

Dense families: no refusal, and the loss of a packed row (positions restarting per document) equals the
loss of the same documents as a padded batch. Hybrid and linear-attention families: on the CPU their
convolutions, scans and delta rules run transformers' PyTorch fallback, which reads no boundaries; the
packed loss differs from the padded one (so the refusal is needed), and packing_blocker says why in one
line, which the trainer logs (padding_free=None) or raises (packing=True, padding_free=True).
"""

import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM

from fusetune.errors import FusetuneError
from fusetune.patching import remove_kernels
from fusetune.sequences import packed_sequences
from fusetune.sequences.packed_sequences import documents, packed_and_padded_loss, packing_blocker
from fusetune.tiny import build_tokenizer
from fusetune.training.trainer import FastSFTConfig, FastSFTTrainer

from ..kernels.tiny_models import COMMON, EXTRA

VOCAB = 97
TOL = 1e-5
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    pad_token_id=0,
    num_hidden_layers=2,
    initializer_range=0.2,  # large enough that a mixer's leak across documents shows in the loss
)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16, mamba_expand=2)
DELTA = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
LINEAR_FIRST = ["linear_attention", "full_attention"]
NO_PATH = "read no document boundaries (no cu_seqlens in their code)"
FALLBACK = "read no document boundaries on cpu (transformers' PyTorch fallback)"

# model type, its config beyond SMALL (a layer of each type), and the refusal line (after "<type>: its ").
HYBRIDS = [
    (
        "qwen3_5_text",
        dict(layer_types=LINEAR_FIRST, **DELTA),
        f"linear_attention layers (Qwen3_5GatedDeltaNet) {FALLBACK}",
    ),
    (
        "qwen3_next",
        dict(layer_types=LINEAR_FIRST, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **DELTA),
        f"linear_attention layers (Qwen3NextGatedDeltaNet) {FALLBACK}",
    ),
    (
        "olmo_hybrid",
        dict(layer_types=LINEAR_FIRST, **DELTA),
        f"linear_attention layers (OlmoHybridGatedDeltaNet) {FALLBACK}",
    ),
    ("bamba", dict(attn_layer_indices=[1], **MAMBA2), f"linear_attention layers (BambaMixer) {NO_PATH}"),
    ("falcon_h1", dict(mamba_d_ssm=128, **MAMBA2), f"hybrid layers (FalconH1Mixer) {NO_PATH}"),
    (
        "granitemoehybrid",
        dict(layer_types=["mamba", "attention"], num_local_experts=4, num_experts_per_tok=2, **MAMBA2),
        f"linear_attention layers (GraniteMoeHybridMambaLayer) {NO_PATH}",
    ),
    (
        "nemotron_h",
        dict(
            layers_block_type=["mamba", "attention"],
            mamba_num_heads=8,
            mamba_head_dim=16,
            n_groups=1,
            ssm_state_size=16,
            chunk_size=16,
        ),
        f"linear_attention layers (NemotronHMamba2Mixer) {NO_PATH}",
    ),
    (
        "lfm2",
        dict(layer_types=["conv", "full_attention"], block_ff_dim=96, block_auto_adjust_ff_dim=False),
        f"conv layers (Lfm2ShortConv) {NO_PATH}",
    ),
    (
        "zamba2",
        dict(layers_block_type=["mamba", "hybrid"], mamba_headdim=16, n_mamba_heads=8, chunk_size=16),
        f"linear_attention/hybrid layers (Zamba2MambaMixer) {NO_PATH}",
    ),
    (
        "jamba",
        dict(attn_layer_period=2, attn_layer_offset=1, num_experts=2, mamba_d_state=16, use_mamba_kernels=False),
        f"linear_attention layers (JambaMambaMixer) {NO_PATH}",
    ),
    (
        "recurrent_gemma",
        dict(block_types=["recurrent", "attention"], lru_width=64, attention_window_size=16),
        f"RecurrentGemmaRecurrentBlock layers {NO_PATH}",
    ),
    (
        "zamba",
        dict(layers_block_type=["mamba", "hybrid"], mamba_d_state=16, n_mamba_heads=2),
        f"linear_attention/hybrid layers (ZambaMambaMixer) {NO_PATH}",
    ),
    (
        "kimi_linear",
        dict(
            layer_types=LINEAR_FIRST,
            linear_attn_config={"full_attn_layers": [2], "kda_layers": [1], "num_heads": 4, "head_dim": 16},
            num_experts=4,
            num_experts_per_token=2,
            moe_intermediate_size=32,
            first_k_dense_replace=2,
        ),
        f"linear_attention layers (KimiLinearDeltaAttention) {NO_PATH}",
    ),
    ("mamba", dict(state_size=8), f"linear_attention layers (MambaMixer) {NO_PATH}"),
    (
        "mamba2",
        dict(num_heads=8, head_dim=16, n_groups=1, state_size=16, chunk_size=16),
        f"linear_attention layers (Mamba2Mixer) {NO_PATH}",
    ),
    ("falcon_mamba", dict(state_size=8), f"linear_attention layers (FalconMambaMixer) {NO_PATH}"),
    (
        "minimax",
        dict(layer_types=LINEAR_FIRST, num_local_experts=2, num_experts_per_tok=1, block_size=8),
        f"linear_attention layers (MiniMaxLightningAttention) {NO_PATH}",
    ),
    ("xlstm", dict(num_heads=4, chunk_size=8, embedding_dim=64), f"xLSTMLayer layers {NO_PATH}"),
]
# Dense families: tests/kernels/tiny_models.py's, and more that TRL users pick.
DENSE = {
    **EXTRA,
    "phi3": {"pad_token_id": 0},
    "olmo2": {},
    "smollm3": {"no_rope_layers": [1, 0], "pad_token_id": 0},
    "granite": {"residual_multiplier": 0.5, "embedding_multiplier": 2.0},
    "glm4": {"pad_token_id": 0},
    "cohere": {"logit_scale": 0.5},
}


def hybrid(model_type, overrides, seed=0):
    config = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def dense(model_type, seed=0):
    config = AutoConfig.for_model(model_type, **{**COMMON, **DENSE[model_type]})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type,overrides,line", HYBRIDS, ids=[row[0] for row in HYBRIDS])
def test_hybrid_family_is_refused_in_one_line(model_type, overrides, line):
    model = hybrid(model_type, overrides)
    expected = f"{model_type}: its {line}; packed rows would mix documents"
    assert packing_blocker(model, "cpu") == expected
    assert packing_blocker(model.config) == expected  # from the config alone, on the meta device


# Kimi Linear's own padded forward fails at these sizes, in transformers, with SDPA and eager attention alike.
PADDED_FAILS = {"kimi_linear"}
LEAK_CASES = [row for row in HYBRIDS if row[0] not in PADDED_FAILS]


@pytest.mark.parametrize("model_type,overrides,line", LEAK_CASES, ids=[row[0] for row in LEAK_CASES])
def test_hybrid_family_mixes_documents_without_the_refusal(model_type, overrides, line):
    packed, padded = packed_and_padded_loss(hybrid(model_type, overrides), documents(VOCAB))
    assert abs(packed - padded) > 100 * TOL * abs(padded), (
        f"packed {packed} == padded {padded}: the refusal is not needed"
    )


@pytest.mark.parametrize("model_type", list(DENSE))
def test_dense_family_packs_with_the_padded_loss(model_type):
    model = dense(model_type)
    assert packing_blocker(model) is None
    packed, padded = packed_and_padded_loss(model, documents(COMMON["vocab_size"]))
    assert abs(packed - padded) <= TOL * abs(padded), f"packed {packed} != padded {padded}"


# ------------------------------------------------------------------ the decision on a GPU with kernels


@pytest.mark.parametrize(
    "installed,expected",
    [
        ({"causal_conv1d", "fla"}, None),  # the delta rule and the convolution both read cu_seqlens / seq_idx
        (
            {"causal_conv1d"},
            "qwen3_5_text: its linear_attention layers (Qwen3_5GatedDeltaNet) read no document boundaries without "
            "flash-linear-attention (transformers' PyTorch fallback); packed rows would mix documents",
        ),
        (
            set(),
            "qwen3_5_text: its linear_attention layers (Qwen3_5GatedDeltaNet) read no document boundaries without "
            "causal-conv1d, flash-linear-attention (transformers' PyTorch fallback); packed rows would mix documents",
        ),
    ],
)
def test_on_cuda_the_kernel_packages_decide(monkeypatch, installed, expected):
    monkeypatch.setattr(
        packed_sequences.importlib.util, "find_spec", lambda name: object() if name in installed else None
    )
    model = hybrid(*HYBRIDS[0][:2])
    assert packing_blocker(model, "cuda") == expected
    # a mixer whose own code takes no boundaries is refused whatever is installed
    assert (
        packing_blocker(hybrid(*HYBRIDS[3][:2]), "cuda")
        == f"bamba: its {HYBRIDS[3][2]}; packed rows would mix documents"
    )


def test_a_stateful_layer_type_without_a_module_found_is_refused():
    model = dense("llama")
    model.config.layer_types = ["linear_attention", "full_attention"]
    assert packing_blocker(model) == (
        "llama: its linear_attention layers carry a state from token to token by a path fusetune cannot read; "
        "packed rows would mix documents"
    )


# ------------------------------------------------------------------ the trainer


@pytest.fixture
def unpatch_kernels():
    yield
    remove_kernels()


def trainer_on(model, tmp_path, **kwargs):
    tokenizer = build_tokenizer()
    data = Dataset.from_list([{"input_ids": [1, 5, 6, 7, 2]}] * 4)
    args = FastSFTConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, use_cpu=True, **kwargs)
    return FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=args)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"packing": True}, "packing"),
        ({"padding_free": True}, "padding_free"),
        ({"packing": True, "packing_strategy": "bfd_split"}, "packing"),
    ],
)
def test_trainer_refuses_packed_rows_on_a_mixing_model(tmp_path, unpatch_kernels, kwargs, key):
    model_type, overrides, line = HYBRIDS[0]
    with pytest.raises(FusetuneError) as refused:
        trainer_on(hybrid(model_type, overrides), tmp_path, **kwargs)
    assert str(refused.value) == (
        f"{key}=True: {model_type}: its {line}; packed rows would mix documents; "
        f"set {key}=False (the app: trainer.{key}=false)"
    )


def test_trainer_leaves_wrapped_packing_alone(tmp_path, unpatch_kernels):
    """TRL's wrapped packing concatenates documents without restarting positions: attention crosses them too, by
    the user's choice, so there is nothing to keep apart."""
    trainer = trainer_on(hybrid(*HYBRIDS[0][:2]), tmp_path, packing=True, packing_strategy="wrapped")
    assert trainer.args.packing and not trainer.args.padding_free


def test_trainer_keeps_padding_free_off_and_says_why(tmp_path, unpatch_kernels, caplog):
    model_type, overrides, line = HYBRIDS[3]  # bamba
    with caplog.at_level(logging.INFO, logger="fusetune.training.trainer"):
        trainer = trainer_on(hybrid(model_type, overrides), tmp_path)
    assert trainer.args.padding_free is False
    assert f"padding-free batching off: {model_type}: its {line}; packed rows would mix documents" in caplog.messages


# ------------------------------------------------------------------ the app, through the same trainer


@pytest.mark.parametrize("key", ["packing", "padding_free"])
def test_app_refuses_packed_rows_on_a_mixing_model_in_one_line(tmp_path, compose_cfg, capsys, unpatch_kernels, key):
    """A model folder of the tiny tokenizer and a Qwen3.5 text config, built with random weights by the app."""
    from ..e2e.app_runs import error_line, exit_and_stderr

    folder = tmp_path / "qwen3_5_tiny"
    build_tokenizer().save_pretrained(folder)
    model_type, overrides, line = HYBRIDS[0]
    AutoConfig.for_model(model_type, **{**SMALL, "vocab_size": 128, **overrides}).save_pretrained(folder)
    overrides = ["logger=none", "trainer.max_steps=1", f"model.name_or_path={folder}", f"trainer.{key}=true"]
    code, stderr = exit_and_stderr(overrides, tmp_path / "run", False, compose_cfg, capsys)
    assert code == 2, stderr[-3000:]
    assert error_line(stderr) == (
        f"fusetune: error: {key}=True: {model_type}: its {line}; packed rows would mix documents; "
        f"set {key}=False (the app: trainer.{key}=false)"
    )
