"""The patch table: patched models compute what the originals compute, and unpatching restores them."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fusetune import families, tiny
from fusetune.errors import FusetuneError
from fusetune.patching import active_backends, apply_kernels, remove_kernels
from fusetune.state import state_of

from ..kernels.conftest import DEVICE, needs_triton_backend
from ..kernels.parity import assert_close
from ..kernels.tiny_models import FAMILIES as TINY_FAMILIES
from ..kernels.tiny_models import batch, tiny_model


@pytest.fixture(autouse=True)
def unpatch_after():
    yield
    remove_kernels()


# What each of the first six families' rows held when they were written by hand.
HAND_ROWS = {
    "llama": ("LlamaRMSNorm", False, "LlamaMLP"),
    "mistral": ("MistralRMSNorm", False, "MistralMLP"),
    "qwen2": ("Qwen2RMSNorm", False, "Qwen2MLP"),
    "qwen3": ("Qwen3RMSNorm", False, "Qwen3MLP"),
    "gemma": ("GemmaRMSNorm", True, "GemmaMLP"),
    "gemma2": ("Gemma2RMSNorm", True, "Gemma2MLP"),
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_derived_rows_hold_what_the_hand_written_rows_held(family):
    row = families.derive(tiny_model(family).config)
    module = f"transformers.models.{family}.modeling_{family}"
    norm, gemma, mlp = HAND_ROWS[family]
    assert row.norms == ((module, norm, gemma),)
    assert row.mlps == ((module, mlp, False),)
    assert row.rope_modules == (module,)
    assert row.causal_lm == (module, f"{norm[: -len('RMSNorm')]}ForCausalLM")
    if family == "gemma2":  # norms after the attention and the MLP: no pre-norm layer to fuse
        assert row.prenorm_layers == () and [op for op, _ in row.missing] == ["add_norm"]
        assert row.offers() == set(families.FAMILY_OPS) - {"add_norm", "experts"}
    else:
        assert row.prenorm_layers == ((module, f"{norm[: -len('RMSNorm')]}DecoderLayer", gemma),)
        assert row.offers() == set(families.FAMILY_OPS) - {"experts"} and not row.missing  # dense: no experts


def loss_and_grads(model, inputs):
    model.zero_grad()
    # use_cache=False as in training: only then does HF give packed rows a block-diagonal mask
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_patched_model_matches_the_original(family, backend):
    if backend == "triton":
        needs_triton_backend()
    model = tiny_model(family).to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in batch(model.config.vocab_size, packed=family != "gemma2").items()}
    ref_loss, ref_grads = loss_and_grads(model, inputs)
    with torch.no_grad():
        ref_logits = model(input_ids=inputs["input_ids"], use_cache=False).logits

    assert apply_kernels(model, backend) == backend
    norm = type(model.model.norm)
    assert norm.forward.__module__ == "fusetune.forwards"
    loss, grads = loss_and_grads(model, inputs)
    assert_close(loss, ref_loss, torch.float32, "loss")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}", tol=1e-4)
    with torch.no_grad():  # without labels the forward returns logits, through the patched layers
        assert_close(model(input_ids=inputs["input_ids"], use_cache=False).logits, ref_logits, torch.float32, "logits")

    remove_kernels()
    assert norm.forward.__module__ == type(model).__module__
    assert loss_and_grads(model, inputs)[0].item() == ref_loss.item()


def test_trl_fused_head_outputs_match_trls_own(tmp_path):
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model("llama").to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in batch(model.config.vocab_size).items()}
    theirs = copy.deepcopy(model)
    add_fused_lm_head(theirs, outputs=("log_probs", "entropy", "is_top1"))
    expected = theirs(**inputs, fused_lm_head=True)
    apply_kernels(model, "reference")
    import trl.trainer.sft_trainer as sft

    assert sft.add_fused_lm_head(model, outputs=("log_probs",)) is None  # steps aside for our forward
    got = model(**inputs, fused_lm_head=True)
    assert torch.equal(got.label_mask, expected.label_mask)
    assert torch.equal(got.is_top1, expected.is_top1)
    assert_close(got.log_probs, expected.log_probs, torch.float32, "log_probs", tol=1e-5)
    assert_close(got.entropy, expected.entropy, torch.float32, "entropy", tol=1e-5)
    assert_close(got.loss, expected.loss, torch.float32, "loss", tol=1e-5)


def tiny_gpt2():
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture
def qwen3_upgraded(monkeypatch):
    """A "transformers upgrade" that changes the maths of every op fusetune offers for Qwen3."""
    from transformers.models.qwen3 import modeling_qwen3 as m

    norm, mlp, head, rope = (
        m.Qwen3RMSNorm.forward,
        m.Qwen3MLP.forward,
        m.Qwen3ForCausalLM.forward,
        m.apply_rotary_pos_emb,
    )
    monkeypatch.setattr(m.Qwen3RMSNorm, "forward", lambda self, x: norm(self, x) * 1.5)
    monkeypatch.setattr(m.Qwen3MLP, "forward", lambda self, x: mlp(self, x) - 0.5 * x)
    monkeypatch.setattr(m, "apply_rotary_pos_emb", lambda q, k, cos, sin, unsqueeze_dim=1: rope(q, k, cos, -sin))

    def forward(self, *args, labels=None, **kwargs):
        out = head(self, *args, **kwargs)
        out.logits = out.logits * 2
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, vocab_size=self.config.vocab_size)
        return out

    monkeypatch.setattr(m.Qwen3ForCausalLM, "forward", forward)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_type_no_kernel_fits_fails_a_named_backend(backend):
    if backend == "triton":
        needs_triton_backend()
    with pytest.raises(
        FusetuneError, match=f"kernels={backend}: model type 'gpt2' cannot be patched: no RMSNorm, gated"
    ):
        apply_kernels(tiny_gpt2(), backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_family_whose_every_op_disagrees_fails_a_named_backend(backend, qwen3_upgraded):
    if backend == "triton":
        needs_triton_backend()
    expected = (
        "cannot be patched: add_norm: max rel error .*; glu: max rel error .*; loss: max rel error .*; "
        "rms_norm: max rel .*; rope: max rel"
    )
    with pytest.raises(FusetuneError, match=f"kernels={backend}: model type 'qwen3' {expected}"):
        apply_kernels(tiny_model("qwen3"), backend)


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_an_unpatchable_type_trains_unpatched_under_auto(caplog, qwen3_upgraded, family):
    model = tiny_gpt2() if family == "gpt2" else tiny_model("qwen3")
    with caplog.at_level("WARNING", logger="fusetune.patching"):
        assert apply_kernels(model, "auto") == "none"
    assert f"model type '{family}' trains with its own modules: " in caplog.text
    assert state_of(model).backend == "none" and not active_backends()


def test_fast_model_refuses_an_unpatchable_family_before_its_weights_load(tmp_path, monkeypatch):
    import transformers

    from fusetune import FastModel

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the backend was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(FusetuneError, match="kernels=reference: model type 'gpt2'"):
        FastModel.from_pretrained(str(tmp_path / "gpt2"), kernels="reference", tokenizer_name="fusetune:tiny_llama")


def test_per_op_switches_patch_only_the_ops_asked_for():
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.models.llama import modeling_llama

    originals = (modeling_llama.LlamaRMSNorm.forward, LoraLinear.forward, modeling_llama.LlamaMLP.forward)
    apply_kernels(tiny_model("llama"), "reference", lora=False, glu=False)
    assert modeling_llama.LlamaRMSNorm.forward is not originals[0]
    assert (LoraLinear.forward, modeling_llama.LlamaMLP.forward) == originals[1:]
    apply_kernels(tiny_model("llama"), "reference")  # the same family, all ops: the rest is patched now
    assert LoraLinear.forward is not originals[1] and modeling_llama.LlamaMLP.forward is not originals[2]
    remove_kernels()
    assert (modeling_llama.LlamaRMSNorm.forward, LoraLinear.forward, modeling_llama.LlamaMLP.forward) == originals


def test_bare_kernels_name_is_left_to_the_pypi_package():
    import importlib.util

    from transformers.utils import is_kernels_available

    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin is not None or not is_kernels_available()
    if spec is not None and spec.origin is None:  # only our folder, as an empty namespace: no shadowing
        with pytest.raises(ImportError):
            from kernels import get_kernel  # noqa: F401


def test_auto_picks_reference_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: auto picks triton")
    assert apply_kernels(tiny_model("llama"), "auto") == "reference"


def test_the_self_check_leaves_the_callers_random_state_alone(monkeypatch, tmp_path):
    """The check builds and runs a small model: a run's own seeded initialisation must not see it."""
    monkeypatch.setenv("FUSETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("fusetune.self_check._memory", {})
    model = tiny_model("qwen2")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    assert apply_kernels(model, "reference") == "reference"
    assert torch.equal(torch.get_rng_state(), state)


def test_the_check_measures_a_negligible_gradient_against_the_largest_and_still_sees_a_wrong_one():
    """A gradient a million times smaller than the others carries only rounding: its relative error is taken
    against NEGLIGIBLE of the largest gradient; a wrong loss, a wrong large gradient or a wrong small gradient at
    the floor's scale still count."""
    from fusetune import self_check

    loss, big, tiny = torch.rand(()) + 1, torch.randn(64), 1e-6 * torch.randn(8)
    noisy = tiny * (1 + 1e-2 * torch.randn(8))  # 1% of a negligible gradient: rounding elsewhere
    assert self_check.relative_error([loss, big, noisy], [loss, big, tiny]) < 1e-4
    assert self_check.relative_error([loss * 1.01, big, tiny], [loss, big, tiny]) > 5e-3
    assert self_check.relative_error([loss, big * 1.01, tiny], [loss, big, tiny]) > 5e-3
    small = 1e-2 * big.norm() * torch.randn(8) / 8**0.5  # well above the floor: its own norm counts
    assert self_check.relative_error([loss, big, small * 1.01], [loss, big, small]) > 5e-3


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "olmoe", "hunyuan_v1_moe", "zaya"])
def test_the_small_model_sends_every_token_to_every_expert(model_type):
    """Routing over all the small model's experts is continuous: the check's verdict cannot flip on a top-k near
    tie in a later layer (it did with two of four, by thread count). A config that allows fewer keeps fewer."""
    config = families.small_config(AutoConfig.for_model(model_type))
    top_k = next(getattr(config, key) for key in families.TOP_K if isinstance(getattr(config, key, None), int))
    experts = families.routed_experts(config)
    assert experts == families.EXPERTS
    assert top_k == (1 if model_type == "zaya" else experts)
    full = AutoConfig.for_model(model_type).to_dict()
    toy = tiny.shrunk(full)  # the bench's and tests' toy models keep routing sparse: two experts at most
    own = next(full[key] for key in families.TOP_K if isinstance(full.get(key), int))
    assert next(toy[key] for key in families.TOP_K if isinstance(toy.get(key), int)) == min(own, 2)
