#!/usr/bin/env bash
# QLoRA on a CUDA host, in one call: the 4-bit and offloading tests on the GPU (NF4 dequantization and the fused
# 4-bit LoRA node against bitsandbytes, offloaded checkpointing's gradients and memory, the bf16 QLoRA trainer
# path, the seed examples and examples/04_qlora.py), then the peer benchmark's scenarios (default S3).
#   TESTS="tests/kernels/test_nf4.py" SCENARIOS=S3 VARIANTS="unsloth fusetune_triton" bash scripts/gpu_qlora.sh
# Writes tests.log under $OUT, and what scripts/gpu_bench.sh writes.
set -uo pipefail
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
TESTS=${TESTS-tests/kernels/test_nf4.py tests/kernels/test_lora_nf4.py tests/library/test_lora_nf4_patch.py \
tests/kernels/test_offloaded_checkpoint.py tests/training/test_qlora.py tests/e2e/test_seeds.py \
tests/e2e/test_examples.py::test_example_runs[04_qlora.py]}
if [ -n "$TESTS" ]; then
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest $TESTS -n "${TEST_WORKERS:-4}" -q -rfs --tb=short \
    -p no:cacheprovider --durations=10 >"$OUT/tests.log" 2>&1
  tail -40 "$OUT/tests.log"
fi
[ -n "${SCENARIOS-S3}" ] && SCENARIOS=${SCENARIOS-S3} bash "$(dirname "$0")/gpu_bench.sh"
