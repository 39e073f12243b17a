"""The shipped architectures (src/fusetune/assets/archs) and the model presets that name them.

Each architecture builds through the real loading code (``random_init``): at its real shape on the meta device
(the published parameter count), and shrunk to toy size on the CPU, where one forward and backward reach every
parameter. Each preset's LoRA targets exist in its architecture. A multimodal checkpoint loads as its language
model alone, from the weight names transformers 5 writes and from those transformers 4 wrote."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusetune import loading, tiny
from fusetune.app.config import validate

from .conftest import CONF

ARCHS = loading.ASSETS / "archs"

# arch -> (class built, model_type, published parameter count or None, what its toy config must keep)
CASES = {
    "llama3_1b": ("LlamaForCausalLM", "llama", 1.236e9, {"tie_word_embeddings": True}),
    "llama3_8b": ("LlamaForCausalLM", "llama", 8.030e9, {}),
    "llama3_2_3b": ("LlamaForCausalLM", "llama", 3.213e9, {"tie_word_embeddings": True}),
    "mistral_7b": ("MistralForCausalLM", "mistral", 7.248e9, {}),
    "qwen2_5_1_5b": ("Qwen2ForCausalLM", "qwen2", 1.544e9, {}),
    "qwen3_5_2b": (
        "Qwen3_5ForCausalLM",
        "qwen3_5_text",
        None,
        {"layer_types": ["linear_attention", "full_attention"], "partial_rotary_factor": 0.25},
    ),
    "gemma3_1b": (
        "Gemma3ForCausalLM",
        "gemma3_text",
        1.000e9,
        {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8},
    ),
    "gemma3_4b": (
        "Gemma3ForCausalLM",
        "gemma3_text",
        3.880e9,
        {"layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 256},
    ),
    "phi4_mini": ("Phi3ForCausalLM", "phi3", 3.836e9, {"partial_rotary_factor": 0.75, "tie_word_embeddings": True}),
    "smollm3_3b": ("SmolLM3ForCausalLM", "smollm3", 3.075e9, {"no_rope_layers": [1, 0]}),
    "qwen3_moe_30b_a3b": ("Qwen3MoeForCausalLM", "qwen3_moe", 30.53e9, {"num_experts": 4}),
    "olmoe_1b_7b": ("OlmoeForCausalLM", "olmoe", 6.919e9, {"num_experts": 4}),
}


def test_every_shipped_arch_has_a_case():
    assert {p.name for p in ARCHS.iterdir() if (p / "config.json").is_file()} == set(CASES)


def write_config(folder: Path, config: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def arch_json(name: str) -> dict:
    return json.loads((ARCHS / name / "config.json").read_text())


@pytest.mark.parametrize("arch", CASES)
def test_real_shape(arch):
    cls, model_type, published, _ = CASES[arch]
    with torch.device("meta"):
        model = loading.load_model("unused", torch.bfloat16, config=f"fusetune:archs/{arch}", random_init=True)
    assert type(model).__name__ == cls and model.config.model_type == model_type
    assert loading.load_config(f"fusetune:archs/{arch}").model_type == model_type  # what the patch table sees
    if published:
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(published, rel=2e-3)


@pytest.mark.parametrize("arch", CASES)
def test_toy_size_trains(arch, tmp_path):
    cls, model_type, _, kept = CASES[arch]
    model = loading.load_model(
        "unused", torch.float32, config=write_config(tmp_path, tiny.shrunk(arch_json(arch))), random_init=True
    )
    assert type(model).__name__ == cls and model.config.model_type == model_type
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 256
    for key, value in kept.items():
        assert getattr(model.config, key, None) == value or model.config.rope_parameters.get(key) == value, key
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 40))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    untouched = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert untouched == []


PRESETS = sorted(
    p.stem for p in (CONF / "model").glob("*.yaml") if "fusetune:archs/" in p.read_text() and "_qlora" not in p.stem
)


def test_the_new_presets_are_there():
    new = {"qwen3_5_2b", "gemma3_1b", "gemma3_4b", "phi4_mini", "llama3_2_3b", "smollm3_3b"}
    assert new | {"qwen3_moe_30b_a3b", "olmoe_1b_7b"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_lora_targets_exist_in_its_arch(preset, compose_cfg, tmp_path):
    """random_init=true builds the preset's own architecture, and LoRA finds every target module in it."""
    cfg = compose_cfg([f"model={preset}", "model.random_init=true"])
    validate(cfg)
    arch = cfg.model.config.removeprefix("fusetune:archs/")
    model = loading.load_model(
        cfg.model.name_or_path,
        torch.float32,
        config=write_config(tmp_path, tiny.shrunk(arch_json(arch))),
        random_init=True,
    )
    lora = cfg.model.lora
    model = loading.add_lora(
        model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
    )
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted == set(lora.target_modules)
    if (CONF / "model" / f"{preset}_qlora.yaml").is_file():
        twin = compose_cfg([f"model={preset}_qlora"]).model
        assert twin.load_in_4bit and not twin.random_init and twin.lora.target_modules == lora.target_modules
        assert (twin.name_or_path, twin.config) == (cfg.model.name_or_path, cfg.model.config)


def tiny_gemma3_wrapper_config() -> dict:
    """gemma3_4b's composite config, its text part shrunk and its vision tower at toy size."""
    config = tiny.shrunk(arch_json("gemma3_4b"))
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}
    config["vision_config"] = {**config["vision_config"], **vision, "image_size": 28}
    config.update(mm_tokens_per_image=4, image_token_index=255, boi_token_index=253, eoi_token_index=254)
    return config


def legacy_names(key: str) -> str:
    """A transformers 5 weight name of Gemma3ForConditionalGeneration, as transformers 4 wrote it."""
    if key.startswith("model.language_model."):
        return "language_model.model." + key.removeprefix("model.language_model.")
    if key.startswith("lm_head."):
        return "language_model." + key
    return key.removeprefix("model.")


@pytest.mark.parametrize("names", ["transformers 5", "transformers 4"])
def test_multimodal_checkpoint_loads_its_language_model(names, tmp_path):
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    whole = Gemma3ForConditionalGeneration(AutoConfig.for_model(**tiny_gemma3_wrapper_config()))
    whole.save_pretrained(tmp_path)
    if names == "transformers 4":
        (weights,) = tmp_path.glob("*.safetensors")
        save_file({legacy_names(k): v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    model = loading.load_model(str(tmp_path), torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM" and not hasattr(model.model, "vision_tower")
    expected = whole.model.language_model.state_dict()
    loaded = model.model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the wrapper


@pytest.mark.parametrize(
    "model_type,built,renamed",
    [
        ("llama", "llama", False),  # a plain config: as it is
        ("gemma3", "gemma3_text", True),  # the wrapper's language model, its weights renamed by fusetune
        ("qwen3_5", "qwen3_5_text", False),  # transformers builds the text model and renames its weights itself
        ("clip", "clip", False),  # a text part that is no causal LM: left alone
    ],
)
def test_text_part(model_type, built, renamed):
    from transformers import AutoConfig

    config, key_mapping = loading.text_part(AutoConfig.for_model(model_type))
    assert config.model_type == built and (key_mapping == loading.TEXT_WEIGHTS if renamed else key_mapping is None)
