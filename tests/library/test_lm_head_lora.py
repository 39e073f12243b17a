"""LoRA on the lm_head trains through the fused loss head: W + s B A without [tokens, vocab] logits, the same
loss and gradients as PEFT's own forward with HF's loss, in every kernels mode and PEFT state."""

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model

from fusetune import FastModel, FastSFTConfig, FastSFTTrainer
from fusetune.errors import FusetuneError
from fusetune.patching import apply_kernels, remove_kernels

from ..kernels.conftest import DEVICE, needs_triton_backend
from ..kernels.parity import assert_close
from ..kernels.tiny_models import tiny_model
from .lora_helpers import count_fused, randomize_lora_b

HEAD = "base_model.model.lm_head"
LAYER_OPS = ("rms_norm", "add_norm", "rope", "glu")


@pytest.fixture(autouse=True)
def unpatch_after():
    yield
    remove_kernels()


def head_lora_model(targets=("q_proj", "v_proj", "lm_head"), tie=False, **lora):
    model = tiny_model("llama", tie_word_embeddings=tie).to(DEVICE)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": list(targets), **lora})
    model = get_peft_model(model, config)
    randomize_lora_b(model)  # B = 0 would give A no gradient
    return model


def fresh_inputs(vocab=301, rows=2, length=13):
    input_ids = torch.randint(0, vocab, (rows, length), device=DEVICE)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return {"input_ids": input_ids, "labels": labels}


def loss_and_grads(model, inputs, **call):
    model.zero_grad()
    loss = model(**inputs, use_cache=False, **call).loss
    if loss.requires_grad:  # not when every adapter is merged into frozen weights
        loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(got, expected):
    (loss, grads), (ref_loss, ref_grads) = got, expected
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        if ref_grads[name] is None:
            assert grad is None, f"{name}: a gradient where PEFT gives none"
            continue
        assert grad is not None, f"{name}: no gradient"
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}", tol=1e-4)


@pytest.mark.parametrize(
    "backend,call",
    # labels: the mean loss; fused_lm_head (TRL's): per-token, the head's gradients made in backward; token_stats
    # (FastSFTTrainer's): the sums of the statistics too
    [("reference", "labels"), ("reference", "fused_lm_head"), ("reference", "token_stats")]
    + [("triton", "labels"), ("triton", "fused_lm_head")],
)
def test_head_adapter_gradients_equal_peft(backend, call, monkeypatch):
    if backend == "triton":
        needs_triton_backend()
    model = head_lora_model()
    inputs = fresh_inputs()
    expected = loss_and_grads(model, inputs)  # PEFT's forward, the full logits, HF's loss
    for part in ("lora_A", "lora_B"):
        grad = expected[1][f"{HEAD}.{part}.default.weight"]
        assert grad is not None and grad.abs().sum() > 0
    calls = count_fused(monkeypatch, backend, "fused_linear_cross_entropy")
    # Triton runs interpreted on the CPU: there only the loss head (and the LoRA node) is patched, to stay fast
    layer_ops = {} if backend == "reference" or DEVICE == "cuda" else dict.fromkeys(LAYER_OPS, False)
    apply_kernels(model, backend, **layer_ops)
    calls.clear()  # a self-check that ran while patching counts too
    got = loss_and_grads(model, inputs, **({} if call == "labels" else {call: True}))
    assert calls == [1]  # the fused loss head ran, and the head's own forward (full logits) did not
    assert_same(got, expected)


@pytest.mark.parametrize(
    "case", ["tied", "tied-ensure", "two-adapters", "lora-bias", "merged", "disabled", "modules-to-save", "unfused"]
)
def test_every_peft_state_trains_what_peft_trains(case):
    lora = (
        {"lora_bias": True} if case == "lora-bias" else {"ensure_weight_tying": True} if case == "tied-ensure" else {}
    )
    if case == "modules-to-save":
        lora["modules_to_save"] = ["lm_head"]
    targets = ("q_proj", "v_proj") if case == "modules-to-save" else ("q_proj", "v_proj", "lm_head")
    model = head_lora_model(targets, tie=case.startswith("tied"), **lora)
    if case == "modules-to-save":
        with torch.no_grad():  # the copy differs from the frozen original: the loss must read the copy
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    if case == "two-adapters":
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["lm_head"]))
        model.base_model.set_adapter(["default", "second"])
        randomize_lora_b(model)
    if case == "merged":
        model.merge_adapter()
    inputs = fresh_inputs()

    def run():
        if case == "disabled":
            with model.disable_adapter():
                return loss_and_grads(model, inputs)
        return loss_and_grads(model, inputs)

    expected = run()
    apply_kernels(model, "reference", loss=case != "unfused")
    got = run()
    assert_same(got, expected)
    if case in ("merged", "disabled"):
        assert got[1].get(f"{HEAD}.lora_A.default.weight") is None  # as in PEFT: the adapter is not in use
    elif case == "modules-to-save":
        assert got[1][f"{HEAD}.modules_to_save.default.weight"] is not None
    else:
        assert got[1][f"{HEAD}.lora_A.default.weight"] is not None
    if case == "two-adapters":
        assert got[1][f"{HEAD}.lora_B.second.weight"] is not None


def test_lora_dropout_acts_on_the_adapter_input():
    # A dropout that keeps a fixed set of features (the same draw for every shape) stands in for PEFT's, so both
    # paths drop the same inputs of A, and only of A; a real dropout makes the training loss differ from eval's.
    model = head_lora_model(("lm_head",), lora_dropout=0.5)
    inputs = fresh_inputs()
    model.train()
    apply_kernels(model, "reference")
    with torch.no_grad():
        trained, evaluated = model(**inputs).loss, model.eval()(**inputs).loss
    assert not torch.allclose(trained, evaluated)
    remove_kernels()
    model.train()
    keep = (torch.rand(model.config.hidden_size, device=DEVICE) > 0.5).float() * 2

    class FixedDropout(torch.nn.Module):
        def forward(self, x):
            return x * keep

    model.base_model.model.lm_head.lora_dropout["default"] = FixedDropout()
    expected = loss_and_grads(model, inputs)
    apply_kernels(model, "reference")
    assert_same(loss_and_grads(model, inputs), expected)


@pytest.mark.parametrize("adapter", ["dora", "ia3"])
def test_an_adapter_the_loss_head_cannot_compute_is_refused(adapter):
    if adapter == "dora":
        model, match = head_lora_model(("lm_head",), use_dora=True), "lm_head is DoRA"
    else:
        model = get_peft_model(
            tiny_model("llama").to(DEVICE), IA3Config(target_modules=["lm_head"], feedforward_modules=[])
        )
        match = r"lm_head \(peft.tuners.ia3.layer.Linear\) is not LoRA"
    apply_kernels(model, "reference")
    with pytest.raises(FusetuneError, match=match):
        model(**fresh_inputs())


@pytest.mark.parametrize("adapters_by", ["get_peft_model", "peft_config"])
def test_twenty_steps_move_the_head_adapter_not_the_head(adapters_by, tmp_path):
    from datasets import Dataset

    from fusetune.data.synthetic import synthetic_splits

    model, tokenizer = FastModel.from_pretrained("fusetune:tiny_llama", max_seq_length=64, random_init=True)
    targets = ["q_proj", "v_proj", "lm_head"]
    extra = {}
    if adapters_by == "get_peft_model":
        model = FastModel.get_peft_model(model, r=4, target_modules=targets, use_gradient_checkpointing=False)
    else:  # TRL adds them while the trainer is built, past its own check on lm_head
        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    args = FastSFTConfig(
        output_dir=str(tmp_path),
        report_to=[],
        max_steps=20,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=10,
        save_strategy="no",
        kernels="reference",
    )
    train = Dataset.from_list(synthetic_splits(40, 0, seed=1)[0])
    trainer = FastSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, **extra)
    head = trainer.model.base_model.model.lm_head
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    assert head.lora_A["default"].weight.requires_grad and not head.base_layer.weight.requires_grad
    trainer.train()
    after = dict(head.named_parameters())
    assert torch.equal(after["base_layer.weight"], before["base_layer.weight"])
    for name in ("lora_A.default.weight", "lora_B.default.weight"):
        assert not torch.allclose(after[name], before[name]), f"{name} did not move"


@pytest.mark.parametrize("given", ["peft_model", "peft_config"])
def test_head_adapter_without_the_fused_loss_is_refused(given, tmp_path, tiny_tokenizer):
    # The loss op off: TRL's own fused head would read lm_head.weight alone and never train the adapter.
    lora = LoraConfig(r=4, target_modules=["lm_head"])
    model = tiny_model("llama").to(DEVICE)
    if given == "peft_model":
        model = get_peft_model(model, lora)
    apply_kernels(model, "reference", loss=False)
    args = FastSFTConfig(output_dir=str(tmp_path), report_to=[], max_steps=1)
    extra = {"peft_config": lora} if given == "peft_config" else {}
    with pytest.raises(FusetuneError, match="LoRA on lm_head .* trains only through fusetune's fused loss head"):
        FastSFTTrainer(model=model, args=args, train_dataset=None, processing_class=tiny_tokenizer, **extra)
