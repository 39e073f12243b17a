"""The MoE experts kernel against its reference loop (output and every gradient), and the reference and the
router against transformers' own MoE blocks and PEFT's LoRA on the expert parameters.

Tolerances (relative error against a float64 reference): fp32 1e-5; bf16 1.5e-2, and 3e-2 under the Triton
interpreter, whose fp32 -> bf16 stores truncate instead of rounding (h, act and y are each stored in bf16).
Where the model's own loop, run in bf16, is itself further than that from float64 (a gradient that is a
sum with cancellation: the routing weights' <g, y> over H, the logits' w1 w2 (dw1 - dw2)), the kernel may be
up to 1.5 times as far as the model's own loop is.
"""

import pytest
import torch

from fusetune_kernels.moe import moe_experts, moe_experts_reference, route
from fusetune_kernels.utils import interpreted

from .conftest import DEVICE, needs_triton_backend
from .parity import assert_close, rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2 if interpreted() else 1.5e-2}
SCALINGS = {"gate_up": 1.75, "down": 0.5}

# name -> tokens T, experts E, top-k, renormalize, experts that get no token, LoRA on, rank, hidden, intermediate,
# whether the expert weights train, backends. Odd token counts; H 48 (and I 40) span two column tiles and two K steps.
CASES = {
    "top2-renorm-two-idle-experts": dict(T=13, E=6, k=2, renorm=True, idle=(1, 4), lora=("gate_up", "down")),
    "top1-no-renorm": dict(T=9, E=4, k=1, renorm=False, idle=(2,), lora=("gate_up", "down")),
    "top3-no-renorm-every-expert-wide": dict(T=11, E=5, k=3, renorm=False, idle=(), lora=("gate_up", "down"), I=40),
    "one-token": dict(T=1, E=4, k=2, renorm=True, idle=(0, 3), lora=("gate_up", "down")),
    "two-experts-take-all-many-tiles": dict(T=37, E=4, k=2, renorm=False, idle=(0, 3), lora=("gate_up", "down")),
    "lora-gate-up-only": dict(T=7, E=5, k=2, renorm=True, idle=(2,), lora=("gate_up",)),
    "lora-down-only": dict(T=7, E=5, k=2, renorm=False, idle=(0,), lora=("down",)),
    "no-lora-experts-train": dict(T=9, E=5, k=2, renorm=True, idle=(4,), lora=(), train_experts=True),
    "rank-3-unaligned-triton-only": dict(T=7, E=3, k=2, renorm=True, idle=(), lora=("gate_up", "down"), r=3, I=20,
                                         backends=("triton",)),
}  # fmt: skip


def make(case: dict, dtype):
    """Inputs of one case: x, router logits (idle experts far below the rest), weights, fp32 adapters."""
    T, E, H, inter, r = case["T"], case["E"], case.get("H", 48), case.get("I", 24), case.get("r", 8)
    logits = torch.randn(T, E, device=DEVICE)
    logits[:, list(case["idle"])] = -30.0
    tensors = {
        "x": torch.randn(T, H, device=DEVICE).to(dtype),
        "logits": logits.to(dtype),
        "gate_up": (torch.randn(E, 2 * inter, H, device=DEVICE) / H**0.5).to(dtype),
        "down": (torch.randn(E, H, inter, device=DEVICE) / inter**0.5).to(dtype),
    }
    for name, (n_in, n_out) in (("gate_up", (H, 2 * inter)), ("down", (inter, H))):
        if name in case["lora"]:
            tensors[f"{name}_A"] = torch.randn(E, r, n_in, device=DEVICE) / n_in**0.5
            tensors[f"{name}_B"] = torch.randn(E, n_out, r, device=DEVICE) / r**0.5
    return tensors


def run(fn, tensors: dict, case: dict, grad: torch.Tensor, **kwargs):
    trains = {name: case.get("train_experts", False) if name in ("gate_up", "down") else True for name in tensors}
    leaves = {name: t.detach().clone().requires_grad_(trains[name]) for name, t in tensors.items()}
    weights, ids = route(leaves["logits"], case["k"], case["renorm"])
    weights.retain_grad()
    lora = {
        name: (leaves[f"{name}_A"], leaves[f"{name}_B"], SCALINGS[name]) if f"{name}_A" in leaves else None
        for name in ("gate_up", "down")
    }
    out = fn(leaves["x"], ids, weights, leaves["gate_up"], leaves["down"], lora["gate_up"], lora["down"], **kwargs)
    out.backward(grad.to(out.dtype))
    return out, ids, {"weights": weights.grad} | {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_parity_with_the_reference_loop(case, backend, dtype):
    spec = CASES[case]
    if backend not in spec.get("backends", ("triton", "torch")):
        pytest.skip("rank and sizes not 16-byte aligned: torch's grouped_mm refuses them (tested below)")
    if backend == "triton":
        needs_triton_backend()
    if backend == "torch" and DEVICE == "cuda" and dtype != torch.bfloat16:
        pytest.skip("torch's CUDA grouped_mm takes bf16 only")
    tensors = make(spec, dtype)
    grad = torch.randn(spec["T"], tensors["x"].shape[1], device=DEVICE)
    out, ids, grads = run(moe_experts, tensors, spec, grad, backend=backend)
    ref, ref_ids, ref_grads = run(moe_experts_reference, {n: t.double() for n, t in tensors.items()}, spec, grad)
    # The model's own loop in this dtype: how far rounding alone takes a quantity from the float64 one.
    own, _, own_grads = run(moe_experts_reference, tensors, spec, grad)

    def limit(name):
        return (
            TOL[dtype] if dtype == torch.float32 else max(TOL[dtype], 1.5 * rel_err(own_grads[name], ref_grads[name]))
        )

    assert torch.equal(ids, ref_ids), "the float64 reference routed differently"
    assert not set(spec["idle"]) & set(ids.unique().tolist()), "an idle expert got tokens"
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out", TOL[dtype])
    for name, g in grads.items():
        if name in ("gate_up", "down") and not spec.get("train_experts"):
            assert g is None, f"a gradient for the frozen {name}"
            continue
        expected_dtype = tensors[name].dtype if name in tensors else dtype
        assert g.dtype == expected_dtype, f"d{name}: {g.dtype} != {expected_dtype}"
        assert_close(g, ref_grads[name], dtype, f"d{name}", limit(name))
        if name.endswith(("_A", "_B")) or name in ("gate_up", "down"):
            for expert in spec["idle"]:
                assert torch.equal(g[expert], torch.zeros_like(g[expert])), f"d{name}[{expert}] of an idle expert"


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_gradient_of_x_alone_strided_x_and_autocast(backend):
    """Only x trains (frozen adapters, fixed routing); x is a column slice (rows strided), with a strided
    output gradient; under bf16 autocast, fp32 x is computed in bf16 and its output and gradient are fp32."""
    needs_triton_backend()
    spec = CASES["top2-renorm-two-idle-experts"]
    t = make(spec, torch.float32)
    weights, ids = route(t["logits"], spec["k"], spec["renorm"])
    lora = [(t[f"{n}_A"], t[f"{n}_B"], SCALINGS[n]) for n in ("gate_up", "down")]
    wide = torch.cat([t["x"], torch.randn_like(t["x"])], dim=1).requires_grad_()
    x = wide[:, : t["x"].shape[1]]
    x64 = t["x"].double().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = moe_experts(x, ids, weights, t["gate_up"], t["down"], *lora, backend=backend)
    ref = moe_experts_reference(
        x64, ids, weights.double(), t["gate_up"].double(), t["down"].double(),
        *[(a.double(), b.double(), s) for a, b, s in lora],
    )  # fmt: skip
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.bfloat16, "out", TOL[torch.bfloat16])
    grad = torch.randn(out.shape[1], out.shape[0], device=DEVICE).t()
    out.backward(grad)
    ref.backward(grad.double())
    assert wide.grad.dtype == torch.float32
    assert_close(wide.grad[:, : x.shape[1]], x64.grad, torch.bfloat16, "dx", TOL[torch.bfloat16])
    assert torch.equal(wide.grad[:, x.shape[1] :], torch.zeros_like(x))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(backend="torch", r=4, dtype=torch.bfloat16), "grouped_mm does not take"),
        (dict(backend="fast"), "backend must be one of"),
        (dict(down_shape=(3, 48, 20)), "disagree"),
        (dict(lora_b_shape=(3, 48, 5)), "gate_up LoRA"),
        (dict(tokens=5), "routed tokens"),
    ],
    ids=["torch-backend-unaligned-rank", "unknown-backend", "down-shape", "lora-b-shape", "token-count"],
)
def test_refusals(change, message):
    dtype = change.get("dtype", torch.float32)
    E, H, inter, r = 3, 48, 24, change.get("r", 8)
    x = torch.randn(6, H, device=DEVICE).to(dtype)
    weights, ids = route(torch.randn(change.get("tokens", 6), E, device=DEVICE), 2, True)
    gate_up = torch.randn(E, 2 * inter, H, device=DEVICE).to(dtype)
    down = torch.randn(*change.get("down_shape", (E, H, inter)), device=DEVICE).to(dtype)
    lora_b = torch.randn(*change.get("lora_b_shape", (E, 2 * inter, r)), device=DEVICE)
    lora = (torch.randn(E, r, H, device=DEVICE), lora_b, 2.0)
    with pytest.raises(ValueError, match=message):
        moe_experts(x, ids, weights, gate_up, down, lora, None, backend=change.get("backend", "auto"))


@pytest.mark.parametrize("bad_id", [-1, 3])
def test_an_expert_id_out_of_range_is_an_error(bad_id):
    if DEVICE == "cuda":
        pytest.skip("on CUDA the check is a device-side assert, which ends the process's CUDA context")
    x = torch.randn(4, 48, device=DEVICE)
    ids = torch.tensor([[0, 1], [1, 2], [2, bad_id], [0, 2]], device=DEVICE)
    weights = torch.full((4, 2), 0.5, device=DEVICE)
    gate_up, down = torch.randn(3, 48, 48, device=DEVICE), torch.randn(3, 48, 24, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"expert id outside \[0, E\)"):
        moe_experts(x, ids, weights, gate_up, down, backend="torch")


# ----------------------------------------------------------------------------- transformers' blocks


def _block(family: str, renorm: bool = True):
    """A tiny random MoE block of transformers' family, and how ``route`` reproduces its router."""
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig as Config
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        config = Config(hidden_size=48, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                        norm_topk_prob=renorm)  # fmt: skip
        routing = dict(renormalize=renorm)
    elif family == "olmoe":
        from transformers.models.olmoe.configuration_olmoe import OlmoeConfig as Config
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block

        config = Config(
            hidden_size=48, intermediate_size=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=renorm
        )
        routing = dict(renormalize=renorm)
    elif family == "mixtral":
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig as Config
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        config = Config(hidden_size=48, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                        router_jitter_noise=0.0)  # fmt: skip
        routing = dict(renormalize=True, weights_dtype=torch.float32)
    else:
        from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig as Config
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock as Block

        config = Config(hidden_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=16, num_experts=6,
                        num_experts_per_tok=2)  # fmt: skip
        routing = dict(renormalize=True)
    config._experts_implementation = "eager"
    block = Block(config).to(DEVICE)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block, routing


FAMILIES = [("qwen3_moe", True), ("qwen3_moe", False), ("olmoe", False), ("mixtral", True), ("qwen3_5_moe", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family, renorm", FAMILIES, ids=lambda v: str(v))
def test_router_and_reference_match_transformers(family, renorm, dtype):
    """``route`` gives the family router's experts and weights (values and dtype) exactly; the reference loop
    gives its experts module's output and the gradients of x and of the routing weights."""
    block, routing = _block(family, renorm)
    block.to(dtype)
    x = torch.randn(11, 48, device=DEVICE).to(dtype)
    logits, hf_weights, hf_ids = block.gate(x)
    weights, ids = route(logits, block.gate.top_k, **routing)
    assert torch.equal(ids, hf_ids) and weights.dtype == hf_weights.dtype and torch.equal(weights, hf_weights)

    def grads(fn):
        x_ = x.detach().clone().requires_grad_()
        w_ = hf_weights.detach().clone().requires_grad_()
        out = fn(x_, hf_ids, w_)
        out.backward(torch.ones_like(out))
        return out, x_.grad, w_.grad

    experts = block.experts
    got = grads(lambda x_, i, w_: moe_experts_reference(x_, i, w_, experts.gate_up_proj, experts.down_proj))
    expected = grads(experts)
    for name, a, b in zip(("out", "dx", "dweights"), got, expected, strict=True):
        assert_close(a, b, dtype, f"{family} {name}", 1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_kernel_with_peft_expert_lora_matches_the_peft_block(family):
    """The whole block with PEFT's LoRA on both expert parameters (target_parameters) and a trained router:
    ``route`` + the kernel, fed PEFT's factors as A = lora_A.view(E, r, in), B = lora_B.view(out, r, E) moved
    to [E, out, r], gives the block's output and the gradients of x, the router and every adapter weight."""
    needs_triton_backend()
    from peft import LoraConfig, inject_adapter_in_model

    block, routing = _block(family)
    model = torch.nn.Module()
    model.mlp = block
    config = LoraConfig(r=4, lora_alpha=7, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    inject_adapter_in_model(config, model)
    wrappers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "parameter_name")}
    by_param = {m.parameter_name: m for m in wrappers.values()}
    with torch.no_grad():
        for m in wrappers.values():
            m.lora_B["default"].weight.normal_(0.0, 0.3)  # PEFT starts B at zero: no signal in dA
    block.gate.weight.requires_grad_(True)
    adapters = {f"{m.parameter_name}.lora_{ab}": getattr(m, f"lora_{ab}")["default"].weight
                for m in wrappers.values() for ab in "AB"}  # fmt: skip
    params = [block.gate.weight, *adapters.values()]
    x = torch.randn(1, 13, 48, device=DEVICE)

    def grads(forward):
        x_ = x.clone().requires_grad_()
        for p in params:
            p.grad = None
        out = forward(x_)
        out.backward(torch.cos(torch.arange(out.numel(), device=DEVICE, dtype=out.dtype)).view(out.shape))
        return [out, x_.grad] + [p.grad.clone() for p in params]

    def factors(m):
        E, r = m.num_experts, m.r["default"]
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        return a.view(E, r, a.shape[1]), b.view(b.shape[0], r, E).permute(2, 0, 1), m.scaling["default"]

    def ours(x_):
        flat = x_.view(-1, 48)
        weights, ids = route(torch.nn.functional.linear(flat, block.gate.weight), block.gate.top_k, **routing)
        base = by_param["gate_up_proj"].get_base_layer()
        while hasattr(base, "get_base_layer"):
            base = base.get_base_layer()
        out = moe_experts(flat, ids, weights, base.gate_up_proj, base.down_proj, factors(by_param["gate_up_proj"]),
                          factors(by_param["down_proj"]), backend="triton")  # fmt: skip
        return out.view(x_.shape)

    expected, got = grads(model.mlp), grads(ours)
    names = ["out", "dx", "drouter"] + [f"d{name}" for name in adapters]
    for name, a, b in zip(names, got, expected, strict=True):
        assert_close(a, b, torch.float32, f"{family} {name}", 1e-5)
