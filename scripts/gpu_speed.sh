#!/usr/bin/env bash
# The speed levers on S1 (Llama-3.2-1B LoRA, 8x2048) on a CUDA host, in one call, each a bench run of its own:
# the CUDA cases of the FP8 and smart-checkpointing tests, then fusetune offloaded (the seeds' mode), smart,
# smart with FP8 base GEMMs, and Unsloth beside them; then S7 (Gemma 3 4B); then the CUDA test cases.
# SHORT=1: the three fusetune runs and the tests only.
# Writes under $OUT: tests.log, and <run>.jsonl / <run>.md per bench run.
set -uo pipefail
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
FINAL=$OUT
bench() {  # name, then the environment of gpu_bench.sh
  local name=$1
  shift
  env OUT="/tmp/speed/$name" "$@" bash "$(dirname "$0")/gpu_bench.sh" 2>&1 | grep -E "^\[bench.*(tok/s|skipped|failed)" 
  for f in /tmp/speed/"$name"/*-peers.*; do cp "$f" "$FINAL/$name.${f##*.}"; done
}
bench s1-offload SCENARIOS=S1 VARIANTS=fusetune_triton BUDGET=90
bench s1-smart SCENARIOS=S1 VARIANTS=fusetune_triton BUDGET=90 BENCH_ARGS="--fusetune-checkpointing smart"
bench s1-smart-fp8 SCENARIOS=S1 VARIANTS=fusetune_triton BUDGET=90 \
  BENCH_ARGS="--fusetune-checkpointing smart --fusetune-fp8"
[ -n "${SHORT:-}" ] || bench s1-unsloth SCENARIOS=S1 VARIANTS=unsloth BUDGET=130
[ -n "${SHORT:-}" ] || bench s7 SCENARIOS=S7 VARIANTS="fusetune_triton liger unsloth hf" BUDGET="${S7_BUDGET:-150}"
timeout "${TESTS_TIMEOUT:-90}" python3 -m pytest -n 8 -q -p no:cacheprovider --tb=short \
  tests/kernels/test_fp8.py tests/library/test_fp8_base.py tests/training/test_smart_checkpointing.py \
  >"$FINAL/tests.log" 2>&1
tail -3 "$FINAL/tests.log"
