"""Smart checkpointing on a fake memory budget: the planner reads saved-tensor bytes on the CPU
(``SavedBytes``) as it reads CUDA's allocator on a GPU. It keeps more layers as the budget grows, never
plans a step past the budget, re-plans for a longer batch, and gives the gradients of full checkpointing."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fusetune import testing
from fusetune.modules import PROJECTIONS
from fusetune.training.smart_checkpointing import (
    SavedBytes,
    enable_smart_checkpointing,
    kept_layers,
    rounded_tokens,
    usable,
)
from fusetune_kernels.offloaded_checkpoint import enable_checkpointing

from ..kernels.tiny_models import batch, tiny_model

LAYERS = 6
GIB = 1 << 30
NO_MARGIN = (0.0, 0)


@pytest.fixture(autouse=True)
def no_simulation():
    yield
    testing.set_cpu_simulation(False)


@pytest.mark.parametrize(
    "layers, tokens, start, base, extra, limit, expected",
    [
        (32, 1000, 0, 10.0, 5.0, 10_000 + 32 * 5_000, 32),  # everything fits
        (32, 1000, 0, 10.0, 5.0, 10_000 + 19 * 5_000 + 4_999, 19),  # one byte short of the 20th
        (32, 1000, 500, 10.0, 5.0, 10_000 + 500 + 19 * 5_000, 19),  # start counts
        (32, 1000, 0, 10.0, 5.0, 9_999, 0),  # not even the all-checkpointed step fits
        (8, 10, 0, 1.0, 0.0, 10, 8),  # a layer that saves nothing more is always kept
    ],
)
def test_kept_layers(layers, tokens, start, base, extra, limit, expected):
    kept = kept_layers(layers, tokens, start, base, extra, limit)
    assert kept == expected
    if kept < layers and start + tokens * base <= limit:  # the next one would not fit
        assert start + tokens * (base + (kept + 1) * extra) > limit


@pytest.mark.parametrize("tokens, expected", [(1, 1), (8, 8), (16, 16), (17, 18), (1000, 1024), (16385, 18432)])
def test_rounded_tokens(tokens, expected):
    assert rounded_tokens(tokens) == expected
    assert tokens <= rounded_tokens(tokens) < tokens * 1.125 + 1


def test_margin():
    assert usable(100 * GIB) == 92 * GIB
    assert usable(4 * GIB) == 3 * GIB  # at least 1 GiB
    assert usable(1000) == 500  # at most half


def lora_model(seed=0):
    model = get_peft_model(
        tiny_model("llama", seed=seed, num_hidden_layers=LAYERS),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(PROJECTIONS)),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.enable_input_require_grads()
    return model.train()


def run_step(model, memory, length=24, seed=1):
    """One training step under the meter: its peak saved bytes, the loss and the LoRA gradients."""
    model.zero_grad(set_to_none=True)
    memory.most = memory.bytes
    with memory:
        loss = model(**batch(model.config.vocab_size, length=length, seed=seed), use_cache=False).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return memory.peak(), loss.detach(), grads


def modes(model):
    return [layer._gradient_checkpointing_func.mode for layer in model.base_model.model.model.layers]


def smart(budget_bytes, offload=False, seed=0, margin=NO_MARGIN):
    testing.set_cpu_simulation(offload)
    model = lora_model(seed)
    memory = SavedBytes(model)
    enable_smart_checkpointing(model, budget_bytes / GIB, memory=memory, margin=margin)
    return model, memory


def extremes():
    """The peaks of the all-checkpointed and the all-kept step, measured."""
    peaks = []
    for checkpointing in (True, False):
        model = lora_model()
        if checkpointing:
            enable_checkpointing(model, offload=False)
        peaks.append(run_step(model, SavedBytes(model))[0])
    return peaks


def test_more_layers_kept_as_the_budget_grows_and_never_past_it():
    all_checkpointed, all_kept = extremes()
    assert all_kept > 3 * all_checkpointed  # the test means something
    budgets = [all_checkpointed + f * (all_kept - all_checkpointed) for f in (0.0, 0.2, 0.45, 0.7, 1.2)]
    kept_counts = []
    for budget in budgets:
        model, memory = smart(budget)
        first, *_ = run_step(model, memory)  # measuring: every layer checkpointed
        assert modes(model) == ["recompute"] * LAYERS and first <= all_checkpointed
        for _ in range(2):
            peak, *_ = run_step(model, memory)
            assert peak <= budget, (peak, budget, modes(model))
        kept = modes(model).count("keep")
        assert modes(model) == ["keep"] * kept + ["recompute"] * (LAYERS - kept)  # the first layers are kept
        kept_counts.append(kept)
    assert kept_counts == sorted(kept_counts)
    assert kept_counts[-1] == LAYERS and kept_counts[0] < LAYERS
    assert 0 < kept_counts[2] < LAYERS


@pytest.mark.parametrize("offload", [False, True])
def test_gradients_equal_full_checkpointing(offload):
    all_checkpointed, all_kept = extremes()
    model, memory = smart((all_checkpointed + all_kept) // 2, offload=offload)
    run_step(model, memory)
    _, loss, grads = run_step(model, memory)
    rest = "offload" if offload else "recompute"
    assert 0 < modes(model).count("keep") < LAYERS and rest in modes(model)

    testing.set_cpu_simulation(offload)
    reference = lora_model()
    enable_checkpointing(reference, offload=offload)
    _, reference_loss, reference_grads = run_step(reference, SavedBytes(reference))
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference_grads.keys() and len(grads) == 7 * 2 * LAYERS
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_longer_batch_keeps_fewer_layers_within_the_budget():
    all_checkpointed, all_kept = extremes()
    budget = all_kept * 5 // 4  # the estimate is conservative: room for all, with some to spare
    # Tokens-linear estimates, measured at 48 tokens, applied at 144: the step's attention mask grows with
    # the square of the length, which the margin covers (2% here).
    model, memory = smart(budget, margin=(0.05, 0))
    run_step(model, memory, length=24)
    run_step(model, memory, length=24)
    assert modes(model).count("keep") == LAYERS
    peak, *_ = run_step(model, memory, length=72)
    assert peak <= budget
    assert 0 < modes(model).count("keep") < LAYERS


def test_a_budget_below_the_all_checkpointed_step_says_so_once(caplog):
    all_checkpointed, _ = extremes()
    model, memory = smart(all_checkpointed // 2)
    with caplog.at_level(logging.INFO, logger="fusetune.training.smart_checkpointing"):
        for _ in range(3):
            run_step(model, memory)
    assert modes(model) == ["recompute"] * LAYERS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "training on with every layer checkpointed" in warnings[0]


def test_plan_lines_and_the_trainers_enable_keep_the_planner(caplog):
    all_checkpointed, all_kept = extremes()
    model, memory = smart((all_checkpointed + all_kept) // 2, offload=True)
    with caplog.at_level(logging.INFO, logger="fusetune.training.smart_checkpointing"):
        run_step(model, memory)
        model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})  # as the Trainer does
        run_step(model, memory)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == f"smart checkpointing: 0 of {LAYERS} layers kept, {LAYERS} offloaded, budget 0.0 GiB " + (
        "(first step at 48 tokens: measuring)"
    )
    kept = modes(model).count("keep")
    assert 0 < kept < LAYERS
    assert lines[-1].startswith(f"smart checkpointing: {kept} of {LAYERS} layers kept, {LAYERS - kept} offloaded,")
    assert "predicted peak" in lines[-1]


def test_off_cuda_it_falls_back_and_says_why():
    model = lora_model()
    description = enable_smart_checkpointing(model, 10)
    why = "the model is on cpu" if torch.cuda.is_available() else "CUDA is not available"
    assert description == (
        f"smart checkpointing needs a CUDA device to measure memory; plain non-reentrant checkpointing on {LAYERS} "
        f"layers ({why})"
    )
    assert set(modes(model)) == {"recompute"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA's allocator is the meter")
def test_on_cuda_the_peak_stays_under_the_budget():
    """A 12-layer model at 4x2048 tokens: the all-offloaded and all-kept peaks measured, then a budget between
    them keeps some layers and the allocator's peak over the planned steps stays under it."""
    from fusetune.training.smart_checkpointing import DeviceMemory

    layers = 12
    shape = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=4, head_dim=128)

    def model_on_cuda():
        model = get_peft_model(
            tiny_model("llama", num_hidden_layers=layers, vocab_size=8192, dtype=torch.bfloat16, **shape).cuda(),
            LoraConfig(r=16, lora_alpha=16, target_modules=list(PROJECTIONS)),
        )
        model.enable_input_require_grads()
        return model.train()

    inputs = {k: v.cuda() for k, v in batch(8192, rows=4, length=2048).items()}

    def peak_of_step(model):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(**inputs, use_cache=False).loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    peaks = {}
    for mode in ("offload", "keep"):
        model = model_on_cuda()
        if mode == "offload":
            enable_checkpointing(model, offload=True)
        peak_of_step(model)
        peaks[mode] = peak_of_step(model)
        del model
        torch.cuda.empty_cache()
    assert peaks["keep"] > peaks["offload"] + 1 * GIB
    budget = (peaks["offload"] + peaks["keep"]) // 2
    model = model_on_cuda()
    enable_smart_checkpointing(model, budget / GIB, memory=DeviceMemory(torch.device("cuda")), margin=(0.03, 0))
    peak_of_step(model)  # measuring
    step_peaks = [peak_of_step(model) for _ in range(3)]
    kept = [layer._gradient_checkpointing_func.mode for layer in model.base_model.model.model.layers].count("keep")
    assert 0 < kept < layers, (kept, peaks, budget)
    assert max(step_peaks) <= budget, (step_peaks, budget, kept)
