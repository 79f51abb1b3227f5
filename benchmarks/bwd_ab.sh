#!/usr/bin/env bash
# One device call that times changes to the Triton backward against a base tree in the same run
# (the only comparison that counts: clocks and copy bandwidth move between machines and calls).
#   for b in main backward-x; do mkdir -p .ab/$b && git archive $b mhc benchmarks | tar -x -C .ab/$b; done
#   run: MHC_AB_TREES=".ab/main .ab/backward-x" bash benchmarks/bwd_ab.sh [bwd_dev.py args]   carry: [".ab"]
# Every tree of MHC_AB_TREES (default: .ab/main), then this working tree, runs `bwd_dev.py` (checks
# against the fp64 math, bitwise repeat, CUDA-graph replay against the floor) at the same
# arguments (default: --profile, per-kernel µs, of pre, head and fused_post_pre at H = 4096,
# T = 16384); then this tree's GPU autograd tests, unless MHC_AB_TESTS=0. Logs under $OUT
# (ab-K.log, K the tree's place in that list), the summaries printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mhc-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
args=("$@"); [[ ${#args[@]} -gt 0 ]] || args=(--profile --ops pre head fused_post_pre --H 4096 --T 16384)
read -ra trees <<< "${MHC_AB_TREES:-.ab/main}"
trees+=(.)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/device.txt"
for k in "${!trees[@]}"; do
  t=${trees[$k]}
  [[ -d $t/mhc ]] || { echo "no tree at $t (see this script's header)" > "$OUT/ab-$k.log"; continue; }
  (cd "$t/benchmarks" && PYTHONPATH=$(cd .. && pwd) timeout "${MHC_AB_S:-90}" python bwd_dev.py "${args[@]}") \
    > "$OUT/ab-$k.log" 2>&1
done
if [[ ${MHC_AB_TESTS:-1} != 0 ]]; then
  MHC_CHECK_LAUNCH_KEYS=1 timeout "${MHC_TESTS_S:-120}" python -m pytest -q --maxfail=3 -rs \
    tests/test_gpu_autograd.py -k "${MHC_TESTS_K:-not 100_runs}" > "$OUT/ab-tests.log" 2>&1
fi
for k in "${!trees[@]}"; do
  echo "== ${trees[$k]}"; grep -v "^copy" "$OUT/ab-$k.log" | tail -40
done
[[ -f $OUT/ab-tests.log ]] && { echo "== tests (this tree)"; tail -8 "$OUT/ab-tests.log"; }
exit 0
