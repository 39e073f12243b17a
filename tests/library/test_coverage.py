"""Every causal-LM model type of the installed transformers: patched with the ops that agree with its own
modules, or left unpatched with a written reason; the README's family table is this test's output."""

import logging
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig

from fusetune import coverage, families, patching, self_check
from fusetune.patching import apply_kernels, remove_kernels

from ..kernels.conftest import needs_triton_backend

README = Path(__file__).parents[2] / "README.md"
TYPES = coverage.causal_lm_types()
# Dense decoders people fine-tune now, and the ops each must keep (add_norm: pre-norm layers only; Gemma 2/3,
# Phi-3, OLMo 2/3, Granite and the hybrids have layers of another form). A transformers upgrade that drops
# one of these ops fails here, with the self-check's reason in the message.
NAMED = {
    "llama": "rms_norm add_norm rope glu loss",
    "mistral": "rms_norm add_norm rope glu loss",
    "qwen2": "rms_norm add_norm rope glu loss",
    "qwen3": "rms_norm add_norm rope glu loss",
    "gemma": "rms_norm add_norm rope glu loss",
    "gemma2": "rms_norm rope glu loss",
    "gemma3_text": "rms_norm rope glu loss",
    "qwen3_5_text": "rms_norm rope glu loss",
    "ministral3": "rms_norm add_norm rope glu loss",
    "phi3": "rms_norm rope glu loss",
    "smollm3": "rms_norm add_norm rope glu loss",
    "olmo2": "rms_norm rope glu loss",
    "olmo3": "rms_norm rope glu loss",
    "granite": "rms_norm rope glu loss",
    "exaone4": "rms_norm rope glu loss",
    "seed_oss": "rms_norm add_norm rope glu loss",
    "ernie4_5": "rms_norm add_norm glu loss",  # interleaved rotary halves
    "helium": "rms_norm add_norm glu loss",  # interleaved rotary halves
    "gemma4_text": "rms_norm rope glu loss",
    "qwen3_next": "rms_norm rope glu loss",
    "olmo_hybrid": "rms_norm rope glu loss",
    "apertus": "rms_norm rope loss",  # its MLP is ungated (xIELU)
    "arcee": "rms_norm add_norm rope loss",  # its MLP is ungated (ReLU squared)
    "glm4": "rms_norm glu loss",  # interleaved rotary halves: the kernel's rotate_half disagrees
    "cohere": "glu loss",  # LayerNorm, interleaved rotary
    "qwen3_moe": "rms_norm add_norm rope experts loss",
    "mixtral": "rms_norm add_norm rope experts loss",
    "olmoe": "rms_norm add_norm rope experts loss",
    "qwen3_5_moe_text": "rms_norm rope glu experts loss",  # glu: its shared expert
}
MIN_DENSE = 40
# One family per structural variant, for the triton backend on the CPU interpreter: plain, 1 + weight with
# softcapping, 1 + weight beside linear attention, fused gate_up with partial rotary, one-tensor rotary with
# weightless norms, logit scaling, layers without RoPE, norms after attention and MLP, routed experts.
VARIANTS = ["llama", "gemma2", "qwen3_5_text", "phi3", "gemma4_text", "granite", "smollm3", "olmo2", "qwen3_moe"]


@pytest.fixture(autouse=True)
def unpatch():
    yield
    remove_kernels()


@pytest.fixture(scope="module")
def outcomes() -> dict[str, coverage.Outcome]:
    logging.disable(logging.WARNING)
    try:
        return {t: coverage.outcome(t) for t in TYPES}
    finally:
        logging.disable(logging.NOTSET)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return [loss.detach(), *(p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters())]


def test_every_type_has_an_outcome_and_every_unpatched_op_a_reason(outcomes):
    for model_type, found in outcomes.items():
        # experts: only a family with routed experts has the op (read_structure gives the reason where refused)
        offered = set(families.FAMILY_OPS) - {"experts"}
        missing = offered - set(found.patched) - set(found.reasons)
        assert "all" in found.reasons or not missing, f"{model_type}: {sorted(missing)} unpatched without a reason"
        assert all(why.strip() for why in found.reasons.values()), model_type


@pytest.mark.parametrize("model_type", sorted(NAMED))
def test_named_families_keep_their_ops(outcomes, model_type):
    found = outcomes[model_type]
    lost = set(NAMED[model_type].split()) - set(found.patched)
    assert not lost, f"{model_type}: {sorted(lost)} no longer patched: {found.reasons}"


def test_at_least_forty_dense_families_are_patched(outcomes):
    dense = [t for t, o in outcomes.items() if o.dense]
    assert len(dense) >= MIN_DENSE, dense


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_patched_families_match_their_own_modules_with_every_op_at_once(outcomes, backend):
    """The self-check tries one op at a time; here all accepted ops run together on a fresh model
    and batch (triton on the CPU interpreter in CI: one family per structural variant)."""
    if backend == "triton":
        needs_triton_backend()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = [t for t, o in outcomes.items() if o.patched and (backend == "reference" or t in VARIANTS)]
    for model_type in chosen:
        config = AutoConfig.for_model(model_type)
        model = families.small_model(config, device, seed=3)
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (3, 9), generator=g).to(device)
        labels = ids.clone()
        labels[0, :4] = -100
        batch = {"input_ids": ids, "labels": labels}
        expected = loss_and_grads(model, batch)
        ops = set(patching.patch_family(config, backend, device=device)) & set(families.FAMILY_OPS)
        backend_outcome = outcomes[model_type] if backend == "reference" else coverage.outcome(model_type, backend)
        assert ops == set(backend_outcome.patched), model_type
        error = self_check.relative_error(loss_and_grads(model, batch), expected)
        assert error <= self_check.TOLERANCE[backend], f"{model_type}: {sorted(ops)} together: {error:.1e}"
        remove_kernels()


def test_the_readme_table_is_this_tests_output(outcomes):
    block = coverage.readme_block(README)
    assert block is not None, "README.md has no families block"
    if f"(transformers {transformers.__version__})" not in block:
        pytest.skip(f"the README table was generated with another transformers than {transformers.__version__}")
    expected = coverage.markdown([outcomes[t] for t in TYPES])
    assert block == expected, "README.md's families table is stale: run python -m fusetune.coverage README.md"


def test_an_upgrade_that_changes_rope_leaves_rope_unpatched_and_training_goes_on(monkeypatch, caplog):
    """A "transformers upgrade" that negates the rotation: rope is left unpatched with its reason, the other
    ops are patched, and training on the patched model follows the upgraded model's own loss curve."""
    from transformers.models.qwen3 import modeling_qwen3

    original = modeling_qwen3.apply_rotary_pos_emb

    def upgraded(q, k, cos, sin, unsqueeze_dim=1):
        return original(q, k, cos, -sin, unsqueeze_dim=unsqueeze_dim)

    monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", upgraded)
    config = AutoConfig.for_model(
        "qwen3",
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
    )
    curves = []
    for patched in (False, True):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
        if patched:
            with caplog.at_level(logging.INFO, logger="fusetune.patching"):
                assert apply_kernels(model, "reference") == "reference"
            assert patching._active["qwen3"][1] == {"rms_norm", "add_norm", "glu", "loss", "lora"}
            assert modeling_qwen3.apply_rotary_pos_emb is upgraded
            assert "qwen3: rope left unpatched: max rel error" in caplog.text
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(0, 128, (4, 16), generator=g)
        losses = []
        for _ in range(5):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
        remove_kernels()
    assert curves[1][-1] < curves[1][0]
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)


def test_packed_rows_train_like_padded_rows_on_every_patched_type(outcomes):
    """Padding-free and packing on the patched model: a packed row's loss equals the padded batch's, or the
    type refuses packed rows with its reason (layers that would mix documents). A type whose own attention
    cannot take a packed row at all fails loudly there; none may give another loss silently, and the named
    families must pack."""
    from fusetune.sequences.packed_sequences import documents, packed_and_padded_loss, packing_blocker

    wrong, loud = [], []
    for model_type in [t for t, o in outcomes.items() if o.patched]:
        config = AutoConfig.for_model(model_type)
        model = families.small_model(config, seed=5)
        reason = packing_blocker(model)
        if reason is not None:
            assert model_type in reason and "would mix documents" in reason
            continue
        patching.patch_family(config, "reference", device="cpu")
        try:
            packed, padded = packed_and_padded_loss(model, documents(model.get_input_embeddings().num_embeddings))
        except Exception as error:  # the model's own attention refuses a packed row: loud, not wrong
            loud.append(f"{model_type}: {type(error).__name__}")
            continue
        finally:
            remove_kernels()
        if packed != pytest.approx(padded, rel=1e-5):
            wrong.append(f"{model_type}: packed {packed} != padded {padded}")
    assert not wrong, "; ".join(wrong)
    assert not [line for line in loud if line.split(":")[0] in NAMED], loud


@pytest.mark.parametrize(
    "values, kept",
    [
        # one kind of layer: the first two layers, so a layer-index list keeps the layers it names
        ({"num_hidden_layers": 4, "layer_types": ["full_attention"] * 4, "index_layers": [1, 3]}, [1]),
        # two kinds: the first of each
        ({"num_hidden_layers": 4, "layer_types": ["a", "a", "b", "b"], "index_layers": [0, 2, 3]}, [0, 1]),
    ],
)
def test_the_small_config_keeps_one_layer_of_each_kind_and_renumbers_index_lists(values, kept):
    small = families.shrink_values(values)
    assert small["num_hidden_layers"] == 2 and small["index_layers"] == kept
