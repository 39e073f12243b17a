#!/usr/bin/env bash
# CUDA-only checks on a CUDA host, in one call, then one scenario of the peer benchmark beyond Llama:
#   the CUDA cases of the FP8, MoE, smart-checkpointing, add+norm and graph tests (pytest-xdist),
#   the load-time self-check's cost on Phi-4-mini, and S8 (Phi-4-mini LoRA 8x2048) against the peers.
# Environment: TESTS_TIMEOUT (default 200 s), SCENARIOS (default S8), BUDGET (default 230 s).
set -uo pipefail
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -n 8 -q -p no:cacheprovider -rfEs \
  tests/kernels/test_fp8.py tests/kernels/test_moe.py tests/training/test_smart_checkpointing.py \
  tests/library/test_add_norm_patch.py tests/sequences/test_graphs.py tests/library/test_fp8_base.py \
  2>&1 | tail -60 | tee "$OUT/gpu_tests.log"
timeout 60 python3 scripts/check_cost.py --archs phi4_mini --backend triton 2>&1 | tail -8 | tee "$OUT/check_cost.jsonl"
SCENARIOS=${SCENARIOS:-S8} BUDGET=${BUDGET:-230} bash "$(dirname "$0")/gpu_bench.sh" 2>&1 | tail -30
