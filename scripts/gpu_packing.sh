#!/usr/bin/env bash
# Packing on a CUDA host, in one call: the packing-isolation tests with PyTorch's varlen kernel,
# and the padding-free step profile (CPU time against GPU time) for SDPA and fusetune's varlen attention.
set -uo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -m pytest tests/trainer/test_packing.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/packing.log" | tail -12
python3 scripts/profile_step.py --out "$OUT/profile" --steps ${STEPS:-10} --warmup 3 --backends sdpa,varlen \
  --kernels triton 2>&1 | tail -40
