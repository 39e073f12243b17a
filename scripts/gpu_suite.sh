#!/usr/bin/env bash
# The GPU checks and timings that belong together, in one call on a CUDA host:
# the whole kernel suite with its `gpu` shapes, the op benchmarks against the eager
# reference and Liger Kernel, and a short kernels=triton run of the embedded default.
# Wheels for what the host lacks lie in .whl/ (scripts/wheelhouse.py, plus fusetune's own).
# Results go to $OUT (default: outputs/gpu).
set -uo pipefail
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers, trl, peft, liger_kernel, importlib.metadata as m; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', \
transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| liger', m.version('liger-kernel'))"
} 2>&1 | tee "$OUT/env.txt"

python3 -m pytest ${KERNEL_TESTS:-tests/kernels tests/library} -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/kernels.log" | tail -25
python3 -m pytest tests/bench -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
  --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench.log" | tail -8
python3 scripts/bench_table.py "$OUT/bench.json" | tee "$OUT/bench.md"
python3 train.py kernels=triton logger=none trainer.max_steps=100 save_model=false \
  hydra.run.dir=/tmp/gpu_run 2>&1 | grep -v "it/s]" | tail -8 | tee "$OUT/train.log"
cp /tmp/gpu_run/summary.json "$OUT/train_summary.json" 2>/dev/null || true
