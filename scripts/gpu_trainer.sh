#!/usr/bin/env bash
# The trainer tests (library flow, QLoRA, packing, gradient accumulation) on a CUDA host, in one call.
set -uo pipefail
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests/training -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/trainer.log" | tail -25
