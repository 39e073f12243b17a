"""The experts entry of the patch table: MoE models with LoRA on attention and experts train the same through
the grouped expert kernel (loss with the router's load-balancing loss, every gradient), packed rows as padded
batches, and experts of another layout stay the model's own, with the reason logged."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from fusetune import forwards, patching
from fusetune.errors import FusetuneError
from fusetune.patching import apply_kernels, check_family, remove_kernels

from ..kernels.conftest import DEVICE, needs_triton_backend
from ..kernels.parity import assert_close
from .lora_helpers import count_fused, loss_and_grads, randomize_lora_b

COMMON = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
    num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05, tie_word_embeddings=False,
)  # fmt: skip
FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=6, norm_topk_prob=True, intermediate_size=48),
    "mixtral": dict(intermediate_size=32, num_local_experts=6),
    "olmoe": dict(intermediate_size=32, num_experts=6, norm_topk_prob=False),
    "qwen3_5_moe_text": dict(
        moe_intermediate_size=32, shared_expert_intermediate_size=16, num_experts=6,
        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16,
    ),
}  # fmt: skip
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["gate_up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def unpatch_after():
    yield
    remove_kernels()


def tiny_moe(family: str, seed: int = 0, **overrides):
    config = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1: perturb them so their gradients matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(DEVICE)


def lora_moe(family: str, seed: int = 0, **overrides):
    """LoRA on the attention projections and both expert parameters, router frozen, B made to matter."""
    model = tiny_moe(family, seed, **overrides)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, target_parameters=EXPERTS)
    model = get_peft_model(model, config)
    randomize_lora_b(model)
    return model


def inputs_for(model, rows=2, length=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids.to(DEVICE), "labels": labels.to(DEVICE)}


def patch(model, backend: str, monkeypatch) -> dict:
    """``apply_kernels``; for triton only the experts and LoRA ops (the others have their own tests, and each
    costs seconds under the interpreter), through Triton's grouped GEMMs (torch's grouped_mm would take these
    CPU shapes). Returns the switches."""
    if backend != "triton":
        assert apply_kernels(model, backend) == backend
        return {}
    needs_triton_backend()
    monkeypatch.setattr(forwards, "MOE_EXECUTOR", "triton")
    rows = patching.family_rows
    monkeypatch.setattr(patching, "family_rows", lambda family: [r for r in rows(family) if r[0] == "experts"])
    switches = dict(rms_norm=False, add_norm=False, rope=False, glu=False, loss=False)
    assert apply_kernels(model, backend, **switches) == backend
    return switches


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_moe_trains_like_the_model(family, backend, monkeypatch):
    """One kernel call per MoE layer (both expert adapters inside it); the loss, with the router's weighted
    load-balancing loss (fusetune's loss head under reference), and every gradient (attention and expert
    LoRA A/B) equal the model's own."""
    model = lora_moe(family)
    inputs = inputs_for(model)
    expected = model(**inputs, use_cache=False)
    assert expected.aux_loss > 0
    ref_loss, ref_grads = loss_and_grads(model, inputs)
    calls = count_fused(monkeypatch, backend, "moe_experts")
    switches = patch(model, backend, monkeypatch)
    assert getattr(type(model.base_model.model).forward, "_fusetune", False) == ("loss" not in switches)
    got = model(**inputs, use_cache=False)
    assert_close(got.aux_loss, expected.aux_loss, torch.float32, "aux loss", tol=1e-5)
    calls.clear()
    loss, grads = loss_and_grads(model, inputs)
    assert len(calls) == 2, "every MoE layer's experts, with their adapters, in one kernel call"
    assert_close(loss, ref_loss, torch.float32, "loss", tol=1e-5)
    assert sum("experts" in n and "lora_" in n for n in grads) == 8  # 2 layers x gate_up, down x A, B
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}", tol=1e-4)


def test_experts_without_tokens_inside_a_step(monkeypatch):
    """Top-1 of 8 experts for 4 tokens: most experts get none; their adapters' gradients are exactly zero."""
    model = lora_moe("qwen3_moe", num_experts=8, num_experts_per_tok=1)
    inputs = inputs_for(model, rows=1, length=4)
    ref_loss, ref_grads = loss_and_grads(model, inputs)
    patch(model, "triton", monkeypatch)
    chosen = []
    gate = model.base_model.model.model.layers[0].mlp.gate
    gate.register_forward_hook(lambda m, args, out: chosen.append(out[2].unique().tolist()))
    loss, grads = loss_and_grads(model, inputs)
    idle = sorted(set(range(8)) - set(chosen[0]))
    assert len(idle) >= 4
    assert_close(loss, ref_loss, torch.float32, "loss", tol=1e-5)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}", tol=1e-4)
    layer0 = "model.layers.0.mlp.experts"
    a = next(g for n, g in grads.items() if layer0 in n and "lora_A" in n and "base_layer" not in n)
    assert torch.count_nonzero(a.view(8, 4, -1)[idle]) == 0


@pytest.mark.parametrize("case", ["disabled", "two-adapters"])
def test_unplain_expert_lora_keeps_peft_forward(case, monkeypatch):
    model = lora_moe("qwen3_moe")
    if case == "two-adapters":
        model.add_adapter("second", LoraConfig(r=2, target_modules=ATTENTION, target_parameters=EXPERTS))
        model.base_model.set_adapter(["default", "second"])
    inputs = inputs_for(model)

    def loss():
        if case == "disabled":
            with model.disable_adapter():
                return model(**inputs, use_cache=False).loss
        return model(**inputs, use_cache=False).loss

    expected = loss()
    calls = count_fused(monkeypatch, "reference", "moe_experts")
    apply_kernels(model, "reference")
    got = loss()
    # the experts module itself is still fused; PEFT's wrappers hand it their merged weights
    assert len(calls) == 2
    assert_close(got, expected, torch.float32, "loss", tol=1e-5)


def test_another_lora_factor_layout_is_one_line():
    """An older PEFT's factors (not the (experts, out, in) layout) are refused, never read the wrong way."""
    model = lora_moe("qwen3_moe")
    for module in model.modules():
        if hasattr(module, "parameter_name"):
            module._did_swap_in_out_features = False
    apply_kernels(model, "reference")
    with pytest.raises(FusetuneError, match=r"^model.lora: PEFT .* not the \(experts, out, in\) layout") as error:
        model(**inputs_for(model), use_cache=False)
    assert "\n" not in str(error.value)


def test_packed_rows_train_as_the_padded_batch(monkeypatch):
    """Routing is per token: one packed row (positions restarting per document, no attention mask) gives the
    padded batch's loss, load-balancing loss included, and gradients."""
    from fusetune.sequences.varlen import enable_varlen_attention

    model = lora_moe("qwen3_moe")
    patch(model, "reference", monkeypatch)
    enable_varlen_attention(model, "masked")
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, 128, (n,), generator=g) for n in (7, 4, 9)]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed_ids = torch.cat(docs)[None]
    packed = {"input_ids": packed_ids, "position_ids": position_ids,
              "labels": packed_ids.masked_fill(position_ids == 0, -100)}  # fmt: skip
    padded_ids = torch.zeros(len(docs), 9, dtype=torch.long)
    mask = torch.zeros_like(padded_ids)
    for row, doc in enumerate(docs):
        padded_ids[row, : len(doc)], mask[row, : len(doc)] = doc, 1
    padded = {"input_ids": padded_ids, "attention_mask": mask, "labels": padded_ids.masked_fill(mask == 0, -100)}
    loss, grads = loss_and_grads(model, {k: v.to(DEVICE) for k, v in packed.items()})
    ref_loss, ref_grads = loss_and_grads(model, {k: v.to(DEVICE) for k, v in padded.items()})
    assert_close(loss, ref_loss, torch.float32, "packed loss", tol=1e-5)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}", tol=1e-4)


def test_experts_of_another_layout_are_refused_with_the_reason(caplog, monkeypatch):
    """gpt-oss keeps its experts (interleaved, transposed, biased, its own gating), saying why in the log."""
    monkeypatch.setattr(patching, "_told", set())  # a reason is logged once a process: another test may have
    config = AutoConfig.for_model("gpt_oss", **{**COMMON, "intermediate_size": 32, "num_local_experts": 4})
    with caplog.at_level(logging.INFO, logger="fusetune.patching"):
        accepted, rejected = check_family(config, "reference", "cpu")
    why = "GptOssExperts interleaves gate and up, is transposed, has biases, has its own gating"
    assert "experts" not in accepted and rejected["experts"] == why
    assert f"gpt_oss: experts left unpatched: {why}" in caplog.text


CONVERGENCE_STEPS = 50  # about 40 s on the CPU interpreter, the bar


def train(backend: str, steps: int, monkeypatch) -> tuple[torch.Tensor, dict]:
    """AdamW steps of LoRA on attention and experts of a one-layer MoE; per-step losses and final adapters."""
    remove_kernels()
    model = lora_moe("qwen3_moe", num_hidden_layers=1, num_experts=4, moe_intermediate_size=16)
    patch(model, backend, monkeypatch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        loss = model(**inputs_for(model, rows=1, length=8, seed=step % 2), use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    remove_kernels()
    return torch.tensor(losses), {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_triton_and_reference_train_the_same(monkeypatch):
    """kernels=triton and kernels=reference: the same per-step losses and final adapters over 50 AdamW steps."""
    ref_losses, ref_lora = train("reference", CONVERGENCE_STEPS, monkeypatch)
    losses, lora = train("triton", CONVERGENCE_STEPS, monkeypatch)
    assert ref_losses[-2:].mean() < ref_losses[:2].mean(), "the reference run did not learn"
    assert (losses - ref_losses).abs().max() <= 1e-4 * ref_losses.abs().max()
    for name, weight in lora.items():
        assert_close(weight, ref_lora[name], torch.float32, f"LoRA {name}", tol=1e-4)


@pytest.mark.parametrize("patched, target_parameters", [(True, None), (True, []), (False, None)])
def test_default_lora_targets_the_patched_experts(patched, target_parameters):
    """FastModel.get_peft_model's default: attention plus the experts' gate_up_proj and down_proj where the
    expert kernel computes them; the router stays frozen."""
    from fusetune import FastModel

    model = tiny_moe("qwen3_moe")
    if patched:
        apply_kernels(model, "reference")
    model = FastModel.get_peft_model(
        model, r=4, target_modules=ATTENTION, target_parameters=target_parameters, use_gradient_checkpointing=False
    )
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    on_experts = {n.split("mlp.experts.")[1] for n in trained if "mlp.experts." in n and "layers.0." in n}
    if patched and target_parameters is None:
        assert on_experts == {f"{b}lora_{ab}.default.weight" for b in ("", "base_layer.") for ab in "AB"}
    else:
        assert on_experts == set()
    assert not any(".gate." in n for n in trained), "the router trains"
    assert any("q_proj.lora_A" in n for n in trained)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_adds_and_logs_the_load_balancing_loss(tmp_path, tiny_tokenizer, monkeypatch, accumulation):
    """FastSFTTrainer's fused pass: TRL's loss (cross-entropy plus the weighted load-balancing loss, averaged
    over accumulated micro-batches) and its aux_loss metric, as TRL's own compute_loss logs them."""
    from datasets import Dataset

    from fusetune import FastSFTConfig, FastSFTTrainer
    from fusetune.compat.trl import original
    from fusetune.data.synthetic import synthetic_splits

    def run(fused: bool):
        remove_kernels()
        model = lora_moe("qwen3_moe", vocab_size=len(tiny_tokenizer), router_aux_loss_coef=0.5)
        args = FastSFTConfig(
            output_dir=str(tmp_path / str(fused)), report_to=[], max_steps=2, logging_steps=1, seed=3,
            per_device_train_batch_size=2, kernels="reference", fused_loss=fused, learning_rate=1e-2,
            gradient_accumulation_steps=accumulation, padding_free=False,
        )  # fmt: skip
        rows = Dataset.from_list(synthetic_splits(8, 0, seed=1)[0])
        trainer = FastSFTTrainer(model=model, processing_class=tiny_tokenizer, train_dataset=rows, args=args)
        trainer.train()
        return [(log["loss"], log["aux_loss"]) for log in trainer.state.log_history if "loss" in log]

    calls = []
    trl_compute_loss = original("SFTTrainer").compute_loss
    monkeypatch.setattr(
        original("SFTTrainer"), "compute_loss", lambda *a, **k: calls.append(1) or trl_compute_loss(*a, **k)
    )
    fused = run(True)
    assert calls == [], "the fused run took TRL's compute_loss"
    trl = run(False)
    assert calls and len(fused) == len(trl) == 2
    for (loss, aux), (want_loss, want_aux) in zip(fused, trl, strict=True):
        assert aux > 0 and aux == pytest.approx(want_aux, rel=1e-5)
        assert loss == pytest.approx(want_loss, rel=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_4bit_on_routed_experts_is_one_line_before_the_weights(family, tmp_path):
    """bitsandbytes quantizes Linear layers only: 3-D experts would train unquantized, so 4-bit is refused."""
    from fusetune import FastModel

    tiny_moe(family).config.save_pretrained(tmp_path)  # a config alone: the refusal comes before any weights
    with pytest.raises(FusetuneError) as refused:
        FastModel.from_pretrained(str(tmp_path), load_in_4bit=True)
    assert str(refused.value) == (
        f"load_in_4bit/load_in_8bit: {family} holds its 6 routed experts as 3-D weights, which bitsandbytes "
        "leaves unquantized (4-bit experts are not implemented); load it in bf16 (load_in_4bit=False) for LoRA "
        "on the experts"
    )


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_expert_adapters_reload_and_merge_as_they_trained(family, tmp_path):
    """LoRA on the patched experts, saved: plain PEFT over a fresh unpatched base gives the patched model's
    logits, and so does the merged model."""
    from peft import PeftModel

    from fusetune import FastModel

    base = tiny_moe(family, seed=3)
    apply_kernels(base, "reference")
    model = FastModel.get_peft_model(base, r=4, target_modules=ATTENTION, use_gradient_checkpointing=False)
    randomize_lora_b(model)
    assert any("mlp.experts.base_layer.lora_B" in n or "mlp.experts.lora_B" in n for n, _ in model.named_parameters())
    ids = inputs_for(model)["input_ids"]
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    remove_kernels()
    reloaded = PeftModel.from_pretrained(tiny_moe(family, seed=3), tmp_path).eval()
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).logits, trained, torch.float32, "reloaded adapters")
        assert_close(reloaded.merge_and_unload()(input_ids=ids).logits, trained, torch.float32, "merged")
