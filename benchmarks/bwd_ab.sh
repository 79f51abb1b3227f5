#!/usr/bin/env bash
# One device call that times a change to the Triton backward against a base tree in the same run
# (the only comparison that counts: clocks and copy bandwidth move between machines and calls).
#   git archive main mhc benchmarks | (mkdir -p .ab/base && tar -x -C .ab/base)   # the base, here
#   run: bash benchmarks/bwd_ab.sh [bwd_dev.py args]        carry: [".ab"]
# Both trees run `bwd_dev.py --profile` (checks against the fp64 math, bitwise repeat, CUDA-graph
# replay against the floor, per-kernel µs) at the same arguments (default: pre, head and
# fused_post_pre at H = 4096, T = 16384), the base first; then this tree's GPU autograd tests,
# unless MHC_AB_TESTS=0. Logs under $OUT; the two summaries printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mhc-out}"; mkdir -p "$OUT"
R=$PWD BASE="${MHC_AB_BASE:-$PWD/.ab/base}"
export PYTHONUNBUFFERED=1
args=("$@"); [[ ${#args[@]} -gt 0 ]] || args=(--profile --ops pre head fused_post_pre --H 4096 --T 16384)
[[ -d $BASE/mhc ]] || { echo "no base tree at $BASE (see this script's header)"; exit 2; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/device.txt"
(cd "$BASE/benchmarks" && PYTHONPATH=$BASE timeout "${MHC_AB_S:-90}" python bwd_dev.py "${args[@]}") > "$OUT/ab-base.log" 2>&1
(cd benchmarks && PYTHONPATH=$R timeout "${MHC_AB_S:-90}" python bwd_dev.py "${args[@]}") > "$OUT/ab-new.log" 2>&1
if [[ ${MHC_AB_TESTS:-1} != 0 ]]; then
  PYTHONPATH=$R MHC_CHECK_LAUNCH_KEYS=1 timeout "${MHC_TESTS_S:-120}" python -m pytest -q --maxfail=3 -rs \
    tests/test_gpu_autograd.py -k "${MHC_TESTS_K:-not 100_runs}" > "$OUT/ab-tests.log" 2>&1
fi
echo "== base ($BASE)"; grep -v "^copy" "$OUT/ab-base.log" | tail -40
echo "== this tree"; grep -v "^copy" "$OUT/ab-new.log" | tail -40
[[ -f $OUT/ab-tests.log ]] && { echo "== tests"; tail -8 "$OUT/ab-tests.log"; }
exit 0
