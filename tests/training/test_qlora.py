"""QLoRA on CPU: 4-bit NF4 with double quantization (bitsandbytes >= 0.50 runs it on CPU), 8-bit loading,
8-bit AdamW, and non-reentrant gradient checkpointing, through FastModel and FastSFTTrainer."""

import pytest
import torch
from datasets import Dataset

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.data.synthetic import synthetic_splits
from fusetune.patching import remove_kernels


@pytest.fixture(autouse=True)
def unpatch_kernels():
    yield
    remove_kernels()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny Llama with random weights saved to disk: quantization needs weights to load."""
    folder = tmp_path_factory.mktemp("tiny_weights")
    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", random_init=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    remove_kernels()
    return str(folder)


def test_qlora_trains_with_nf4_double_quant_and_adamw_8bit(tiny_folder, tmp_path):
    import bitsandbytes as bnb

    model, tokenizer = FastModel.from_pretrained(tiny_folder, max_seq_length=64, load_in_4bit=True)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert isinstance(weight, bnb.nn.Params4bit) and weight.quant_type == "nf4" and weight.quant_state.nested
    model = FastModel.get_peft_model(
        model, r=4, modules_to_save=["embed_tokens", "lm_head"], use_gradient_checkpointing=True
    )
    assert model.get_base_model().is_gradient_checkpointing
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = FastSFTConfig(
        output_dir=str(tmp_path),
        report_to=[],
        max_steps=3,
        logging_steps=1,
        optim="adamw_8bit",
        learning_rate=1e-2,
        embedding_learning_rate=1e-3,
        per_device_train_batch_size=4,
    )
    data = Dataset.from_list(synthetic_splits(32, 0, seed=2)[0])
    trainer = FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=args)
    out = trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, bnb.optim.AdamW) and optimizer.args.optim_bits == 8
    assert [g["initial_lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]  # LoRA, then embeddings
    assert torch.isfinite(torch.tensor(out.training_loss))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed) and any("embed_tokens" in n for n in changed)


def test_8bit_loading(tiny_folder):
    import bitsandbytes as bnb

    model, _ = FastModel.from_pretrained(tiny_folder, load_in_8bit=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 100, (1, 9), device=model.device)).logits).all()


def test_save_merged_from_a_4bit_base_reloads_16bit_weights(tiny_folder, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from fusetune import loading

    model, tokenizer = FastModel.from_pretrained(tiny_folder, load_in_4bit=True, revision="main")
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
    model.config.use_cache = False  # as the Trainer leaves it after training with checkpointing
    reloads = []
    load_model = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **kw: reloads.append(kw) or load_model(*a, **kw))
    FastModel.save_merged(model, tokenizer, str(tmp_path / "merged"), token="hf_secret")
    # the 16-bit base comes with the revision and remote-code choice of the 4-bit one, and the token given here
    assert reloads == [{"token": "hf_secret", "revision": "main", "trust_remote_code": False}]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16 and not hasattr(merged.model.layers[0].mlp.down_proj.weight, "quant_state")
    assert merged.config.use_cache is True
    assert "hf_secret" not in "".join(f.read_text(errors="ignore") for f in (tmp_path / "merged").glob("*.json"))


def test_qlora_computes_in_the_compute_dtype_with_fp32_master_weights(tiny_folder, tmp_path):
    """bf16 end to end on a 4-bit base: no frozen weight is fp32, every layer's input is bf16, the trainable
    weights (LoRA, modules_to_save) are fp32 master weights, and every projection takes the fused NF4 node."""
    model, tokenizer = FastModel.from_pretrained(
        tiny_folder, dtype=torch.bfloat16, load_in_4bit=True, kernels="reference"
    )
    model = FastModel.get_peft_model(model, r=4, modules_to_save=["embed_tokens", "lm_head"])
    args = FastSFTConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, per_device_train_batch_size=4)
    data = Dataset.from_list(synthetic_splits(8, 0, seed=3)[0])
    trainer = FastSFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=args)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert set(trainable.values()) == {torch.float32}
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    seen = []
    layers = model.get_base_model().model.layers
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).dtype),
            with_kwargs=True,
        )
        for layer in layers
    ]
    trainer.train()
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    bases = [m.base_layer for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    assert bases and all(getattr(b, "_fusetune_nf4", (None, None))[1] is not None for b in bases)


def test_qlora_loss_matches_a_bf16_model_of_the_dequantized_weights(tiny_folder):
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    from fusetune.patching import apply_kernels

    model, _ = FastModel.from_pretrained(tiny_folder, dtype=torch.bfloat16, load_in_4bit=True, kernels="reference")
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)  # B = 0: the base alone
    plain = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.bfloat16).to(model.device)
    apply_kernels(plain, "reference")
    quantized = dict(model.get_base_model().named_modules())
    with torch.no_grad():
        for name, module in plain.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                weight = quantized[name].base_layer.weight
                module.weight.copy_(dequantize_4bit(weight.data, weight.quant_state).to(torch.bfloat16))
    ids = torch.randint(3, 100, (3, 40), generator=torch.Generator().manual_seed(5)).to(model.device)
    labels = ids.clone()
    labels[:, :7] = -100
    with torch.no_grad():
        got = model(input_ids=ids, labels=labels).loss.float()
        expected = plain(input_ids=ids, labels=labels).loss.float()
    assert torch.isfinite(got) and abs(got - expected) / expected < 1e-2, (got, expected)
