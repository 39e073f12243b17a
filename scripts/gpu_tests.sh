#!/usr/bin/env bash
# The whole suite on a CUDA host in one call, pytest-xdist over the cores, each failure printed as it happens. The
# wheels of .whl/: scripts/wheelhouse.py --extras dev --skip wandb,ruff,scipy --pin datasets==4.8.5 --have
# scripts/hosts/cuda-image.txt (every package the app imports, hydra's launchers included; the tests of
# W&B and of Optuna's TPE sampler skip, saying so). check_cost and the bench need `source scripts/gpu_env.sh` again.
# Results in $OUT: env.txt, suite.log (every test's line), junit.xml.
# Environment: WORKERS (default: the cores less two), TESTS_TIMEOUT (seconds, default 480), PYTEST_ARGS.
set -uo pipefail
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import importlib.metadata as m; print(' '.join(f'{n} {m.version(n)}' for n in \
('torch', 'triton', 'transformers', 'trl', 'peft', 'accelerate', 'bitsandbytes', 'datasets')))"
} 2>&1 | tee "$OUT/env.txt"
workers=${WORKERS:-$(($(nproc) - 2))}
timeout "${TESTS_TIMEOUT:-480}" python3 -m pytest tests -n "$workers" --dist loadfile -v -p no:cacheprovider \
  --tb=short -rfEs --durations=20 --junitxml="$OUT/junit.xml" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/suite.log" \
  | grep --line-buffered -E "(FAILED|ERROR) |^(FAILED|ERROR|SKIPPED) |passed|failed|^=+ .*(slowest|short test summary)"
exit "${PIPESTATUS[0]}"
