#!/usr/bin/env bash
# The trainer tests (library flow, QLoRA, packing, gradient accumulation) on a CUDA host, in one call.
set -uo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests/trainer -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/trainer.log" | tail -25
