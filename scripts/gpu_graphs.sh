#!/usr/bin/env bash
# CUDA graphs on a CUDA host, in one call. First the graph, packing, trainer and example tests with the
# shipped defaults (graphs on where safe, non-blocking batch copies), then eager against graphed steps
# (scripts/profile_step.py, Llama-3.2-1B shapes, LoRA r=16, triton kernels):
#   p8:   8 documents a step (4.7k tokens, the CPU-bound case): bare loop, and FastSFTTrainer with
#         blocking and non-blocking batch copies;
#   p32:  32 documents (17k tokens, GPU-bound): what the padding costs where the host is not the limit;
#   gc8:  8 documents with gradient checkpointing.
# Writes tests.log, profile.log and <run>/profile.{json,md} under $OUT.
#   TESTS="tests/sequences/test_graphs.py" TEST_WORKERS=4 RUNS="p8" BACKENDS= TRAINER=fused,graphs bash scripts/gpu_graphs.sh
set -uo pipefail
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, trl, peft; print(torch.__version__, torch.version.cuda, \
triton.__version__, transformers.__version__, trl.__version__, peft.__version__)"
} 2>&1 | tee "$OUT/tests.log"
# TESTS: the tests (empty: none); TEST_WORKERS: pytest-xdist processes; RUNS: which profiles, in order
TESTS=${TESTS-tests/training tests/sequences tests/library tests/e2e/test_examples.py}
if [ -n "$TESTS" ]; then
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest $TESTS ${TEST_WORKERS:+-n $TEST_WORKERS} -q -rfs --tb=short \
    -p no:cacheprovider --durations=8 >>"$OUT/tests.log" 2>&1
  tail -30 "$OUT/tests.log"
fi

profile() {
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$OUT/profile.log"
  timeout "${PROFILE_TIMEOUT:-240}" python3 scripts/profile_step.py --out "$OUT/$name" --kernels triton "$@" \
    >>"$OUT/profile.log" 2>&1 || echo "$name: exit $?"
  # the summary tables only: backends, then the trainer's
  sed -n '/^| backend/,/^$/p;/^| variant/,/^$/p;/^- .*buckets captured/p' "$OUT/$name/profile.md" 2>/dev/null
}
for run in ${RUNS:-p8 p32 gc8}; do
  case $run in
    p8) profile p8 --docs 8 --warmup "${WARMUP:-30}" --steps "${STEPS:-20}" --backends "${BACKENDS-varlen,varlen_graphs}" \
      --trainer "${TRAINER-fused,fused_async,graphs,graphs_async}" ;;
    p32) profile p32 --docs 32 --warmup 20 --steps 10 --backends varlen,varlen_graphs ;;
    gc8) profile gc8 --docs 8 --warmup 30 --steps 20 --backends varlen,varlen_graphs --gradient-checkpointing ;;
    *) echo "unknown run $run (p8, p32, gc8)" ;;
  esac
done
