"""Offloaded checkpointing: the same gradients as plain non-reentrant checkpointing, through the offload path.

On CPU the offload path runs in simulation (the layer input "offloaded" to a separate CPU copy
synchronously), so these tests prove the hooks, the bookkeeping and the prefetch chain give
bit-identical gradients; the GPU tests add real pinned-memory copies on a side stream and the
memory they save.
"""

import copy
import logging

import pytest
import torch

from fusetune import FastModel, testing
from fusetune.patching import remove_kernels
from fusetune_kernels import offloaded_checkpoint as oc
from fusetune_kernels.offloaded_checkpoint import (
    LayerCheckpoint,
    checkpoint_reference,
    enable_checkpointing,
    offloaded_checkpoint,
)

from .parity import assert_close

LOGGER = "fusetune_kernels.offloaded_checkpoint"
TINY_LAYERS = 4  # fusetune:tiny_llama


@pytest.fixture(autouse=True)
def clean_state():
    testing.reset_offload_stats()
    yield
    testing.set_cpu_simulation(False)
    testing.reset_offload_stats()
    remove_kernels()


@pytest.fixture
def simulate():
    testing.set_cpu_simulation(True)


def tiny_lora(device: str, **lora):
    """fusetune's tiny Llama with LoRA on every projection and plain non-reentrant checkpointing."""
    model, _ = FastModel.from_pretrained(
        "fusetune:tiny_llama", random_init=True, dtype=torch.float32, kernels="reference", attn_implementation="eager"
    )
    model = FastModel.get_peft_model(model.to(device), r=4, lora_alpha=8, use_gradient_checkpointing=True, **lora)
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def random_batch(model, device: str, rows: int = 2, length: int = 16) -> dict:
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (rows, length), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -5:] = 0  # a padded row: the mask is one of the shared keyword arguments
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, batch: dict, embeds: torch.Tensor | None = None):
    model.zero_grad(set_to_none=True)
    if embeds is not None:
        embeds.grad = None
        batch = {k: v for k, v in batch.items() if k != "input_ids"} | {"inputs_embeds": embeds}
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if embeds is not None and embeds.requires_grad:
        grads["inputs_embeds"] = embeds.grad.clone()
    return loss.detach(), grads


def routed(module) -> bool:
    func = module._gradient_checkpointing_func
    return isinstance(func, LayerCheckpoint) and func.offload


def decoder_layers(model) -> list:
    return list(model.get_base_model().model.layers)


def compare(model, batch, embeds=None):
    """Loss and gradients under plain checkpointing, then under the offload path: they must be equal."""
    ref_loss, ref_grads = loss_and_grads(model, batch, embeds)
    assert oc.stats["offloaded"] == 0
    description = enable_checkpointing(model)
    assert description.startswith("offloaded checkpointing") and all(map(routed, decoder_layers(model)))
    loss, grads = loss_and_grads(model, batch, embeds)
    # every checkpointed layer's input went out, came back once, and all but the first fetched were prefetched
    assert oc.stats == {"offloaded": TINY_LAYERS, "fetched": TINY_LAYERS, "prefetched": TINY_LAYERS - 1}
    return (loss, grads), (ref_loss, ref_grads)


# (a) the offload mechanism gives the same loss and gradients as plain checkpointing, exactly in fp32
@pytest.mark.parametrize("case", ["input_ids", "embeds_require_grad", "embeds_frozen", "trained_embeddings"])
def test_offload_matches_plain_checkpointing(case, simulate):
    lora = {"modules_to_save": ["embed_tokens", "lm_head"]} if case == "trained_embeddings" else {}
    model = tiny_lora("cpu", **lora)
    batch = random_batch(model, "cpu")
    embeds = None
    if case.startswith("embeds"):  # the layers' input is a leaf that does or does not require grad
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
        embeds.requires_grad_(case == "embeds_require_grad")
    (loss, grads), (ref_loss, ref_grads) = compare(model, batch, embeds)
    assert torch.equal(loss, ref_loss)
    assert set(grads) == set(ref_grads) and any("lora_A" in n for n in grads)
    if case == "embeds_require_grad":
        assert "inputs_embeds" in grads
    if case == "trained_embeddings":
        assert any("embed_tokens" in n for n in grads) and any("lm_head" in n for n in grads)
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), f"grad {name} differs from plain checkpointing"


def test_offloaded_inputs_leave_the_device_after_the_forward(simulate):
    """Nothing keeps a layer's input alive once it is offloaded: not the hooks (autograd holds them as long
    as the graph), not the checkpoint. Layer 0's input is the embedding output, which its caller holds."""
    import weakref

    model = tiny_lora("cpu")
    enable_checkpointing(model)
    inputs = []
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append(weakref.ref(args[0] if args else kwargs["hidden_states"])),
            with_kwargs=True,
        )
    loss = model(**random_batch(model, "cpu")).loss
    assert oc.stats["offloaded"] == TINY_LAYERS
    assert [ref() is None for ref in inputs[1:]] == [True] * (TINY_LAYERS - 1)
    loss.backward()


def test_function_level_twin(simulate):
    """Tuple outputs, a keyword tensor, an input with or without grad, a second backward (retain_graph)."""
    weight = torch.randn(24, 24, requires_grad=True)
    bias = torch.randn(24)

    def layer(x, bias=None):
        y = torch.tanh(x @ weight) + bias
        return y, (y * x).sum(-1)

    for requires_grad in (True, False):
        x = torch.randn(3, 5, 24, requires_grad=requires_grad)
        results = []
        for fn in (checkpoint_reference, offloaded_checkpoint):
            weight.grad = x.grad = None
            hidden = x * 2 if requires_grad else x  # a non-leaf and a leaf input
            y, s = fn(layer, hidden, bias=bias)
            (y.square().sum() + s.sum()).backward(retain_graph=True)
            y.sum().backward()  # the graph replays: the host copy is fetched again
            results.append((weight.grad.clone(), None if x.grad is None else x.grad.clone()))
        (w_ref, x_ref), (w_off, x_off) = results
        assert torch.equal(w_off, w_ref)
        assert (x_off is None) == (not requires_grad) and (x_off is None or torch.equal(x_off, x_ref))
    assert oc.stats["offloaded"] == 2 and oc.stats["fetched"] == 4
    with torch.no_grad():  # no backward to serve: nothing is offloaded
        offloaded_checkpoint(layer, torch.randn(2, 24), bias=bias)
    assert oc.stats["offloaded"] == 2
    with pytest.raises(ValueError, match="non-reentrant"):
        offloaded_checkpoint(layer, torch.randn(2, 24, requires_grad=True), use_reentrant=True, bias=bias)


# (b) without CUDA (or with the model on the CPU) it is plain checkpointing, and it says why
def test_cpu_falls_back_and_logs_why(caplog):
    model = tiny_lora("cpu")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        description = enable_checkpointing(model)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "plain non-reentrant" in lines[0]
    assert "CUDA is not available" in lines[0] or "the model is on cpu" in lines[0]
    assert description.startswith("plain non-reentrant checkpointing on 4 layers")
    assert not any(map(routed, decoder_layers(model)))
    assert all(isinstance(layer._gradient_checkpointing_func, LayerCheckpoint) for layer in decoder_layers(model))
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    loss_and_grads(model, random_batch(model, "cpu"))
    assert oc.stats["offloaded"] == 0


# (c) the layers really run through offloaded_checkpoint, and stay routed when checkpointing is re-enabled
def test_enable_routes_every_layer(simulate, monkeypatch):
    model = tiny_lora("cpu")
    calls = []
    torch_checkpoint = oc.checkpoint

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return torch_checkpoint(*args, **kwargs)

    monkeypatch.setattr(oc, "checkpoint", counted)
    batch = random_batch(model, "cpu")
    assert "offloaded checkpointing on 4 layers" in enable_checkpointing(model)
    loss_and_grads(model, batch)
    assert len(calls) == TINY_LAYERS and oc.stats["offloaded"] == oc.stats["fetched"] == TINY_LAYERS

    # The Trainer enables checkpointing again with its own kwargs: still offloaded, the kwargs kept.
    base = model.get_base_model()
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False, "preserve_rng_state": False})
    layers = decoder_layers(model)
    assert all(map(routed, layers)) and layers[0]._gradient_checkpointing_func.keywords == {"preserve_rng_state": False}
    calls.clear()
    loss_and_grads(model, batch)
    assert len(calls) == TINY_LAYERS and all(c["preserve_rng_state"] is False for c in calls)
    assert oc.stats["offloaded"] == 2 * TINY_LAYERS

    # A copy of the model is routed on its own (the setter binds to the copy, not to the original).
    twin = copy.deepcopy(model).get_base_model()
    assert twin._set_gradient_checkpointing.__self__ is twin
    (getattr(twin, "activation_checkpointing_enable", None) or twin.gradient_checkpointing_enable)(None)
    assert all(map(routed, twin.model.layers))

    # Disabling it restores transformers' own function.
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()
    assert not any(map(routed, layers)) and not any(layer.gradient_checkpointing for layer in layers)


# (d) on CUDA: real pinned-memory offloading, the same gradients, and less peak memory
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("case", ["input_ids", "embeds_frozen"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_offload_matches_plain_checkpointing(case):
    model = tiny_lora("cuda")
    batch = random_batch(model, "cuda", rows=2, length=64)
    embeds = None
    if case == "embeds_frozen":
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    (loss, grads), (ref_loss, ref_grads) = compare(model, batch, embeds)
    torch.cuda.synchronize()
    assert_close(loss, ref_loss, torch.float32, "loss", tol=1e-6)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}", tol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_cuda_offload_lowers_peak_memory():
    from transformers import AutoConfig, AutoModelForCausalLM

    layers, rows, length, hidden = 12, 2, 8192, 512
    config = AutoConfig.for_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=301,
        max_position_embeddings=length,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to("cuda")
    model = FastModel.get_peft_model(model, r=8, use_gradient_checkpointing=True).train()
    ids = torch.randint(0, config.vocab_size, (rows, length), device="cuda")

    def peak() -> int:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    peak()  # warm-up: cuBLAS workspaces and the like, outside the measurement
    plain = peak()
    enable_checkpointing(model)
    peak()
    offloaded = peak()
    assert oc.stats["offloaded"] == 2 * layers
    layer_input = rows * length * hidden * 2  # bf16 bytes
    # Plain checkpointing holds every layer's input; offloading holds about two. Ask for half the difference.
    assert plain - offloaded > 0.5 * (layers - 2) * layer_input, (
        f"peak {offloaded / 2**20:.0f} MiB offloaded vs {plain / 2**20:.0f} MiB plain"
    )
