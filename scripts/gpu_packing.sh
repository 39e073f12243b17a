#!/usr/bin/env bash
# Packing on a CUDA host, in one call: the packing-isolation tests with PyTorch's varlen kernel,
# and the padding-free step profile (CPU time against GPU time, host syncs) for SDPA, fusetune's
# varlen attention, and FastSFTTrainer.train() on the same documents.
#   TESTS: the tests run first (default: the packing tests); SKIP_TESTS=1 skips them
#   EXTRA_TESTS="tests/training/test_library.py -k merge"  also runs those tests, last
#   DOCS, BACKENDS, TRAINER, STEPS, WARMUP: passed to scripts/profile_step.py
set -uo pipefail
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  # shellcheck disable=SC2086
  python3 -m pytest ${TESTS:-tests/sequences/test_varlen.py} -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/packing.log" | tail -12
fi
python3 scripts/profile_step.py --out "$OUT/profile" --steps ${STEPS:-10} --warmup ${WARMUP:-3} --docs ${DOCS:-8} \
  --backends ${BACKENDS:-sdpa,varlen_peft_lora,varlen} --kernels triton --trainer "${TRAINER-fused,trl}" 2>&1 | tail -60
if [ -n "${EXTRA_TESTS:-}" ]; then
  # shellcheck disable=SC2086
  python3 -m pytest $EXTRA_TESTS -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/extra_tests.log" | tail -12
fi
