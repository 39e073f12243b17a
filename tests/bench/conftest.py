"""GPU op benchmarks: fusetune against the eager reference and Liger Kernel, timed with CUDA events.

Run: pytest tests/bench --benchmark-json=bench.json, then python scripts/bench_table.py bench.json.
pytest-benchmark records wall time per synchronized call; extra_info carries the CUDA-event median,
peak memory and achieved bandwidth or FLOP rate against ceilings measured in the same session.
test_profile_step.py is a CPU smoke test of the step profiler (scripts/profile_step.py over scripts/step_profiler/).
"""

import pytest
import torch


@pytest.fixture(scope="session")
def ceilings():
    """Measured device-to-device copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    from triton.testing import do_bench

    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return {"copy_bytes_per_s": 2 * 2**30 / (copy_ms * 1e-3), "matmul_flops_per_s": 2 * 8192**3 / (mm_ms * 1e-3)}
