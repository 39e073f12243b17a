"""The fused pre-norm decoder layer (op ``add_norm``): the attention's residual add and the post-attention
RMSNorm in one ``add_rms_norm``. Patched where the layer has the standard pre-norm form and the self-check
agrees; the patched layer computes what the original computes (bit for bit on the reference backend),
hands its attention the same arguments, and keeps checkpointing's down-projection skip."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig
from transformers.models.llama import modeling_llama

from fusetune import families, forwards, patching, prenorm, self_check, testing
from fusetune.modules import PROJECTIONS
from fusetune.patching import apply_kernels, remove_kernels
from fusetune_kernels import offloaded_checkpoint as oc
from fusetune_kernels.offloaded_checkpoint import enable_checkpointing

from ..kernels.conftest import DEVICE, needs_triton_backend
from ..kernels.parity import assert_close
from ..kernels.tiny_models import batch, tiny_model
from .lora_helpers import loss_and_grads, randomize_lora_b

ONLY = frozenset({"add_norm"})


@pytest.fixture(autouse=True)
def clean_state(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSETUNE_CACHE_DIR", str(tmp_path))
    yield
    testing.set_cpu_simulation(False)
    remove_kernels()


def counting(monkeypatch, backend: str, op: str) -> list:
    """The keyword arguments of every call of ``backend``'s ``op`` by forwards patched from now on."""
    calls, ops = [], forwards.OPS[backend]
    original = getattr(ops, op)

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setitem(forwards.OPS, backend, forwards.Ops(**{**ops.__dict__, op: counted}))
    return calls


def model_of(family: str, dtype=torch.float32):
    """The awkward tiny model where the kernel tests have one, else the family's own small model."""
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        return tiny_model(family, dtype=dtype).to(DEVICE).train()
    return families.small_model(AutoConfig.for_model(family), DEVICE, seed=2).to(dtype).train()


def all_grads(model, inputs):
    loss, grads = loss_and_grads(model, inputs)
    return [loss, *grads.values()]


CASES = [
    ("llama", "reference", torch.float32),
    ("llama", "reference", torch.bfloat16),
    ("qwen3", "reference", torch.float32),
    ("mistral", "reference", torch.float32),
    ("qwen2", "reference", torch.bfloat16),
    ("gemma", "reference", torch.float32),  # the 1 + weight norm
    ("mixtral", "reference", torch.float32),  # a sparse MoE block as the MLP
    ("llama", "triton", torch.float32),
    ("qwen3", "triton", torch.float32),
    ("gemma", "triton", torch.float32),
]


@pytest.mark.parametrize("family, backend, dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_the_fused_layer_computes_what_the_original_computes(family, backend, dtype, monkeypatch):
    if backend == "triton":
        needs_triton_backend()
    model = model_of(family, dtype)
    inputs = {k: v.to(DEVICE) for k, v in batch(model.config.vocab_size, packed=True).items()}
    expected = all_grads(model, inputs)
    layer_cls = type(model.model.layers[0])
    original = layer_cls.forward

    calls = counting(monkeypatch, backend, "add_rms_norm")
    assert patching.patch_family(model.config, backend, ONLY, DEVICE) == ONLY
    assert layer_cls.forward is not original and type(model.model.norm).forward.__module__ != "fusetune.forwards"
    calls.clear()  # the self-check's calls
    got = all_grads(model, inputs)
    assert len(calls) == model.config.num_hidden_layers
    if backend == "reference":  # the reference twin is the original's arithmetic, so is the whole model
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    else:
        for a, b in zip(got, expected, strict=True):
            assert_close(a, b, torch.float32, family, tol=1e-5)

    remove_kernels()
    assert layer_cls.forward is original


def record_attention_calls(layer) -> list:
    seen = []
    layer.self_attn.register_forward_pre_hook(lambda _, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    return seen


@pytest.mark.parametrize(
    "call",
    [
        "all",  # as the model calls its layers
        "positional",  # attention_mask and position_ids by position
        "defaults",  # only the required arguments: the original's defaults reach the attention
        "deprecated",  # a keyword under its old name (5.25 renames past_key_values to cache before the forward)
    ],
)
def test_the_attention_gets_exactly_what_the_original_hands_it(call):
    model = tiny_model("llama").train()
    layer = model.model.layers[0]
    hidden = torch.randn(2, 5, model.config.hidden_size)
    positions = torch.arange(5).expand(2, 5)
    cos_sin = model.model.rotary_emb(hidden, positions)
    varlen = {"cu_seq_lens_q": torch.tensor([0, 3, 5]), "max_length_q": 3}  # travels in **kwargs
    args, kwargs = {
        "all": ((), dict(attention_mask=None, position_ids=positions, position_embeddings=cos_sin, **varlen)),
        "positional": ((None, positions), dict(position_embeddings=cos_sin, **varlen)),
        "defaults": ((), dict(position_embeddings=cos_sin)),
        "deprecated": ((), dict(position_embeddings=cos_sin, past_key_values=None)),
    }[call]
    seen = record_attention_calls(layer)
    expected = layer(hidden, *args, **kwargs)
    patching.patch_family(model.config, "reference", ONLY, "cpu")
    got = layer(hidden, *args, **kwargs)
    assert type(got) is type(expected) is torch.Tensor and torch.equal(got, expected)
    (expected_args, expected_kwargs), (got_args, got_kwargs) = seen
    assert len(got_args) == len(expected_args) and got_kwargs.keys() == expected_kwargs.keys()
    assert torch.equal(got_kwargs.pop("hidden_states"), expected_kwargs.pop("hidden_states"))
    assert all(got_kwargs[k] is v for k, v in expected_kwargs.items())  # the same objects, untouched


GEMMA2 = (
    "Gemma2DecoderLayer.forward has `hidden_states = self.post_attention_layernorm(hidden_states)` "
    "where a pre-norm layer has `hidden_states = residual + hidden_states`"
)
GRANITE = (
    "GraniteDecoderLayer.forward has `hidden_states = residual + hidden_states * self.residual_multiplier` "
    "where a pre-norm layer has `hidden_states = residual + hidden_states`"
)
PHI3 = (
    "Phi3DecoderLayer.forward has `hidden_states = residual + self.resid_attn_dropout(hidden_states)` "
    "where a pre-norm layer has `hidden_states = residual + hidden_states`"
)
OLMO2 = "Olmo2DecoderLayer.forward has `hidden_states, _ = self.self_attn(hidden_states=hidden_states"
HYBRID = "Qwen3_5DecoderLayer.forward: the attention is not called as `hidden_states, _ = self.self_attn(...)`"


@pytest.mark.parametrize(
    "family, reason",
    [
        ("gemma2", GEMMA2),  # norms after the attention and the MLP
        ("granite", GRANITE),  # a scaled residual
        ("phi3", PHI3),  # a residual dropout
        ("olmo2", OLMO2),  # no input norm: the norm comes after the attention
        ("qwen3_5_text", HYBRID),  # linear-attention layers beside attention layers
    ],
)
def test_layers_of_another_form_keep_their_own_forward_with_the_reason(family, reason, caplog, monkeypatch):
    monkeypatch.setattr(patching, "_told", set())  # each reason is logged once a process
    config = AutoConfig.for_model(family)
    with caplog.at_level(logging.INFO, logger="fusetune.patching"):
        accepted, rejected = patching.check_family(config, "reference", "cpu")
    assert "add_norm" not in accepted and rejected["add_norm"].startswith(reason)
    assert f"{family}: add_norm left unpatched: {reason}" in caplog.text
    model = families.small_model(config)
    layer_forwards = {type(m): type(m).forward for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    patched = apply_kernels(model, "reference")
    assert patched == "reference" and "add_norm" not in patching._active[config.model_type][1]
    assert {cls: cls.forward for cls in layer_forwards} == layer_forwards


def test_the_self_check_refuses_a_fused_layer_whose_norm_changed(monkeypatch):
    """An "upgrade" of Mistral's RMSNorm: the layer's code still has the pre-norm form, but its
    post-attention norm computes otherwise, so the fused layer (which does not call that norm) disagrees."""
    from transformers.models.mistral import modeling_mistral as m

    norm = m.MistralRMSNorm.forward
    monkeypatch.setattr(m.MistralRMSNorm, "forward", lambda self, x: norm(self, x) * 1.5)
    accepted, rejected = patching.check_family(AutoConfig.for_model("mistral"), "reference", "cpu")
    assert "rope" in accepted and {"rms_norm", "add_norm"} <= rejected.keys()
    assert rejected["add_norm"].startswith("max rel error ")
    assert "against the model's own MistralDecoderLayer.forward" in rejected["add_norm"]


def test_the_self_check_refuses_the_wrong_norm_variant(monkeypatch):
    """A row that takes Llama's ``weight`` norm for Gemma's ``1 + weight``: the check catches it."""
    monkeypatch.setattr(families, "_rows", {})
    monkeypatch.setattr(self_check, "_memory", {})  # verdicts are keyed by the code, not by a hand-made row
    module = modeling_llama.__name__
    monkeypatch.setitem(families.OVERRIDES, "llama", {"prenorm_layers": ((module, "LlamaDecoderLayer", True),)})
    accepted, rejected = patching.check_family(AutoConfig.for_model("llama"), "reference", "cpu")
    assert "add_norm" not in accepted and rejected["add_norm"].startswith("max rel error")


def lora_llama():
    model = get_peft_model(
        tiny_model("llama").to(DEVICE),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(PROJECTIONS)),
    )
    randomize_lora_b(model)
    return model.train()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offloaded"])
def test_lora_gradients_under_checkpointing_with_the_down_projection_skip(backend, offload, monkeypatch):
    """Every trainable gradient (the LoRA factors) with the fused layer equals that without it, under
    plain and offloaded checkpointing, and each layer's recompute still leaves its down projection out."""
    if backend == "triton":
        needs_triton_backend()
    testing.set_cpu_simulation(offload)
    lora_calls = counting(monkeypatch, backend, "lora_linear")
    model = lora_llama()
    inputs = {k: v.to(DEVICE) for k, v in batch(model.config.vocab_size).items()}
    layers = model.config.num_hidden_layers
    assert enable_checkpointing(model, offload=offload).startswith("offloaded" if offload else "plain")

    runs = {}
    for add_norm in (False, True):
        remove_kernels()
        apply_kernels(model, backend, add_norm=add_norm)
        assert ("add_norm" in patching._active["llama"][1]) == add_norm
        lora_calls.clear()
        testing.reset_offload_stats()
        runs[add_norm] = loss_and_grads(model, inputs)
        skipped = [call for call in lora_calls if call.get("compute_output") is False]
        assert len(skipped) == layers  # one down projection per layer's recompute
        assert oc.stats["offloaded"] == (layers if offload else 0)
    (loss, grads), (fused_loss, fused_grads) = runs[False], runs[True]
    assert len(grads) == layers * len(PROJECTIONS) * 2 and grads.keys() == fused_grads.keys()
    assert_close(fused_loss, loss, torch.float32, "loss", tol=1e-6)
    for name, grad in grads.items():
        if backend == "reference":
            assert torch.equal(fused_grads[name], grad), name
        else:
            assert_close(fused_grads[name], grad, torch.float32, name, tol=1e-5)


@pytest.mark.parametrize(
    "source, expected",
    [
        # the attention called positionally, its weights under another name, a docstring and comments
        (
            '''
            from transformers.utils.deprecation import deprecate_kwarg

            @deprecate_kwarg("past", version="9.0", new_name="cache")
            def forward(self, hidden_states, mask=None, cache=None, **kwargs):
                """A docstring."""
                residual = hidden_states
                hidden_states = self.input_layernorm(hidden_states)
                # attention
                hidden_states, weights = self.self_attn(hidden_states, mask, past_key_values=cache, **kwargs)
                hidden_states = residual + hidden_states
                residual = hidden_states
                hidden_states = self.post_attention_layernorm(hidden_states)
                hidden_states = self.mlp(hidden_states)
                hidden_states = residual + hidden_states
                return hidden_states
            ''',
            (("hidden_states", "mask"), (("past_key_values", "cache"),), "kwargs"),
        ),
        (
            """
            def forward(self, hidden_states, position_ids=None):
                residual = hidden_states
                hidden_states = self.input_layernorm(hidden_states)
                hidden_states, _ = self.self_attn(hidden_states=hidden_states, position_ids=position_ids + 1)
            """,
            "forward: its attention gets more than the forward's own arguments",
        ),
        (
            """
            def forward(self, hidden_states, **kwargs):
                residual = hidden_states
                hidden_states = self.input_layernorm(hidden_states)
                hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
                hidden_states = residual + hidden_states
                residual = hidden_states
                hidden_states = self.post_attention_layernorm(hidden_states)
                hidden_states = self.mlp(hidden_states)
                hidden_states = residual + hidden_states
                return (hidden_states,)
            """,
            "forward has `return (hidden_states,)` where a pre-norm layer has `return hidden_states`",
        ),
        (
            """
            def forward(self, hidden_states, **kwargs):
                residual = hidden_states
                hidden_states = self.input_layernorm(hidden_states)
            """,
            "forward ends where a pre-norm layer has `hidden_states, _ = self.self_attn(...)`",
        ),
        (
            """
            def forward(self, x, **kwargs):
                return x
            """,
            "forward takes x, not hidden_states",
        ),
        (
            """
            def forward(self, hidden_states, **kwargs):
                residual = hidden_states
                hidden_states = self.input_layernorm(hidden_states)
                hidden_states, residual = self.self_attn(hidden_states, **kwargs)
            """,
            "forward: the attention is not called as `hidden_states, _ = self.self_attn(...)`",
        ),
        (
            """
            import functools

            @functools.lru_cache
            def forward(self, hidden_states):
                return hidden_states
            """,
            "forward has the decorator `@functools.lru_cache`",
        ),
    ],
    ids=["pre-norm", "computed-argument", "tuple-return", "short", "other-input", "rebinds-residual", "decorated"],
)
def test_the_pre_norm_form_is_read_from_the_code(source, expected, tmp_path, monkeypatch):
    import importlib.util
    import textwrap

    path = tmp_path / "layer_source.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location("layer_source", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = prenorm.read(module.forward)
    if isinstance(expected, str):
        assert found == expected
    else:
        assert (found.positional, found.keywords, found.passes_kwargs) == expected
        assert len(found.decorators) == 1  # deprecate_kwarg, worn by the fused forward too
        # a repeated keyword fails as the original call would
        positional, keywords = found.arguments(None, 1, (2,), {"cache": 3, "extra": 4}, 0)
        assert positional == [0, 2] and keywords == {"past_key_values": 3, "extra": 4}
        assert found.arguments(None, 1, (), {}, 0) == ([0, None], {"past_key_values": None})  # the defaults
        with pytest.raises(TypeError, match="multiple values for keyword argument 'past_key_values'"):
            found.arguments(None, 1, (), {"past_key_values": 2}, 0)  # as the original call would fail


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_bf16_on_the_gpu(family):
    model = tiny_model(family, dtype=torch.bfloat16).to("cuda").train()
    inputs = {k: v.to("cuda") for k, v in batch(model.config.vocab_size, packed=True).items()}
    expected = all_grads(model, inputs)
    assert patching.patch_family(model.config, "triton", ONLY, "cuda") == ONLY
    for a, b in zip(all_grads(model, inputs), expected, strict=True):
        assert_close(a, b, torch.bfloat16, family, tol=2e-2)
