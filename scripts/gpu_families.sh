#!/usr/bin/env bash
# The families' checks on a CUDA host, in one call: what the load-time self-check costs (scripts/check_cost.py:
# cold, warm Triton cache, cached verdicts) beside building the full-size model, then the whole suite on
# the GPU (pytest-xdist), the coverage test with kernels=triton on real Triton included.
# Environment: ARCHS (default llama3_1b), SUITE (default: tests), SUITE_TIMEOUT (seconds, default 420).
set -uo pipefail
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, \
'| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
python3 scripts/check_cost.py --archs ${ARCHS:-llama3_1b} --backend triton 2>&1 | tee "$OUT/check_cost.jsonl"
timeout "${SUITE_TIMEOUT:-420}" python3 -m pytest ${SUITE:-tests} -n 12 --dist loadfile -q -p no:cacheprovider -rfE \
  --durations=15 2>&1 | tail -80 | tee "$OUT/suite.log"
