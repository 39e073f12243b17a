"""Forward+backward of each op at Llama-3-8B shapes (8192 tokens, hidden 4096, vocab 128256), bf16."""

import importlib.util

import pytest
import torch

from fusetune_kernels import cross_entropy as ce
from fusetune_kernels import fused_linear_cross_entropy as flce
from fusetune_kernels import glu, rms_norm, rope

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
T, H, INTER, V, HEADS, KV, D = 8192, 4096, 14336, 128256, 32, 8, 128
BF16 = torch.bfloat16


# Resolved once, so Liger's timed calls pay an attribute lookup like ours, not an import.
LIGER = importlib.import_module("liger_kernel.transformers.functional") if HAS_LIGER else None


def rand(*shape, grad=False, dtype=BF16):
    return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=grad)


def labels_with_ignored(n, vocab):
    labels = torch.randint(0, vocab, (n,), device="cuda")
    labels[torch.rand(n, device="cuda") < 0.25] = -100
    return labels


# Each case: name -> (make inputs, {impl: op}, bytes moved by fwd+bwd at minimum, or None, flops, or None)
def rms_case():
    x, w = rand(T, H, grad=True), rand(H)
    dy = rand(T, H)
    impls = {
        "fusetune": lambda: rms_norm.rms_norm(x, w, 1e-5),
        "reference": lambda: rms_norm.rms_norm_reference(x, w, 1e-5),
        "liger": lambda: LIGER.liger_rms_norm(x, w, 1e-5, in_place=False),
    }
    return impls, lambda out: out.backward(dy), 5 * T * H * 2, None


def rope_case():
    q = rand(4, T // 4, HEADS, D).transpose(1, 2).requires_grad_()
    k = rand(4, T // 4, KV, D).transpose(1, 2).requires_grad_()
    pos = torch.arange(T // 4, device="cuda")
    freqs = pos[:, None] / 500000 ** (torch.arange(0, D, 2, device="cuda") / D)
    emb = torch.cat([freqs, freqs], -1)[None]
    cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
    dq, dk = rand(*q.shape), rand(*k.shape)
    impls = {
        "fusetune": lambda: rope.rope(q, k, cos, sin),
        "reference": lambda: rope.rope_reference(q, k, cos, sin),
        "liger": lambda: LIGER.liger_rope(q, k, cos, sin),
    }
    return impls, lambda out: torch.autograd.backward(out, (dq, dk)), 4 * (q.numel() + k.numel()) * 2, None


def glu_case(kind):
    gate, up, dy = rand(T, INTER, grad=True), rand(T, INTER, grad=True), rand(T, INTER)
    if kind == "swiglu":
        impls = {
            "fusetune": lambda: glu.swiglu(gate, up),
            "reference": lambda: glu.swiglu_reference(gate, up),
            "liger": lambda: LIGER.liger_swiglu(gate, up),
        }
    else:  # Liger's GeGLU is the tanh approximation
        impls = {
            "fusetune": lambda: glu.geglu(gate, up, "tanh"),
            "reference": lambda: glu.geglu_reference(gate, up, "tanh"),
            "liger": lambda: LIGER.liger_geglu(gate, up),
        }
    return impls, lambda out: out.backward(dy), 8 * T * INTER * 2, None


def ce_case():
    logits, labels = rand(T, V, grad=True), labels_with_ignored(T, V)
    impls = {
        "fusetune": lambda: ce.cross_entropy(logits, labels),
        "reference": lambda: ce.cross_entropy_reference(logits, labels),
        "liger": lambda: LIGER.liger_cross_entropy(logits, labels),
    }
    kept = (labels != -100).float().mean().item()  # ignored rows are neither read nor scored
    return impls, lambda out: out.backward(), (2 * kept + 1) * T * V * 2, None


def flce_case():
    hidden, weight, labels = rand(T, H, grad=True), rand(V, H) * 0.02, labels_with_ignored(T, V)
    impls = {
        "fusetune": lambda: flce.fused_linear_cross_entropy(hidden, weight, labels),
        "reference": lambda: flce.fused_linear_cross_entropy_reference(hidden, weight, labels),
        "liger": lambda: LIGER.liger_fused_linear_cross_entropy(hidden, weight, labels),
    }
    kept = (labels != -100).float().mean().item()
    return impls, lambda out: out.backward(), None, 2 * 2 * kept * T * H * V  # logits, dhidden (frozen head)


CASES = {
    "rms_norm": rms_case,
    "rope": rope_case,
    "swiglu": lambda: glu_case("swiglu"),
    "geglu_tanh": lambda: glu_case("geglu"),
    "cross_entropy": ce_case,
    "fused_linear_ce": flce_case,
}


def gpu_kernel_ms(step, repeats: int = 5) -> float:
    """GPU time of one step: the profiler's sum of device kernel durations, median over repeats."""
    from torch.profiler import ProfilerActivity, profile

    times = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        times.append(sum(e.device_time_total for e in prof.key_averages()) / 1e3)
    return sorted(times)[len(times) // 2]


def _leaves(fn):
    """The tensors an impl lambda closes over (its inputs)."""
    cells = [c.cell_contents for c in (fn.__closure__ or ())]
    return [c for c in cells if isinstance(c, torch.Tensor) and c.is_leaf]


@pytest.mark.parametrize("impl", ["fusetune", "reference", "liger"])
@pytest.mark.parametrize("op", list(CASES))
def test_op_fwd_bwd(benchmark, ceilings, op, impl):
    from triton.testing import do_bench

    if impl == "liger" and LIGER is None:
        pytest.skip("liger-kernel is not installed")

    torch.manual_seed(0)
    impls, backward, nbytes, flops = CASES[op]()
    fn = impls[impl]

    leaves = [t for t in _leaves(fn) if t.requires_grad]

    def step():
        for t in leaves:  # no gradient accumulation inside the timings
            t.grad = None
        backward(fn())

    step()  # compile and warm up outside the measurements
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    median_ms = do_bench(step, warmup=25, rep=200, grad_to_none=None, return_mode="median")
    kernel_ms = gpu_kernel_ms(step)
    info = {"op": op, "impl": impl, "cuda_median_ms": median_ms, "kernel_ms": kernel_ms, "peak_extra_gib": peak / 2**30}
    if nbytes:  # judged on GPU kernel time: the launch gaps of an isolated op are CPU time
        info["bandwidth_fraction"] = nbytes / (kernel_ms * 1e-3) / ceilings["copy_bytes_per_s"]
    if flops:
        info["matmul_fraction"] = flops / (kernel_ms * 1e-3) / ceilings["matmul_flops_per_s"]
    info.update({k: v for k, v in ceilings.items()})
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)
