#!/usr/bin/env bash
# The peer benchmark (scripts/bench.py) on a CUDA host, in one call: hf, liger, unsloth and fusetune on the
# same LoRA/QLoRA steps, each variant in its own subprocess. All scenarios take long, so pick some:
#   SCENARIOS="S1 S4" bash scripts/gpu_bench.sh
#   SCENARIOS=S3 VARIANTS="hf unsloth fusetune_triton" bash scripts/gpu_bench.sh
#   SCENARIOS=S5 VARIANTS="unsloth fusetune_triton" \
#     BENCH_ARGS="--s5-memory-gib 24 --s5-min 32768 --s5-probes 4 --s5-together" bash scripts/gpu_bench.sh
# Environment: SCENARIOS (default all), VARIANTS (default hf liger unsloth fusetune_triton),
# STEPS / WARMUP (default: per scenario), BUDGET (seconds for bench.py, default 500: a subprocess gets at most what
# is left, later ones are skipped), TIMEOUT (per subprocess), BENCH_ARGS (more bench.py flags).
# Families beyond Llama (8x2048): SCENARIOS=S6 (Qwen3.5-2B), S7 (Gemma 3 4B), S8 (Phi-4-mini), S9 (its QLoRA).
# DPO through each variant's trainer (LoRA, 4 pairs of 2x2048 a step): SCENARIOS="D1 D8" (Llama-3.2-1B, 3.1-8B).
# Wheels: .whl/*.whl as for every GPU script (scripts/gpu_env.sh); the peers from .whl-peers/ (wheelhouse.py
# --peers-only --peers liger,unsloth, carried beside .whl) or .whl/: liger's wheel into /tmp/site, and
# unsloth/*.whl installed apart into /tmp/unsloth-site and put first on the path of the unsloth subprocess
# only (it pins trl<=1.15; fusetune needs trl 1.16).
# Writes under $OUT, in few files: <date>-<gpu>-peers.jsonl and .md, bench.log, env.txt, logs.tgz (the tail of
# every subprocess's log). Model folders are kept in $SCRATCH (default /tmp/fusetune-bench) for the next run.
set -uo pipefail
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
SCRATCH=${SCRATCH:-/tmp/fusetune-bench}
PEERS=$([ -d .whl-peers ] && echo .whl-peers || echo .whl)
if compgen -G "$PEERS/liger_kernel-*.whl" >/dev/null && ! python3 -c "import liger_kernel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$PEERS"/liger_kernel-*.whl || echo "liger wheel: install failed; liger will be reported as skipped"
fi
if compgen -G "$PEERS/unsloth/*.whl" >/dev/null && [ ! -d /tmp/unsloth-site/unsloth ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/unsloth-site \
    "$PEERS"/unsloth/*.whl || echo "unsloth wheels: install failed; unsloth will be reported as skipped"
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  python3 -m pip list 2>/dev/null | grep -iE "^(trl|bitsandbytes|liger|datasets|accelerate) "
  [ -d /tmp/unsloth-site ] && ls /tmp/unsloth-site | grep -iE "dist-info$" | sed 's/^/unsloth-site: /'
  free -g | head -2
  df -h /tmp | tail -1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

BUDGET=${BUDGET:-500}
# shellcheck disable=SC2086
timeout -s TERM $((BUDGET + 40)) python3 scripts/bench.py \
  --scenarios "${SCENARIOS:-all}" --variants "${VARIANTS:-hf liger unsloth fusetune_triton}" \
  ${STEPS:+--steps $STEPS} ${WARMUP:+--warmup $WARMUP} ${TIMEOUT:+--timeout $TIMEOUT} --budget "$BUDGET" \
  --out "$OUT" --scratch "$SCRATCH" --unsloth-site /tmp/unsloth-site ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"

# every subprocess's log, cut to its last 256 KiB
if [ -d "$SCRATCH/logs" ]; then
  rm -rf /tmp/bench-logs && mkdir -p /tmp/bench-logs
  for f in "$SCRATCH"/logs/*.log; do tail -c 262144 "$f" >"/tmp/bench-logs/$(basename "$f")"; done
  tar czf "$OUT/logs.tgz" -C /tmp bench-logs
fi
ls -la "$OUT"
