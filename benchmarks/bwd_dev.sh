#!/usr/bin/env bash
# One device call of the backward development loop (benchmarks/bwd_dev.py): checks and timings of
# every op at the default configs, the fused RMSNorm, a sweep of the tiles, and
# ncu's per-kernel time and bytes. Logs under $OUT.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/mhc-out}"; mkdir -p "$OUT"
cd benchmarks
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/dev.log"
python bwd_dev.py "$@" 2>&1 | tee -a "$OUT/dev.log"
python bwd_dev.py --norm --ops pre fused_post_pre "$@" 2>&1 | tee -a "$OUT/dev.log"
# The backward's tiles (configs.BackwardRow): the grad_residual tile and the grad_fn GEMM's
# pipeline depth first (docs/tuning/triton.md, "Backward").
for s in "gres_bm=64 gres_bh=64" "gres_bm=16 gres_bh=256" "gres_warps=4" "gfn_stages=4" "gfn_bt=128" \
         "bh=64" "bm=128 stats_warps=8" "stats_stages=3"; do
  timeout 120 python bwd_dev.py --ops pre fused_post_pre --H 4096 --T 16384 --set $s 2>&1 | grep -v "^copy" | tee -a "$OUT/dev.log"
done
# post's backward (configs.PostBackwardRow): its tile and warps (1.23x the floor on the H200 at 4 warps, 1024 columns).
for s in "warps=8" "block_h=2048 warps=8" "block_h=512"; do
  timeout 60 python bwd_dev.py --ops post --H 4096 --T 16384 --set $s 2>&1 | grep -v "^copy" | tee -a "$OUT/dev.log"
done
timeout 150 ncu --clock-control none -k regex:'_bwd|prep' \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread \
  python bwd_dev.py --once --H 4096 --T 16384 > "$OUT/ncu.txt" 2>&1
grep -E "^  [_a-z]|duration|bytes|registers" "$OUT/ncu.txt" | head -90
