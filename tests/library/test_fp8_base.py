"""fp8_base: refused with one line where it cannot run; where it runs, the LoRA-wrapped projections hold e4m3
weights (their bf16 freed), train within FP8's error of bf16, and merge back. The CPU cases go through
``fp8_base.hold_fp8`` directly, past the device check that ``from_pretrained`` makes."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fusetune import FastModel, fp8_base
from fusetune.errors import FusetuneError
from fusetune.patching import apply_kernels, remove_kernels
from fusetune.state import state_of
from fusetune_kernels import fp8

from ..kernels.parity import rel_err
from ..kernels.tiny_models import batch, tiny_model
from .lora_helpers import TARGETS, loss_and_grads, randomize_lora_b

CPU_LINE = (
    "kernels.fp8 (fp8_base): the FP8 base GEMMs need a GPU with FP8 tensor cores (compute capability 8.9 or "
    "later); this run is on the CPU"
)


@pytest.fixture(autouse=True)
def unpatch_after(monkeypatch):
    # the row quantizer's twin, equal to it bit for bit (tests/kernels/test_fp8.py): the interpreter's one
    # program per token would cost a minute here
    monkeypatch.setattr(fp8, "quantize_rows", fp8.quantize_rows_reference)
    yield
    remove_kernels()


def fake_gpu(monkeypatch, capability, name="NVIDIA A100-SXM4-80GB"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize(
    "gpu, kwargs, line",
    [
        (None, {}, CPU_LINE),
        (
            (8, 0),
            {},
            "kernels.fp8 (fp8_base): the FP8 base GEMMs need a GPU with FP8 tensor cores (compute capability 8.9 "
            "or later); this run is on NVIDIA A100-SXM4-80GB (compute capability 8.0)",
        ),
        ((9, 0), {"dtype": torch.float16}, "kernels.fp8 (fp8_base) computes in bfloat16; the model's dtype is float16"),
        (
            (9, 0),
            {"kernels": "reference"},
            "kernels.fp8 (fp8_base) runs fusetune's kernels; kernels=reference is the bf16 definition of correct",
        ),
        (
            (9, 0),
            {"full_finetuning": True},
            "kernels.fp8 (fp8_base) is for a frozen bf16 or 4-bit base under LoRA adapters",
        ),
    ],
    ids=["cpu", "a100", "fp16", "reference", "full-finetuning"],
)
def test_refused_with_one_line_before_the_weights(gpu, kwargs, line, monkeypatch):
    if gpu is not None:
        fake_gpu(monkeypatch, gpu)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = []
    monkeypatch.setattr("fusetune.loading.load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(FusetuneError) as refused:
        FastModel.from_pretrained("fusetune:tiny_llama", random_init=True, fp8_base=True, **kwargs)
    assert str(refused.value) == line
    assert not loaded


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_fp8_gpus_pass_the_check(capability, monkeypatch):
    fake_gpu(monkeypatch, capability, name="NVIDIA H100 80GB HBM3")
    fp8_base.refuse_without_fp8(torch.bfloat16)


def fp8_lora_model(dropout=0.0):
    """A bf16 tiny Llama (intermediate 136: padded to 144) with LoRA on every projection, on the fused node."""
    model = get_peft_model(
        tiny_model("llama", dtype=torch.bfloat16),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS),
    )
    randomize_lora_b(model)
    apply_kernels(model, "triton", rms_norm=False, rope=False, glu=False, loss=False)  # the LoRA node alone
    return model


def test_held_weights_train_within_fp8_error_of_bf16(monkeypatch):
    model = fp8_lora_model()
    inputs = batch(model.config.vocab_size, rows=4, length=32)
    ref_loss, ref_grads = loss_and_grads(model, inputs)
    bases = {n: m.base_layer for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    originals = {n: b.weight.detach().clone() for n, b in bases.items()}

    line = fp8_base.hold_fp8(model)

    freed = sum(w.numel() * 2 for w in originals.values())
    held = sum(-(-w.shape[0] // 16) * 16 * (-(-w.shape[1] // 16) * 16 + 4) for w in originals.values())
    assert line == f"kernels.fp8 (fp8_base): 14 projections hold e4m3 weights, {held / 2**30:.2f} GiB " + (
        f"(their {freed / 2**30:.2f} GiB freed)"
    )
    for name, base in bases.items():
        assert base.weight.shape == originals[name].shape and base.weight.dtype == torch.bfloat16
        assert base.weight.untyped_storage().nbytes() == 2 and base.weight.isnan().all()  # the bf16 weight is gone
        assert not base.weight.requires_grad
    products = []
    real = fp8.fp8_product
    monkeypatch.setattr("fusetune_kernels.lora.fp8_product", lambda *a, **k: products.append(1) or real(*a, **k))
    loss, grads = loss_and_grads(model, inputs)
    assert len(products) == 14  # every wrapped projection ran the FP8 product
    assert set(grads) == set(ref_grads) and all("lora_" in n for n in grads)  # no base weight trains
    assert abs(loss.item() - ref_loss.item()) <= 0.01 * ref_loss.item()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and rel_err(grad, ref_grads[name]) <= 0.1, name


def test_a_call_the_fused_node_does_not_cover_is_refused():
    model = fp8_lora_model(dropout=0.1)
    fp8_base.hold_fp8(model)
    model.train()
    with pytest.raises(FusetuneError, match=r"^kernels.fp8 \(fp8_base\): a LoRA call the fused node does not cover"):
        model(**batch(model.config.vocab_size))


def test_unpatched_lora_is_refused():
    model = fp8_lora_model()
    remove_kernels()
    with pytest.raises(FusetuneError, match="keeps PEFT's own LoRA forward"):
        fp8_base.hold_fp8(model)


def test_merge_dequantizes_the_held_weights(tmp_path, tiny_tokenizer):
    model = fp8_lora_model()
    fp8_base.hold_fp8(model)
    expected = {}
    for name, module in model.named_modules():
        if name.endswith("layers.0.self_attn.q_proj"):
            held = module.base_layer.fusetune_fp8.dequantize(torch.float32)
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            expected = (held + delta).bfloat16()
    FastModel.save_merged(model, tiny_tokenizer, str(tmp_path / "merged"))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)
    got = merged.model.layers[0].self_attn.q_proj.weight
    assert torch.isfinite(got).all() and rel_err(got, expected) <= 1e-2
    assert fp8_base.held_weight(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer) is not None


def test_qlora_bases_go_from_nf4_to_e4m3_on_every_call(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from fusetune_kernels import lora_nf4

    from .test_lora_nf4_patch import nf4_lora_model

    folder = tmp_path / "tiny"
    tiny_model("llama", hidden_size=128, intermediate_size=192, num_attention_heads=8).save_pretrained(folder)
    model = nf4_lora_model(folder)
    apply_kernels(model, "triton", rms_norm=False, rope=False, glu=False, loss=False)
    inputs = {k: v.to(model.device) for k, v in batch(model.config.vocab_size).items()}
    ref_loss, ref_grads = loss_and_grads(model, inputs)  # the fused NF4 node, base products in the compute dtype

    assert fp8_base.hold_fp8(model) == "kernels.fp8 (fp8_base): 14 NF4 projections go to e4m3 on every call"

    conversions = []
    # the kernel's twin (equal bit for bit, tests/kernels/test_fp8.py): the interpreter's kernel costs half a minute
    real = fp8.nf4_to_fp8_reference
    monkeypatch.setattr(lora_nf4, "nf4_to_fp8", lambda w: conversions.append(w.shape) or real(w))
    loss, grads = loss_and_grads(model, inputs)
    assert len(conversions) == 2 * 14  # forward and backward of every 4-bit projection
    assert abs(loss.item() - ref_loss.item()) <= 0.01 * ref_loss.item()
    assert set(grads) == set(ref_grads)
    # e4m3 keeps 3 mantissa bits: each base weight is off by ~4% norm-wise (3.7% measured on 8B shapes), and the
    # second layer's adapter gradients see the first layer's error too (0.107 measured on an H100)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and rel_err(grad, ref_grads[name]) <= 0.15, name


def test_a_model_without_fp8_projections_is_refused_by_the_trainer(tiny_tokenizer, tmp_path):
    """fp8_base asked for, no adapters added: the trainer refuses rather than train in bf16 without saying so."""
    from datasets import Dataset

    from fusetune import FastSFTConfig, FastSFTTrainer

    model = tiny_model("llama")
    state_of(model).fp8_base = True
    data = Dataset.from_dict({"text": ["a b c d"] * 4})
    args = FastSFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(FusetuneError) as refused:
        FastSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    assert str(refused.value) == (
        "kernels.fp8 (fp8_base): no projection runs in FP8; add LoRA adapters with FastModel.get_peft_model before "
        "training (the FP8 base is the frozen weight under the adapters)"
    )
